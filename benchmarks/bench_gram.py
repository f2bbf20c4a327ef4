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

The lowrank_ggn worker also measures, after its timed call and in the same process,
the floor of this work on the machine (:mod:`harness.floor`: one forward pass, C
backward passes of the batch, the Gram's GEMM over the explicitly formed rows,
``eigh`` of the ``[N·C, N·C]`` Gram); every method of that (model, N) is reported as
``time / floor`` (``--no-floor`` skips it).

Usage::

    python benchmarks/bench_gram.py                    # full run (minutes)
    python benchmarks/bench_gram.py --quick            # tiny smoke run (used by tests)
    python benchmarks/bench_gram.py --device cuda      # on a GPU
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness.cli import (
    add_floor_option,
    add_model_options,
    add_run_options,
    parser,
)
from harness.floor import explicit_parameters, spectrum_floor
from harness.machine import machine, machine_line
from harness.memory import measure
from harness.models import BN_MODELS, build
from harness.peers import available, curvlinops_eigsh, power_iteration, vivit_eigh
from harness.results import RESULTS, fmt, gib, write_results
from harness.workers import announce, outcome, run_worker

METHODS = ("lowrank_ggn", "vivit", "curvlinops", "power")
EXACT_UNDER_BN = {
    "lowrank_ggn": True,
    "vivit": False,
    "curvlinops": True,
    "power": True,
}
AGREEMENT_RTOL = 1e-4
FLOOR_NOTE = (
    "Floor: what any Gram-based spectrum of the batch costs on this machine, measured "
    "in lowrank_ggn's worker after its call (`harness.floor`, each part the fastest "
    "of 2, in the model's dtype): one forward pass, C backward passes of the batch, "
    "the Gram's multiply-adds `V Vᵀ` over the layers whose per-sample rows are "
    "explicit (`V` `[N·C, D_e]`, BLAS `syrk` on the CPU), `eigh` of the "
    "`[N·C, N·C]` Gram. time / floor: each method's time over that floor."
)


# ---------------------------------------------------------------------------- methods
def lowrank(model, loss, X, y, k):
    """All nonzero eigenvalues and the top-k eigenvectors in one call."""
    import torch

    from lowrank_ggn import ggn_spectrum

    res = ggn_spectrum(model, loss, X, y, eigenvectors=k)
    assert res.eigenvectors.shape[0] == min(k, res.rank)
    assert torch.isfinite(res.eigenvectors).all()
    report = res.engine_report
    info = {
        "num_nonzero": res.rank,
        "path": res.path.name,
        "engine": str(report),
        # parameters whose per-sample rows the Gram multiplies explicitly: the floor's
        "explicit_params": explicit_parameters(model, report.layers),
    }
    return res.eigenvalues[:k], info


def vivit(model, loss, X, y, k):
    """ViViT's eigh: every eigenvalue, the top-k eigenvectors; the top k returned."""
    return vivit_eigh(model, loss, X, y, k)[:k], {}


def curvlinops(model, loss, X, y, k):
    """curvlinops + ``eigsh``: the top k (products counted)."""
    return curvlinops_eigsh(model, loss, X, y, k)


def power(model, loss, X, y, k):
    """Deflated power iteration (PyHessian's scheme) on GGN-vector products."""
    return power_iteration(model, loss, X, y, k)


# ----------------------------------------------------------------------------- worker
def worker(
    method: str, model_name: str, N: int, device: str, threads: int, floor: bool
) -> dict:
    """Warm up, time one call; on lowrank_ggn's rows also the floor of its work."""
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
    # no reset of the peak mark: the peak includes the warm-up's (see README)
    (evals, info), cost = measure(lambda: fn(model, loss, X, y, k), device, False)
    if floor and method == "lowrank_ggn":  # after the call: its peak is read
        info.update(spectrum_floor(model, loss, X, y, info["explicit_params"]))
    return {
        "method": method,
        "model": model_name,
        "N": N,
        **cost,
        "top_eigenvalues": [float(v) for v in evals],
        **info,
    }


# ----------------------------------------------------------------------------- driver
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
            cmd = [sys.executable, __file__, "--worker", method, model_name, str(N)]
            cmd += ["--device", args.device, "--threads", str(args.threads)]
            cmd += ["--no-floor"] if args.no_floor else []
            announce(f"{model_name:8s} N={N:4d} {method:12s}")
            rec = outcome(run_worker(cmd, args.timeout))
            records.append({"method": method, "model": model_name, "N": N, **rec})
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
        if ref.get("floor_s"):  # every method against the same floor
            rec["time_over_floor"] = rec["time_s"] / ref["floor_s"]
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
    result["ratios"] = ratios(result["records"])
    lines = [f"# 3c3d top-10 GGN eigenpairs, float32 ({tag})", "", machine_line(result)]
    lines.append("")
    lines += [
        "| model | N | method | time [s] | peak RSS [GiB] | rel. dev. from lowrank_ggn "
        "| exact here | floor [s] | time / floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["records"]:
        head = f"| {r['model']} | {r['N']} | {r['method']} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error'][:60]} | | | | | |")
            continue
        cells = [
            f"{r['time_s']:.2f}",
            gib(r["peak_rss_bytes"]),
            fmt(r.get("max_rel_dev_from_lowrank"), ".1e"),
            "yes" if r.get("exact_for_model", True) else "no",
            fmt(r.get("floor_s"), ".3g"),
            fmt(r.get("time_over_floor")),
        ]
        lines.append(f"{head} " + " | ".join(cells) + " |")
    if any(r.get("floor_s") for r in result["records"]):
        lines += ["", FLOOR_NOTE]
    lines += [
        "",
        "| model | N | peer | lowrank time / peer | lowrank peak RSS / peer | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for q in result["ratios"]:
        lines.append(
            f"| {q['model']} | {q['N']} | {q['peer']} | {q['time_ratio']:.2f} | {q['rss_ratio']:.2f} | {q['speedup']:.1f}× |"
        )
    write_results(out, f"gram_{tag}", result, "\n".join(lines) + "\n")
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
    p = parser(__doc__)
    p.add_argument(
        "--worker", nargs=3, metavar=("METHOD", "MODEL", "N"), help=argparse.SUPPRESS
    )
    p.add_argument(
        "--N", type=int, nargs="+", default=[32, 64, 128], help="batch sizes"
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--device", default="cpu")
    add_run_options(p, quick="tiny model, small N (smoke test)", out=RESULTS)
    p.add_argument(
        "--tag", default=None, help="results file tag (default: device kind)"
    )
    p.add_argument(
        "--replot",
        action="store_true",
        help="only redraw the table and figure from the existing results JSON",
    )
    add_floor_option(p, "lowrank_ggn's rows")
    merge = "replace matching records in an existing results file, keep the others"
    add_model_options(p, merge)
    args = p.parse_args()
    if args.worker:
        method, model_name, N = args.worker
        floor = not args.no_floor
        rec = worker(method, model_name, int(N), args.device, args.threads, floor)
        print(json.dumps(rec))
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
