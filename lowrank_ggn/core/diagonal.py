r"""The GGN diagonal and trace, exact or Monte-Carlo.

With ``G = V Vᵀ``, ``V = [J_θF_nᵀ s_nc]`` ``[D, N·C]`` (:mod:`lowrank_ggn.core.linearization`),

.. math::
    \operatorname{diag}(G) = \sum_{n,c} (J_θF_n^⊤ s_{nc})^{⊙2}, \qquad
    \operatorname{tr} G = \sum_d \operatorname{diag}(G)_d
    = \operatorname{tr}(V^⊤ V) = \sum_k λ_k,

the row-wise sums of squares of ``V``. The *per-component diagonals*
``d_n = Σ_c (J_θF_nᵀ s_nc)²`` ``[N, D]`` sum to ``diag(G)``; with ``ρ`` of
``L = ρ Σ_n ℓ_n`` (``1/N`` for ``'mean'``, 1 for ``'sum'``, as for
:mod:`lowrank_ggn.diagnostics.moments`), ``d_n / ρ`` is the diagonal of sample ``n``'s
own GGN ``J_nᵀ ∇²ℓ_n J_n`` when samples are independent (BackPACK's
``BatchDiagGGNExact`` returns the rows ``d_n``). Under train-mode BatchNorm ``F_n``
depends on the whole batch: the ``d_n`` are per-component, and still sum to the exact
diagonal (the factorisation holds for full-batch vector-Jacobian products).

**Monte-Carlo.** With ``M`` sampled factor columns per sample
(:func:`lowrank_ggn.core.loss_sampling.sampled_loss_hessian_factors`,
``E[s̃ s̃ᵀ] = ∇²_{F_n} L``) each ``(J_nᵀ s̃_nm)²`` is unbiased, so the MC diagonal
is an unbiased estimate of ``diag(G)`` at ``M/C`` of the cost.

**Routes** (:class:`DiagonalRoute`), never forming ``V`` as a whole:

* ``layerwise``: the Gram engine's backward passes and per-layer operands
  (:mod:`lowrank_ggn.core.engine.diagonal`): ``C`` backward passes of the batch on
  the per-sample path (``bn_split``: plus one partial pass per BatchNorm
  statistic), then ``(g²)ᵀ(a²)`` for ``Linear`` layers (``N·D_l`` flops) and squared
  rows in chunks for convolutions (``N·C·P·D_l``);
* ``streamed``: blocks of columns of ``V`` from
  :meth:`~lowrank_ggn.core.linearization.Linearization.factor_blocks` (vmapped
  per-sample VJPs, ``C`` per sample; or ``N·C`` full-batch VJPs on the full-batch
  path), squared and summed: memory ``chunk·D``. Taken with ``engine="generic"`` or
  ``strategy="streamed"``, and whenever the layer-wise route does not apply.

Softmax cross-entropy on ``[N, K]`` outputs first trades its ``K`` factor columns
per sample for ``K − 1`` with the same loss Hessians (:func:`fewer_columns`): one
backward pass and one column of squares fewer on either route.

Time: ``O(C · backward(N))`` on the per-sample path (``bn_split`` as for the Gram),
``O(N·C · backward(N))`` when only full-batch columns apply. Memory: ``O(D)`` for
the result (``O(N·D)`` per component) plus the route's blocks. No Gram, no ``eigh``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from lowrank_ggn.core.engine import EngineReport, LayerwiseUnavailable
from lowrank_ggn.core.engine.diagonal import layerwise_diagonal
from lowrank_ggn.core.linearization import DEFAULT_CHUNK, Linearization
from lowrank_ggn.core.loss_sampling import sampled_loss_hessian_factors
from lowrank_ggn.core.modes import Mode, Strategy
from lowrank_ggn.core.options import GGNOptions
from lowrank_ggn.core.paths import EnginePath
from lowrank_ggn.core.subsampling import subsample_factors


class DiagonalRoute(Mode):
    """How the squares of ``V``'s rows were summed (see module docstring)."""

    LAYERWISE = "layerwise"
    STREAMED = "streamed"


