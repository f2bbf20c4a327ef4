r"""The Gram operator ``U ↦ Sᵀ J Jᵀ S U`` from one batched VJP and one batched JVP.

For coefficient columns ``U`` ``[NC, B]`` (rows sample-major):

.. math::
    𝒢 U = Vᵀ (V U) = Sᵀ J_θF \,\bigl(J_θFᵀ (S U)\bigr),

one full-batch vector-Jacobian product of the cotangents ``S U`` (``[B, N, *out]``)
gives ``V U`` ``[B, D]``; one full-batch Jacobian-vector product (``torch.func.jvp``
under ``vmap``) of those ``B`` directions gives ``J V U`` ``[B, N, *out]``; the
projection onto ``S`` gives ``[B, NC]``. Exact for any model (BatchNorm in train mode
included: both products differentiate the true batch function), memory ``B·D`` plus
``B`` copies of the activations. :func:`streamed_gram` applies it to blocks of the
identity; :mod:`lowrank_ggn.lanczos` applies it to Krylov blocks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import jvp, vmap

from lowrank_ggn.engine.report import EngineReport
from lowrank_ggn.factors import Linearization


def project(lin: Linearization, out_tangents: Tensor) -> Tensor:
    """``Sᵀ T`` for output tangents ``T`` ``[B, N, *out]``: ``[B, NS·C]`` sample-major."""
    B = out_tangents.shape[0]
    NS, C = lin.num_samples, lin.num_columns_per_sample
    picked = out_tangents.reshape(B, lin.batch_size, -1)[:, lin.sample_index]
    S = lin.factors.reshape(C, NS, -1)
    return torch.einsum("bno,cno->bnc", picked, S).reshape(B, NS * C)


def output_jvp(lin: Linearization, directions: Tensor) -> Tensor:
    """``J_θF · d_b`` for flat parameter directions ``[B, D]``: ``[B, N, *out]``."""
    fm = lin.fmodel
    theta = fm.primals()

    def one(*tangent: Tensor) -> Tensor:
        return jvp(lambda th: fm(th, lin.inputs), (theta,), (tangent,))[1]

    return vmap(one)(*fm.unflatten(directions))


def block_width(lin: Linearization, budget: int, groups: int = 1) -> int:
    """Columns per VJP/JVP block: ``[B, D]`` directions plus ``B`` activation copies."""
    item = lin.outputs.element_size()
    D = lin.fmodel.num_params
    per_column = item * (3 * D + 8 * lin.inputs.numel() * max(1, groups) + 1)
    return int(max(1, min(lin.num_columns, (budget // 4) // per_column)))


def gram_apply(
    lin: Linearization,
    U: Tensor,
    masks: list[Tensor] | None = None,
    report: EngineReport | None = None,
) -> list[Tensor]:
    """``𝒢_g U`` ``[NC, B]`` for each parameter group ``g`` (one VJP for all groups).

    Args:
        lin: The linearised model.
        U: ``[NC, B]`` coefficient columns.
        masks: Per group a ``[D]`` 0/1 mask of its parameters (``None``: one group,
            all parameters). ``𝒢_g = V_gᵀ V_g`` takes the JVP of the masked ``V U``.
        report: Pass counts go here.

    Returns:
        One ``[NC, B]`` tensor per group.
    """
    VU = lin.apply_factors(U.T, chunk=U.shape[1])  # [B, D]
    if report is not None:
        report.count("backward", U.shape[1])
    results = []
    for mask in masks or [None]:
        d = VU if mask is None else VU * mask
        results.append(project(lin, output_jvp(lin, d)).T)
        if report is not None:
            report.count("jvp", U.shape[1])
    return results


def streamed_gram(
    lin: Linearization,
    budget: int,
    masks: list[Tensor] | None = None,
    report: EngineReport | None = None,
    tick: Callable[[int], None] | None = None,
) -> list[Tensor]:
    """Every group's Gram matrix, block column by block column (memory ``B·D``)."""
    NC = lin.num_columns
    dtype, device = lin.outputs.dtype, lin.outputs.device
    grams = [torch.zeros(NC, NC, dtype=dtype, device=device) for _ in masks or [None]]
    width = block_width(lin, budget, len(masks or [None]))
    for start in range(0, NC, width):
        stop = min(NC, start + width)
        E = torch.zeros(NC, stop - start, dtype=dtype, device=device)
        E[torch.arange(start, stop), torch.arange(stop - start)] = 1.0
        for gram, cols in zip(grams, gram_apply(lin, E, masks, report)):
            gram[:, start:stop] = cols
        if tick is not None:
            tick(stop - start)
    return [0.5 * (g + g.T) for g in grams]


__all__ = ["block_width", "gram_apply", "output_jvp", "project", "streamed_gram"]
