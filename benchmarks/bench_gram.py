"""Side-by-side benchmark: top-10 GGN eigenpairs of 3c3d, lowrank_ggn against its peers.

Task: on DeepOBS' 3c3d with CIFAR-10 shapes (D = 895,210, C = 10),
float32, compute the top-10 GGN eigenpairs of one mini-batch; lowrank_ggn and ViViT also
return all nonzero eigenvalues. Methods, each run in a fresh subprocess so that its peak
memory is its own:

* ``lowrank_ggn``: ``ggn_spectrum(..., eigenvectors=True)``, all nonzero eigenvalues
  and the top-10 eigenvectors;
* ``vivit``: ViViT 1.0.0 ``EighComputation`` on BackPACK (``torch.symeig`` shimmed with
  ``torch.linalg.eigh``), top-10 eigenvectors; it takes the per-sample shortcut, so it is
  *not exact* for train-mode BatchNorm;
* ``curvlinops``: ``GGNLinearOperator(...).to_scipy()`` with ``scipy.sparse.linalg.eigsh``
  (k = 10, which = "LA"); ``check_deterministic=False`` (the peer's fastest setting);
* ``power``: deflated power iteration on GGN-vector products (curvlinops' matvec),
  PyHessian's defaults (``max_iter=100``, ``tol=1e-3`` relative change per eigenvalue).

Each worker builds the model and data from a seed, warms up on a batch of 4, then times
one call. It reports wall time, the process's peak resident set size (``VmHWM``,
which includes the Python/torch baseline, also reported) or, on CUDA, the peak
allocated device memory, and the top-10 eigenvalues. The driver checks agreement with
lowrank_ggn (relative 1e-4 of λ_max in float32) and writes ``results/gram_<device>.json``
, ``.md`` and a figure.

Usage::

    python benchmarks/bench_gram.py                    # full run (minutes)
    python benchmarks/bench_gram.py --quick            # tiny smoke run (used by tests)
    python benchmarks/bench_gram.py --device cuda      # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _memory import peak_rss_bytes  # noqa: E402

METHODS = ("lowrank_ggn", "vivit", "curvlinops", "power")
BN_MODELS = {"3c3d-bn", "tiny"}
EXACT_UNDER_BN = {
    "lowrank_ggn": True,
    "vivit": False,
    "curvlinops": True,
    "power": True,
}
AGREEMENT_RTOL = 1e-4


# ----------------------------------------------------------------------------- setup
def build(
    model_name: str, N: int, device: str, seed: int = 0, running_stats: bool = True
):
    """3c3d (or its BatchNorm variant, train mode) and a CIFAR-10-shaped batch.

    ``running_stats=False`` builds BatchNorm with ``track_running_stats=False``: the same
    train-mode function, needed by curvlinops, whose ``torch.func`` transforms refuse
    BatchNorm's in-place running-statistics update.
    """
    import torch
    from torch import nn

    def block(cin, cout, k, pad, bn):
        layers = [nn.Conv2d(cin, cout, k, padding=pad)]
        if bn:
            layers.append(nn.BatchNorm2d(cout, track_running_stats=running_stats))
        return layers + [nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1)]

    bn = model_name in BN_MODELS
    small = model_name == "tiny"
    torch.manual_seed(seed)
    if small:
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.BatchNorm2d(4, track_running_stats=running_stats),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 6 * 6, 3),
        )
        X, C = torch.randn(N, 3, 8, 8), 3
    else:
        model = nn.Sequential(
            *block(3, 64, 5, 0, bn),
            *block(64, 96, 3, 0, bn),
            *block(96, 128, 3, 1, bn),
            nn.Flatten(),
            nn.Linear(1152, 512),
            nn.ReLU(),
            nn.Linear(512, 256),
            nn.ReLU(),
            nn.Linear(256, 10),
        )
        X, C = torch.randn(N, 3, 32, 32), 10
    y = torch.randint(0, C, (N,))
    model = model.to(device).train()
    return model, nn.CrossEntropyLoss(), X.to(device), y.to(device)


# ---------------------------------------------------------------------------- methods
def lowrank(model, loss, X, y, k):
    """All nonzero eigenvalues and the top-k eigenvectors in one call."""
    import torch

    from lowrank_ggn import ggn_spectrum

    res = ggn_spectrum(model, loss, X, y, eigenvectors=k)
    assert res.eigenvectors.shape[0] == min(k, res.rank)
    assert torch.isfinite(res.eigenvectors).all()
    info = {
        "num_nonzero": res.rank,
        "path": res.path.name,
        "engine": str(res.engine_report),
    }
    return res.eigenvalues[:k], info


def vivit(model, loss, X, y, k):
    from _peers import shim_symeig
    from backpack import backpack, extend

    shim_symeig()
    from vivit.linalg.eigh import EighComputation

    model, loss = extend(model), extend(loss)
    comp = EighComputation()
    group = {
        "params": list(model.parameters()),
        "criterion": lambda ev: list(range(ev.numel() - k, ev.numel())),
    }
    with backpack(
        comp.get_extension(), extension_hook=comp.get_extension_hook([group])
    ):
        loss(model(X), y).backward()
    evals, evecs = comp.get_result(group)
    return evals.flip(0)[:k], {}


def curvlinops(model, loss, X, y, k):
    import numpy as np
    import torch
    from curvlinops import GGNLinearOperator
    from scipy.sparse.linalg import eigsh

    params = [p for p in model.parameters() if p.requires_grad]
    op = GGNLinearOperator(
        model, loss, params, [(X, y)], check_deterministic=False
    ).to_scipy()
    evals, _ = eigsh(op, k=k, which="LA")
    return torch.from_numpy(np.sort(evals)[::-1].copy()), {}


def power(model, loss, X, y, k, max_iter=100, tol=1e-3):
    """Deflated power iteration (PyHessian's scheme) on GGN-vector products."""
    import torch
    from curvlinops import GGNLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    op = GGNLinearOperator(model, loss, params, [(X, y)], check_deterministic=False)
    D = sum(p.numel() for p in params)
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
    return torch.tensor(values), {"matvecs": matvecs}


# ----------------------------------------------------------------------------- worker
def worker(method: str, model_name: str, N: int, device: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    fn = {
        "lowrank_ggn": lowrank,
        "vivit": vivit,
        "curvlinops": curvlinops,
        "power": power,
    }[method]
    k = 10 if model_name != "tiny" else 3
    running_stats = method not in ("curvlinops", "power")
    warm = build(model_name, 4, device, seed=1, running_stats=running_stats)
    fn(*warm, k=min(k, 4))
    del warm
    model, loss, X, y = build(model_name, N, device, running_stats=running_stats)
    base_rss = peak_rss_bytes()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    evals, info = fn(model, loss, X, y, k)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    rec = {
        "method": method,
        "model": model_name,
        "N": N,
        "time_s": elapsed,
        "peak_rss_bytes": peak_rss_bytes(),
        "baseline_rss_bytes": base_rss,
        "top_eigenvalues": [float(v) for v in evals],
        **info,
    }
    if device.startswith("cuda"):
        rec["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    return rec


# ----------------------------------------------------------------------------- driver
def machine(device: str) -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def available(method: str) -> bool:
    mods = {
        "vivit": ["vivit", "backpack"],
        "curvlinops": ["curvlinops"],
        "power": ["curvlinops"],
    }
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in mods.get(method, []))


def drive(args) -> dict:
    configs = (
        [("tiny", n) for n in (8, 16)]
        if args.quick
        else [(m, n) for m in args.models for n in args.N]
    )
    records = []
    for model_name, N in configs:
        for method in args.methods:
            if not available(method):
                print(f"skip {method}: not installed", file=sys.stderr)
                continue
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                method,
                model_name,
                str(N),
                "--device",
                args.device,
                "--threads",
                str(args.threads),
            ]
            print(
                f"{model_name:8s} N={N:4d} {method:12s}",
                end=" ",
                flush=True,
                file=sys.stderr,
            )
            proc = subprocess.run(
                cmd, check=False, capture_output=True, text=True, timeout=args.timeout
            )
            if proc.returncode != 0:
                err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"FAILED: {err}", file=sys.stderr)
                records.append(
                    {"method": method, "model": model_name, "N": N, "error": err}
                )
                continue
            rec = json.loads(proc.stdout.strip().splitlines()[-1])
            print(
                f"{rec['time_s']:8.2f} s  peak RSS {rec['peak_rss_bytes'] / 2**30:6.2f} GiB",
                file=sys.stderr,
            )
            records.append(rec)
    annotate(records)
    return {
        "machine": machine(args.device),
        "threads": args.threads,
        "records": records,
    }


