r"""Optimisers that use the GGN's eigen-decomposition.

:class:`DampedNewton` takes damped Newton steps along the top-``K`` GGN eigenvectors
of each batch (exact for BatchNorm in train mode); its dampings come from a
:class:`DampingPolicy`: :class:`ConstantDamping` or ViViT's
:class:`BootstrapDamping` (Dangel, Tatzel & Hennig, TMLR 2022,
https://arxiv.org/abs/2106.02624).
"""

from lowrank_ggn.optim.damped_newton import DampedNewton, StepInfo
from lowrank_ggn.optim.damping import (
    BootstrapDamping,
    ConstantDamping,
    DampingPolicy,
    DirectionalData,
)
from lowrank_ggn.optim.warnings import NoProgressWarning, TopKWarning

__all__ = [
    "BootstrapDamping",
    "ConstantDamping",
    "DampedNewton",
    "DampingPolicy",
    "DirectionalData",
    "NoProgressWarning",
    "StepInfo",
    "TopKWarning",
]
