r"""Products ``V w`` from the captured factors, and the self-check against autograd.

Every strategy except :attr:`~lowrank_ggn.core.engine.report.Strategy.STREAMED` assembles
the Gram matrix from per-layer formulas that assume each parameter acts only inside
its module. :func:`factor_products` recomputes ``V w`` from the same data the Gram is
built from; :func:`self_check` compares it with one direct full-batch vector-Jacobian
product for a random ``w``. A mismatch (a weight used outside its layer, a model that
mixes samples other than through BatchNorm statistics) sends the caller to a strategy
that makes no such assumption.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lowrank_ggn.core.engine.batchnorm import BNLayer
from lowrank_ggn.core.engine.layer import Layer
from lowrank_ggn.core.tolerances import roundoff_rtol

if TYPE_CHECKING:
    from lowrank_ggn.core.linearization import Linearization

#: Relative tolerance of the self-check, per dtype (round-off of two summation orders).


@dataclass
class Factors:
    """Everything one strategy found, from which the Gram matrix is assembled.

    Attributes:
        lin: The linearised model.
        layers: Captured layers (``grads`` if local, ``explicit`` rows if mixing).
        bns: BatchNorm layers with their frozen cotangent sums (``BN_SPLIT``).
        W: ``[2K, NC]`` statistics coefficients (``BN_SPLIT``), else ``None``.
        B: ``id(p) -> [2K − s_p, numel]`` statistics directions (``BN_SPLIT``): rows
            ``s_p …`` of ``B_p``, those of the BatchNorm layers above ``p``.
        B_starts: ``id(p) -> s_p``, the first row of ``W`` that ``B[id(p)]`` meets.
        generic: Parameters of no captured layer, with rows ``[NC, numel]``.
        owners: ``id(p) -> `` layer name for generic rows that are a named layer's
            full-batch rows (BatchNorm affines under ``COLUMNS``): reported as
            ``MIXING`` under that name.
    """

    lin: Linearization
    layers: list[Layer]
    bns: list[BNLayer] = field(default_factory=list)
    W: Tensor | None = None
    B: dict[int, Tensor] = field(default_factory=dict)
    generic: list[Tensor] = field(default_factory=list)
    generic_rows: list[Tensor] = field(default_factory=list)
    owners: dict[int, str] = field(default_factory=dict)
    B_starts: dict[int, int] = field(default_factory=dict)

    def coefficients_for(self, p: Tensor) -> Tensor | None:
        """``[NC, 2K − s_p]``: the columns of ``Wᵀ`` that meet ``B[id(p)]``, or ``None``."""
        if self.W is None or id(p) not in self.B:
            return None
        return self.W[self.B_starts.get(id(p), 0) :].T

    def statistics_rows(self, p: Tensor) -> Tensor | None:
        """``(B_p W)ᵀ`` ``[NC, numel]``: the statistics part of ``p``'s rows, or ``None``."""
        WT = self.coefficients_for(p)
        return None if WT is None else WT @ self.B[id(p)]

    def statistics_term(self, p: Tensor, weights: Tensor) -> Tensor | None:
        """``(B_p W w_k)`` rows ``[K, numel]`` for coefficient rows ``weights``, or ``None``."""
        WT = self.coefficients_for(p)
        return None if WT is None else (weights @ WT) @ self.B[id(p)]


def factor_products(f: Factors, weights: Tensor) -> Tensor:
    """``(V w_k)ᵀ`` for rows ``w_k`` of ``weights`` ``[K, NC]``: ``[K, D]``, no backward pass.

    Local layer: its operand's rows of ``Σ_c w_{nc} g_{nc}`` (``Σ_n (Σ_c w_{nc}
    g_{nc})ᵀ A_n`` for a dense weight); explicit rows are multiplied;
    under ``BN_SPLIT`` the statistics term ``B_p W w`` is added.
    """
    lin = f.lin
    K, C, NS = weights.shape[0], lin.num_columns_per_sample, lin.num_samples
    result: dict[int, Tensor] = {}
    for la in f.layers:
        if la.local:
            g = la.grad_matrix()  # [NC, P, O]
            P, O = g.shape[1:]
            # gw[k, n] = Σ_c w[k, n·C + c] g[n·C + c]: [K, NS, P, O]
            gw = torch.einsum(
                "knc,ncx->knx", weights.reshape(K, NS, C), g.reshape(NS, C, P * O)
            ).reshape(K, NS, P, O)
            operand = la.operand.select(lin.sample_index)
            parts = la.param_rows(gw, operand)
        else:
            flat = weights @ torch.cat(la.explicit)
            parts = flat.split([p.numel() for p in la.params], 1)
        for p, rows in zip(la.params, parts):  # shared parameters: sum over uses
            result[id(p)] = rows if id(p) not in result else result[id(p)] + rows
    for bn in f.bns:
        for p, rows in zip(bn.params, bn.affine_rows()):
            result[id(p)] = weights @ rows
    for p, rows in zip(f.generic, f.generic_rows):
        result[id(p)] = weights @ rows
    for p in lin.fmodel.params:
        extra = f.statistics_term(p, weights)
        if extra is not None:
            result[id(p)] = result[id(p)] + extra
    return lin.fmodel.flatten(
        [result[id(p)].reshape(K, -1) for p in lin.fmodel.params], batch_dims=1
    )


def self_check(f: Factors, precision: torch.dtype | None = None) -> set[int]:
    """``V w`` from the factors against a direct full-batch VJP, for a random ``w``.

    To the round-off of ``precision``, the least precise dtype the forward pass
    computed in, if lower than the outputs' (a float32 cast inside a float64 model).

    Returns:
        The ``id`` of the parameters whose block differs (empty if ``V w`` agrees to
        round-off). Output gradients come from autograd, so a block differs only
        where its layer's row formula does not hold.
    """
    lin = f.lin
    dtype, device = lin.outputs.dtype, lin.outputs.device
    gen = torch.Generator(device="cpu").manual_seed(1234)
    w = torch.randn(1, lin.num_columns, generator=gen, dtype=dtype).to(device)
    direct = lin.apply_factors(w)[0]
    mine = factor_products(f, w)[0]
    tol = max(roundoff_rtol(dtype), roundoff_rtol(precision or dtype))
    # relative to the whole vector: a parameter with zero gradient (a bias before
    # BatchNorm) has only round-off, which must not count as a mismatch
    scale = max(direct.norm().item(), mine.norm().item(), 1e-30)
    if (direct - mine).norm() <= tol * scale:
        return set()
    # some block holds at least 1/P of the squared difference
    params = lin.fmodel.params
    blocks = (direct - mine).split([p.numel() for p in params])
    limit = tol * scale / len(params) ** 0.5
    return {id(p) for p, d in zip(params, blocks) if d.norm() > limit}


__all__ = ["Factors", "factor_products", "self_check"]
