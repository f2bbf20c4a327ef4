r"""Shared helpers of the paper-figure experiments (not part of the package).

Each ``experiments/<name>/run.py`` puts this folder on ``sys.path`` (anchored at the
script, never the working directory) and imports what it needs; this module puts
``benchmarks/`` there too, so that the experiments share the benchmarks' harness
(``benchmarks/harness``: models, peers, peak memory):

* :func:`run_main` / :func:`plot_main`: the common command lines
  ``run.py [--quick] [--out PATH]`` and ``plot.py [--quick] [--json PATH] [--out DIR]``;
  every JSON records its settings, seed, package versions and wall time;
* :func:`build_3c3d` and :func:`cifar_batch`: DeepOBS' 3c3d (D = 895,210) with or
  without BatchNorm, and seeded synthetic CIFAR-10-shaped batches (timing only);
* :func:`digits_inputs`: digits batches of any size (drawn with replacement beyond
  the 1,797 images; memory does not depend on the values);
* :func:`frozen_statistics_copy`: a train-mode BatchNorm model turned into the
  eval-mode model whose running statistics are the batch's (ViViT's shortcut);
* :func:`subspace_overlap`, :func:`train_steps`, :func:`peak_rss_of`;
* :func:`curve`: a line in the figures' style.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIGURES = ROOT / "figures"
sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmarks' harness

from harness.memory import peak_rss_bytes, reset_peak_rss, resident_bytes  # noqa: E402
from harness.models import three_c_three_d  # noqa: E402
from harness.peers import installed  # noqa: E402, F401 - experiments import it here

#: Distributions whose versions every results JSON records (peers where installed).
PACKAGES = (
    "torch",
    "numpy",
    "scipy",
    "scikit-learn",
    "matplotlib",
    "backpack-for-pytorch",
    "vivit-for-pytorch",
    "curvlinops-for-pytorch",
)


def versions() -> dict[str, str | None]:
    """Python, lowrank_ggn and :data:`PACKAGES` versions (``None``: not installed)."""
    from lowrank_ggn import __version__

    out: dict[str, str | None] = {
        "python": platform.python_version(),
        "lowrank_ggn": __version__,
    }
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


# ------------------------------------------------------------------------ command lines
def run_main(
    doc: str,
    here: Path,
    compute: Callable[[dict], dict],
    full: dict,
    quick: dict,
    seed: int,
    argv: list[str] | None = None,
) -> dict:
    """``run.py [--quick] [--out PATH]``: compute, stamp and write the JSON.

    The default output is ``results.json`` (``results_quick.json`` with ``--quick``)
    next to the script, so quick runs never overwrite committed full results.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run for the tests")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small tensors, and `make figures` budgets one core
    out = args.out or here / ("results_quick.json" if args.quick else "results.json")
    settings = {**(quick if args.quick else full), "quick": args.quick, "seed": seed}
    t0 = time.perf_counter()
    result = compute(settings)
    result = {
        "settings": settings,
        "versions": versions(),
        "torch_threads": torch.get_num_threads(),
        **result,
        "seconds_total": time.perf_counter() - t0,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=_jsonable))
    print(f"wrote {out} ({result['seconds_total']:.1f} s)")
    return result


def _jsonable(obj: Any):
    if isinstance(obj, Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def plot_main(
    doc: str, here: Path, stem: str, make_figure: Callable[[dict], Any], argv=None
) -> None:
    """``plot.py [--quick] [--json PATH] [--out DIR]``: read the JSON, save PNG + PDF.

    Writes ``<DIR>/<stem>.png|pdf`` (``<stem>_quick`` when the JSON is a quick run),
    ``DIR`` defaulting to ``figures/`` at the repository root.
    """
    from lowrank_ggn.app import plotting

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="plot the quick run")
    parser.add_argument("--json", type=Path, default=None, help="results JSON")
    parser.add_argument("--out", type=Path, default=None, help="figure folder")
    args = parser.parse_args(argv)
    source = args.json or here / (
        "results_quick.json" if args.quick else "results.json"
    )
    result = json.loads(source.read_text())
    if result["settings"].get("quick"):
        stem += "_quick"
    fig = make_figure(result)
    for path in plotting.save_figure(fig, (args.out or FIGURES) / stem):
        print(f"wrote {path}")


