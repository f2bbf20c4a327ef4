"""Small shims that let the released peers run on torch 2 (benchmarks only)."""

from __future__ import annotations


def shim_symeig() -> None:
    """vivit 1.0.0 calls ``Tensor.symeig``; torch 2 keeps it only as a stub that raises.

    Replace it by ``torch.linalg.eigh`` with the old return convention
    ``(eigenvalues ascending, eigenvectors or an empty tensor)``.
    """
    import torch

    def symeig(self, eigenvectors=False, upper=True):
        evals, evecs = torch.linalg.eigh(self, UPLO="U" if upper else "L")
        return evals, (evecs if eigenvectors else torch.empty(0))

    torch.Tensor.symeig = symeig
