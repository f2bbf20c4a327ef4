r"""One curvature object: linearise the model on a batch once, serve every quantity.

:class:`GGN` holds one :class:`~lowrank_ggn.core.linearization.Linearization` of the
model around a batch — the forward pass with its autograd graph, the loss-Hessian
factors ``S`` and the engine's path — and derives everything from it:

* :meth:`GGN.gram` (and :meth:`GGN.block_grams`): the engine's backward passes,
  cached; :meth:`GGN.spectrum`: ``eigh`` of the cached Gram, eigenvectors from one
  batched backward pass of ``K`` cotangents;
* :meth:`GGN.moments`: ``N`` per-sample VJPs (one vmapped pass over the batch) on
  the per-sample path, ``N`` backward passes of the graph on the full-batch path;
* :meth:`GGN.directional_derivatives`: double-backward products on the graph;
* :meth:`GGN.linear_operator`, :meth:`GGN.gram_operator`: frozen copies.

How many forward passes the object takes, and what it guarantees about the model,
is :mod:`lowrank_ggn._batch`'s (:class:`~lowrank_ggn._batch.LinearizedBatch`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn

from lowrank_ggn._batch import LinearizedBatch
from lowrank_ggn.approx.param_groups import groups_within
from lowrank_ggn.core.budget import check_linearization_memory
from lowrank_ggn.core.diagonal import GGNDiagonal, diagonal_from_linearization, redrawn
from lowrank_ggn.core.engine.report import EngineReport
from lowrank_ggn.core.gram import gram_from_linearization
from lowrank_ggn.core.linearization import Linearization
from lowrank_ggn.core.loss_sampling import check_mc_samples
from lowrank_ggn.core.modes import Accumulate, Solver
from lowrank_ggn.core.options import DEFAULT_CHUNK, GGNOptions
from lowrank_ggn.core.outputs import OutputSpec
from lowrank_ggn.core.precision import (
    ErrorModel,
    accumulation_dtype,
    resolves_top,
    tries_native_sums,
)
from lowrank_ggn.core.solvers import check_solver, choose_solver, lanczos_pairs
from lowrank_ggn.core.spectrum import (
    GGNSpectrum,
    GramEigenpairs,
    check_eigenvectors,
    eigenvector_count,
    gram_eigh,
    spectrum_result,
)
from lowrank_ggn.core.state import refuse_changed
from lowrank_ggn.core.validation import check_options
from lowrank_ggn.diagnostics.audit import StructureReport, audit_structure
from lowrank_ggn.diagnostics.component_diagonals import (
    PerComponentDiagonals,
    per_component_from_linearization,
)
from lowrank_ggn.diagnostics.directional import (
    DirectionalDerivatives,
    directional_from_linearization,
)
from lowrank_ggn.diagnostics.moments import (
    GradientMoments,
    batch_gradient,
    moments_from_linearization,
)
from lowrank_ggn.operators import ggn_operator, gram_operator


class GGN(LinearizedBatch):
    r"""The generalized Gauss-Newton matrix of one batch, linearised once.

    ``G = Σ_n J_θF_nᵀ (∇²_{F_n} L) J_θF_n = V Vᵀ`` for the batch loss ``L`` (reduction
    included), exact for any model, BatchNorm in train mode included. Construction
    checks the arguments and runs nothing; the first method that needs the model
    linearises it (see the module docstring for what each method costs).

    Args:
        model: The module, ``inputs -> [N, *out]``; observed, never changed.
        loss_func: Any loss ``loss_func(outputs, targets) -> scalar`` that is a
            per-sample loss with a sum or mean reduction: ``CrossEntropyLoss``,
            ``MSELoss`` and ``BCEWithLogitsLoss`` in closed form, any other loss
            module or callable through autodiff Hessians
            (:mod:`lowrank_ggn.core.loss_factors`).
        inputs: The batch: a tensor ``[N, *in]``, a tuple of entries (passed
            positionally) or a dict (passed as keywords); entries whose dim 0 is
            ``N`` are split per sample, the rest shared
            (:mod:`lowrank_ggn.core.inputs`).
        targets: The batch's targets (a tuple is passed as ``loss(out, *targets)``).
        params: Parameters of ``model``; default: all that require grad. They define
            ``D`` and the flattening order of every parameter-space vector.
        subsampling: Batch positions whose curvature is kept (forward pass on the
            whole batch; :mod:`lowrank_ggn.core.subsampling`).
        batch_size: ``N`` when the first entry of tuple/dict ``inputs`` is not the
            batched one (default: its dim 0).
        mc_samples, generator, memory_budget, progress, path, engine, strategy, chunk, accumulate, output:
            The options, checked once and typed by
            :meth:`GGNOptions.of <lowrank_ggn.core.options.GGNOptions.of>`, which
            documents them; the object keeps them as ``.options``.
        options: Instead of those keywords, a ready
            :class:`~lowrank_ggn.core.options.GGNOptions` (one object shared by
            many calls); giving both is an error.

    Example:
        >>> import torch
        >>> from lowrank_ggn import GGN
        >>> from lowrank_ggn.reference import dense_ggn
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
        ...                             torch.nn.ReLU(), torch.nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0])
        >>> ggn = GGN(model, torch.nn.CrossEntropyLoss(), X, y)
        >>> spec = ggn.spectrum(top_k=2, eigenvectors=True)
        >>> G = dense_ggn(model, torch.nn.CrossEntropyLoss(), X, y)
        >>> assert torch.allclose(G @ spec.eigenvectors.T, spec.eigenvectors.T * spec.eigenvalues)
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")  # BatchNorm: per-component moments
        ...     mom = ggn.moments()
        ...     dd = ggn.directional_derivatives(spec)
        >>> assert torch.allclose(dd.curvatures, spec.eigenvalues)
        >>> ggn.forward_passes <= 3 + 4 / len(X)  # and the memory probe
        True

    """

    def __init__(
        self,
        model: nn.Module,
        loss_func: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        *,
        params: Sequence[Tensor] | None = None,
        mc_samples: int | None = None,
        generator: torch.Generator | None = None,
        subsampling: Sequence[int] | Tensor | None = None,
        memory_budget: float | None = None,
        progress: bool | None = None,
        path: str | None = None,
        engine: str = "layerwise",
        strategy: str | None = None,
        chunk: int = DEFAULT_CHUNK,
        accumulate: str | None = None,
        batch_size: int | None = None,
        output: OutputSpec = None,
        options: GGNOptions | None = None,
    ) -> None:
        options = GGNOptions.given(
            options,
            engine=engine,
            strategy=strategy,
            path=path,
            chunk=chunk,
            accumulate=accumulate,
            mc_samples=mc_samples,
            generator=generator,
            memory_budget=memory_budget,
            progress=progress,
            output=output,
        )
        super().__init__(
            options, model, loss_func, inputs, targets, params, subsampling, batch_size
        )
        self._gram: Tensor | None = None
        self._eigh: GramEigenpairs | None = None
        # a float32 model's pairs from float32 sums (None: not finite), their report
        self._native: tuple[GramEigenpairs | None, EngineReport] | None = None

    def gram(self) -> Tensor:
        r"""``Vᵀ V`` ``[N·C, N·C]``, sample-major (row ``n·C + c``); cached.

        In the accumulation dtype (float64 for a float32 model by default). Its
        nonzero eigenvalues are the GGN's; its trace is ``tr G``. The cached tensor
        itself is returned: :meth:`spectrum` diagonalises it, so do not modify it.
        """
        with self._observing():
            if self._gram is None:
                self._fit(grams=1)
                self._gram = self._grams(None)[0]
            return self._gram

    def block_grams(self, param_groups: Sequence[Mapping]) -> list[Tensor]:
        """One Gram ``V_gᵀ V_g`` per parameter group, from the same backward passes.

        ``V_g`` holds the rows of ``V`` of group ``g``: ``V_g V_gᵀ`` is the GGN's
        diagonal block of that group (:mod:`lowrank_ggn.approx.param_groups`).

        Args:
            param_groups: ``[{"params": [...]}, …]``, disjoint subsets of this GGN's
                parameters (as for ``torch.optim``).
        """
        with self._observing():
            groups, _ = groups_within(self.model, self.params, param_groups)
            self._fit(grams=len(groups))
            return self._grams(groups)[: len(param_groups)]

    def _pairs(self, lin: Linearization) -> GramEigenpairs:
        if self._eigh is None:
            self._native = None  # within the budget of one Gram and its eigh
            gram = self.gram()
            model = ErrorModel.of(lin.outputs.dtype, gram.dtype, lin.fmodel.num_params)
            self._eigh = gram_eigh(gram, model)
            self._report.solver = Solver.DENSE
        return self._eigh

    def _dense_pairs(
        self, lin: Linearization, top_k: int | None, rtol: float | None
    ) -> GramEigenpairs:
        """The dense solver's pairs, selected by ``rtol`` and ``top_k``.

        From the cached Gram; or, for a float32 model's ``top_k`` under the defaults,
        from float32 sums when the error model resolves all ``top_k`` there
        (:func:`~lowrank_ggn.core.precision.tries_native_sums`,
        :func:`~lowrank_ggn.core.precision.resolves_top`); else from float64 sums,
        whose report then counts the passes of both tries.
        """
        dtype = lin.outputs.dtype
        tried = None
        if (
            self._eigh is None
            and self._gram is None
            and tries_native_sums(
                dtype, self.options.accumulate, top_k, rtol, lin.num_columns
            )
        ):
            if self._native is None:
                self._native = self._native_pairs(lin)
            pairs, report = self._native
            if pairs is not None and resolves_top(
                pairs.eigenvalues, pairs.errors, top_k
            ):
                report.solver = Solver.DENSE
                self._report = report
                return pairs.select(rtol, top_k)
            tried = report
            del pairs, report  # _pairs drops the float32 pairs before float64 sums
        chosen = self._pairs(lin).select(rtol, top_k)
        if tried is not None:
            for kind, n in tried.passes.items():
                self._report.count(kind, n)
        return chosen

    def _native_pairs(
        self, lin: Linearization
    ) -> tuple[GramEigenpairs | None, EngineReport]:
        """Every eigenpair of the Gram summed in the parameters' dtype.

        ``None`` where that Gram is not finite (float32 products overflow where
        float64 ones do not). Holds ``[N·C, N·C]`` eigenvectors; the Gram itself is
        released.
        """
        options = replace(self.options, accumulate=Accumulate.NATIVE)
        check_linearization_memory(lin, options, 1)
        (gram,), report = gram_from_linearization(lin, options, self._work)
        if not torch.isfinite(gram.diagonal()).all():
            return None, report
        model = ErrorModel.of(lin.outputs.dtype, gram.dtype, lin.fmodel.num_params)
        try:
            pairs = gram_eigh(gram, model)
        except ValueError:  # non-finite entries off the diagonal
            return None, report
        pairs.diag = pairs.diag.clone()  # a view would keep the Gram alive
        return pairs, report

    def spectrum(
        self,
        top_k: int | None = None,
        eigenvectors: bool | int = False,
        solver: str = "dense",
        rtol: float | None = None,
    ) -> GGNSpectrum:
        r"""Nonzero eigenvalues (and eigenvectors ``e_k = V u_k / √λ_k``) of ``G``.

        Args:
            top_k: Return only the ``top_k`` largest.
            eigenvectors: ``True`` for every returned eigenvalue, an int ``k`` for
                the top ``k`` (one batched backward pass of ``k`` cotangents).
            solver: ``"dense"`` (the Gram and ``eigh``: every resolved eigenvalue),
                ``"lanczos"`` (matrix-free top ``top_k``) or ``"auto"``
                (:mod:`lowrank_ggn.core.solvers`).
            rtol: ``None``: the eigenvalues the error model of
                :mod:`lowrank_ggn.core.precision` resolves to ``1e-3`` relative;
                a float: those above ``rtol · λ_max``.

        Returns:
            A :class:`~lowrank_ggn.core.spectrum.GGNSpectrum`.
        """
        check_eigenvectors(eigenvectors)
        check_options(rtol=rtol, top_k=top_k)
        chosen = check_solver(solver, top_k, self.options.generic)
        with self._observing():
            vectors = eigenvector_count(eigenvectors, top_k)
            if chosen is Solver.LANCZOS:
                self._fit(grams=0, eigenvectors=vectors)
            elif self._eigh is None:
                self._fit(grams=1, eigh=True, eigenvectors=vectors)
            lin = self.linearization
            if chosen is Solver.AUTO:
                chosen = choose_solver(lin, top_k)
            acc = accumulation_dtype(lin.outputs.dtype, self.options.accumulate)
            model = ErrorModel.of(lin.outputs.dtype, acc, lin.fmodel.num_params)
            if chosen is Solver.LANCZOS:
                check_linearization_memory(lin, self.options, 0)
                pairs, self._report = lanczos_pairs(
                    lin, top_k, rtol, model, self._work, self.options.progress
                )
            else:
                pairs = self._dense_pairs(lin, top_k, rtol)
            chunk = self.options.chunk
            return spectrum_result(lin, pairs, eigenvectors, chunk, self._report)

    def block_spectra(
        self,
        param_groups: Sequence[Mapping],
        top_k: int | None = None,
        eigenvectors: bool | int = False,
        rtol: float | None = None,
    ) -> list[GGNSpectrum]:
        """The spectrum of each group's diagonal block of the GGN (dense solver).

        Eigenvectors of group ``g`` are ``[K, D_g]``, flattened in the order of the
        group's parameters. Same options as :meth:`spectrum`.
        """
        check_eigenvectors(eigenvectors)
        check_options(rtol=rtol, top_k=top_k)
        with self._observing():
            groups, positions = groups_within(self.model, self.params, param_groups)
            vectors = eigenvector_count(eigenvectors, top_k)
            self._fit(grams=len(groups), eigh=True, eigenvectors=vectors)
            lin = self.linearization
            grams = self._grams(groups)
            self._report.solver = Solver.DENSE
            model = ErrorModel.of(
                lin.outputs.dtype, grams[0].dtype, lin.fmodel.num_params
            )
            return [
                spectrum_result(
                    lin,
                    gram_eigh(gram, model).select(rtol, top_k),
                    eigenvectors,
                    self.options.chunk,
                    self._report,
                    cols,
                )
                for gram, cols in zip(grams, positions)
            ]

    def gradient(self) -> Tensor:
        """The batch gradient ``∇_θ L`` ``[D]`` (one backward pass of the graph)."""
        with self._observing():
            return batch_gradient(self.linearization)

    def moments(self, per_component: bool = False) -> GradientMoments:
        """Per-sample (per-component) gradients' moments (:mod:`~lowrank_ggn.diagnostics.moments`).

        Args:
            per_component: Also return the ``[N, D]`` rows (memory ``N·D``).
        """
        with self._observing():
            result = moments_from_linearization(
                self.linearization, self.options.chunk, per_component
            )
        result.warn()
        return result

    def _diagonal_linearization(
        self, mc_samples: int | None, generator: torch.Generator | None
    ) -> tuple[Linearization, int | None]:
        own, lin = self.options.mc_samples, self.linearization
        if mc_samples is None or (mc_samples == own and generator is None):
            return lin, own
        budget = self.options.memory_budget
        return redrawn(lin, mc_samples, generator, budget), mc_samples

    def diagonal(
        self, mc_samples: int | None = None, generator: torch.Generator | None = None
    ) -> GGNDiagonal:
        r"""``diag(G) = Σ_{n,c} (J_θF_nᵀ s_nc)²`` per parameter (:mod:`lowrank_ggn.core.diagonal`).

        Args:
            mc_samples: ``None``: this GGN's factors (exact, or its own Monte-Carlo
                factors if built with ``mc_samples``: the same draw as
                :meth:`spectrum`). ``M``: that draw when ``M`` is this GGN's own
                ``mc_samples`` and no ``generator`` is given, else ``M`` fresh
                columns per sample drawn from the linearisation's outputs (no
                forward pass): an unbiased estimate.
            generator: ``torch.Generator`` for a fresh draw.

        Cost: ``C`` (``M``) backward passes of the batch on the per-sample path, the
        Gram engine's ``bn_split`` passes under train-mode BatchNorm, and one
        captured forward pass if an earlier method used the linearisation's.
        Returns a :class:`~lowrank_ggn.core.diagonal.GGNDiagonal` (``.per_param``,
        ``.flat``, ``.trace``, ``.route``).
        """
        check_mc_samples(mc_samples, generator)
        with self._observing():
            self._fit(grams=0)
            lin, mc = self._diagonal_linearization(mc_samples, generator)
            return diagonal_from_linearization(lin, self.options, self._work, mc)

    def trace(
        self, mc_samples: int | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """``tr G`` (0-dim, parameters' dtype): the cached Gram's trace, else ``Σ diag``.

        Equals the sum of the nonzero eigenvalues; arguments as for :meth:`diagonal`.
        """
        check_mc_samples(mc_samples, generator)
        with self._observing():
            own = mc_samples is None or (
                mc_samples == self.options.mc_samples and generator is None
            )
            if own and self._gram is not None:
                return self._gram.trace().to(self._budget_dtype())
            return self.diagonal(mc_samples, generator).trace

    def per_component_diagonals(self) -> PerComponentDiagonals:
        """Rows ``d_n = Σ_c (J_θF_nᵀ s_nc)²`` ``[N, *θ_p.shape]`` that sum to :meth:`diagonal`.

        BackPACK's ``BatchDiagGGN`` analogue, with this GGN's factors; ``ρ`` as for
        :meth:`moments`. Under train-mode BatchNorm the rows are per-component (a
        :class:`~lowrank_ggn.SampleMixingWarning` says so).
        """
        with self._observing():
            self._fit(grams=0)
            lin, mc = self.linearization, self.options.mc_samples
            result = per_component_from_linearization(lin, self.options, self._work, mc)
        result.warn()
        return result

    def directional_derivatives(
        self, directions: Tensor | GGNSpectrum
    ) -> DirectionalDerivatives:
        """Per-sample slopes ``γ_nk`` and curvatures ``λ_nk`` along ``directions``.

        Args:
            directions: ``[K, D]`` (or ``[D]``) in this GGN's flattening, or a
                :class:`~lowrank_ggn.core.spectrum.GGNSpectrum` with eigenvectors.
        """
        with self._observing():
            result = directional_from_linearization(
                self.linearization, directions, self.options.chunk
            )
        result.warn()
        return result

    def linear_operator(self) -> LinearOperator:
        """``G`` (``D × D``) as a scipy ``LinearOperator``, frozen now (see :mod:`lowrank_ggn.operators`)."""
        with self._observing():
            return ggn_operator(self.model, self.linearization, self.options.chunk)

    def gram_operator(self) -> LinearOperator:
        """``Vᵀ V`` (``N·C × N·C``) as a scipy ``LinearOperator``, frozen now."""
        with self._observing():
            return gram_operator(self.model, self.linearization, self.options.chunk)

    def audit(self) -> StructureReport:
        """The structure audit of this batch (:func:`lowrank_ggn.audit_structure`).

        It runs its own checks (forward passes of the batch and of single samples).
        """
        refuse_changed(self.model, self._versions, "GGN")
        batch = (self.model, self.loss_func, self.inputs, self.targets)
        return audit_structure(*batch, params=self.params)


__all__ = ["GGN"]