def annotate(records: list[dict]) -> None:
    """Agreement of each record's top eigenvalues with lowrank_ggn's, per configuration."""
    for rec in records:
        ref = next(
            (
                r
                for r in records
                if r["method"] == "lowrank_ggn"
                and r["model"] == rec["model"]
                and r["N"] == rec["N"]
                and "error" not in r
            ),
            None,
        )
        if ref is None or "error" in rec:
            continue
        a, b = rec["top_eigenvalues"], ref["top_eigenvalues"]
        n = min(len(a), len(b))
        rec["max_rel_dev_from_lowrank"] = max(
            abs(x - z) for x, z in zip(a[:n], b[:n])
        ) / abs(b[0])
        rec["agrees"] = rec["max_rel_dev_from_lowrank"] <= AGREEMENT_RTOL
        rec["exact_for_model"] = (
            EXACT_UNDER_BN[rec["method"]] or rec["model"] not in BN_MODELS
        )


def ratios(records: list[dict]) -> list[dict]:
    """lowrank_ggn's time and memory relative to each peer, per configuration."""
    rows = []
    for ref in records:
        if ref["method"] != "lowrank_ggn" or "error" in ref:
            continue
        for r in records:
            if (
                r is ref
                or "error" in r
                or (r["model"], r["N"]) != (ref["model"], ref["N"])
            ):
                continue
            rows.append(
                {
                    "model": ref["model"],
                    "N": ref["N"],
                    "peer": r["method"],
                    "time_ratio": ref["time_s"] / r["time_s"],
                    "rss_ratio": ref["peak_rss_bytes"] / r["peak_rss_bytes"],
                    "speedup": r["time_s"] / ref["time_s"],
                }
            )
    return rows


