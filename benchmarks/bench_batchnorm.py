r"""What train-mode BatchNorm costs lowrank_ggn: 3c3d with and without BN, ResNet-18, Lanczos.

Three parts, each (method, model, N) measured in a fresh subprocess so that its peak
resident set size is its own; each worker warms up on a batch of 4 (``--quick`` skips
that), then times one call with ``progress=False``. Before that call the worker hands
freed heap back to the OS and resets the kernel's peak mark (``5 > /proc/self/clear_refs``,
Linux), so ``VmHWM`` afterwards (``_memory.peak_rss_bytes``) is the call's own peak; it includes what was resident
at its start (Python, torch, model, data: ``baseline_rss_bytes``). Where the reset is
refused (``peak_rss_reset: false``) the peak includes the warm-up's, as in
``bench_gram.py``.

Parts:

* ``bn_vs_plain``: DeepOBS' 3c3d (D = 895,210) against its BatchNorm variant in train
  mode (``bench_gram.build``), CIFAR-10 shapes, C = 10, float32, N ∈ {64, 128, 256}:
  ``ggn_spectrum(model, loss, X, y, eigenvectors=10)`` (all nonzero eigenvalues, the
  top-10 eigenvectors); on the BN variant also ``strategy="columns"``, the previous
  engine (one full-batch vector-Jacobian product per Gram column). Reported: time, peak
  RSS, the number of nonzero eigenvalues, the engine report, and ``t(BN) / t(plain)``
  per N.
* ``resnet18``: torchvision's ResNet-18 (:mod:`resnet`, D = 11,181,642, 20 BatchNorm
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
machine, and each target with whether it is met, computed from the numbers).

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
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from enum import Enum
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
if str(HERE) not in sys.path:  # bench_gram, resnet, _peers sit next to this script
    sys.path.insert(0, str(HERE))

from _memory import peak_rss_bytes, reset_peak_rss, resident_bytes  # noqa: E402
from bench_gram import AGREEMENT_RTOL, BN_MODELS, available, build, machine  # noqa: E402
from bench_gram import curvlinops as curvlinops_eigsh  # noqa: E402

PARTS = ("bn_vs_plain", "resnet18", "lanczos")
RSS_TARGET_BYTES = 5.5e9  # "5.5 GB", decimal
LANCZOS_RATIO_TARGET = 0.67  # t(lanczos) / t(curvlinops)
BN_RATIO_TARGET = 15.0  # t(3c3d-BN) / t(3c3d) at N = 128
# keyword arguments of ggn_spectrum that are only passed when not at their default
OPTIONAL_KWARGS = {"strategy": None, "solver": "dense", "progress": None}


# ----------------------------------------------------------------------------- cases
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

    ``tiny-plain`` is bench_gram's ``tiny`` with its BatchNorm replaced by the identity;
    ResNet-18 sees ``[N, 3, 32, 32]`` and C = 10 (``--quick``: ``[N, 3, 8, 8]``, C = 3).
    """
    import torch
    from torch import nn

    if model_name == "tiny-plain":
        model, loss, X, y = build("tiny", N, device, seed, running_stats)
        model[1] = nn.Identity()
        return model, loss, X, y
    if model_name.startswith("resnet18"):
        from resnet import resnet18

        size, C = (8, 3) if quick else (32, 10)
        torch.manual_seed(seed)
        model = resnet18(num_classes=C)
        X, y = torch.randn(N, 3, size, size), torch.randint(0, C, (N,))
        model = model.to(device).train(not model_name.endswith("-eval"))
        return model, nn.CrossEntropyLoss(), X.to(device), y.to(device)
    return build(model_name, N, device, seed, running_stats)


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


