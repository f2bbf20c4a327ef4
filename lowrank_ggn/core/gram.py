r"""The Gram matrix ``Vᵀ V`` of the backpropagated loss-Hessian factors.

.. math::
    G = V V^⊤ ∈ ℝ^{D×D}, \qquad \mathcal{G} = V^⊤ V ∈ ℝ^{NC×NC},
    \qquad \mathcal{G}_{(n,c),(m,c')} = ⟨J_θF_n^⊤ s_{nc},\; J_θF_m^⊤ s_{mc'}⟩ .

Both matrices share their nonzero eigenvalues, and ``G e = λ e`` with
``e = V u / √λ`` for ``𝒢 u = λ u`` (Dangel, Tatzel & Hennig, TMLR 2022,
https://arxiv.org/abs/2106.02624).

Rows and columns of ``𝒢`` are ordered **sample-major**: index ``n·C + c`` is factor
column ``c`` of sample ``n``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lowrank_ggn.approx.param_groups import (
    params_by_group,
    resolve_param_groups,
    symmetric_gram,
)
from lowrank_ggn.core.engine import EngineReport, Strategy, layerwise_gram
from lowrank_ggn.core.linearization import DEFAULT_CHUNK, Linearization, linearize
from lowrank_ggn.core.precision import accumulation_dtype, check_accumulate
from lowrank_ggn.core.progress import PassProgress
from lowrank_ggn.core.state import model_preserved
from lowrank_ggn.core.validation import (
    check_linearization_memory,
    check_options,
    resolve_memory_budget,
)

ENGINES = ("layerwise", "generic")
STRATEGIES = tuple(s.value for s in Strategy if s is not Strategy.GENERIC)


def check_engine(engine: str, strategy: str | None = None) -> Strategy | None:
    """Check ``engine`` and ``strategy`` (before any model call); return the strategy."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}; got {engine!r}.")
    if strategy is None:
        return None
    if strategy not in STRATEGIES:
        raise ValueError(
            f"strategy must be None (automatic) or one of {STRATEGIES}; got {strategy!r}."
        )
    if engine == "generic":
        raise ValueError(
            "strategy applies to engine='layerwise' only; drop strategy or the engine."
        )
    return Strategy(strategy)


def gram_from_linearization(
    lin: Linearization,
    chunk: int = DEFAULT_CHUNK,
    engine: str = "layerwise",
    memory_budget: float | None = None,
    columns: Sequence[slice] | None = None,
    strategy: Strategy | None = None,
    progress: bool | None = None,
    accumulate: str | None = None,
) -> Tensor | list[Tensor]:
    """``Vᵀ V`` ``[N·C, N·C]`` for a linearised model (symmetric by construction).

    Args:
        lin: The linearised model; ``lin.engine_report`` records how the Gram was
            built (:class:`lowrank_ggn.core.engine.EngineReport`).
        chunk: Columns per batched backward pass.
        engine: ``"layerwise"`` (default; :mod:`lowrank_ggn.core.engine`) or ``"generic"`` (all of ``Vᵀ`` ``[N·C, D]`` from vmapped
            vector-Jacobian products, then one product; memory ``N·C·D``). The
            layer-wise engine falls back to the generic one if its self-check fails.
        memory_budget: Bytes the layer-wise engine may hold in factor blocks and
            chunk buffers (``None``: environment or default; see
            :func:`lowrank_ggn.core.validation.resolve_memory_budget`).
        columns: Parameter groups as ranges of the flattened parameters (see
            :func:`lowrank_ggn.approx.param_groups.resolve_param_groups`): return one Gram
            ``V_gᵀ V_g`` per group, all from the same backward passes.
        strategy: Force a backpropagation :class:`~lowrank_ggn.core.engine.Strategy`
            (``None``: the cost model of :mod:`lowrank_ggn.core.engine.plan` chooses).
        progress: Progress bar on stderr (``None``: for calls estimated to take more
            than a few seconds).
        accumulate: ``None``, ``"float64"`` or ``"native"``: the dtype the Gram is
            summed in (:func:`lowrank_ggn.core.precision.accumulation_dtype`).

    Returns:
        The Gram matrix, or a list of them (one per group) if ``columns`` is given,
        in the accumulation dtype.
    """
    check_engine(engine)
    acc_dtype = accumulation_dtype(lin.outputs.dtype, accumulate)
    groups = None if columns is None else params_by_group(lin.fmodel.params, columns)
    report = EngineReport(
        Strategy.GENERIC, reason="engine='generic': explicit Vᵀ, memory N·C·D"
    )
    if engine == "layerwise":
        budget = int(min(resolve_memory_budget(memory_budget), 2**62))
        bar = PassProgress(progress)
        try:
            grams, report = layerwise_gram(
                lin, chunk, budget, groups, strategy, bar, acc_dtype
            )
        finally:
            bar.close()
        lin.engine_report = report
        if grams is not None:
            return grams if columns is not None else grams[0]
        report = EngineReport(
            Strategy.GENERIC,
            reason="layer-wise self-check failed: a parameter is used outside its layer",
            fallback=f"{report.strategy} failed its self-check",
        )
    lin.engine_report = report
    report.count("backward", lin.num_columns)
    Vt = lin.factors_matrix(chunk)  # [N·C, D]
    if columns is None:
        return symmetric_gram(Vt, acc_dtype)
    return [symmetric_gram(Vt[:, cols], acc_dtype) for cols in columns]


