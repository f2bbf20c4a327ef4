"""ViViT (``vivit-for-pytorch`` on BackPACK) as a peer: its GGN spectrum of one batch.

vivit 1.0.0 calls ``Tensor.symeig``, which torch 2 keeps only as a stub that raises;
:func:`shim_symeig` puts ``torch.linalg.eigh`` in its place (as ``benchmarks/_peers.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def shim_symeig() -> None:
    """``Tensor.symeig`` as ``torch.linalg.eigh`` with the old return convention."""

    def symeig(self, eigenvectors=False, upper=True):
        evals, evecs = torch.linalg.eigh(self, UPLO="U" if upper else "L")
        return evals, (evecs if eigenvectors else torch.empty(0))

    torch.Tensor.symeig = symeig


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
    from backpack import backpack, extend

    shim_symeig()
    from vivit.linalg.eigh import EighComputation

    model, loss = extend(model), extend(loss)
    comp = EighComputation(mc_samples=1 if mc else 0)
    kept = {}

    def criterion(evals: Tensor) -> list[int]:
        kept["all"] = evals.detach().clone()
        return list(range(evals.numel() - k, evals.numel()))

    group = {
        "params": [p for p in model.parameters() if p.requires_grad],
        "criterion": criterion,
    }
    with backpack(
        comp.get_extension(), extension_hook=comp.get_extension_hook([group])
    ):
        loss(model(X), y).backward()
    comp.get_result(group)
    return kept["all"].flip(0)


def vivit_spectrum(model, loss, X, y, mc: bool = False) -> int:
    """Number of eigenvalues vivit returned (for the memory workers)."""
    return int(vivit_eigenvalues(model, loss, X, y, mc).numel())
