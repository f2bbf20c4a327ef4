r"""Backpropagated loss-Hessian factors ``V = [J_θF_nᵀ s_nc]`` and products with ``Jᵀ``.

One forward pass of the whole batch linearises the model:

.. math::
    G = J^⊤ (∇²_F L) J = \sum_{n,c} v_{nc} v_{nc}^⊤, \qquad
    v_{nc} = (J_θ F_n)^⊤ s_{nc} ∈ ℝ^D,

with ``S`` from :mod:`lowrank_ggn.core.loss_factors`. The columns are ordered
**sample-major**: column ``i = n·C + c``. ``V`` is ``[D, N·C]``; this module returns
it transposed, as per-parameter blocks ``[N·C, *θ_p.shape]``.

Two paths compute ``V`` (see :mod:`lowrank_ggn.core.paths` for the choice):

* ``per_sample``: ``F_n = f(x_n)``, so ``v_{nc} = J_θ f(x_n)ᵀ s_{nc}``; a vmap over
  samples of a vmap over ``c`` of the per-sample vector-Jacobian product. Cost: ``C``
  batched backward passes, ``O(C · cost(backward of N samples))``.
* ``full_batch``: ``v_{nc} = J_θ F(X)ᵀ (e_n ⊗ s_{nc})``, the full-batch vector-Jacobian
  product of a cotangent that is zero except at sample ``n``. Cost: ``N·C`` full-batch
  backward passes, ``O(N·C · cost(backward of N samples))``; exact for any model.

For any cotangent ``W = [w_1, …, w_N]`` the full-batch product ``J_θF(X)ᵀ W`` equals
``Σ_n J_θF_nᵀ w_n``. With ``w_n = Σ_c u_{nc} s_{nc}`` it gives ``V u`` without ``V``:
that is how eigenvectors are formed, on both paths.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lowrank_ggn.core.autodiff import batched_grad, per_sample_vjps
from lowrank_ggn.core.budget import check_factor_memory
from lowrank_ggn.core.engine.batchnorm import has_batch_norm
from lowrank_ggn.core.engine.capture import ForwardCapture
from lowrank_ggn.core.inputs import ModelInputs, as_inputs
from lowrank_ggn.core.loss_factors import hessian_factors, num_factor_columns
from lowrank_ggn.core.loss_sampling import sampled_factors
from lowrank_ggn.core.loss_targets import check_targets
from lowrank_ggn.core.losses.registry import resolve_loss
from lowrank_ggn.core.model import FunctionalModel
from lowrank_ggn.core.modes import PathName
from lowrank_ggn.core.options import DEFAULT_CHUNK, GGNOptions
from lowrank_ggn.core.paths import (
    PER_SAMPLE,
    EnginePath,
    check_deterministic,
    choose_path,
)
from lowrank_ggn.core.subsampling import subsample_factors
from lowrank_ggn.core.validation import check_outputs, check_params_finite


@dataclass
class Linearization:
    """The model linearised around one batch: outputs, loss factors and the path.

    Attributes:
        fmodel: The model as a function of the selected parameters.
        loss_func: The loss.
        inputs: The batch (:class:`~lowrank_ggn.core.inputs.ModelInputs`).
        targets: The targets (a tensor, or a tuple passed as ``loss(out, *targets)``).
        outputs: ``F(θ, X)``, ``[N, *out]``, detached.
        factors: ``S``, ``[C, N_S, *out]`` (reduction factor included): the factor
            columns of the samples in ``sample_index``.
        path: Which way ``V`` is computed, and why.
        sample_index: ``[N_S]`` batch positions of the samples that carry factor
            columns (all ``N`` by default; a subset under curvature sub-sampling).
            Column ``i = j·C + c`` belongs to sample ``sample_index[j]``.
        graph: Outputs of the forward pass on the live parameters with its autograd
            graph, shared by every backward pass (:meth:`forward_with_graph`;
            :meth:`release_graph` drops it).
        capture: The Gram engine's record of that pass
            (:class:`~lowrank_ggn.core.engine.capture.ForwardCapture`), until one
            engine run takes it (:meth:`take_capture`).

    Results computed from it (Gram matrices, engine reports) are returned to the
    caller, never stored here; the object owns only its graph, its capture and the
    located mixing modules (:meth:`located_mixing`).
    """

    fmodel: FunctionalModel
    loss_func: nn.Module
    inputs: ModelInputs
    targets: object
    outputs: Tensor
    factors: Tensor
    path: EnginePath
    sample_index: Tensor | None = None
    graph: Tensor | None = None
    capture: ForwardCapture | None = None
    _located: tuple[str, ...] | None = field(default=None, init=False, repr=False)

    @property
    def forward_passes(self) -> float:
        """Forward passes of the model so far, in full-batch equivalents.

        Every evaluation counts the samples it processes (vmapped per-sample passes
        included), divided by ``N``; Jacobian-vector products count as passes too.
        """
        return self.fmodel.samples_processed / self.batch_size

    def __post_init__(self) -> None:
        if self.sample_index is None:
            N = self.outputs.shape[0]
            self.sample_index = torch.arange(N, device=self.outputs.device)

    @property
    def batch_size(self) -> int:
        """``N``, the samples in the forward pass."""
        return self.outputs.shape[0]

    @property
    def num_samples(self) -> int:
        """``N_S``, the samples that carry factor columns (``N`` unless sub-sampled)."""
        return self.sample_index.numel()

    @property
    def num_columns_per_sample(self) -> int:
        """``C``."""
        return self.factors.shape[0]

    @property
    def num_columns(self) -> int:
        """``N_S·C``, the size of the Gram matrix."""
        return self.num_samples * self.num_columns_per_sample

    def combine(self, weights: Tensor) -> Tensor:
        """Cotangents ``w_n = Σ_c u[j·C + c] s_jc`` for ``n = sample_index[j]``, else 0.

        Args:
            weights: ``[K, N_S·C]``, rows ordered sample-major.

        Returns:
            ``[K, N, *out]``, zero at samples without factor columns.
        """
        NS, C = self.num_samples, self.num_columns_per_sample
        u = weights.reshape(-1, NS, C)
        S = self.factors.reshape(C, NS, -1)
        picked = torch.einsum("knc,cno->kno", u, S)  # [K, N_S, O]
        full = picked.new_zeros(picked.shape[0], self.batch_size, picked.shape[-1])
        full[:, self.sample_index] = picked
        return full.reshape(-1, *self.outputs.shape)

    def forward_with_graph(self) -> Tensor:
        """Run ``F(θ, X)`` on the live parameters, keep the graph in :attr:`graph`.

        Forward hooks registered on the model's modules fire here; the layer-wise
        engine uses that to capture layer inputs and outputs in the same pass.
        """
        with torch.enable_grad():
            self.graph = self.fmodel(tuple(self.fmodel.params), self.inputs)
        return self.graph

    def release_graph(self) -> None:
        """Drop the graph: the next backward pass redoes the forward pass."""
        self.graph = None

    def take_capture(self) -> ForwardCapture | None:
        """The unused capture of the forward pass, handed to one engine run.

        ``None`` once taken: a capture serves one run (its layers hold that run's
        factors).
        """
        cap, self.capture = self.capture, None
        return cap

    def located_mixing(
        self, locate: Callable[[FunctionalModel, ModelInputs], tuple[str, ...]]
    ) -> tuple[str, ...]:
        """Names of the modules that mix samples: the path check's, else ``locate``'s.

        ``locate(fmodel, inputs)`` runs at most once per linearisation (its result
        is kept); ``()`` when the path saw no mixing.
        """
        if not self.path.sample_mixing:
            return ()
        if self._located is None:
            found = self.path.mixing_modules
            self._located = found or locate(self.fmodel, self.inputs)
        return self._located

    def vjp(self, cotangents: Tensor, chunk: int = DEFAULT_CHUNK) -> Tensor:
        """Full-batch products ``J_θF(X)ᵀ W_k`` for cotangents ``[K, N, *out]``.

        One backward pass per cotangent on CPUs, one batched pass per chunk
        elsewhere (:func:`~lowrank_ggn.core.autodiff.batched_grad`); each
        parameter's gradient is copied once, into its columns of the result.

        Returns:
            ``[K, D]``, flattened in ``params`` order.
        """
        if self.graph is None:
            self.forward_with_graph()
        fm = self.fmodel
        K = cotangents.shape[0]
        step = 1 if cotangents.device.type == "cpu" else max(1, chunk)
        dtypes = [p.dtype for p in fm.params] or [cotangents.dtype]
        dtype = functools.reduce(torch.promote_types, dtypes)
        rows = cotangents.new_empty(K, fm.num_params, dtype=dtype)
        # rows[b, columns of p] viewed as p: [K, *p.shape] per parameter
        blocks = [
            part.view(K, *shape)
            for part, shape in zip(rows.split(fm.numels, dim=1), fm.shapes)
        ]
        for start in range(0, K, step):
            stop = min(K, start + step)
            part = cotangents[start:stop]
            if part.shape[0] == 1:  # one plain backward pass
                grads = torch.autograd.grad(
                    self.graph, fm.params, part[0], retain_graph=True, allow_unused=True
                )
                grads = [None if g is None else g.unsqueeze(0) for g in grads]
            else:
                grads = batched_grad(self.graph, fm.params, part)
            for block, g in zip(blocks, grads):
                if g is None:
                    block[start:stop].zero_()
                else:
                    block[start:stop].copy_(g)
        return rows

    def apply_factors(self, weights: Tensor, chunk: int = DEFAULT_CHUNK) -> Tensor:
        """``(V u_k)ᵀ`` for coefficient rows ``u_k``: ``[K, N_S·C] -> [K, D]``."""
        return self.vjp(self.combine(weights), chunk)

    def factor_blocks(
        self, chunk: int = DEFAULT_CHUNK
    ) -> Iterator[tuple[slice, Tensor]]:
        """Yield ``(columns, Vᵀ[columns])`` with ``Vᵀ[columns]`` of shape ``[B, D]``.

        Columns come in sample-major order, in blocks of about ``chunk`` columns.
        """
        NS, C = self.num_samples, self.num_columns_per_sample
        dtype, device = self.outputs.dtype, self.outputs.device
        if self.path.name == PER_SAMPLE:
            samples = max(1, chunk // C)
            S = self.factors.movedim(0, 1)  # [N_S, C, *out]
            X = self.inputs.select(self.sample_index)
            for start in range(0, NS, samples):
                stop = min(NS, start + samples)
                blocks = per_sample_vjps(
                    self.fmodel,
                    X.select(slice(start, stop)),
                    S[start:stop],
                    columns=True,
                )
                flat = self.fmodel.flatten(blocks, batch_dims=2)  # [B, C, D]
                yield slice(start * C, stop * C), flat.flatten(0, 1)
            return
        for start in range(0, NS * C, chunk):
            stop = min(NS * C, start + chunk)
            weights = torch.zeros(stop - start, NS * C, dtype=dtype, device=device)
            weights[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
            yield slice(start, stop), self.apply_factors(weights, chunk)

    def factors_matrix(self, chunk: int = DEFAULT_CHUNK) -> Tensor:
        """``Vᵀ`` as one ``[N·C, D]`` tensor (memory ``N·C·D``; for small problems)."""
        return torch.cat([block for _, block in self.factor_blocks(chunk)])


def linearize(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: ModelInputs | Tensor,
    targets: object,
    params: Sequence[Tensor] | None = None,
    options: GGNOptions | None = None,
    sample_index: Tensor | None = None,
    capture: bool = True,
    batch_size: int | None = None,
) -> Linearization:
    """Run one forward pass (with its graph), check the targets and choose the path.

    Forward passes: this one, on the live parameters with the autograd graph that
    every later backward pass shares (and, with ``capture``, the Gram engine's
    record of layer inputs and outputs); a second one, the determinism check; and
    the path check's per-sample evaluation of four probe samples. The path check's
    batch side is one backward pass through the recorded graph.

    The caller checked the call (:func:`lowrank_ggn.core.validation.check_call`) and
    built ``options`` (:meth:`~lowrank_ggn.core.options.GGNOptions.of`); this
    function checks what needs the forward pass: finite parameters, the outputs, the
    targets against them (once), the factors' memory and the path. The caller holds
    :func:`lowrank_ggn.core.state.model_preserved` around this and every use of the
    result.

    Args:
        model: Any module that maps ``inputs`` to ``[N, *out]``.
        loss_func: A loss ``loss_func(outputs, targets) -> scalar`` with the
            per-sample-plus-reduction structure (see
            :mod:`lowrank_ggn.core.loss_factors`).
        inputs: The batch: a tensor ``[N, *in]``, a tuple (positional) or a dict
            (keyword) of entries (:mod:`lowrank_ggn.core.inputs`).
        targets: Its targets.
        params: Parameters to differentiate; default: those that require grad.
        options: ``path`` (a forced ``"per_sample"`` on a sample-mixing model is
            refused), ``mc_samples`` and ``generator`` (Monte-Carlo factors,
            :func:`lowrank_ggn.core.loss_sampling.sampled_loss_hessian_factors`),
            ``memory_budget`` (bytes ``S`` may take) and ``output``; default:
            :class:`~lowrank_ggn.core.options.GGNOptions` ``()``.
        sample_index: Checked batch positions whose curvature is kept, scaled by
            ``N/|S|`` for ``'mean'`` (:mod:`lowrank_ggn.core.subsampling`); the
            forward pass still uses the whole batch.
        capture: Record the pass for the Gram engine
            (:class:`~lowrank_ggn.core.engine.capture.ForwardCapture`).
        batch_size: ``N`` when the first input entry is not batched.

    Returns:
        The :class:`Linearization`.

    """
    options = GGNOptions() if options is None else options
    path, budget = options.path, options.memory_budget
    selected = (
        [p for p in model.parameters() if p.requires_grad]
        if params is None
        else list(params)
    )
    inputs = as_inputs(inputs, batch_size)
    loss_func = resolve_loss(loss_func)
    fmodel = FunctionalModel(model, selected, options.output)
    check_params_finite(fmodel.params, fmodel.names)
    cap = None
    if capture:
        with_bns = path is PathName.FULL_BATCH or has_batch_norm(model)
        cap = ForwardCapture(model, {id(p) for p in fmodel.params}, with_bns)
    with torch.enable_grad(), cap.recording(inputs.size) if cap else nullcontext():
        graph = fmodel(tuple(fmodel.params), inputs)
    check_outputs(graph, inputs.size)
    outputs = graph.detach()
    check_targets(loss_func, outputs, targets)
    M = options.mc_samples
    check_factor_memory(
        outputs.shape[0] if sample_index is None else sample_index.numel(),
        M or num_factor_columns(loss_func, outputs.shape),
        outputs[0].numel(),
        outputs.element_size(),
        budget,
    )
    chosen = choose_path(fmodel, inputs, outputs, graph)
    # against an unmodified pass: the capture's substitutions must not show
    check_deterministic(fmodel, inputs, outputs)
    if M is None:
        factors = hessian_factors(loss_func, outputs, targets, budget)
    else:
        factors = sampled_factors(loss_func, outputs, targets, options)
    if sample_index is not None:
        factors = subsample_factors(loss_func, factors, sample_index)
    if path is PathName.PER_SAMPLE and chosen.mixing_modules:
        raise ValueError(
            f"path='per_sample' is invalid for this model: {', '.join(chosen.mixing_modules)} "
            "normalize with batch statistics, so per-sample Jacobians do not exist. "
            "Leave path=None."
        )
    if path is not None and path != chosen.name:
        chosen = EnginePath(
            path,
            f"forced by path={path.value!r} (automatic choice: {chosen})",
            chosen.mixing_modules,
            chosen.sample_mixing,
        )
    return Linearization(
        fmodel,
        loss_func,
        inputs,
        targets,
        outputs,
        factors,
        chosen,
        sample_index,
        graph=graph,
        capture=cap,
    )
