"""lowrank_ggn: the exact low-rank structure of the generalized Gauss-Newton matrix.

The mini-batch GGN ``G = Σ_n J_nᵀ S_n S_nᵀ J_n = V Vᵀ`` has rank at most ``N·C``;
its nonzero eigenvalues are those of the ``N·C × N·C`` Gram matrix ``Vᵀ V``
(Dangel, Tatzel & Hennig, TMLR 2022, https://arxiv.org/abs/2106.02624). lowrank_ggn
computes them exactly for any model, BatchNorm in train mode included.

:class:`GGN` linearises a model on a batch once and serves the Gram matrix, the
spectrum, the diagonal and trace, gradient moments, directional derivatives and linear operators from it;
the one-call functions of :mod:`lowrank_ggn.functional` wrap it.
"""

from lowrank_ggn import (
    _threads,  # noqa: F401 (first: before scipy's BLAS loads)
    optim,
    reference,
)
from lowrank_ggn.approx.dataset import DatasetSpectrum, ggn_spectrum_dataset
from lowrank_ggn.approx.dataset_solvers import GramMemoryError
from lowrank_ggn.approx.param_groups import per_layer_groups
from lowrank_ggn.core.budget import MemoryBudgetExceeded, MemoryBudgetWarning
from lowrank_ggn.core.diagonal import GGNDiagonal
from lowrank_ggn.core.loss_factors import loss_hessian_factors
from lowrank_ggn.core.loss_sampling import sampled_loss_hessian_factors
from lowrank_ggn.core.losses.autodiff import AutodiffLoss
from lowrank_ggn.core.losses.registry import resolve_loss
from lowrank_ggn.core.options import GGNOptions
from lowrank_ggn.core.paths import EnginePath
from lowrank_ggn.core.spectrum import GGNSpectrum, NearZeroEigenvalueWarning
from lowrank_ggn.core.state import AutocastDisabledWarning
from lowrank_ggn.curvature import GGN
from lowrank_ggn.dataset_diagonal import DatasetDiagonal, ggn_diagonal_dataset
from lowrank_ggn.diagnostics.audit import (
    StructureCheck,
    StructureReport,
    audit_structure,
)
from lowrank_ggn.diagnostics.component_diagonals import PerComponentDiagonals
from lowrank_ggn.diagnostics.directional import DirectionalDerivatives
from lowrank_ggn.diagnostics.moments import GradientMoments
from lowrank_ggn.diagnostics.warnings import SampleMixingWarning
from lowrank_ggn.functional import (
    block_gram_matrices,
    directional_derivatives,
    ggn_block_spectra,
    ggn_diagonal,
    ggn_linear_operator,
    ggn_spectrum,
    ggn_trace,
    gradient_moments,
    gram_linear_operator,
    gram_matrix,
)

__version__ = "0.1.0"

__all__ = [
    "GGN",
    "GGNOptions",
    "AutocastDisabledWarning",
    "AutodiffLoss",
    "DatasetDiagonal",
    "DatasetSpectrum",
    "DirectionalDerivatives",
    "EnginePath",
    "GGNDiagonal",
    "GGNSpectrum",
    "GradientMoments",
    "GramMemoryError",
    "MemoryBudgetExceeded",
    "MemoryBudgetWarning",
    "NearZeroEigenvalueWarning",
    "PerComponentDiagonals",
    "SampleMixingWarning",
    "StructureCheck",
    "StructureReport",
    "audit_structure",
    "block_gram_matrices",
    "directional_derivatives",
    "ggn_block_spectra",
    "ggn_diagonal",
    "ggn_diagonal_dataset",
    "ggn_linear_operator",
    "ggn_spectrum",
    "ggn_spectrum_dataset",
    "ggn_trace",
    "gradient_moments",
    "gram_linear_operator",
    "gram_matrix",
    "loss_hessian_factors",
    "optim",
    "per_layer_groups",
    "reference",
    "resolve_loss",
    "sampled_loss_hessian_factors",
]
