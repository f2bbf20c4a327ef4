r"""Float32 spectra: what summing the Gram in float64 costs and what it resolves.

Two parts:

* ``3c3d``: DeepOBS' 3c3d and its BatchNorm variant in train mode (``harness.models``,
  CIFAR-10 shapes, C = 10, random weights), N ∈ {64, 128}. Three variants of
  ``ggn_spectrum(model, loss, X, y)`` (all resolved eigenvalues, no eigenvectors):
  the float32 model with ``accumulate="native"``, the float32 model with
  ``accumulate="float64"`` (the default), and the float64 model (same weights).
  Each runs in a fresh subprocess (peak RSS its own, reset after a warm-up on N = 4,
  as in ``bench_batchnorm.py``); with ``--repeat R`` native and float64 alternate
  ``R`` times, one call each, and the fastest counts. Reported: time, peak RSS, the ratio
  ``t(float64 accumulation) / t(native)`` (target ≤ 1.3 at N = 128), and the
  eigenvalues returned per decade of ``λ/λ_max`` against the float64 model's.
* ``digits``: the zoo's ``mlp``, ``cnn``, ``cnn-bn`` and ``resnet-bn`` (train mode),
  trained 150 SGD steps in float32 (``lowrank-ggn``'s training loop), one digits
  batch of N = 128: per decade, the eigenvalues the float64 model finds (``rtol=0``
  truth and its default rule), and what float32 returns with native and float64
  accumulation, with the largest relative error and the largest ratio of actual error
  to the stated bound (``eigenvalue_errors``); and float32 sums in :data:`BLOCKS`.

Results go to ``results/precision_<device>.json`` and ``.md`` (:mod:`precision_report`
and :func:`blocks_md`).

Usage::

    python benchmarks/bench_precision.py                 # both parts
    python benchmarks/bench_precision.py --only digits
    python benchmarks/bench_precision.py --quick --out /tmp/bpq   # smoke run (tests)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from harness.machine import machine
from harness.memory import peak_rss_bytes, reset_peak_rss, resident_bytes
from harness.models import build
from harness.results import write_results
from harness.workers import run_worker
from precision_report import DECADES, markdown

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
VARIANTS = ("native", "float64", "model64")
PARTS = ("3c3d", "digits")


def decade_counts(evals: list[float], lam_max: float) -> list[int]:
    """Eigenvalues in ``(10^-(j+1), 10^-j]·λ_max`` for ``j = 0 … DECADES−1``."""
    counts = [0] * DECADES
    for v in evals:
        if v <= 0:
            continue
        j = int(-_log10(v / lam_max) // 1) if v < lam_max else 0
        if 0 <= j < DECADES:
            counts[j] += 1
    return counts


def _log10(x: float) -> float:
    import math

    return math.log10(x)


def deviations(evals, errors, truth) -> tuple[list[float], list[float]]:
    """Relative error and error/bound of each eigenvalue against the nearest truth."""
    import torch

    lam = torch.tensor(evals, dtype=torch.float64)
    ref = torch.tensor(truth, dtype=torch.float64)
    dist = (lam[:, None] - ref[None, :]).abs().min(1).values
    bound = torch.tensor(errors, dtype=torch.float64)
    return (dist / lam).tolist(), (dist / bound).tolist()


# ----------------------------------------------------------------------------- 3c3d
def kink_flips(model_name: str, N: int) -> int:
    """ReLU/max-pool outputs whose sign differs between float32 and float64 forward.

    Where float32 and float64 take different sides of a kink, the two GGNs belong to
    different linearisations: no round-off model of one covers the other.
    """
    import copy

    import torch
    from torch import nn

    model, _, X, _ = build(model_name, N, "cpu", 0)
    m64 = copy.deepcopy(model).double()
    outs: dict[str, list] = {"32": [], "64": []}
    hooks = []
    for tag, m in (("32", model), ("64", m64)):
        for mod in m.modules():
            if isinstance(mod, (nn.ReLU, nn.MaxPool2d)):
                hooks.append(
                    mod.register_forward_hook(lambda *a, t=tag: outs[t].append(a[2]))
                )
    with torch.no_grad():
        model(X)
        m64(X.double())
    for h in hooks:
        h.remove()
    return sum(int(((a > 0) != (b > 0)).sum()) for a, b in zip(outs["32"], outs["64"]))


def worker(
    model_name: str, N: int, variant: str, quick: bool, threads: int, repeat: int = 1
) -> dict:
    import torch

    from lowrank_ggn import ggn_spectrum

    torch.set_num_threads(threads)
    acc = {"native": "native", "float64": "float64", "model64": None}[variant]

    def problem(n: int, seed: int):
        model, loss, X, y = build(model_name, n, "cpu", 0)
        if variant == "model64":
            model, X = model.double(), X.double()
        return model, loss, X, y

    if not quick:
        model, loss, X, y = problem(4, 1)
        ggn_spectrum(model, loss, X, y, accumulate=acc, progress=False)
    model, loss, X, y = problem(N, 0)
    reset = reset_peak_rss()
    base = resident_bytes()
    times = []
    for _ in range(repeat):  # the fastest of `repeat` calls
        t0 = time.perf_counter()
        res = ggn_spectrum(model, loss, X, y, accumulate=acc, progress=False)
        times.append(time.perf_counter() - t0)
    elapsed = min(times)

    truth = None
    if variant == "model64":  # every eigenvalue, for the deviations
        truth = ggn_spectrum(model, loss, X, y, rtol=0.0, progress=False).eigenvalues
    return {
        "model": model_name,
        "N": N,
        "variant": variant,
        "time_s": elapsed,
        "times_s": times,
        "peak_rss_bytes": peak_rss_bytes(),
        "baseline_rss_bytes": base,
        "peak_rss_reset": reset,
        "strategy": str(res.engine_report.strategy),
        "accumulate": res.accumulate,
        "num_resolved": res.rank,
        "num_unresolved": res.num_unresolved,
        "eigenvalues": res.eigenvalues.tolist(),
        "errors": res.eigenvalue_errors.tolist(),
        "truth": None if truth is None else truth.tolist(),
        "kink_flips": kink_flips(model_name, N) if variant == "model64" else None,
    }


def run_3c3d(args) -> dict:
    models = ("tiny",) if args.quick else tuple(args.models)
    sizes = (6,) if args.quick else tuple(args.n)
    records = []
    for model_name in models:
        for N in sizes:
            # native and float64 alternate, one call per worker and round, so that
            # a busy spell of the machine falls on both; the float64 model once
            best: dict[str, dict] = {}
            for r in range(args.repeat):
                for variant in VARIANTS if r == 0 else VARIANTS[:2]:
                    cmd = [
                        sys.executable,
                        __file__,
                        "--worker",
                        json.dumps([model_name, N, variant, args.quick, args.threads]),
                    ]
                    print(f"3c3d: {model_name} N={N} {variant} ({r})", file=sys.stderr)
                    rec = run_worker(cmd, None)
                    best[variant] = _faster(best.get(variant), rec)
            for variant in VARIANTS:
                rec = best[variant]
                records.append({"model": model_name, "N": N, "variant": variant, **rec})
    summary = []
    for model_name in models:
        for N in sizes:
            rows = {
                r["variant"]: r
                for r in records
                if r["model"] == model_name and r["N"] == N and "error" not in r
            }
            if set(rows) != set(VARIANTS):
                continue
            truth = rows["model64"]["truth"]
            lam_max = truth[0]
            entry = {
                "model": model_name,
                "N": N,
                "kink_flips": rows["model64"]["kink_flips"],
                "ratio_float64_to_native": rows["float64"]["time_s"]
                / rows["native"]["time_s"],
                "ratio_model64_to_native": rows["model64"]["time_s"]
                / rows["native"]["time_s"],
                "decades": {
                    v: decade_counts(rows[v]["eigenvalues"], lam_max) for v in VARIANTS
                },
            }
            for v in ("native", "float64"):
                rel, ratio = deviations(
                    rows[v]["eigenvalues"], rows[v]["errors"], truth
                )
                entry[f"max_rel_error_{v}"] = max(rel, default=0.0)
                entry[f"max_error_over_bound_{v}"] = max(ratio, default=0.0)
            summary.append(entry)
    for r in records:
        r.pop("truth", None)
        r.pop("eigenvalues", None)
        r.pop("errors", None)
    return {"records": records, "summary": summary}


def _faster(kept: dict | None, rec: dict) -> dict:
    """The faster of two runs of one variant, with every run's time in ``times_s``."""
    if kept is None or "error" in kept or "error" in rec:
        return rec if kept is None or "error" in kept else kept
    times = kept["times_s"] + rec["times_s"]
    return {**min(kept, rec, key=lambda r: r["time_s"]), "times_s": times}


