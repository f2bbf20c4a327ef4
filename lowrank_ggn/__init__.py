"""lowrank_ggn: the exact low-rank structure of the generalized Gauss-Newton matrix.

The mini-batch GGN ``G = Σ_n J_nᵀ S_n S_nᵀ J_n = V Vᵀ`` has rank at most ``N·C``;
its nonzero eigenvalues are those of the ``N·C × N·C`` Gram matrix ``Vᵀ V``
(Dangel, Tatzel & Hennig, TMLR 2022, https://arxiv.org/abs/2106.02624). lowrank_ggn
computes them exactly for any model, BatchNorm in train mode included.
"""

from lowrank_ggn import reference
from lowrank_ggn.approx.dataset import (
    DatasetSpectrum,
    GramMemoryError,
    ggn_spectrum_dataset,
)
from lowrank_ggn.approx.param_groups import per_layer_groups
from lowrank_ggn.core.gram import gram_matrix
from lowrank_ggn.core.loss_factors import (
    loss_hessian_factors,
    sampled_loss_hessian_factors,
)
from lowrank_ggn.core.paths import EnginePath
from lowrank_ggn.core.spectrum import (
    GGNSpectrum,
    NearZeroEigenvalueWarning,
    ggn_spectrum,
)
from lowrank_ggn.diagnostics.audit import (
    SampleMixingWarning,
    StructureCheck,
    StructureReport,
    audit_structure,
)
from lowrank_ggn.diagnostics.directional import (
    DirectionalDerivatives,
    directional_derivatives,
)
from lowrank_ggn.diagnostics.moments import GradientMoments, gradient_moments
from lowrank_ggn.operators import ggn_linear_operator, gram_linear_operator

__version__ = "0.1.0"

__all__ = [
    "DirectionalDerivatives",
    "EnginePath",
    "GGNSpectrum",
    "GradientMoments",
    "SampleMixingWarning",
    "StructureCheck",
    "StructureReport",
    "audit_structure",
    "directional_derivatives",
    "gradient_moments",
    "NearZeroEigenvalueWarning",
    "ggn_spectrum",
    "gram_matrix",
    "loss_hessian_factors",
    "reference",
    # approximations and scale (issue 4)
    "DatasetSpectrum",
    "GramMemoryError",
    "ggn_linear_operator",
    "ggn_spectrum_dataset",
    "gram_linear_operator",
    "per_layer_groups",
    "sampled_loss_hessian_factors",
]