class DiagonalValues:
    """``.flat`` and ``.trace`` of a result whose ``per_param`` holds ``diag(G)``."""

    per_param: list[Tensor]

    @property
    def flat(self) -> Tensor:
        """``diag(G)`` ``[D]``, parameters flattened in ``params`` order."""
        return torch.cat([d.reshape(-1) for d in self.per_param])

    @property
    def trace(self) -> Tensor:
        """``tr G = Σ_d diag(G)_d``, a 0-dim tensor (the sum of the eigenvalues)."""
        return self.flat.sum()


@dataclass
class GGNDiagonal(DiagonalValues):
    """Result of :meth:`lowrank_ggn.GGN.diagonal` and :func:`lowrank_ggn.ggn_diagonal`.

    Attributes:
        per_param: ``diag(G)`` per parameter, shaped like it, in the order of the
            GGN's ``params`` and their dtype and device.
        path: The engine's path (``.name``, ``.reason``, ``.mixing_modules``).
        mc_samples: ``M`` of the Monte-Carlo factors, ``None`` if exact.
        num_columns: ``N_S·C`` (``N_S·M``), the factor columns summed over.
        route: The :class:`DiagonalRoute` taken.
        engine_report: The layer-wise engine's strategy and per-layer treatment
            (``None`` if it did not run); ``.fallback`` says why it streamed.
    """

    per_param: list[Tensor]
    path: EnginePath
    mc_samples: int | None
    num_columns: int
    route: DiagonalRoute
    engine_report: EngineReport | None = None


def redrawn(
    lin: Linearization,
    mc_samples: int,
    generator: torch.Generator | None,
    memory_budget: float | None = None,
) -> Linearization:
    """``lin`` with ``M`` fresh Monte-Carlo factor columns, drawn from its outputs.

    No forward pass: the outputs, graph and path are ``lin``'s (its unused capture
    moves to the copy); sub-sampling as in ``lin``.
    """
    S = sampled_loss_hessian_factors(
        lin.loss_func,
        lin.outputs,
        lin.targets,
        mc_samples,
        generator,
        memory_budget=memory_budget,
    )
    if lin.num_samples != lin.batch_size or not torch.equal(
        lin.sample_index, torch.arange(lin.batch_size, device=S.device)
    ):
        S = subsample_factors(lin.loss_func, S, lin.sample_index)
    return replace(lin, factors=S, capture=lin.take_capture())


def fewer_columns(lin: Linearization) -> Linearization:
    r"""``lin`` with ``K − 1`` factor columns per sample, for softmax cross-entropy.

    ``CrossEntropyLoss`` on outputs ``[N, K]`` has factors orthogonal to ``1``
    (exact ``√p_c (e_c − p)``: ``S_nᵀ 1 = √p (1 − Σ_k p_k) = 0``; sampled
    ``e_ŷ − p``), so ``H_n = S_n S_nᵀ`` has rank ``≤ K − 1``. With ``Q`` ``[K, K−1]``
    an orthonormal basis of ``1^⊥`` and the QR factorisation ``S_nᵀ Q = Q_n R_n``,

    .. math::
        T_n = Q R_n^⊤, \qquad T_n T_n^⊤ = Q Q^⊤ S_n S_n^⊤ Q Q^⊤ = H_n,

    ``K − 1`` columns with the same ``H_n``: ``diag(G)`` and each ``d_n`` depend on
    the factors only through ``H_n``, so they keep their values (to round-off) at
    ``(K − 1)/C`` of the backward passes and squares (``0.9×`` for ``K = C = 10``).
    Any other loss, fewer than ``K`` columns per sample (``mc_samples < K``),
    ``K > 1024`` or factors not orthogonal to ``1`` to ``√ε`` (a check that costs
    one pass over ``S``): ``lin`` itself. The copy takes ``lin``'s unused capture.
    """
    S = lin.factors  # [C, NS, K]
    C, K = S.shape[0], S.shape[-1]
    if type(lin.loss_func) is not nn.CrossEntropyLoss or S.dim() != 3:
        return lin
    if not 1 < K <= C or K > 1024 or not S.is_floating_point():
        return lin
    work = S.double().permute(1, 0, 2)  # [NS, C, K]: rows are the columns s_nc
    leak = work.sum(2).norm(dim=1)  # ‖S_nᵀ 1‖
    scale = work.flatten(1).norm(dim=1) * K**0.5
    if bool((leak > torch.finfo(S.dtype).eps ** 0.5 * scale).any()):
        return lin
    basis = torch.eye(K, dtype=work.dtype, device=work.device)
    basis[:, 0] = 1.0  # [1, e_2, …, e_K]: QR gives 1/√K, then a basis of 1^⊥
    Q = torch.linalg.qr(basis).Q[:, 1:]  # [K, K−1]
    R = torch.linalg.qr(work @ Q, mode="r").R  # [NS, K−1, K−1]
    T = Q @ R.transpose(1, 2)  # [NS, K, K−1]
    factors = T.permute(2, 0, 1).to(S.dtype).contiguous()  # [K−1, NS, K]
    return replace(lin, factors=factors, capture=lin.take_capture())