def linearize_request(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    params: Sequence[Tensor] | None,
    param_groups: Sequence[Mapping] | None,
    path: str | None,
    mc_samples: int | None,
    generator: torch.Generator | None,
    subsampling: Sequence[int] | Tensor | None,
    memory_budget: float | None,
    engine: str,
    gram: bool = True,
    accumulate: str | None = None,
) -> tuple[Linearization, list[slice] | None]:
    """The shared front of :func:`gram_matrix` and :func:`ggn_spectrum`.

    Resolves ``param_groups``, linearises the model (one forward pass, all checks)
    and checks the memory the Gram matrices will take (none with ``gram=False``:
    a matrix-free solver). The caller holds
    :func:`lowrank_ggn.core.state.model_preserved`.

    Returns:
        ``(lin, columns)``: the linearisation, and per group its range of the
        flattened parameters (``None`` without groups).
    """
    groups = resolve_param_groups(model, param_groups, params)
    lin = linearize(
        model,
        loss_func,
        inputs,
        targets,
        params if groups is None else groups[0],
        path,
        mc_samples=mc_samples,
        generator=generator,
        subsampling=subsampling,
        memory_budget=memory_budget,
    )
    columns = None if groups is None else groups[1]
    num_grams = len(columns or [0]) if gram else 0
    acc = accumulation_dtype(lin.outputs.dtype, accumulate)
    itemsize = torch.empty(0, dtype=acc).element_size()
    check_linearization_memory(lin, memory_budget, engine, num_grams, itemsize)
    return lin, columns