def merge_3c3d(old: dict | None, new: dict) -> dict:
    """Replace the rows of the (model, N) just measured, keep the others."""
    if not old:
        return new
    done = {(r["model"], r["N"]) for r in new["records"]}
    keep = lambda rows: [r for r in rows if (r["model"], r["N"]) not in done]  # noqa: E731
    return {
        "records": keep(old["records"]) + new["records"],
        "summary": keep(old["summary"]) + new["summary"],
    }


# --------------------------------------------------------------------------- digits
def run_digits(args) -> dict:
    import copy

    import torch
    from torch import nn

    from lowrank_ggn import ggn_spectrum
    from lowrank_ggn.app.data import digits_batch
    from lowrank_ggn.app.models import build_model
    from lowrank_ggn.app.training import train

    torch.set_num_threads(args.threads)
    names = ("cnn",) if args.quick else ("mlp", "cnn", "cnn-bn", "resnet-bn")
    steps, N = (2, 16) if args.quick else (150, 128)
    out = []
    for name in names:
        m32 = build_model(name, 0, torch.float32)
        train(m32, "ce", steps, 0, torch.float32, "cpu", f"training {name}")
        X, y = digits_batch(N, 0, torch.float32)
        loss = nn.CrossEntropyLoss()
        m64 = copy.deepcopy(m32).double()
        truth = ggn_spectrum(m64, loss, X.double(), y, rtol=0.0).eigenvalues.tolist()
        res64 = ggn_spectrum(m64, loss, X.double(), y)
        lam_max = truth[0]
        entry = {
            "model": name,
            "N": N,
            "train_steps": steps,
            "float64_all": decade_counts(truth, lam_max),
            "float64_resolved": decade_counts(res64.eigenvalues.tolist(), lam_max),
        }
        for acc in ("native", "float64"):
            res = ggn_spectrum(m32, loss, X, y, accumulate=acc)
            evals = res.eigenvalues.tolist()
            rel, ratio = deviations(evals, res.eigenvalue_errors.tolist(), truth)
            entry[f"float32_{acc}"] = decade_counts(evals, lam_max)
            per_decade = [0.0] * DECADES
            for v, r in zip(evals, rel):
                j = (
                    min(DECADES - 1, int(-_log10(v / lam_max) // 1))
                    if v < lam_max
                    else 0
                )
                per_decade[j] = max(per_decade[j], r)
            entry[f"float32_{acc}_max_rel_error"] = per_decade
            entry[f"float32_{acc}_max_error_over_bound"] = max(ratio, default=0.0)
        # the alternative not taken: float32 GEMMs in blocks, float64 across them
        for b in (None, *BLOCKS):
            with float32_block_sums(b):
                evals = ggn_spectrum(m32, loss, X, y, rtol=0.0).eigenvalues.tolist()
            entry[f"within_1e-3_blocks_{b or 'none'}"] = reproduced(evals, truth)
        out.append(entry)
    return {"models": out}


#: Column blocks of float32 sums tried against the float64 sums (digits part).
BLOCKS = (256, 4096)
BLOCKS_NOTE = (
    "Float32 sums in blocks (the alternative not taken): true eigenvalues above "
    "1e-10·λ_max that the float32 model reproduces within 1e-3, by rank, with the "
    "explicit rows' `syrk` in float32 over blocks of b columns and float64 sums "
    "across blocks (Kronecker products and `eigh` in float64):"
)


def reproduced(evals: list[float], truth: list[float]) -> list[int]:
    """``[k, K]``: of the ``K`` true eigenvalues above ``1e-10·λ_max``, the ``k``
    that the ``k``-th largest of ``evals`` matches within ``1e-3`` relative."""
    top = [v for v in truth if v > 1e-10 * truth[0]]
    hits = sum(abs(a - t) <= 1e-3 * t for a, t in zip(evals, top))
    return [hits, len(top)]


def float32_block_sums(block: int | None):
    """Within the block: explicit rows' ``syrk`` in float32 over ``block`` columns at
    a time, each block's product added to the float64 Gram (``None``: unchanged)."""
    import contextlib
    from unittest import mock

    import torch

    from lowrank_ggn.core.engine import accumulate

    if block is None:
        return contextlib.nullcontext()
    exact = accumulate.symmetric_rank_k_update

    def update(gram, rows):
        if gram.dtype != torch.float64 or rows.dtype != torch.float32:
            return exact(gram, rows)
        for k in range(0, rows.shape[1], block):
            part = torch.zeros(gram.shape, dtype=rows.dtype)
            exact(part, rows[:, k : k + block])
            gram += part

    return mock.patch.object(accumulate, "symmetric_rank_k_update", update)


def blocks_md(result: dict) -> str:
    """The digits part's float32-block rows (empty without the part)."""
    models = result["parts"].get("digits", {}).get("models", [])
    if not models or "within_1e-3_blocks_none" not in models[0]:
        return ""
    head = " | ".join(f"float32 blocks of {b}" for b in BLOCKS)
    lines = ["", BLOCKS_NOTE, "", f"| model | float64 sums (default) | {head} |"]
    lines.append("|---|---|" + "---|" * len(BLOCKS))
    for m in models:
        cells = [m[f"within_1e-3_blocks_{b}"] for b in ("none", *BLOCKS)]
        lines.append(
            f"| {m['model']} | " + " | ".join(f"{k} / {n}" for k, n in cells) + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=PARTS, nargs="+", default=list(PARTS))
    parser.add_argument("--n", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="*", default=["3c3d", "3c3d-bn"])
    parser.add_argument(
        "--repeat", type=int, default=1, help="3c3d: the fastest of R alternating runs"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run for the tests")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return
    tag = "quick" if args.quick else "cpu"
    path = args.out / f"precision_{tag}.json"
    result = {"machine": machine("cpu"), "threads": args.threads, "parts": {}}
    if path.exists():
        result["parts"] = json.loads(path.read_text()).get("parts", {})
    t0 = time.perf_counter()
    runners = {"3c3d": run_3c3d, "digits": run_digits}
    for part in args.only:
        new = runners[part](args)
        if part == "3c3d":
            new = merge_3c3d(result["parts"].get(part), new)
            for entry in new["summary"]:  # rows measured before the count existed
                if entry.get("kink_flips") is None:
                    entry["kink_flips"] = kink_flips(entry["model"], entry["N"])
        result["parts"][part] = new
        result["parts"][part]["seconds"] = time.perf_counter() - t0
        result["parts"][part]["when"] = time.strftime("%Y-%m-%d")
    md = write_results(
        args.out, f"precision_{tag}", result, markdown(result) + blocks_md(result)
    )
    print(f"wrote {path} and {md}")


if __name__ == "__main__":
    main()
