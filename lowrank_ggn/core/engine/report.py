r"""What the engine chose, as data: strategies, per-layer treatments, pass counts.

**Strategies** (how the ``N·C`` columns ``v_i = J_θFᵀ (e_n ⊗ s_nc)`` are obtained):

* :attr:`Strategy.PER_SAMPLE`: the model is sample-independent; ``C`` backward passes
  of the cotangents ``S[c]`` (all samples at once) give every column's layer-output
  gradient. Work: ``C`` batch backward passes.
* :attr:`Strategy.BN_SPLIT`: BatchNorm with batch statistics mixes samples *only*
  through its per-channel mean ``μ`` and inverse standard deviation ``r``. With the
  statistics held fixed the network is sample-independent ("frozen"), and

  .. math::
      V = V_f + B W, \qquad V_f = ∂_θF̃^⊤ S, \quad B = (J_θ m)^⊤ ∈ ℝ^{D×2K},
      \quad W = ∂_m F̃^⊤ S ∈ ℝ^{2K×NC},

  where ``F̃(θ, m)`` is the network with its statistics ``m = (μ_l, r_l)_l`` as inputs
  and ``K = Σ_l K_l`` the channels of all such BatchNorm layers. ``V_f`` comes from
  ``C`` frozen backward passes (per-sample, like :attr:`PER_SAMPLE`), ``W`` from the
  channel sums of the frozen cotangents at each BatchNorm output, and ``B`` from one
  backward pass per statistic, from its BatchNorm layer down (``2K`` directions,
  batched). Work: ``C`` batch passes plus ``Σ_l 2K_l`` partial passes.
* :attr:`Strategy.COLUMNS`: one full-batch backward pass per column (batched); layers
  whose gradients turn out to depend on other samples keep explicit ``[NC, D_l]``
  blocks. Work: ``N·C`` passes; memory up to ``N·C·D``.
* :attr:`Strategy.STREAMED`: Gram columns ``Sᵀ J (Jᵀ S_B)`` for blocks ``B`` of columns,
  one batched vector-Jacobian and one batched Jacobian-vector product per block,
  holding only ``[|B|, D]``. Work: ``N·C`` backward plus ``N·C`` forward-mode passes;
  memory ``|B|·D``, bounded by ``memory_budget`` for any model.

**Layer treatments**: see :class:`LayerTreatment` (``STREAMED`` keeps no per-layer
data, so its report lists no layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lowrank_ggn.core.modes import Mode, Solver, Strategy  # re-exported: their old home


class LayerTreatment(Mode):
    """How one layer's contribution ``V_lᵀ V_l`` to the Gram matrix was added.

    ``KRONECKER`` and ``LOCAL_EXPLICIT`` are per-sample (the layer's gradients vanish
    off each column's own sample): Kronecker products of the input kernel (index
    matches for embeddings) and output gradients, or explicit rows ``[NC, D_l]`` in
    chunks, whichever the layer's cost model favours
    (:mod:`lowrank_ggn.core.engine.operands`). ``MIXING`` holds explicit rows of full-batch gradients (``columns``).
    ``SPLIT`` adds frozen per-sample rows and statistics directions, ``V_{f,l} +
    B_l W`` (``bn_split``), as explicit rows; ``SPLIT_KRONECKER`` the frozen rows'
    Kronecker form plus the statistics terms, where those live on one output channel
    each. ``SHARED``: a layer with a parameter that other captured
    calls read too (tied weights, a reused layer): explicit rows of each use, summed
    before the Gram. ``GENERIC`` covers parameters of no captured layer.
    """

    KRONECKER = "kronecker"
    LOCAL_EXPLICIT = "local_explicit"
    MIXING = "mixing"
    SPLIT = "split"
    SPLIT_KRONECKER = "split_kronecker"
    SHARED = "shared"
    GENERIC = "generic"

    @property
    def local(self) -> bool:
        """Whether the layer's per-column gradients are per-sample."""
        return self in (LayerTreatment.KRONECKER, LayerTreatment.LOCAL_EXPLICIT)

    @property
    def split(self) -> bool:
        """Whether the layer's rows are frozen rows plus statistics directions."""
        return self in (LayerTreatment.SPLIT, LayerTreatment.SPLIT_KRONECKER)


@dataclass
class EngineReport:
    """The engine's choices for one call, as data.

    Attributes:
        strategy: The :class:`Strategy` that produced the Gram matrix (or its
            operator).
        solver: The :class:`Solver` that produced the eigenpairs (``None`` for
            :func:`lowrank_ggn.gram_matrix`).
        layers: Qualified module name -> :class:`LayerTreatment`, for captured
            layers (:mod:`lowrank_ggn.core.engine.layers`: ``Linear``, convolutions,
            transposed convolutions, embeddings, normalisation affines) and
            ``BatchNorm``; qualified parameter name -> ``GENERIC`` for the others.
        passes: Counts of the autodiff work done: ``"forward"`` (graph-building
            forward passes), ``"backward"`` (batch backward passes, each a batched
            call counted per cotangent), ``"statistics"`` (statistics directions,
            :attr:`Strategy.BN_SPLIT`), ``"jvp"`` (forward-mode products).
        estimated_passes: The cost model's full-batch-pass equivalents per strategy
            that was considered (see :func:`lowrank_ggn.core.engine.plan.plan_strategy`).
        reason: One sentence on why this strategy was chosen.
        fallback: Set when a faster strategy failed its self-check and this one ran
            instead.
        reasons: Qualified layer name -> why it was left uncaptured although its
            type is known (a recomputation that did not match what the model
            computed); its parameters are then treated like any other.
        memory_budget: The ``memory_budget`` in bytes the call was held to.
        memory_estimate: Part -> bytes of the call's estimated peak above the
            process's memory at its start (:mod:`lowrank_ggn.core.footprint`); the
            strategy's own blocks fit in what is left.
        memory_peak: The measured peak resident memory above the start of the
            method call that built this report, in bytes (``None``: not measured,
            e.g. not on Linux).
    """

    strategy: Strategy
    solver: Solver | None = None
    layers: dict[str, LayerTreatment] = field(default_factory=dict)
    passes: dict[str, int] = field(default_factory=dict)
    estimated_passes: dict[Strategy, float] = field(default_factory=dict)
    reason: str = ""
    fallback: str | None = None
    reasons: dict[str, str] = field(default_factory=dict)
    memory_budget: float | None = None
    memory_estimate: dict[str, float] = field(default_factory=dict)
    memory_peak: float | None = None

    def count(self, kind: str, n: int = 1) -> None:
        """Add ``n`` to the pass counter ``kind``."""
        self.passes[kind] = self.passes.get(kind, 0) + n

    def __str__(self) -> str:
        layers = ", ".join(f"{k}:{v}" for k, v in self.layers.items())
        passes = ", ".join(f"{k}={v}" for k, v in self.passes.items())
        text = f"{self.strategy}"
        if self.solver is not None:
            text += f" / {self.solver}"
        if layers:
            text += f" [{layers}]"
        if passes:
            text += f" ({passes})"
        if self.fallback:
            text += f"; fallback: {self.fallback}"
        return text


__all__ = ["EngineReport", "LayerTreatment", "Solver", "Strategy"]
