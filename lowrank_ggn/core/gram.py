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

import torch
from torch import Tensor

from lowrank_ggn.core.engine import EngineReport, SelfCheckFailed, layerwise_gram
from lowrank_ggn.core.linearization import Linearization
from lowrank_ggn.core.modes import Strategy
from lowrank_ggn.core.options import GGNOptions
from lowrank_ggn.core.precision import accumulation_dtype
from lowrank_ggn.core.progress import PassProgress


def symmetric_gram(Vt: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``Vᵀ V`` from ``Vᵀ`` ``[K, D]``, symmetrised: ``[K, K]``, summed in ``dtype``.

    With a ``dtype`` other than ``Vt``'s, ``Vt`` is cast in column blocks of about
    ``2²⁴`` entries (no full copy).
    """
    if dtype is None or dtype == Vt.dtype:
        gram = Vt @ Vt.T
    else:
        K, D = Vt.shape
        gram = Vt.new_zeros(K, K, dtype=dtype)
        step = max(1, 2**24 // max(K, 1))
        for j in range(0, D, step):
            block = Vt[:, j : j + step].to(dtype)
            gram.addmm_(block, block.T)
    return 0.5 * (gram + gram.T)


def gram_from_linearization(
    lin: Linearization,
    options: GGNOptions | None = None,
    work: float | None = None,
    groups: list[list[Tensor]] | None = None,
) -> tuple[list[Tensor], EngineReport]:
    """``Vᵀ V`` ``[N·C, N·C]`` for a linearised model (symmetric by construction).

    Args:
        lin: The linearised model.
        options: ``strategy`` (``GENERIC``: all of ``Vᵀ`` ``[N·C, D]`` from
            vmapped vector-Jacobian products, then one product, memory ``N·C·D``;
            else the layer-wise engine of :mod:`lowrank_ggn.core.engine`, forced to
            a strategy or left to its cost model, falling back to the generic one if
            its self-check fails), ``chunk`` (columns per batched backward pass),
            ``progress`` and ``accumulate`` (the dtype the Gram is summed in,
            :func:`lowrank_ggn.core.precision.accumulation_dtype`).
        work: Bytes the layer-wise engine may hold in factor blocks and chunk
            buffers (``None``: ``options.memory_budget``).
        groups: A partition of ``lin.fmodel.params`` (any order inside a group):
            one Gram ``V_gᵀ V_g`` per group, all from the same backward passes
            (``None``: one group of all parameters).

    Returns:
        ``(grams, report)``: one Gram matrix per group (one in all without
        ``groups``), in the accumulation dtype, and how they were built
        (:class:`lowrank_ggn.core.engine.EngineReport`).
    """
    options = GGNOptions() if options is None else options
    chunk = options.chunk
    acc_dtype = accumulation_dtype(lin.outputs.dtype, options.accumulate)
    report = EngineReport(
        Strategy.GENERIC, reason="engine='generic': explicit Vᵀ, memory N·C·D"
    )
    if not options.generic:
        budget = int(min(options.memory_budget if work is None else work, 2**62))
        bar = PassProgress(options.progress)
        try:
            return layerwise_gram(
                lin, chunk, budget, groups, options.strategy, bar, acc_dtype
            )
        except SelfCheckFailed as err:
            report = EngineReport(
                Strategy.GENERIC,
                reason="layer-wise self-check failed: a parameter is used outside "
                "its layer",
                fallback=f"{err.report.strategy} failed its self-check",
            )
        finally:
            bar.close()
    report.count("backward", lin.num_columns)
    Vt = lin.factors_matrix(chunk)  # [N·C, D]
    if groups is None:
        return [symmetric_gram(Vt, acc_dtype)], report
    offsets = dict(zip(map(id, lin.fmodel.params), _offsets(lin.fmodel.numels)))
    grams = [
        symmetric_gram(
            torch.cat(
                [Vt[:, offsets[id(p)] : offsets[id(p)] + p.numel()] for p in g], 1
            ),
            acc_dtype,
        )
        for g in groups
    ]
    return grams, report


def _offsets(numels: list[int]) -> list[int]:
    """Start of each parameter in the flattening."""
    out, start = [], 0
    for n in numels:
        out.append(start)
        start += n
    return out


__all__ = ["gram_from_linearization", "symmetric_gram"]