def streamed_diagonal(
    lin: Linearization, chunk: int = DEFAULT_CHUNK, per_component: bool = False
) -> list[Tensor]:
    """Squares of column blocks ``Vᵀ[cols]`` ``[B, D]``, summed (per sample).

    Returns:
        Per parameter ``[numel]``, or ``[N_S, numel]`` with ``per_component``.
    """
    fm = lin.fmodel
    C = lin.num_columns_per_sample
    lead = (lin.num_samples,) if per_component else ()
    total = torch.zeros(*lead, fm.num_params, dtype=fm.dtype, device=fm.device)
    for cols, block in lin.factor_blocks(chunk):
        squares = block.square()
        if per_component:  # column i = j·C + c belongs to row j
            owner = torch.arange(cols.start, cols.stop, device=block.device) // C
            total.index_add_(0, owner, squares)
        else:
            total += squares.sum(0)
    return list(total.split(fm.numels, dim=-1))


def diagonal_values(
    lin: Linearization,
    options: GGNOptions,
    work: float,
    per_component: bool = False,
) -> tuple[list[Tensor], DiagonalRoute, EngineReport | None]:
    """Flat per-parameter values by the layer-wise route, else streamed.

    ``options.strategy``: ``GENERIC`` (``engine="generic"``) and ``STREAMED``
    stream, any other is forced on the engine; ``options.chunk``: columns per block;
    ``work``: bytes for the engine's blocks and chunks. The caller holds
    :func:`lowrank_ggn.core.state.model_preserved`.
    """
    report, budget, chunk = None, int(min(work, 2**62)), options.chunk
    strategy = options.strategy
    lin = fewer_columns(lin)
    if strategy not in (Strategy.GENERIC, Strategy.STREAMED):
        try:
            values, report = layerwise_diagonal(
                lin, chunk, budget, per_component, strategy
            )
        except LayerwiseUnavailable as err:
            report = err.report
        else:
            return values, DiagonalRoute.LAYERWISE, report
    return streamed_diagonal(lin, chunk, per_component), DiagonalRoute.STREAMED, report


def diagonal_from_linearization(
    lin: Linearization,
    options: GGNOptions,
    work: float,
    mc_samples: int | None = None,
) -> GGNDiagonal:
    """``diag(G)`` of ``lin``'s factors (exact, or MC with ``mc_samples`` columns).

    Args:
        lin: The linearisation (its factors are the ones squared).
        options: The route's options (:func:`diagonal_values`).
        work: Bytes for the engine's blocks and chunks.
        mc_samples: Recorded on the result: ``M`` if ``lin``'s factors are MC.
    """
    values, route, report = diagonal_values(lin, options, work)
    return GGNDiagonal(
        [v.reshape(p.shape) for v, p in zip(values, lin.fmodel.params)],
        lin.path,
        mc_samples,
        lin.num_columns,
        route,
        report,
    )


__all__ = [
    "DiagonalRoute",
    "DiagonalValues",
    "GGNDiagonal",
    "diagonal_from_linearization",
    "diagonal_values",
    "fewer_columns",
    "redrawn",
    "streamed_diagonal",
]
