r"""The cases of ``bench_batchnorm.py``: which runs each part makes, the models they
build, and the call each run times.

A :class:`Case` is one worker run (a method of one part on one model and batch size),
passed to the worker as JSON. ``strategy``, ``solver`` and ``progress`` are passed to
``ggn_spectrum`` only when they differ from its defaults and its signature has them,
so a case also runs against a lowrank_ggn that predates them
(:func:`unsupported` says when it cannot).
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

from harness.models import build
from harness.peers import curvlinops_eigsh
from harness.results import plain_data

PARTS = ("bn_vs_plain", "resnet18", "lanczos")
# keyword arguments of ggn_spectrum that are only passed when not at their default
OPTIONAL_KWARGS = {"strategy": None, "solver": "dense", "progress": None}


@dataclasses.dataclass(frozen=True)
class Case:
    """One worker run: a method of one part on one model and batch size."""

    part: str
    method: str  # "lowrank_ggn", "lowrank_ggn[columns]", "lanczos", "curvlinops", …
    model: str  # "3c3d", "3c3d-bn", "tiny", "tiny-plain", "resnet18", "resnet18-eval"
    N: int
    k: int
    kwargs: dict = dataclasses.field(default_factory=dict)  # for ggn_spectrum
    quick: bool = False
    pythonpath: str | None = None  # import lowrank_ggn from here (--previous)


def cases(part: str, args) -> list[Case]:
    """The runs of one part, full size or (``--quick``) tiny."""
    q = args.quick
    k = 3 if q else 10
    if part == "bn_vs_plain":
        plain, bn = ("tiny-plain", "tiny") if q else ("3c3d", "3c3d-bn")
        out = []
        for N in [8] if q else args.n:
            ev = {"eigenvectors": k}
            out += [
                Case(part, "lowrank_ggn", plain, N, k, ev, q),
                Case(part, "lowrank_ggn", bn, N, k, ev, q),
            ]
            if q or N in args.columns_n:
                columns = {**ev, "strategy": "columns"}
                out.append(Case(part, "lowrank_ggn[columns]", bn, N, k, columns, q))
                if args.previous_dir:
                    out.append(
                        Case(part, "previous", bn, N, k, ev, q, args.previous_dir)
                    )
        return out
    if part == "resnet18":
        ev = {"eigenvectors": k}
        return [
            Case(part, "lowrank_ggn", model, N, k, ev, q)
            for N in ([4] if q else args.resnet_n)
            for model in ("resnet18", "resnet18-eval")
        ]
    if part == "lanczos":
        model, N = ("tiny", 16) if q else ("3c3d-bn", args.lanczos_n)
        top = {"top_k": k}
        return [
            Case(part, "dense", model, N, k, {**top, "solver": "dense"}, q),
            Case(part, "lanczos", model, N, k, {**top, "solver": "lanczos"}, q),
            Case(part, "curvlinops", model, N, k, {}, q),
        ]
    raise ValueError(f"unknown part {part!r}; choose from {PARTS}")


def build_case(
    model_name: str,
    N: int,
    device: str,
    seed: int,
    quick: bool,
    running_stats: bool = True,
):
    """Model (train mode unless ``*-eval``), loss, inputs and targets for one case.

    The 3c3d and tiny nets are :func:`harness.models.build`'s; ResNet-18 sees ``[N, 3, 32, 32]`` and C = 10 (``--quick``: ``[N, 3, 8, 8]``, C = 3).
    """
    import torch
    from torch import nn

    if model_name.startswith("resnet18"):
        from harness.resnet import resnet18

        size, C = (8, 3) if quick else (32, 10)
        torch.manual_seed(seed)
        model = resnet18(num_classes=C)
        X, y = torch.randn(N, 3, size, size), torch.randint(0, C, (N,))
        model = model.to(device).train(not model_name.endswith("-eval"))
        return model, nn.CrossEntropyLoss(), X.to(device), y.to(device)
    return build(model_name, N, device, seed, running_stats)


def case_fields(case: Case) -> dict:
    """What identifies a case's record."""
    return {
        "part": case.part,
        "method": case.method,
        "model": case.model,
        "N": case.N,
        "kwargs": case.kwargs,
    }


# --------------------------------------------------------------------------- methods
def accepted_keywords() -> set[str]:
    """Keywords this lowrank_ggn's ``ggn_spectrum`` takes (its ``GGN``'s options too)."""
    import lowrank_ggn
    from lowrank_ggn import ggn_spectrum

    accepted = set(inspect.signature(ggn_spectrum).parameters)
    if hasattr(lowrank_ggn, "GGN"):  # options pass through to the curvature object
        accepted |= set(inspect.signature(lowrank_ggn.GGN).parameters)
    return accepted


def unsupported(kwargs: dict) -> str | None:
    """Why this lowrank_ggn cannot take ``kwargs`` (a keyword it lacks), or ``None``."""
    accepted = accepted_keywords()
    for name, value in kwargs.items():
        if name not in accepted and value != OPTIONAL_KWARGS.get(name, object()):
            return f"ggn_spectrum has no {name}= (this lowrank_ggn predates it)"
    return None


def call_kwargs(kwargs: dict) -> dict:
    """``kwargs`` plus ``progress=False``, minus the optional ones at their default or
    unknown to this ``ggn_spectrum``."""
    accepted = accepted_keywords()
    out = {}
    for name, value in {**kwargs, "progress": False}.items():
        if name in OPTIONAL_KWARGS and (
            value == OPTIONAL_KWARGS[name] or name not in accepted
        ):
            continue
        out[name] = value
    return out


def lowrank(model, loss, X, y, k: int, kwargs: dict):
    """``ggn_spectrum`` with the case's keywords; top-k eigenvalues and what it did."""
    import torch

    from lowrank_ggn import ggn_spectrum

    res = ggn_spectrum(model, loss, X, y, **call_kwargs(kwargs))
    import lowrank_ggn

    info = {
        "num_nonzero": int(res.eigenvalues.numel()),
        "package": str(Path(lowrank_ggn.__file__).parent),  # which release ran
    }
    if kwargs.get("eigenvectors"):
        wanted = res.eigenvalues.numel()
        if kwargs["eigenvectors"] is not True:
            wanted = min(kwargs["eigenvectors"], wanted)
        assert res.eigenvectors.shape[0] == wanted
        assert torch.isfinite(res.eigenvectors).all()
    path = getattr(res, "path", None)
    info["path"] = getattr(path, "name", None if path is None else str(path))
    if getattr(res, "gram_engine", None):
        info["gram_engine"] = res.gram_engine
    report = getattr(res, "engine_report", None)
    info["engine_report"] = None if report is None else plain_data(report)
    return res.eigenvalues[:k], info


def run_method(case: Case, model, loss, X, y, k: int):
    """The case's method for the top ``k`` (``k`` also caps ``top_k``/``eigenvectors``)."""
    if case.method == "curvlinops":
        return curvlinops_eigsh(model, loss, X, y, k)
    kwargs = {
        name: min(value, k) if name in ("top_k", "eigenvectors") else value
        for name, value in case.kwargs.items()
    }
    return lowrank(model, loss, X, y, k, kwargs)
