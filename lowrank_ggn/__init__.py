"""lowrank_ggn: the exact low-rank structure of the generalized Gauss-Newton matrix.

The mini-batch GGN ``G = Σ_n J_nᵀ S_n S_nᵀ J_n = V Vᵀ`` has rank at most ``N·C``;
its nonzero eigenvalues are those of the ``N·C × N·C`` Gram matrix ``Vᵀ V``
(Dangel, Tatzel & Hennig, TMLR 2022, https://arxiv.org/abs/2106.02624). lowrank_ggn
computes them exactly for any model, BatchNorm in train mode included.
"""

from lowrank_ggn import reference
from lowrank_ggn.gram import gram_matrix
from lowrank_ggn.loss_factors import loss_hessian_factors
from lowrank_ggn.sample_mixing import EnginePath
from lowrank_ggn.spectrum import GGNSpectrum, NearZeroEigenvalueWarning, ggn_spectrum

__version__ = "0.1.0"

__all__ = [
    "EnginePath",
    "GGNSpectrum",
    "NearZeroEigenvalueWarning",
    "ggn_spectrum",
    "gram_matrix",
    "loss_hessian_factors",
    "reference",
]
