r"""What train-mode BatchNorm costs lowrank_ggn: 3c3d with and without BN, ResNet-18, Lanczos.

Three parts, each (method, model, N) measured in a fresh subprocess so that its peak
resident set size is its own; each worker warms up on a batch of 4 (``--quick`` skips
that), then times one call with ``progress=False``. Before that call the worker hands
freed heap back to the OS and resets the kernel's peak mark (``5 > /proc/self/clear_refs``,
Linux), so ``VmHWM`` afterwards (``harness.memory``) is the call's own peak; it includes what was resident
at its start (Python, torch, model, data: ``baseline_rss_bytes``). Where the reset is
refused (``peak_rss_reset: false``) the peak includes the warm-up's, as in
``bench_gram.py``.

Parts:

* ``bn_vs_plain``: DeepOBS' 3c3d (D = 895,210) against its BatchNorm variant in train
  mode (``harness.models``), CIFAR-10 shapes, C = 10, float32, N ∈ {64, 128, 256}:
  ``ggn_spectrum(model, loss, X, y, eigenvectors=10)`` (all nonzero eigenvalues, the
  top-10 eigenvectors); on the BN variant also ``strategy="columns"``, the previous
  engine (one full-batch vector-Jacobian product per Gram column). Reported: time, peak
  RSS, the number of nonzero eigenvalues, the engine report, and ``t(BN) / t(plain)``
  per N.
* ``resnet18``: torchvision's ResNet-18 (:mod:`harness.resnet`, D = 11,181,642, 20 BatchNorm
  layers with ``Σ_l K_l = 4800``) in train mode, ``[N, 3, 32, 32]``, C = 10, float32,
  N ∈ {16, 32, 64}, ``eigenvectors=10``, the default memory budget; the same net in eval
  mode (per-sample path) for reference. Target: peak RSS ≤ 5.5 GB (``5.5·10⁹`` bytes) in
  train mode. A worker that fails (``MemoryError``, killed, timed out) is an error row.
* ``lanczos``: 3c3d-BN, N = 128, the top-10 eigenvalues from
  ``ggn_spectrum(..., top_k=10, solver="lanczos")``, from ``solver="dense"`` and from
  curvlinops' ``GGNLinearOperator`` + ``scipy.sparse.linalg.eigsh`` (k = 10,
  ``which="LA"``, ``check_deterministic=False``, BatchNorm built with
  ``track_running_stats=False`` as in ``bench_gram.py``: the same train-mode function).
  Targets: Lanczos and curvlinops agree with the dense top-10 to ``1e-4 · λ_max``;
  ``t(lanczos) / t(curvlinops) ≤ 0.67``.

``strategy``, ``solver`` and ``progress`` are passed to ``ggn_spectrum`` only when they
differ from its defaults and its signature has them, so the script also runs against a
lowrank_ggn that predates them; a run that needs one it lacks is a ``skipped`` row. The
engine report (``res.engine_report``, when the result has one) is recorded as plain data:
dataclass fields by name, enums as their value, anything else as ``str()``.

Results go to ``results/batchnorm_<device>.json`` and ``.md`` (one table per part, the
machine, and each target with whether it is met, computed from the numbers). The cases
are in :mod:`batchnorm_cases`, the analysis and the markdown in :mod:`batchnorm_report`;
this script drives the workers. The full-spectrum rows of lowrank_ggn (parts
bn_vs_plain and resnet18) also record the floor of the work on this machine, measured
in the worker after its timed call (:mod:`harness.floor`; ``--no-floor`` skips it),
and ``time / floor``.

Usage::

    python benchmarks/bench_batchnorm.py                     # all three parts (long)
    python benchmarks/bench_batchnorm.py --only resnet18     # one part, merged into
                                                             # the existing results
    python benchmarks/bench_batchnorm.py --only bn_vs_plain --n 64 128
    python benchmarks/bench_batchnorm.py --quick --out /tmp/bbq   # smoke run (tests)
    python benchmarks/bench_batchnorm.py --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

from batchnorm_cases import (
    PARTS,
    Case,
    build_case,
    case_fields,
    cases,
    run_method,
    unsupported,
)
from batchnorm_report import analyse, markdown, targets
from harness.cli import DEFAULT_THREADS, add_floor_option, add_run_options, parser
from harness.floor import floor_of, over_floor
from harness.machine import machine
from harness.memory import measure
from harness.peers import available
from harness.results import RESULTS, write_results
from harness.workers import announce, outcome, previous_release, run_worker

FLOOR_PARTS = ("bn_vs_plain", "resnet18")  # full spectra (part lanczos: top-k only)


# ----------------------------------------------------------------------------- worker
def worker(case: Case, device: str, threads: int, floor: bool = True) -> dict:
    """Warm up, then time the case's call with its own peak RSS (in this process);
    on lowrank_ggn's full spectra also the floor of the work (:mod:`harness.floor`)."""
    import torch

    torch.set_num_threads(threads)
    reason = None if case.method == "curvlinops" else unsupported(case.kwargs)
    if reason:
        return {**case_fields(case), "skipped": reason}
    running_stats = case.method != "curvlinops"
    if not case.quick:  # warm up on a batch of 4 (the smoke run skips it)
        warm = build_case(case.model, 4, device, 1, case.quick, running_stats)
        run_method(case, *warm, k=2)
        del warm
    model, loss, X, y = build_case(
        case.model, case.N, device, 0, case.quick, running_stats
    )
    # the peak of the timed call alone, not of the warm-up: reset the kernel's mark
    (evals, info), cost = measure(
        lambda: run_method(case, model, loss, X, y, case.k), device
    )
    if floor and case.part in FLOOR_PARTS and case.method != "curvlinops":
        layers = (info.get("engine_report") or {}).get("layers")
        info.update(floor_of(model, loss, X, y, layers))  # after the call's peak
    rec = {
        **case_fields(case),
        **cost,
        "num_params": sum(p.numel() for p in model.parameters()),
        "top_eigenvalues": [float(v) for v in evals],
        **info,
    }
    return {**rec, "time_over_floor": over_floor(rec)} if "floor_s" in rec else rec