def write(result: dict, tag: str, out: Path = RESULTS) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result["ratios"] = ratios(result["records"])
    (out / f"gram_{tag}.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# 3c3d top-10 GGN eigenpairs, float32 ({tag})",
        "",
        "Machine: "
        + ", ".join(f"{k}={v}" for k, v in result["machine"].items())
        + f", torch threads={result['threads']}",
        "",
    ]
    lines += [
        "| model | N | method | time [s] | peak RSS [GiB] | rel. dev. from lowrank_ggn | exact here |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["records"]:
        if "error" in r:
            lines.append(
                f"| {r['model']} | {r['N']} | {r['method']} | failed: {r['error'][:60]} | | | |"
            )
            continue
        dev = r.get("max_rel_dev_from_lowrank")
        lines.append(
            f"| {r['model']} | {r['N']} | {r['method']} | {r['time_s']:.2f} | {r['peak_rss_bytes'] / 2**30:.2f} | "
            f"{'' if dev is None else f'{dev:.1e}'} | {'yes' if r.get('exact_for_model', True) else 'no'} |"
        )
    lines += [
        "",
        "| model | N | peer | lowrank time / peer | lowrank peak RSS / peer | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for q in result["ratios"]:
        lines.append(
            f"| {q['model']} | {q['N']} | {q['peer']} | {q['time_ratio']:.2f} | {q['rss_ratio']:.2f} | {q['speedup']:.1f}× |"
        )
    (out / f"gram_{tag}.md").write_text("\n".join(lines) + "\n")
    plot(result, out / f"gram_{tag}.png")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in result["records"]})
    fig, axes = plt.subplots(
        2, len(models), figsize=(3.4 * len(models), 4.6), squeeze=False
    )
    for j, m in enumerate(models):
        for method in METHODS:
            rs = sorted(
                (
                    r
                    for r in result["records"]
                    if r["model"] == m and r["method"] == method and "error" not in r
                ),
                key=lambda r: r["N"],
            )
            if not rs:
                continue
            Ns = [r["N"] for r in rs]
            exact = EXACT_UNDER_BN[method] or m not in BN_MODELS
            style = "-o" if exact else "--x"
            label = method if exact else f"{method} (not exact)"
            axes[0, j].plot(Ns, [r["time_s"] for r in rs], style, label=label)
            axes[1, j].plot(
                Ns, [r["peak_rss_bytes"] / 2**30 for r in rs], style, label=method
            )
        axes[0, j].set_title(m, fontsize=9)
        axes[0, j].set_yscale("log")
        axes[0, j].set_ylabel("wall time [s]")
        axes[1, j].set_ylabel("peak RSS [GiB]")
        axes[1, j].set_xlabel("batch size N")
        for ax in axes[:, j]:
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
    for ax in axes[0]:
        ax.legend(fontsize=7)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--worker", nargs=3, metavar=("METHOD", "MODEL", "N"), help=argparse.SUPPRESS
    )
    p.add_argument(
        "--N", type=int, nargs="+", default=[32, 64, 128], help="batch sizes"
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 16))
    p.add_argument("--timeout", type=int, default=1800, help="seconds per worker")
    p.add_argument(
        "--quick", action="store_true", help="tiny model, small N (smoke test)"
    )
    p.add_argument(
        "--tag", default=None, help="results file tag (default: device kind)"
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument(
        "--replot",
        action="store_true",
        help="only redraw the table and figure from the existing results JSON",
    )
    p.add_argument(
        "--models", nargs="+", default=["3c3d", "3c3d-bn"], choices=["3c3d", "3c3d-bn"]
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="replace matching records in an existing results file, keep the others",
    )
    args = p.parse_args()
    if args.worker:
        method, model_name, N = args.worker
        print(json.dumps(worker(method, model_name, int(N), args.device, args.threads)))
        return
    tag = args.tag or ("quick" if args.quick else args.device.split(":")[0])
    if args.replot:
        write(json.loads((args.out / f"gram_{tag}.json").read_text()), tag, args.out)
        return
    result = drive(args)
    old = args.out / f"gram_{tag}.json"
    if args.merge and old.exists():
        new_keys = {(r["method"], r["model"], r["N"]) for r in result["records"]}
        kept = [
            r
            for r in json.loads(old.read_text())["records"]
            if (r["method"], r["model"], r["N"]) not in new_keys
        ]
        result["records"] = sorted(
            kept + result["records"],
            key=lambda r: (r["model"], r["N"], METHODS.index(r["method"])),
        )
        annotate(result["records"])
    write(result, tag, args.out)
    print((args.out / f"gram_{tag}.md").read_text())


if __name__ == "__main__":
    main()
