r"""The peers as every benchmark calls them: ViViT's eigh, curvlinops + ``eigsh``,
deflated power iteration, and which of them are installed.

* ViViT 1.0.0 (https://github.com/f-dangel/vivit) on BackPACK: ``EighComputation``
  eigendecomposes the Gram matrix of ``V`` (``[N·C, N·C]``) and returns eigenvectors
  for the selected eigenvalues. It calls ``Tensor.symeig``, which torch 2 keeps only as
  a stub that raises: :func:`shim_symeig` puts ``torch.linalg.eigh`` in its place.
* curvlinops (https://github.com/f-dangel/curvlinops): ``GGNLinearOperator`` with
  ``check_deterministic=False`` (its fastest setting) and
  ``scipy.sparse.linalg.eigsh(k, which="LA")``, GGN-vector products counted. Its
  ``torch.func`` transforms refuse BatchNorm's in-place running-statistics update:
  build BatchNorm with ``track_running_stats=False`` for it (the same train-mode
  function).
* :func:`power_iteration`: deflated power iteration on curvlinops' products with
  PyHessian's defaults (https://github.com/amirgholami/PyHessian): at most 100
  iterations, relative tolerance 1e-3 per eigenvalue.

Every import of a peer happens inside the function that needs it.
"""

from __future__ import annotations

import importlib.util

#: Modules each peer method needs (methods not listed need none beyond torch).
PEER_MODULES = {
    "vivit": ("vivit", "backpack"),
    "backpack": ("backpack",),
    "backpack_mc1": ("backpack",),
    "curvlinops": ("curvlinops",),
    "power": ("curvlinops",),
    "hutchinson": ("curvlinops",),
    "xdiag": ("curvlinops",),
}


def installed(*modules: str) -> bool:
    """Whether every module can be imported (peers are optional)."""
    return all(importlib.util.find_spec(m) is not None for m in modules)


def available(method: str) -> bool:
    """Whether the modules a method needs (:data:`PEER_MODULES`) are installed."""
    return installed(*PEER_MODULES.get(method, ()))


def shim_symeig() -> None:
    """``Tensor.symeig`` as ``torch.linalg.eigh`` with the old return convention
    ``(eigenvalues ascending, eigenvectors or an empty tensor)``."""
    import torch

    def symeig(self, eigenvectors=False, upper=True):
        evals, evecs = torch.linalg.eigh(self, UPLO="U" if upper else "L")
        return evals, (evecs if eigenvectors else torch.empty(0))

    torch.Tensor.symeig = symeig


def vivit_eigh(model, loss, X, y, k: int = 1, mc_samples: int = 0):
    """Every GGN eigenvalue of the batch by ViViT's ``EighComputation``, descending.

    The eigenvectors of the top ``k`` are computed too (ViViT's cost); ``mc_samples``
    Monte-Carlo samples per datum replace the exact loss Hessian's factors when
    positive. ``model`` and ``loss`` are extended by BackPACK in place.
    """
    from backpack import backpack, extend

    shim_symeig()
    from vivit.linalg.eigh import EighComputation

    model, loss = extend(model), extend(loss)
    comp = EighComputation(mc_samples=mc_samples)
    kept = {}

    def criterion(evals):
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


def ggn_operator(model, loss, X, y):
    """curvlinops' ``GGNLinearOperator`` of the batch, ``check_deterministic=False``."""
    from curvlinops import GGNLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    return GGNLinearOperator(model, loss, params, [(X, y)], check_deterministic=False)


def curvlinops_eigsh(model, loss, X, y, k: int = 10) -> tuple[list[float], dict]:
    """curvlinops' GGN operator and ``eigsh(k, which="LA")``: the top ``k``
    eigenvalues, descending, and ``{"products": GGN-vector products}``."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    op = ggn_operator(model, loss, X, y).to_scipy()
    products = 0

    def matvec(v):
        nonlocal products
        products += 1 if v.ndim == 1 else v.shape[1]
        return op @ v

    counted = LinearOperator(op.shape, matvec=matvec, matmat=matvec, dtype=op.dtype)
    evals, _ = eigsh(counted, k=k, which="LA")
    return sorted((float(v) for v in evals), reverse=True), {"products": products}


def power_iteration(
    model, loss, X, y, k: int, max_iter: int = 100, tol: float = 1e-3
) -> tuple[list[float], dict]:
    """Deflated power iteration (PyHessian's scheme) on curvlinops' GGN-vector
    products: the top ``k`` eigenvalues in the order found, ``{"matvecs": …}``."""
    import torch

    op = ggn_operator(model, loss, X, y)
    D = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gen = torch.Generator(device="cpu").manual_seed(0)
    found, values, matvecs = [], [], 0
    for _ in range(k):
        v = torch.randn(D, generator=gen).to(X.device, X.dtype)
        lam = None
        for _ in range(max_iter):
            for u in found:  # deflate
                v = v - (u @ v) * u
            v = v / v.norm()
            Gv = op @ v
            matvecs += 1
            for u, mu in zip(found, values):
                Gv = Gv - mu * (u @ v) * u
            new = (v @ Gv).item()
            v = Gv
            if lam is not None and abs(new - lam) <= tol * (abs(lam) + 1e-12):
                lam = new
                break
            lam = new
        found.append(v / v.norm())
        values.append(lam)
    return values, {"matvecs": matvecs}
