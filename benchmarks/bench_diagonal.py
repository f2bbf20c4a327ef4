r"""The exact GGN diagonal of 3c3d: lowrank_ggn against BackPACK and curvlinops.

Task: ``diag(G)`` of one mini-batch GGN of DeepOBS' 3c3d (D = 895,210) and its
BatchNorm variant in train mode (``harness.models``), CIFAR-10 shapes, C = 10,
float32, N = 128. Methods, each (method, model) in a fresh subprocess:

* ``lowrank_ggn``: ``ggn_diagonal(model, loss, X, y)``, exact (the layer-wise route;
  ``route`` and the engine's strategy are recorded);
* ``lowrank_ggn_mc1``: ``ggn_diagonal(..., mc_samples=1)``, one Monte-Carlo column
  per sample (unbiased; its relative error is recorded);
* ``backpack``: BackPACK's ``DiagGGNExact`` (``extend`` on model and loss, one
  backward pass); it raises for train-mode BatchNorm, which is recorded;
  ``backpack_mc1``: its ``DiagGGNMC(mc_samples=1)``;
* ``hutchinson``: curvlinops' ``hutchinson_diag`` on ``GGNLinearOperator``
  (``check_deterministic=False``; BatchNorm with ``track_running_stats=False`` as in
  ``bench_gram.py``, the same train-mode function) with ``--matvecs`` products.
  curvlinops has no exact diagonal route; its Hutchinson error with ``K`` Rademacher
  vectors is ``E‖d̂ − d‖² = (‖G‖_F² − ‖d‖²) / K``, so the products for 1 % relative
  error are ``K₁ = (‖G‖_F² − ‖d‖²) / (10⁻⁴ ‖d‖²)``; the measured time per product
  gives the projected time (and the measured error checks the formula). Its XDiag
  (``xdiag``) is exact once ``num_matvecs/2`` exceeds the rank ``≤ N·C``:
  ``2(N·C + 1)`` products, projected likewise (run in ``--quick`` mode, where it is
  cheap, to confirm that it is exact);
* ``spectrum``: one dense ``GGN.spectrum()`` call (the Gram and ``eigh``, eigenvalues
  only), the bar for the BatchNorm variant; after the timed call the worker records
  ``‖G‖_F² = ‖VᵀV‖_F²`` from the cached Gram for the projection above.

Each worker warms up on a batch of 4, hands freed heap back and resets the peak-RSS
mark (``harness.memory.measure``), then times one call; peak RSS is that call's
(it includes what was resident at its start, ``baseline_rss_bytes``). ``--repeats``
interleaved runs of every method, so that they share the machine's conditions; the
fastest is reported (all are kept in ``times_s``: on a shared machine the fastest run
is the one least disturbed). Agreement: each diagonal against lowrank_ggn's,
``max|Δ| / max|d|`` and ``‖Δ‖ / ‖d‖``. Results: ``results/diagonal_<tag>.json`` and
``.md``.

Usage::

    python benchmarks/bench_diagonal.py                      # full run (~15 minutes)
    python benchmarks/bench_diagonal.py --models 3c3d-bn --merge  # one model, merged
    python benchmarks/bench_diagonal.py --quick --out /tmp/bd  # smoke run (tests)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

from harness.cli import add_model_options, add_run_options, parser
from harness.machine import machine, machine_words
from harness.memory import measure
from harness.models import build as make
from harness.models import num_classes
from harness.peers import available, ggn_operator
from harness.results import gib, write_results
from harness.workers import announce, outcome, run_worker

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

METHODS = (
    "lowrank_ggn",
    "backpack",
    "lowrank_ggn_mc1",
    "backpack_mc1",
    "hutchinson",
    "spectrum",
)
QUICK_BN = ["lowrank_ggn", "backpack", "spectrum"]
REPEATED = set(METHODS)
#: Target relative error of the Hutchinson projection.
HUTCHINSON_RTOL = 1e-2


# ---------------------------------------------------------------------------- methods
def lowrank(model, loss, X, y, args) -> tuple:
    import torch

    from lowrank_ggn import ggn_diagonal

    options = {}
    if args.mc:
        options = dict(mc_samples=1, generator=torch.Generator().manual_seed(0))
    res = ggn_diagonal(model, loss, X, y, progress=False, **options)
    report = res.engine_report
    info = {
        "route": str(res.route),
        "strategy": None if report is None else str(report.strategy),
        "engine": None if report is None else str(report),
    }
    return res.flat, info


def backpack(model, loss, X, y, args) -> tuple:
    import torch
    from backpack import backpack as context
    from backpack import extend
    from backpack.extensions import DiagGGNExact, DiagGGNMC

    model, loss = extend(model), extend(loss)
    if args.mc:
        torch.manual_seed(0)
    with context(DiagGGNMC(mc_samples=1) if args.mc else DiagGGNExact()):
        loss(model(X), y).backward()
    name = "diag_ggn_mc" if args.mc else "diag_ggn_exact"
    return torch.cat([getattr(p, name).flatten() for p in model.parameters()]), {}


def hutchinson(model, loss, X, y, args, prepared=None) -> tuple:
    from curvlinops import hutchinson_diag

    return hutchinson_diag(prepared, args.matvecs), {"matvecs": args.matvecs}


def xdiag(model, loss, X, y, args, prepared=None) -> tuple:
    from curvlinops import xdiag as estimate

    K = 2 * (X.shape[0] * args.classes + 1)
    return estimate(prepared, K), {"matvecs": K}


def spectrum(model, loss, X, y, args) -> tuple:
    from lowrank_ggn import GGN

    ggn = GGN(model, loss, X, y, progress=False)
    res = ggn.spectrum()
    info = {"num_nonzero": res.rank, "engine": str(res.engine_report)}
    return res.eigenvalues, info, ggn


FUNCTIONS = {
    "lowrank_ggn": lowrank,
    "lowrank_ggn_mc1": lowrank,
    "backpack": backpack,
    "backpack_mc1": backpack,
    "hutchinson": hutchinson,
    "xdiag": xdiag,
    "spectrum": spectrum,
}


# ----------------------------------------------------------------------------- worker
def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    fn = FUNCTIONS[args.method]
    args.mc = args.method.endswith("_mc1")
    args.classes = num_classes(args.model)
    running_stats = args.method not in ("hutchinson", "xdiag")
    prepare = args.method in ("hutchinson", "xdiag")
    if not args.quick:  # warm-up: torch.func's and BackPACK's first-call set-up
        warm = make(args.model, 4, seed=1, running_stats=running_stats)
        if prepare:
            op = ggn_operator(*warm)
            op @ torch.ones(op.shape[1])
        elif args.method != "spectrum":
            fn(*warm, args)
        del warm
    model, loss, X, y = make(args.model, args.N, running_stats=running_stats)
    extra = {"prepared": ggn_operator(model, loss, X, y)} if prepare else {}
    out, cost = measure(lambda: fn(model, loss, X, y, args, **extra))
    values, info = out[0], out[1]
    rec = {
        "method": args.method,
        "model": args.model,
        "N": args.N,
        "D": sum(p.numel() for p in model.parameters()),
        **cost,
        **info,
    }
    if args.method == "spectrum":  # ‖G‖_F² = ‖VᵀV‖_F² from the cached Gram
        rec["frobenius_sq"] = float(out[2].gram().double().square().sum())
        rec["eigenvalue_sum"] = float(values.double().sum())
    else:
        torch.save(values.detach().double(), args.save)
    return rec


# ----------------------------------------------------------------------------- driver
def run_case(method: str, model: str, N: int, args, tmp: Path) -> dict:
    """One method in a fresh subprocess; its diagonal saved to ``tmp``."""
    save = tmp / f"{method}-{model}.pt"
    cmd = [sys.executable, __file__, "--worker", method, model, str(N)]
    cmd += ["--threads", str(args.threads), "--matvecs", str(args.matvecs)]
    cmd += ["--save", str(save)] + (["--quick"] if args.quick else [])
    announce(f"{model:10s} N={N:4d} {method:16s}")
    if not available(method):
        return outcome(
            {"method": method, "model": model, "N": N, "skipped": "not installed"}
        )
    rec = run_worker(cmd, args.timeout)
    if "error" in rec:
        return outcome({"method": method, "model": model, "N": N, **rec})
    if save.exists():
        rec["saved"] = str(save)
    return outcome(rec)


def drive(args) -> dict:
    models = ["tiny-plain", "tiny"] if args.quick else args.models
    N = 8 if args.quick else args.N
    load = [os.getloadavg()[0]]  # the machine's other jobs, 1-minute average
    records = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_diagonal_"))
    for model in models:
        methods = list(METHODS)
        if args.quick:  # xdiag where it is cheap; the BN smoke model: the bar only
            methods = methods + ["xdiag"] if model == "tiny-plain" else QUICK_BN
        runs = []
        for r in range(args.repeats):
            for method in methods:
                if r and method not in REPEATED:
                    continue
                runs.append(run_case(method, model, N, args, tmp))
        records += merge(runs)
    annotate(records)
    load.append(os.getloadavg()[0])
    return {
        "machine": machine("cpu"),
        "load_average": load,
        "threads": args.threads,
        "quick": args.quick,
        "repeats": args.repeats,
        "hutchinson_rtol": HUTCHINSON_RTOL,
        "records": records,
    }


def merge(runs: list[dict]) -> list[dict]:
    """One record per method: its fastest repeat (all times kept in ``times_s``)."""
    out = []
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        ok = [r for r in mine if "time_s" in r]
        if not ok:
            out.append(mine[0])
            continue
        rec = dict(min(ok, key=lambda r: r["time_s"]))
        rec["times_s"] = [r["time_s"] for r in ok]
        rec["peak_rss_bytes"] = statistics.median(r["peak_rss_bytes"] for r in ok)
        out.append(rec)
    return out


def annotate(records: list[dict]) -> None:
    """Agreement with lowrank_ggn's diagonal, and curvlinops' projected times."""
    import torch

    for model in dict.fromkeys(r["model"] for r in records):
        mine = {r["method"]: r for r in records if r["model"] == model}
        ref = mine.get("lowrank_ggn")
        if ref is None or "saved" not in ref:
            continue
        d = torch.load(ref["saved"])
        ref["trace"] = float(d.sum())
        spec = mine.get("spectrum", {})
        if "eigenvalue_sum" in spec:
            spec["rel_dev_trace"] = (
                abs(spec["eigenvalue_sum"] - ref["trace"]) / ref["trace"]
            )
        for r in mine.values():
            if "saved" not in r or r is ref:
                continue
            e = torch.load(r["saved"])
            r["max_rel_dev"] = float((e - d).abs().max() / d.abs().max())
            r["rel_error"] = float((e - d).norm() / d.norm())
        F2 = spec.get("frobenius_sq")
        for name in ("hutchinson", "xdiag"):
            r = mine.get(name)
            if r is None or "time_s" not in r:
                continue
            per = r["time_s"] / r["matvecs"]
            r["seconds_per_matvec"] = per
            # XDiag is exact once num_matvecs / 2 exceeds the rank (≤ N·C); unit
            # vectors after D products: curvlinops' cheapest exact diagonal
            rank_bound = ref["N"] * num_classes(model)
            r["exact_matvecs"] = min(2 * (rank_bound + 1), ref["D"])
            r["projected_exact_xdiag_s"] = per * r["exact_matvecs"]
            if name == "hutchinson" and F2 is not None:
                dd = float(d.square().sum())
                r["predicted_rel_error"] = math.sqrt((F2 - dd) / (r["matvecs"] * dd))
                K1 = math.ceil((F2 - dd) / (HUTCHINSON_RTOL**2 * dd))
                r["matvecs_for_1pct"] = K1
                r["projected_1pct_s"] = per * K1
        for r in mine.values():  # lowrank's time relative to each peer (MC: MC's)
            mc = r["method"].endswith("_mc1")
            base = mine.get("lowrank_ggn_mc1", {}) if mc else ref
            if r is not ref and r is not base and "time_s" in r and "time_s" in base:
                r["speedup_of_lowrank"] = r["time_s"] / base["time_s"]
                for key in ("projected_1pct_s", "projected_exact_xdiag_s"):
                    if key in r:
                        r[key.replace("projected", "speedup")] = r[key] / ref["time_s"]


def write(result: dict, tag: str, out: Path) -> None:
    for r in result["records"]:
        r.pop("saved", None)
    m = result["machine"]
    lines = [
        f"# Exact GGN diagonal of 3c3d, float32 ({tag})",
        "",
        f"Machine: {machine_words(m)}, "
        f"threads={result['threads']}; fastest of {result['repeats']} interleaved runs "
        "(all in the JSON's `times_s`; the machine was shared with other jobs"
        + (
            ", 1-minute load average {:.1f} at the start and {:.1f} at the end".format(
                *result["load_average"]
            )
            if "load_average" in result
            else ""
        )
        + "). "
        "Peak RSS (median) includes the baseline "
        "resident at the call's start. Speed-ups: the peer's time over lowrank_ggn's "
        "(MC rows: over lowrank_ggn_mc1's).",
        "",
        "| model | N | method | time [s] | peak RSS [GiB] | baseline [GiB] | "
        "max rel. dev. | rel. error | lowrank faster by | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["records"]:
        head = f"| {r['model']} | {r['N']} | {r['method']} |"
        if "time_s" not in r:
            why = r.get("error") or r.get("skipped")
            lines.append(f"{head} — | | | | | | {why[:120]} |")
            continue
        dev = r.get("max_rel_dev")
        err = r.get("rel_error")
        speed = r.get("speedup_of_lowrank")
        notes = []
        for key in ("route", "strategy", "matvecs", "num_nonzero"):
            if r.get(key) is not None:
                notes.append(f"{key}={r[key]}")
        if "predicted_rel_error" in r:
            notes.append(f"predicted error {r['predicted_rel_error']:.2f}")
        if "matvecs_for_1pct" in r:
            notes.append(
                f"1 %: {r['matvecs_for_1pct']:.3g} products, projected "
                f"{r['projected_1pct_s']:.3g} s ({r['speedup_1pct_s']:.3g}× lowrank)"
            )
        if "projected_exact_xdiag_s" in r:
            notes.append(
                f"exact (xdiag or unit vectors): {r['exact_matvecs']} products, projected "
                f"{r['projected_exact_xdiag_s']:.3g} s"
            )
        if "rel_dev_trace" in r:
            notes.append(f"Σλ vs Σ diag: {r['rel_dev_trace']:.1e}")
        lines.append(
            f"{head} {r['time_s']:.2f} | {gib(r['peak_rss_bytes'])} | "
            f"{gib(r['baseline_rss_bytes'])} | {'' if dev is None else f'{dev:.1e}'} | "
            f"{'' if err is None else f'{err:.2g}'} | "
            f"{'' if speed is None else f'{speed:.2f}×'} | {'; '.join(notes)} |"
        )
    write_results(out, f"diagonal_{tag}", result, "\n".join(lines) + "\n")


def main() -> None:
    p = parser(__doc__)
    p.add_argument(
        "--worker", nargs=3, metavar=("METHOD", "MODEL", "N"), help=argparse.SUPPRESS
    )
    p.add_argument("--save", default=None, help=argparse.SUPPRESS)
    p.add_argument("--N", type=int, default=128, help="batch size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--matvecs", type=int, default=16, help="Hutchinson products")
    add_run_options(p, quick="tiny models (smoke test)", out=RESULTS)
    p.add_argument("--tag", default=None, help="results file tag (default: cpu)")
    add_model_options(p, "keep the existing results' records of the other models")
    args = p.parse_args()
    if args.worker:
        args.method, args.model, N = args.worker
        args.N = int(N)
        print(json.dumps(worker(args)))  # an exception exits with 1 and its trace
        return
    if args.quick:
        args.repeats, args.matvecs, args.threads = 1, 4, 1
    tag = args.tag or ("quick" if args.quick else "cpu")
    result = drive(args)
    old = args.out / f"diagonal_{tag}.json"
    if args.merge and old.exists():
        kept = json.loads(old.read_text())["records"]
        kept = [r for r in kept if r["model"] not in args.models]
        order = ["3c3d", "3c3d-bn"]
        result["records"] = sorted(
            kept + result["records"], key=lambda r: order.index(r["model"])
        )
    write(result, tag, args.out)
    print((args.out / f"diagonal_{tag}.md").read_text())


if __name__ == "__main__":
    main()