# ----------------------------------------------------------------------------- driver
def run_case(case: Case, args) -> dict:
    """One case in a fresh subprocess; failures and skips become rows, never raise."""
    announce(f"{case.part:11s} {case.model:13s} N={case.N:4d} {case.method:20s}")
    reason = None
    if not available(case.method):
        reason = "not installed"
    elif case.method != "curvlinops":
        reason = unsupported(case.kwargs)
    if reason:
        return outcome({**case_fields(case), "skipped": reason})
    cmd = [sys.executable, __file__, "--worker", json.dumps(dataclasses.asdict(case))]
    cmd += ["--device", args.device, "--threads", str(args.threads)]
    cmd += ["--no-floor"] if args.no_floor else []
    rec = run_worker(cmd, args.timeout, case.pythonpath)
    return outcome(rec if "error" not in rec else {**case_fields(case), **rec})


def drive(args) -> dict:
    """Every case of the parts asked for, then each part's analysis."""
    parts = {}
    with previous_release(args.previous) as args.previous_dir:
        for part in args.only or PARTS:
            parts[part] = [run_case(case, args) for case in cases(part, args)]
    when = time.strftime("%Y-%m-%d %H:%M")
    return {
        "machine": machine(args.device),
        "threads": args.threads,
        "quick": args.quick,
        # threads and date per part too: --only merges parts of different runs
        "parts": {
            p: {"threads": args.threads, "measured": when, **analyse(p, recs)}
            for p, recs in parts.items()
        },
    }


def write(result: dict, tag: str, out: Path) -> Path:
    """Targets from the parts, then ``batchnorm_<tag>.json`` and ``.md``."""
    result["targets"] = targets(result["parts"])
    return write_results(out, f"batchnorm_{tag}", result, markdown(result, tag))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--worker", metavar="CASE_JSON", help=argparse.SUPPRESS)
    p.add_argument(
        "--only",
        nargs="+",
        choices=PARTS,
        help="run these parts only; the others are kept from an existing "
        "results file of the same tag",
    )
    p.add_argument(
        "--previous",
        metavar="REV",
        help="git revision of the previous release: part bn_vs_plain also runs its "
        "engine (one full-batch pass per column) at the --columns-n batch sizes",
    )
    for flag, default, what in (
        ("--n", [64, 128, 256], "batch sizes of part bn_vs_plain"),
        (
            "--columns-n",
            [64, 128],
            "batch sizes of part bn_vs_plain at which the previous engine "
            "(strategy='columns', quadratic in N) runs as the baseline",
        ),
        ("--resnet-n", [16, 32, 64], "batch sizes of part resnet18"),
    ):
        p.add_argument(flag, type=int, nargs="+", default=default, help=what)
    p.add_argument(
        "--lanczos-n", type=int, default=128, help="batch size of part lanczos"
    )
    p.add_argument("--device", default="cpu")
    quick = (
        "tiny models, small N (smoke test); without --out it writes into a fresh "
        "temporary folder"
    )
    threads = (
        "torch threads per worker (default: min(cores, 16); 1 with --quick, which "
        "must stay fast on a busy machine)"
    )
    add_run_options(
        p,
        quick=quick,
        out=None,
        results=RESULTS,
        threads=None,
        timeout=3600,
        threads_help=threads,
    )
    p.add_argument(
        "--tag", default=None, help="results file tag (default: device kind)"
    )
    add_floor_option(p, "the full-spectrum rows")
    args = p.parse_args()
    if args.worker:
        case = Case(**json.loads(args.worker))
        floor = not args.no_floor
        print(json.dumps(worker(case, args.device, args.threads, floor)))
        return
    if args.threads is None:
        args.threads = 1 if args.quick else DEFAULT_THREADS
    if args.out is None:
        args.out = (
            Path(tempfile.mkdtemp(prefix="bench_batchnorm_")) if args.quick else RESULTS
        )
    tag = args.tag or ("quick" if args.quick else args.device.split(":")[0])
    result = drive(args)
    old = args.out / f"batchnorm_{tag}.json"
    if args.only and old.exists():
        kept = json.loads(old.read_text()).get("parts", {})
        result["parts"] = {
            part: result["parts"].get(part, kept.get(part))
            for part in PARTS
            if part in result["parts"] or part in kept
        }
    print(write(result, tag, args.out).read_text())
    print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