def gram_matrix(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    params: Sequence[Tensor] | None = None,
    chunk: int = DEFAULT_CHUNK,
    path: str | None = None,
    engine: str = "layerwise",
    memory_budget: float | None = None,
    mc_samples: int | None = None,
    generator: torch.Generator | None = None,
    subsampling: Sequence[int] | Tensor | None = None,
    param_groups: Sequence[Mapping] | None = None,
    strategy: str | None = None,
    progress: bool | None = None,
    accumulate: str | None = None,
) -> Tensor | list[Tensor]:
    r"""The ``[N·C, N·C]`` Gram matrix ``Vᵀ V`` of the mini-batch GGN.

    Works for any model, BatchNorm in train mode included: the engine checks whether
    the forward pass mixes samples and then uses full-batch vector-Jacobian products
    (see :mod:`lowrank_ggn.core.paths`).

    Args:
        model: Module mapping ``inputs`` ``[N, *in]`` to outputs ``[N, *out]``. It is
            observed, never changed (parameters, buffers, mode, grads).
        loss_func: ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss`` with
            reduction ``'mean'`` or ``'sum'``.
        inputs: The batch, ``[N, *in]``.
        targets: Targets for the batch.
        params: Parameters of ``model``; default: all that require grad.
        chunk: Factor columns per vmapped backward pass (time/memory trade-off).
        path: ``None`` (automatic), ``"per_sample"`` or ``"full_batch"``.
        engine: ``"layerwise"`` (default) or ``"generic"``; see
            :func:`gram_from_linearization`.
        mc_samples: Use ``M`` Monte-Carlo factor columns per sample instead of the
            ``C`` exact ones: the Gram is ``N·M × N·M`` and its GGN an unbiased
            estimate (:func:`lowrank_ggn.core.loss_factors.sampled_loss_hessian_factors`).
        generator: ``torch.Generator`` for the Monte-Carlo draws (same seed, same
            result); ``None`` uses the default generator of the outputs' device.
        subsampling: Batch positions ``S``: curvature of these samples only, forward
            pass on the whole batch; rows ``j·C + c`` for ``S[j]``; see
            :mod:`lowrank_ggn.approx.subsampling` (scaled by ``N/|S|`` for ``'mean'``).
        param_groups: ``[{"params": [...]}, …]``: return one Gram per group, of the
            GGN's diagonal block for that group (:mod:`lowrank_ggn.approx.param_groups`),
            from one forward and one backward pass. Excludes ``params``.
        memory_budget: Bytes the computation may hold: the Gram matrices, ``S`` and
            (engine ``"generic"``) ``Vᵀ`` ``[N·C, D]`` are checked after the forward
            pass, before any backward pass; the layer-wise engine also sizes its
            factor blocks and column chunks by it. ``None``:
            ``LOWRANK_GGN_MEMORY_BUDGET`` or 4 GiB.
        strategy: ``None`` (the cost model chooses), ``"per_sample"``,
            ``"bn_split"``, ``"columns"`` or ``"streamed"``: how the columns are
            backpropagated (:mod:`lowrank_ggn.core.engine.report`). All are exact.
        progress: Progress bar on stderr (``None``: for calls estimated to take
            more than a few seconds; ``True``/``False``: always/never).
        accumulate: Where the Gram is summed: ``None`` (float64 for float32,
            float16 and bfloat16 models, the parameters' dtype otherwise),
            ``"float64"`` or ``"native"`` (the parameters' dtype). Backward passes
            always run in the parameters' dtype (:mod:`lowrank_ggn.core.precision`).

    Returns:
        ``[N·C, N·C]`` in the accumulation dtype (float64 for a float32 model by
        default; the parameters' dtype with ``accumulate="native"``) on the
        parameters' device, rows ordered sample-major
        (``n·C + c``), where ``C`` is the number of factor columns per sample
        (``C = Π out`` for all supported losses, ``M`` with ``mc_samples``). Its
        trace is ``tr G``. With ``param_groups``, a list of such matrices.

    Example:
        >>> import torch
        >>> from lowrank_ggn.reference import dense_ggn
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
        >>> K = gram_matrix(model, torch.nn.CrossEntropyLoss(), X, y)
        >>> G = dense_ggn(model, torch.nn.CrossEntropyLoss(), X, y)
        >>> assert K.shape == (8, 8) and torch.allclose(K.trace(), G.trace())

    """
    check_options(chunk=chunk, memory_budget=memory_budget)
    check_accumulate(accumulate)
    forced = check_engine(engine, strategy)
    with model_preserved(model):
        lin, columns = linearize_request(
            model,
            loss_func,
            inputs,
            targets,
            params=params,
            param_groups=param_groups,
            path=path,
            mc_samples=mc_samples,
            generator=generator,
            subsampling=subsampling,
            memory_budget=memory_budget,
            engine=engine,
            accumulate=accumulate,
        )
        return gram_from_linearization(
            lin, chunk, engine, memory_budget, columns, forced, progress, accumulate
        )


__all__ = ["gram_matrix", "gram_from_linearization"]
