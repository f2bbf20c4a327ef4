"""ViViT (``vivit-for-pytorch`` on BackPACK) as a peer: its GGN spectrum of one batch.

The call and the ``torch.symeig`` shim vivit 1.0.0 needs on torch 2 are the
benchmarks' (:mod:`harness.peers`); :mod:`_common` puts ``benchmarks/`` on
``sys.path``.
"""

from __future__ import annotations

import _common  # noqa: F401 - puts the benchmarks' harness on sys.path
from harness.peers import shim_symeig, vivit_eigh
from torch import Tensor, nn

__all__ = ["shim_symeig", "vivit_eigenvalues", "vivit_spectrum"]


def vivit_eigenvalues(
    model: nn.Module,
    loss: nn.Module,
    X: Tensor,
    y: Tensor,
    mc: bool = False,
    k: int = 1,
) -> Tensor:
    """All nonzero GGN eigenvalues by vivit's ``EighComputation`` (``k`` eigenvectors
    are computed too; ``mc``: one Monte-Carlo sample per datum), descending."""
    return vivit_eigh(model, loss, X, y, k, mc_samples=1 if mc else 0)


def vivit_spectrum(model, loss, X, y, mc: bool = False) -> int:
    """Number of eigenvalues vivit returned (for the memory workers)."""
    return int(vivit_eigenvalues(model, loss, X, y, mc).numel())
