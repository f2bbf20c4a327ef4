r"""The autodiff toolbox every stage uses: per-sample VJPs, one-hot cotangents, JVPs.

With ``F(θ, X)`` the batch function (:class:`~lowrank_ggn.core.model.FunctionalModel`)
and ``f(θ, x)`` its per-sample restriction:

* :func:`per_sample_vjps`: ``J_θ f(x_n)ᵀ w_n`` for each sample, optionally for
  several cotangents per sample (``vmap`` over samples of a ``vjp``; for modules
  without batching rules, such as ``nn.LSTM``, a loop over batches of one sample);
  valid on the per-sample path only;
* :func:`batched_grad`: VJPs of a recorded graph for a batch of cotangents (a loop
  of backward passes on CPUs, one batched pass elsewhere);
* :func:`one_hot_cotangents`: ``e_n ⊗ w_n``, the cotangents whose full-batch VJPs
  ``J_θF(X)ᵀ (e_n ⊗ w_n) = J_θF_nᵀ w_n`` are per-component quantities on any path;
* :func:`batch_jvps`: ``J_θF(X) · t_k`` for parameter tangents (forward mode, or
  double backward for modules without forward-mode AD, such as CPU attention);
* :func:`graph_jvps`: the same products from a retained autograd graph with two
  reverse-mode passes, ``J t = ∂/∂w ⟨Jᵀ w, t⟩``: no forward pass, and it works for
  modules without forward-mode AD.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

from lowrank_ggn.core.inputs import ModelInputs, as_inputs
from lowrank_ggn.core.model import FunctionalModel

#: Phrases by which ``vmap`` or forward-mode AD say an operator has no rule.
_NO_RULE = ("batching rule", "vmap", "functorch", "forward ad", "not implemented",
            "does not support")


def vmappable(model: torch.nn.Module) -> bool:
    """Whether ``vmap`` can run ``model``: not with recurrent layers.

    The fused kernels of ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` have no batching
    rules; those models are evaluated one sample at a time instead.
    """
    return not any(isinstance(m, torch.nn.RNNBase) for m in model.modules())


@contextmanager
def quiet_fallbacks() -> Iterator[None]:
    """Silence torch's "performance drop" notes for ops ``vmap`` loops over itself.

    They are about speed, not correctness (e.g. CPU attention, ``EmbeddingBag``);
    the results are exact either way.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*performance drop because we have not yet implemented"
        )
        yield


def no_rule(err: BaseException) -> bool:
    """Whether ``err`` says that ``vmap``/forward-mode AD lacks a rule (not a bug)."""
    text = f"{type(err).__name__}: {err}".lower()
    return isinstance(err, (RuntimeError, NotImplementedError)) and any(
        phrase in text for phrase in _NO_RULE
    )


def per_sample_vjps(
    fmodel: FunctionalModel,
    inputs: Tensor | ModelInputs,
    cotangents: Tensor,
    columns: bool = False,
) -> tuple[Tensor, ...]:
    """``J_θ f(x_n)ᵀ w_n`` per sample, as per-parameter tensors.

    ``vmap`` over the samples where every module has batching rules; otherwise
    (``nn.LSTM``, ``nn.GRU``) one forward pass per sample on a batch of one and its
    backward passes: the same numbers, linear in ``B``, with Python overhead.

    Args:
        fmodel: The model (its :meth:`~FunctionalModel.single` is differentiated).
        inputs: ``B`` samples (split entries ``[B, *in]``).
        cotangents: ``[B, *out]``, or ``[B, C, *out]`` with ``columns=True``.
        columns: ``C`` cotangents per sample (one forward, ``C`` backward each).

    Returns:
        Per parameter ``[B, *θ_p]`` (``[B, C, *θ_p]`` with ``columns``).
    """
    inputs = as_inputs(inputs)
    theta = fmodel.primals()

    def sample(split: list[Tensor], w: Tensor) -> tuple[Tensor, ...]:
        x = inputs.with_tensors(split, 1)
        _, fn = vjp(lambda th: fmodel.single(th, x), theta)
        return vmap(fn)(w)[0] if columns else fn(w)[0]

    if not vmappable(fmodel.model):
        return _looped_vjps(fmodel, inputs, cotangents, columns)
    try:
        with quiet_fallbacks():
            return vmap(sample)(inputs.tensors, cotangents)
    except (RuntimeError, NotImplementedError) as err:
        if not no_rule(err):
            raise
        return _looped_vjps(fmodel, inputs, cotangents, columns)


def _looped_vjps(
    fmodel: FunctionalModel, inputs: ModelInputs, cotangents: Tensor, columns: bool
) -> tuple[Tensor, ...]:
    """:func:`per_sample_vjps` one sample at a time, with plain autograd."""
    params = [t.detach().requires_grad_(True) for t in fmodel.primals()]
    rows: list[list[Tensor]] = [[] for _ in params]
    for n in range(inputs.size):
        with torch.enable_grad():
            out = fmodel(params, inputs.select([n])).squeeze(0)
        ws = cotangents[n] if columns else cotangents[n].unsqueeze(0)
        per_column = [
            torch.autograd.grad(out, params, w, retain_graph=True, allow_unused=True)
            for w in ws
        ]
        for p, r, grads in zip(params, rows, zip(*per_column)):
            g = torch.stack([torch.zeros_like(p) if x is None else x for x in grads])
            r.append(g if columns else g[0])
    return tuple(torch.stack(r) for r in rows)


def batched_grad(
    outputs: Tensor | Sequence[Tensor],
    inputs: Sequence[Tensor],
    cotangents: Tensor | Sequence[Tensor],
) -> list[Tensor | None]:
    """``∂⟨outputs, cot_b⟩/∂inputs`` for a batch of cotangents ``[B, *out]``: ``[B, *in]``.

    On CPUs the ``B`` backward passes run one after another: batched autodiff
    (``is_grads_batched``) measured 1.5–2× slower per column there for convolutional
    networks and transformers alike. Elsewhere one batched pass. An input that no output reaches gives
    ``None``.
    """
    outs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    cots = [cotangents] if isinstance(cotangents, Tensor) else list(cotangents)
    if not inputs:
        return []
    if cots[0].device.type != "cpu":
        return list(
            torch.autograd.grad(
                outs,
                inputs,
                cots,
                retain_graph=True,
                is_grads_batched=True,
                allow_unused=True,
            )
        )
    per_column = [
        torch.autograd.grad(
            outs, inputs, [c[b] for c in cots], retain_graph=True, allow_unused=True
        )
        for b in range(cots[0].shape[0])
    ]
    return [
        None if column[0] is None else torch.stack(column)
        for column in zip(*per_column)
    ]


def one_hot_cotangents(values: Tensor, start: int, batch_size: int) -> Tensor:
    """``e_n ⊗ w_n`` for ``n = start, start+1, …``: ``[B, *out] -> [B, N, *out]``."""
    B = values.shape[0]
    cot = values.new_zeros(B, batch_size, *values.shape[1:])
    rows = torch.arange(B, device=values.device)
    cot[rows, rows + start] = values
    return cot


def batch_jvps(
    fmodel: FunctionalModel,
    inputs: Tensor | ModelInputs,
    tangents: Tensor,
    chunk: int,
) -> Tensor:
    """``J_θF(X) · t_k`` for flat tangents ``[K, D]``: ``[K, N, *out]``.

    Forward mode (one vmapped JVP per chunk; attention runs on its composite
    backend, :func:`~lowrank_ggn.core.model.composite_attention`).
    For an operator without forward-mode AD, one forward pass with its graph and
    :func:`graph_jvps`; without double backward either (``nn.EmbeddingBag``),
    :func:`jacobian_jvps`.
    """
    theta = fmodel.primals()

    def push(t: Tensor) -> Tensor:
        return jvp(lambda th: fmodel(th, inputs), (theta,), (fmodel.unflatten(t),))[1]

    try:  # attention runs on its composite backend inside every model call
        return vmap(push, chunk_size=max(1, chunk))(tangents)
    except (RuntimeError, NotImplementedError) as err:
        if not no_rule(err):
            raise
    params = [t.detach().requires_grad_(True) for t in theta]
    with torch.enable_grad():
        graph = fmodel(params, inputs)
    return reverse_jvps(graph, params, fmodel.unflatten(tangents), chunk)


def reverse_jvps(
    graph: Tensor, params: list[Tensor], tangents: tuple[Tensor, ...], chunk: int
) -> Tensor:
    """``J t_k`` from a graph in reverse mode only.

    :func:`graph_jvps`, else :func:`jacobian_jvps` for operators without double
    backward.
    """
    try:
        return graph_jvps(graph, params, tangents)
    except (RuntimeError, NotImplementedError) as err:
        if not no_rule(err):
            raise
    return jacobian_jvps(graph, params, tangents, chunk)


def jacobian_jvps(
    graph: Tensor, params: list[Tensor], tangents: tuple[Tensor, ...], chunk: int
) -> Tensor:
    """``J t_k`` from the rows of the batch Jacobian: first derivatives only.

    One backward pass per output entry (``N·O`` for outputs ``[N, *out]``,
    ``O = Π out``), each row contracted with the tangents at once: the last resort
    for operators with neither forward-mode AD nor double backward.

    Args:
        graph: Batch outputs ``[N, *out]`` in the autograd graph of ``params``.
        params: The parameters.
        tangents: Per parameter ``[K, *θ_p]``.
        chunk: Rows per batched backward pass.

    Returns:
        ``[K, N, *out]``.
    """
    M = graph.numel()
    flat_t = torch.cat([t.flatten(1) for t in tangents], dim=1)  # [K, D]
    out = graph.new_zeros(M, flat_t.shape[0])
    for start in range(0, M, max(1, chunk)):
        stop = min(M, start + max(1, chunk))
        rows = []
        for i in range(start, stop):
            cot = torch.zeros(M, dtype=graph.dtype, device=graph.device)
            cot[i] = 1.0
            grads = torch.autograd.grad(
                graph, params, cot.view_as(graph), retain_graph=True, allow_unused=True
            )
            rows.append(
                torch.cat(
                    [
                        (torch.zeros_like(p) if g is None else g).flatten()
                        for g, p in zip(grads, params)
                    ]
                )
            )
        out[start:stop] = torch.stack(rows) @ flat_t.T
    return out.T.reshape(-1, *graph.shape).detach()


def graph_jvps(
    graph: Tensor, params: list[Tensor], tangents: tuple[Tensor, ...]
) -> Tensor:
    """``J t_k`` from the graph of ``graph = F(θ, X)`` by double backward.

    ``g(w) = Jᵀ w`` is linear in the cotangent ``w``, so ``∂⟨g(w), t⟩/∂w = J t``:
    one backward pass with ``create_graph`` builds ``g``, one batched backward pass
    per chunk of tangents differentiates it.

    Args:
        graph: The batch outputs ``[N, *out]`` in the autograd graph of ``params``.
        params: The parameters.
        tangents: Per parameter ``[K, *θ_p]``.

    Returns:
        ``[K, N, *out]``.
    """
    K = tangents[0].shape[0] if tangents else 0
    w = torch.zeros_like(graph, requires_grad=True)
    with torch.enable_grad():
        grads = torch.autograd.grad(
            graph, params, w, create_graph=True, allow_unused=True
        )
    used = [
        (g, t) for g, t in zip(grads, tangents) if g is not None and g.requires_grad
    ]
    if not used or K == 0:
        return graph.new_zeros(K, *graph.shape)
    outs, tans = zip(*used)
    try:
        (Jt,) = torch.autograd.grad(
            outs, w, tans, retain_graph=True, is_grads_batched=True, allow_unused=True
        )
    except RuntimeError:  # no batching rule for a double-backward op: one by one
        Jt = torch.stack(
            [
                torch.autograd.grad(
                    outs, w, [t[k] for t in tans], retain_graph=True, allow_unused=True
                )[0]
                for k in range(K)
            ]
        )
    return graph.new_zeros(K, *graph.shape) if Jt is None else Jt.detach()


__all__ = [
    "batch_jvps",
    "batched_grad",
    "graph_jvps",
    "jacobian_jvps",
    "no_rule",
    "one_hot_cotangents",
    "per_sample_vjps",
    "reverse_jvps",
    "vmappable",
]