def curve(ax, x, y, fmt: str = "o-", **kwargs: Any) -> None:
    """``ax.plot(x, y, fmt)`` in the figures' line style (markers of 3 pt, lines of
    0.8 pt); ``kwargs`` (``color``, ``label``, …) go to ``plot``."""
    ax.plot(x, y, fmt, ms=3, lw=0.8, **kwargs)


# ------------------------------------------------------------------------------ models
def build_3c3d(
    batch_norm: bool,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    running_stats: bool = True,
) -> nn.Module:
    """DeepOBS' 3c3d for ``[N, 3, 32, 32]`` → 10 (BatchNorm after each conv optional).

    :func:`harness.models.three_c_three_d`, initialised from ``seed`` without
    touching the global generator; ``running_stats=False`` gives BatchNorm
    ``track_running_stats=False``, the same train-mode function, which curvlinops'
    ``torch.func`` transforms need.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = three_c_three_d(batch_norm, running_stats)
    return model.to(dtype).train()


def cifar_batch(
    N: int, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Seeded synthetic CIFAR-10-shaped batch: ``randn [N, 3, 32, 32]``, labels ``[N]``."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(N, 3, 32, 32, generator=gen, dtype=dtype)
    return X, torch.randint(0, 10, (N,), generator=gen)


def digits_inputs(
    N: int, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """``N`` digits: distinct for ``N ≤ 1797``, else drawn with replacement (seeded)."""
    from lowrank_ggn.app.data import digits_batch, load_digits

    images, labels = load_digits(dtype)
    if N <= images.shape[0]:
        return digits_batch(N, seed, dtype)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, images.shape[0], (N,), generator=gen)
    return images[idx], labels[idx]


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


def frozen_statistics_copy(model: nn.Module, inputs: Tensor) -> nn.Module:
    r"""Eval-mode copy whose BatchNorm running statistics are ``inputs``' batch ones.

    Its forward pass equals the train-mode one on ``inputs`` (``μ`` and the *biased*
    variance of each BatchNorm input over batch and positions), but the statistics
    are constants: each output depends on its own sample only. Its GGN is the
    per-sample shortcut ``Σ_n J̃_nᵀ H_n J̃_n`` that ignores ``∂(μ, σ²)/∂θ`` and the
    coupling between samples (what per-sample engines such as ViViT/BackPACK compute
    for a train-mode BatchNorm network).
    """
    frozen = copy.deepcopy(model).train()
    seen: dict[nn.Module, Tensor] = {}
    hooks = [
        bn.register_forward_pre_hook(lambda m, a: seen.__setitem__(m, a[0].detach()))
        for bn in batch_norms(frozen)
    ]
    snapshot = copy.deepcopy(frozen.state_dict())  # train() would move the stats
    with torch.no_grad():
        frozen(inputs)
    for h in hooks:
        h.remove()
    frozen.load_state_dict(snapshot)
    for bn in batch_norms(frozen):
        x = seen[bn]
        dims = [d for d in range(x.dim()) if d != 1]
        bn.running_mean = x.mean(dims)
        bn.running_var = x.var(dims, unbiased=False)
    return frozen.eval()


def without_running_stats(model: nn.Module) -> nn.Module:
    """Copy with ``track_running_stats=False`` BatchNorm: the same train-mode function
    without in-place buffer updates (``torch.func`` transforms need that)."""
    out = copy.deepcopy(model).train()
    for bn in batch_norms(out):
        bn.track_running_stats = False
        bn.running_mean = None
        bn.running_var = None
        bn.num_batches_tracked = None
    return out


# ------------------------------------------------------------------------- quantities
def subspace_overlap(A: Tensor, B: Tensor) -> float:
    r"""``‖P_A P_B‖_F² / max(k_A, k_B)`` of the row spaces of ``A [k_A, D]``, ``B``.

    ``Tr(P_A P_B) / max(k_A, k_B)`` with orthogonal projectors onto the spans of the
    rows: 1 for equal subspaces, 0 for orthogonal ones; ``k/D`` expected for random
    ``k``-dimensional subspaces. Rows need not be orthonormal (QR first).
    """
    Qa = torch.linalg.qr(A.T.double())[0]
    Qb = torch.linalg.qr(B.T.double())[0]
    return float((Qa.T @ Qb).square().sum() / max(Qa.shape[1], Qb.shape[1]))


def train_steps(
    model: nn.Module,
    batches: Iterator[tuple[Tensor, Tensor]],
    steps: int,
    lr: float,
    momentum: float,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[torch.optim.Optimizer, float]:
    """``steps`` SGD steps with cross-entropy, in place; returns optimizer, last loss."""
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss = nn.CrossEntropyLoss()
    last = float("nan")
    model.train()
    for _ in range(steps):
        X, y = next(batches)
        opt.zero_grad(set_to_none=True)
        value = loss(model(X), y)
        value.backward()
        opt.step()
        last = value.item()
    model.zero_grad(set_to_none=True)
    return opt, last


def sgd_checkpoints(
    model: nn.Module,
    batches: Iterator[tuple[Tensor, Tensor]],
    s: dict,
    record: Callable[[int], dict],
) -> list[dict]:
    """SGD (:func:`train_steps`, ``s["lr"]``, ``s["momentum"]``) up to each of
    ``s["checkpoints"]`` in turn; at each, ``{"step", "train_loss", **record(step)}``."""
    opt, step, last, points = None, 0, float("nan"), []
    for target in s["checkpoints"]:
        if target > step:
            opt, last = train_steps(
                model, batches, target - step, s["lr"], s["momentum"], opt
            )
            step = target
        points.append({"step": step, "train_loss": last, **record(step)})
    return points


def digits_sgd_runs(
    s: dict,
    seed: int,
    models: list[tuple[str, str]],
    monitor: Callable[[nn.Module, str, int], dict],
) -> dict:
    """Train each ``(label, zoo name)`` model (float64, ``seed``) by SGD on seeded digit
    batches of ``s["train_batch"]``, recording ``monitor(model, label, step)`` at each
    of ``s["checkpoints"]`` (:func:`sgd_checkpoints`); the experiments' ``runs``."""
    from lowrank_ggn.app.data import digits_batches
    from lowrank_ggn.app.models import build_model, num_params

    runs = []
    for label, name in models:
        model = build_model(name, seed, torch.float64)
        batches = digits_batches(
            s["train_batch"], max(s["checkpoints"]), seed, torch.float64
        )

        def record(step: int, model=model, label=label) -> dict:
            return monitor(model, label, step)

        points = sgd_checkpoints(model, batches, s, record)
        runs.append(
            {
                "label": label,
                "model": name,
                "num_params": num_params(model),
                "points": points,
            }
        )
    return {"loss": "CrossEntropyLoss(mean)", "dtype": "float64", "runs": runs}


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``(fn(*args, **kwargs), seconds)``."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


# ---------------------------------------------------------------------------- memory
def peak_rss_of(fn: Callable[[], Any]) -> tuple[Any, int | None]:
    """``(fn(), peak resident bytes above the start)``; ``None`` where the peak mark
    cannot be reset (then nothing sensible is measured). Run it in a fresh process:
    memory that the process already holds is reused and not counted."""
    ok = reset_peak_rss()
    base = resident_bytes() if ok else None
    out = fn()
    return out, (peak_rss_bytes() - base) if base is not None else None