def plain_data(obj):
    """JSON-ready copy of an engine report: dataclasses by field, enums by value."""
    if isinstance(obj, Enum):
        return str(obj.value)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: plain_data(getattr(obj, f.name)) for f in dataclasses.fields(obj)
        }
    if isinstance(obj, Mapping):
        return {str(plain_data(k)): plain_data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [plain_data(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


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


# ----------------------------------------------------------------------------- worker
def worker(case: Case, device: str, threads: int) -> dict:
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
    peak_reset = reset_peak_rss()
    base_rss = resident_bytes() if peak_reset else None
    if base_rss is None:
        base_rss = peak_rss_bytes()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    evals, info = run_method(case, model, loss, X, y, case.k)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    rec = {
        **case_fields(case),
        "time_s": elapsed,
        "peak_rss_bytes": peak_rss_bytes(),
        "baseline_rss_bytes": base_rss,
        "peak_rss_reset": peak_reset,
        "num_params": sum(p.numel() for p in model.parameters()),
        "top_eigenvalues": [float(v) for v in evals],
        **info,
    }
    if device.startswith("cuda"):
        rec["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    return rec


def case_fields(case: Case) -> dict:
    return {
        "part": case.part,
        "method": case.method,
        "model": case.model,
        "N": case.N,
        "kwargs": case.kwargs,
    }


# ----------------------------------------------------------------------------- driver
def run_case(case: Case, args) -> dict:
    """One case in a fresh subprocess; failures and skips become rows, never raise."""
    label = f"{case.part:11s} {case.model:13s} N={case.N:4d} {case.method:20s}"
    print(label, end=" ", flush=True, file=sys.stderr)
    if not available(case.method):  # bench_gram's check of the peer's modules
        print("skipped: not installed", file=sys.stderr)
        return {**case_fields(case), "skipped": "not installed"}
    if case.method != "curvlinops":
        reason = unsupported(case.kwargs)
        if reason:
            print(f"skipped: {reason}", file=sys.stderr)
            return {**case_fields(case), "skipped": reason}
    spec = json.dumps(dataclasses.asdict(case))
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        spec,
        "--device",
        args.device,
        "--threads",
        str(args.threads),
    ]
    env = dict(os.environ)
    if case.pythonpath:  # the previous release shadows the installed package
        env["PYTHONPATH"] = os.pathsep.join(
            [case.pythonpath, *filter(None, [env.get("PYTHONPATH")])]
        )
    try:
        proc = subprocess.run(
            cmd,
            check=False,
            capture_output=True,
            text=True,
            timeout=args.timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        err = f"timed out after {args.timeout} s"
        print(err, file=sys.stderr)
        return {**case_fields(case), "error": err}
    if proc.returncode != 0:
        if proc.returncode < 0:
            err = f"killed by signal {-proc.returncode}"
            if -proc.returncode == 9:
                err += " (out of memory?)"
        else:
            err = exception_line(proc.stderr)
        print(f"FAILED: {err}", file=sys.stderr)
        return {**case_fields(case), "error": err}
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skipped" in rec:
        print(f"skipped: {rec['skipped']}", file=sys.stderr)
    else:
        print(
            f"{rec['time_s']:8.2f} s  peak RSS {rec['peak_rss_bytes'] / 2**30:6.2f} GiB",
            file=sys.stderr,
        )
    return rec


def exception_line(stderr: str) -> str:
    """The ``SomeError: message`` line of a traceback (its last line otherwise)."""
    lines = stderr.strip().splitlines() or ["?"]
    for i in range(len(lines) - 1, -1, -1):
        if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", lines[i]):
            return " ".join(x.strip() for x in lines[i : i + 3])[:300]
    return lines[-1]


def ok(rec: dict | None) -> bool:
    return rec is not None and "error" not in rec and "skipped" not in rec


def find(records: list[dict], **match) -> dict | None:
    return next(
        (r for r in records if all(r.get(k) == v for k, v in match.items())), None
    )


def rel_dev(a: list[float], ref: list[float]) -> float:
    """``max_i |a_i − ref_i| / |ref_0|`` over the common leading eigenvalues."""
    n = min(len(a), len(ref))
    return max(abs(x - z) for x, z in zip(a[:n], ref[:n])) / abs(ref[0])


def analyse(part: str, records: list[dict]) -> dict:
    """Derived numbers of one part (ratios, agreement), from its records only."""
    out: dict = {"records": records}
    if part == "bn_vs_plain":
        rows = []
        for N in sorted({r["N"] for r in records}):
            plain = next(
                (
                    r
                    for r in records
                    if r["N"] == N
                    and r["method"] == "lowrank_ggn"
                    and r["model"] not in BN_MODELS
                ),
                None,
            )
            bn = next(
                (
                    r
                    for r in records
                    if r["N"] == N
                    and r["method"] == "lowrank_ggn"
                    and r["model"] in BN_MODELS
                ),
                None,
            )
            cols = find(records, N=N, method="lowrank_ggn[columns]")
            prev = find(records, N=N, method="previous")
            rows.append(
                {
                    "N": N,
                    "bn_over_plain_time": bn["time_s"] / plain["time_s"]
                    if ok(bn) and ok(plain)
                    else None,
                    "columns_over_bn_time": cols["time_s"] / bn["time_s"]
                    if ok(cols) and ok(bn)
                    else None,
                    "previous_over_bn_time": prev["time_s"] / bn["time_s"]
                    if ok(prev) and ok(bn)
                    else None,
                    "same_nonzero_count_columns": cols["num_nonzero"]
                    == bn["num_nonzero"]
                    if ok(cols) and ok(bn)
                    else None,
                }
            )
        out["ratios"] = rows
    elif part == "lanczos":
        dense = find(records, method="dense")
        rows = []
        for name in ("lanczos", "curvlinops"):
            r = find(records, method=name)
            dev = (
                rel_dev(r["top_eigenvalues"], dense["top_eigenvalues"])
                if ok(r) and ok(dense)
                else None
            )
            rows.append({"method": name, "max_rel_dev_from_dense": dev})
        lz, cv = find(records, method="lanczos"), find(records, method="curvlinops")
        out["agreement"] = rows
        out["lanczos_over_curvlinops_time"] = (
            lz["time_s"] / cv["time_s"] if ok(lz) and ok(cv) else None
        )
    return out


def targets(parts: dict) -> list[dict]:
    """Each target with its measured value and whether it is met (``None``: not measured)."""
    out = []
    if "bn_vs_plain" in parts:
        ratios = {
            r["N"]: r["bn_over_plain_time"] for r in parts["bn_vs_plain"]["ratios"]
        }
        at128 = ratios.get(128)
        out.append(
            {
                "part": "bn_vs_plain",
                "target": f"t(3c3d-BN) / t(3c3d) ≤ {BN_RATIO_TARGET:g} at N=128",
                "value": None if at128 is None else f"{at128:.1f}",
                "met": None if at128 is None else at128 <= BN_RATIO_TARGET,
            }
        )
        at256 = ratios.get(256)
        out.append(
            {
                "part": "bn_vs_plain",
                "target": "the ratio at N=256 no larger than at N=128",
                "value": None if at256 is None else f"{at256:.1f}",
                "met": None if None in (at128, at256) else at256 <= at128,
            }
        )
    if "resnet18" in parts:
        for r in parts["resnet18"]["records"]:
            if r["model"] != "resnet18":
                continue
            value = r.get("peak_rss_bytes")
            met = None if "skipped" in r else (ok(r) and value <= RSS_TARGET_BYTES)
            out.append(
                {
                    "part": "resnet18",
                    "target": f"ResNet-18 train mode, N={r['N']}: peak RSS ≤ 5.5 GB",
                    "value": f"{value / 1e9:.2f} GB"
                    if value
                    else r.get("error", r.get("skipped")),
                    "met": met,
                }
            )
    if "lanczos" in parts:
        lz = parts["lanczos"]
        for row in lz["agreement"]:
            dev = row["max_rel_dev_from_dense"]
            out.append(
                {
                    "part": "lanczos",
                    "target": f"{row['method']} top-k within {AGREEMENT_RTOL:g}·λ_max of dense",
                    "value": None if dev is None else f"{dev:.1e}",
                    "met": None if dev is None else dev <= AGREEMENT_RTOL,
                }
            )
        ratio = lz["lanczos_over_curvlinops_time"]
        out.append(
            {
                "part": "lanczos",
                "target": f"t(lanczos) / t(curvlinops) ≤ {LANCZOS_RATIO_TARGET}",
                "value": None if ratio is None else f"{ratio:.2f}",
                "met": None if ratio is None else ratio <= LANCZOS_RATIO_TARGET,
            }
        )
    return out


def export_previous(rev: str | None) -> str | None:
    """``lowrank_ggn`` as of git revision ``rev``, unpacked into a temporary folder."""
    if rev is None:
        return None
    root = HERE.parent
    target = Path(tempfile.mkdtemp(prefix="lowrank_ggn_previous_"))
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", rev, "lowrank_ggn"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return str(target)


def drive(args) -> dict:
    args.previous_dir = export_previous(args.previous)
    parts = {}
    try:
        for part in args.only or PARTS:
            parts[part] = [run_case(case, args) for case in cases(part, args)]
    finally:
        if args.previous_dir:
            shutil.rmtree(args.previous_dir, ignore_errors=True)
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


# ----------------------------------------------------------------------------- output
def gib(b: float | None) -> str:
    return "" if b is None else f"{b / 2**30:.2f}"


def engine_cell(r: dict) -> str:
    """The engine report in a few words: strategy/solver, layer kinds, passes."""
    rep = r.get("engine_report")
    if not rep:
        return r.get("path") or ""
    words = "/".join(
        str(rep[k]) for k in ("strategy", "solver") if rep.get(k) is not None
    )
    layers = rep.get("layers") or {}
    if layers:
        counts: dict[str, int] = {}
        for kind in layers.values():
            counts[str(kind)] = counts.get(str(kind), 0) + 1
        words += "; " + ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    if rep.get("fallback"):
        words += f"; fallback: {rep['fallback']}"
    passes = rep.get("passes") or {}
    if passes:
        words += "; passes " + ", ".join(f"{k}={v}" for k, v in passes.items())
    return words


def record_row(r: dict, extra: str = "") -> str:
    head = f"| {r['model']} | {r['N']} | {r['method']} |"
    if "error" in r or "skipped" in r:
        what = (
            f"failed: {r['error'][:80]}" if "error" in r else f"skipped: {r['skipped']}"
        ).replace("|", "\\|")
        return head + f" {what} | | | | |" + (" |" if extra else "")
    cells = [
        f"{r['time_s']:.2f}",
        gib(r["peak_rss_bytes"]),
        gib(r["baseline_rss_bytes"]),
        str(r.get("num_nonzero", "")),
    ]
    if extra:
        cells.append(extra)
    return head + " " + " | ".join(cells) + f" | {engine_cell(r)} |"


def markdown(result: dict, tag: str) -> str:
    parts = result["parts"]
    measured = [r for p in parts.values() for r in p["records"] if ok(r)]
    lines = [
        f"# Train-mode BatchNorm: cost and scale, float32 ({tag})",
        "",
        "Machine: "
        + ", ".join(f"{k}={v}" for k, v in result["machine"].items())
        + f", torch threads={result['threads']}",
        "",
        "Peak RSS is each worker's `VmHWM` over the timed call, its peak mark reset "
        "after the warm-up "
        + (
            "(every measured row)"
            if all(r.get("peak_rss_reset") for r in measured)
            else "(**not** for every row: those peaks include the warm-up's)"
        )
        + "; it includes the baseline resident at the call's start (Python, torch, "
        "model, data). 1 GiB = 2³⁰ bytes; the RSS target is in GB (10⁹ bytes).",
    ]
    head = (
        "| model | N | method | time [s] | peak RSS [GiB] | baseline RSS [GiB] "
        "| nonzero eigenvalues |"
    )
    if "bn_vs_plain" in parts:
        p = parts["bn_vs_plain"]
        lines += [
            "",
            "## 3c3d with and without BatchNorm (train mode)" + when(p),
            "",
            head + " engine |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [record_row(r) for r in p["records"]]
        lines += [
            "",
            "| N | t(BN) / t(plain) | t(columns) / t(BN) | t(previous) / t(BN) "
            "| columns and BN: same rank |",
            "|---|---|---|---|---|",
        ]
        for q in p["ratios"]:
            lines.append(
                f"| {q['N']} | {fmt(q['bn_over_plain_time'])} | "
                f"{fmt(q['columns_over_bn_time'])} | "
                f"{fmt(q.get('previous_over_bn_time'))} | "
                f"{fmt(q['same_nonzero_count_columns'])} |"
            )
    if "resnet18" in parts:
        lines += [
            "",
            "## ResNet-18 (train-mode BN; eval mode for reference)"
            + when(parts["resnet18"]),
            "",
            head + " engine |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [record_row(r) for r in parts["resnet18"]["records"]]
    if "lanczos" in parts:
        p = parts["lanczos"]
        devs = {row["method"]: row["max_rel_dev_from_dense"] for row in p["agreement"]}
        lines += [
            "",
            "## Top-k: Lanczos vs dense vs curvlinops + eigsh" + when(p),
            "",
            head + " rel. dev. from dense | engine |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in p["records"]:
            lines.append(record_row(r, extra=fmt(devs.get(r["method"]), ".1e") or "–"))
        lines += [
            "",
            f"t(lanczos) / t(curvlinops) = {fmt(p['lanczos_over_curvlinops_time'])}",
        ]
    lines += ["", "## Targets", ""]
    if not result["targets"]:
        lines.append("None in the parts run (part bn_vs_plain has no target).")
        return "\n".join(lines) + "\n"
    lines += ["| part | target | measured | met |", "|---|---|---|---|"]
    for t in result["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['part']} | {t['target']} | {t['value'] or ''} | {met} |")
    return "\n".join(lines) + "\n"


def when(part: dict) -> str:
    """`` (date, T threads)`` of one part's run, for its heading."""
    if "measured" not in part:
        return ""
    return f" ({part['measured']}, torch threads={part['threads']})"


def fmt(x, spec: str = ".2f") -> str:
    if x is None:
        return ""
    if isinstance(x, bool):
        return "yes" if x else "no"
    return format(x, spec)


def write(result: dict, tag: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result["targets"] = targets(result["parts"])
    (out / f"batchnorm_{tag}.json").write_text(json.dumps(result, indent=1))
    (out / f"batchnorm_{tag}.md").write_text(markdown(result, tag))


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--worker", metavar="CASE_JSON", help=argparse.SUPPRESS)
    p.add_argument(
        "--only",
        nargs="+",
        choices=PARTS,
        help="run these parts only; the others are kept from an existing "
        "results file of the same tag",
    )
    p.add_argument(
        "--n",
        type=int,
        nargs="+",
        default=[64, 128, 256],
        help="batch sizes of part bn_vs_plain",
    )
    p.add_argument(
        "--previous",
        metavar="REV",
        help="git revision of the previous release: part bn_vs_plain also runs its "
        "engine (one full-batch pass per column) at the --columns-n batch sizes",
    )
    p.add_argument(
        "--columns-n",
        type=int,
        nargs="+",
        default=[64, 128],
        help="batch sizes of part bn_vs_plain at which the previous engine "
        "(strategy='columns', quadratic in N) runs as the baseline",
    )
    p.add_argument(
        "--resnet-n",
        type=int,
        nargs="+",
        default=[16, 32, 64],
        help="batch sizes of part resnet18",
    )
    p.add_argument(
        "--lanczos-n", type=int, default=128, help="batch size of part lanczos"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per worker (default: min(cores, 16); 1 with --quick, "
        "which must stay fast on a busy machine)",
    )
    p.add_argument("--timeout", type=int, default=3600, help="seconds per worker")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny models, small N (smoke test); without --out it writes "
        "into a fresh temporary folder",
    )
    p.add_argument(
        "--tag", default=None, help="results file tag (default: device kind)"
    )
    p.add_argument(
        "--out", type=Path, default=None, help=f"results folder (default: {RESULTS})"
    )
    args = p.parse_args()
    if args.worker:
        case = Case(**json.loads(args.worker))
        print(json.dumps(worker(case, args.device, args.threads)))
        return
    if args.threads is None:
        args.threads = 1 if args.quick else min(os.cpu_count() or 1, 16)
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
    write(result, tag, args.out)
    print((args.out / f"batchnorm_{tag}.md").read_text())
    print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
