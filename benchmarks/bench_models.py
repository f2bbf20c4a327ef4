r"""Top-10 GGN eigenpairs of a token transformer and a MobileNet: lowrank_ggn vs its
previous release vs curvlinops + eigsh.

Models (:mod:`models_zoo`, float32, random weights from a fixed seed,
``CrossEntropyLoss``, C = 10):

* ``transformer``: a 2-layer ``nn.TransformerEncoder`` classifier (d_model 64, 4 heads,
  feed-forward 256, dropout 0), token embedding (vocabulary 1000) plus learned
  positions, masked mean pool, ``Linear(64, 10)``; inputs the tuple
  ``(tokens [N, 32] int64, padding_mask [N, 32] bool)`` with random lengths 8..32. It
  runs in **train mode**: with dropout 0 that is the same function as eval mode, and
  eval mode sends ``nn.TransformerEncoderLayer`` down its fused fast path
  (``aten::_transformer_encoder_layer_fwd``), which has no forward-mode derivative.
* ``mobilenet``: a MobileNet-v1-style CNN on ``[N, 3, 32, 32]`` (stride-2 stem, four
  depthwise-separable blocks, widths up to 128), BatchNorm in **eval** mode with
  calibrated, randomly perturbed running statistics: sample-independent.

Methods, each (method, model, N) in a fresh subprocess so that its peak resident set
size is its own:

* ``lowrank_ggn``: this working tree's ``ggn_spectrum(model, loss, inputs, y,
  top_k=10, eigenvectors=True)``, the transformer's inputs as the tuple; recorded: the
  path, the engine report's strategy, pass counts and per-layer treatments (the
  Gram summed in float64, the default for float32 models);
* ``lowrank_ggn_f32``: the same with ``accumulate="native"`` (the Gram summed in
  float32; the error model's bounds then include float32 sums);
* ``previous``: the same call on the previous release (git revision ``--previous``,
  default ``6642272``, exported with ``git archive`` and put first on ``sys.path``).
  That release takes a single input tensor, so the transformer runs behind
  :class:`models_zoo.Packed` (``x = cat([tokens, mask.long()], 1)``, ``[N, 64]``
  int64, split again in ``forward``): the same function;
* ``curvlinops``: ``GGNLinearOperator(model, loss, params, [(X, y)],
  check_deterministic=False)`` and ``scipy.sparse.linalg.eigsh(k=10, which="LA")``,
  GGN-vector products counted. Its products use forward-mode ``torch.func.jvp``, which
  CPU's fused scaled-dot-product attention kernels lack; the transformer therefore runs
  under ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` (the math backend is
  composite, so forward mode differentiates through it). Whether the call fails
  without that context is tried once on N = 2 and recorded (``without_math_backend``).
  curvlinops takes a tensor or a dict, not a tuple: the transformer is ``Packed``.

Each worker warms up on a batch of 4 (``--quick`` skips that), then hands freed heap
back to the OS, resets the kernel's peak-RSS mark (``_memory.reset_peak_rss``)
and times one call (``time.perf_counter``); peak RSS is ``VmHWM`` after it,
including the baseline resident at its start (also recorded). A worker that fails or
times out is an error row; the driver never stops.

Analysis: every method's top-10 against lowrank_ggn's (``max_i |λ_i − λ_i^ref| /
λ_max^ref``; bar ``1e-4``, float32), speed-ups ``t(previous) / t(lowrank_ggn)`` and
``t(curvlinops) / t(lowrank_ggn)`` at each N, and the targets on the transformer at
N = 128: at least 5× faster than the previous release, at least 3× faster than
curvlinops. MobileNet gets the same ratios, without a target.

Results: ``results/models_<device>.json`` and ``.md``.

Usage::

    python benchmarks/bench_models.py                       # full run, N = 32, 128
    python benchmarks/bench_models.py --only transformer --N 128
    python benchmarks/bench_models.py --methods lowrank_ggn curvlinops
    python benchmarks/bench_models.py --quick --out /tmp/bmq  # smoke run (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
if str(HERE) not in sys.path:  # bench_gram, bench_batchnorm, models_zoo sit here
    sys.path.insert(0, str(HERE))

from _memory import peak_rss_bytes, reset_peak_rss, resident_bytes  # noqa: E402
from bench_batchnorm import (  # noqa: E402
    exception_line,
    export_previous,
    find,
    ok,
    plain_data,
    rel_dev,
)
from bench_gram import AGREEMENT_RTOL, available, machine  # noqa: E402

MODELS = ("transformer", "mobilenet")
METHODS = ("lowrank_ggn", "lowrank_ggn_f32", "previous", "curvlinops")
PREVIOUS = "6642272"  # the previous release
TOP_K = 10
WARMUP_N = 4
TARGET_N = 128
# t(method) / t(lowrank_ggn) on the transformer at N = 128, at least
SPEEDUP_TARGETS = {"previous": 5.0, "curvlinops": 3.0}


@dataclasses.dataclass(frozen=True)
class Case:
    """One worker run: a method on one model and batch size."""

    method: str
    model: str
    N: int
    quick: bool = False
    pythonpath: str | None = None  # the previous release's folder


# --------------------------------------------------------------------------- methods
def math_attention(model_name: str):
    """``sdpa_kernel(MATH)`` for the transformer (forward-mode AD), else a no-op."""
    if model_name != "transformer":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def lowrank(model, loss, X, y, **options) -> tuple[list[float], dict]:
    """``ggn_spectrum(top_k=10, eigenvectors=True)`` of whichever lowrank_ggn is first
    on ``sys.path``; the top-10 eigenvalues and what the engine did."""
    import torch

    import lowrank_ggn

    res = lowrank_ggn.ggn_spectrum(
        model, loss, X, y, top_k=TOP_K, eigenvectors=True, progress=False, **options
    )
    assert res.eigenvectors.shape[0] == res.eigenvalues.numel()
    assert torch.isfinite(res.eigenvectors).all()
    report = getattr(res, "engine_report", None)
    info = {
        "package": str(Path(lowrank_ggn.__file__).parent),  # which release ran
        "path": getattr(res.path, "name", str(res.path)),
        "engine_report": None if report is None else plain_data(report),
    }
    return [float(v) for v in res.eigenvalues[:TOP_K]], info


def curvlinops_eigsh(model, loss, X, y, k: int = TOP_K) -> tuple[list[float], dict]:
    """curvlinops' GGN operator and ``eigsh(k, which="LA")``; products counted."""
    from curvlinops import GGNLinearOperator
    from scipy.sparse.linalg import LinearOperator, eigsh

    params = [p for p in model.parameters() if p.requires_grad]
    op = GGNLinearOperator(
        model, loss, params, [(X, y)], check_deterministic=False
    ).to_scipy()
    products = 0

    def matvec(v):
        nonlocal products
        products += 1 if v.ndim == 1 else v.shape[1]
        return op @ v

    counted = LinearOperator(op.shape, matvec=matvec, matmat=matvec, dtype=op.dtype)
    evals, _ = eigsh(counted, k=k, which="LA")
    return sorted((float(v) for v in evals), reverse=True), {"products": products}


def run_method(case: Case, N: int, seed: int) -> tuple[list[float], dict, int]:
    """Build the case's model at ``N`` and run its method: eigenvalues, info, ``D``."""
    from models_zoo import build

    # only this release takes tuple inputs
    packed = not case.method.startswith("lowrank_ggn")
    model, loss, X, y = build(case.model, N, seed, case.quick, packed=packed)
    D = sum(p.numel() for p in model.parameters())
    if case.method == "curvlinops":
        with math_attention(case.model):
            evals, info = curvlinops_eigsh(model, loss, X, y)
        return evals, info, D
    # lowrank_ggn_f32: the Gram summed in float32 (accumulate="native")
    native = {"accumulate": "native"} if case.method == "lowrank_ggn_f32" else {}
    evals, info = lowrank(model, loss, X, y, **native)
    return evals, info, D


def without_math_backend(case: Case) -> str:
    """Whether curvlinops runs on the transformer at N = 2 with the default backends."""
    from models_zoo import build

    model, loss, X, y = build(case.model, 2, 1, case.quick, packed=True)
    try:
        _one_product(model, loss, X, y)
    except Exception as e:  # noqa: BLE001 - the failure is the finding
        return f"fails: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return "works"


def _one_product(model, loss, X, y) -> None:
    """One curvlinops GGN-vector product (enough to hit forward-mode AD)."""
    import torch
    from curvlinops import GGNLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    op = GGNLinearOperator(model, loss, params, [(X, y)], check_deterministic=False)
    op @ torch.ones(sum(p.numel() for p in params))


# ----------------------------------------------------------------------------- worker
def worker(case: Case, threads: int) -> dict:
    if case.pythonpath:  # the previous release shadows the working tree
        sys.path.insert(0, case.pythonpath)
    import torch

    torch.set_num_threads(threads)
    rec: dict = {**dataclasses.asdict(case), "threads": threads}
    rec.pop("pythonpath")
    if case.method == "curvlinops":
        rec["sdpa_backend"] = "math" if case.model == "transformer" else "default"
        if case.model == "transformer":
            rec["without_math_backend"] = without_math_backend(case)
    else:
        rec["sdpa_backend"] = "default"
    rec["inputs"] = (
        "tuple (tokens, mask)"
        if case.model == "transformer" and case.method.startswith("lowrank_ggn")
        else "Packed [N, 64] int64"
        if case.model == "transformer"
        else "tensor"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if not case.quick:  # warm-up on a batch of 4
            run_method(case, WARMUP_N, seed=1)
        # the peak of the timed call alone, not of the warm-up: reset the kernel's mark
        peak_reset = reset_peak_rss()
        base_rss = resident_bytes() if peak_reset else None
        if base_rss is None:
            base_rss = peak_rss_bytes()
        t0 = time.perf_counter()
        evals, info, D = run_method(case, case.N, seed=0)
        elapsed = time.perf_counter() - t0
    rec.update(
        D=D,
        time_s=elapsed,
        peak_rss_bytes=peak_rss_bytes(),
        baseline_rss_bytes=base_rss,
        peak_rss_reset=peak_reset,
        top_eigenvalues=evals,
        warnings=sorted(
            {f"{w.category.__name__}: {str(w.message)[:160]}" for w in caught}
        ),
        **info,
    )
    return rec


# ----------------------------------------------------------------------------- driver
def run_case(case: Case, args) -> dict:
    """One case in a fresh subprocess; failures become rows, never raise."""
    fields = {"method": case.method, "model": case.model, "N": case.N}
    print(
        f"{case.model:12s} N={case.N:4d} {case.method:12s}",
        end=" ",
        flush=True,
        file=sys.stderr,
    )
    if not available(case.method):
        print("skipped: not installed", file=sys.stderr)
        return {**fields, "skipped": "not installed"}
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        json.dumps(dataclasses.asdict(case)),
        "--threads",
        str(args.threads),
    ]
    try:
        proc = subprocess.run(
            cmd, check=False, capture_output=True, text=True, timeout=args.timeout
        )
    except subprocess.TimeoutExpired:
        err = f"timed out after {args.timeout} s"
        print(err, file=sys.stderr)
        return {**fields, "error": err}
    if proc.returncode != 0:
        err = (
            f"killed by signal {-proc.returncode}"
            + (" (out of memory?)" if proc.returncode == -9 else "")
            if proc.returncode < 0
            else exception_line(proc.stderr)
        )
        print(f"FAILED: {err}", file=sys.stderr)
        return {**fields, "error": err}
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"{rec['time_s']:8.2f} s  peak RSS {rec['peak_rss_bytes'] / 2**30:5.2f} GiB  "
        f"{engine_cell(rec)}",
        file=sys.stderr,
    )
    return rec


def cases(args) -> list[Case]:
    """Every (model, N, method), models outermost."""
    Ns = [4] if args.quick else args.N
    return [
        Case(m, model, N, args.quick, args.previous_dir if m == "previous" else None)
        for model in args.only or MODELS
        for N in Ns
        for m in args.methods
    ]


def analyse(records: list[dict]) -> list[dict]:
    """Per (model, N): speed-ups over lowrank_ggn and top-10 agreement with it.

    The reference for agreement is lowrank_ggn, or the first other method measured
    when it failed (named in ``reference``).
    """
    rows = []
    for model in dict.fromkeys(r["model"] for r in records):
        for N in sorted({r["N"] for r in records if r["model"] == model}):
            at = {m: find(records, model=model, N=N, method=m) for m in METHODS}
            ref = next((m for m in METHODS if ok(at[m])), None)
            row: dict = {"model": model, "N": N, "reference": ref}
            row["D"] = at[ref]["D"] if ref else None
            base = at["lowrank_ggn"]
            for m in ("previous", "curvlinops"):
                r = at[m]
                row[f"speedup_vs_{m}"] = (
                    r["time_s"] / base["time_s"] if ok(r) and ok(base) else None
                )
            f32, r = at["lowrank_ggn_f32"], at["curvlinops"]
            row["f32_speedup_vs_curvlinops"] = (
                r["time_s"] / f32["time_s"] if ok(r) and ok(f32) else None
            )
            row["agreement"] = {
                m: rel_dev(at[m]["top_eigenvalues"], at[ref]["top_eigenvalues"])
                for m in METHODS
                if m != ref and ok(at[m])
            }
            rows.append(row)
    return rows


def targets(comparisons: list[dict], quick: bool) -> list[dict]:
    """The issue's two targets on the transformer at N = 128 (``met=None``: not measured)."""
    row = next(
        (c for c in comparisons if c["model"] == "transformer" and c["N"] == TARGET_N),
        None,
    )
    out = []
    for m, bar in SPEEDUP_TARGETS.items():
        value = None if row is None or quick else row[f"speedup_vs_{m}"]
        out.append(
            {
                "target": f"transformer, N={TARGET_N}: t({m}) / t(lowrank_ggn) ≥ {bar:g}",
                "value": None if value is None else round(value, 2),
                "met": None if value is None else value >= bar,
            }
        )
    return out


def drive(args) -> dict:
    args.previous_dir = (
        export_previous(args.previous) if "previous" in args.methods else None
    )
    try:
        records = [run_case(case, args) for case in cases(args)]
    finally:
        if args.previous_dir:
            shutil.rmtree(args.previous_dir, ignore_errors=True)
    comparisons = analyse(records)
    return {
        "machine": machine("cpu"),
        "threads": args.threads,
        "quick": args.quick,
        "previous": args.previous,
        "measured": time.strftime("%Y-%m-%d %H:%M"),
        "agreement_rtol": AGREEMENT_RTOL,
        "records": records,
        "comparisons": comparisons,
        "targets": targets(comparisons, args.quick),
    }


# ----------------------------------------------------------------------------- output
def engine_cell(r: dict) -> str:
    """Path, strategy, pass counts and layer treatments in a few words."""
    if "products" in r:
        return f"eigsh, {r['products']} GGN-vector products (SDPA {r['sdpa_backend']})"
    rep = r.get("engine_report") or {}
    words = [r.get("path") or "?"]
    if rep.get("strategy"):
        words[0] += f" / {rep['strategy']}"
    passes = rep.get("passes") or {}
    if passes:
        words.append("passes " + ", ".join(f"{k}={v}" for k, v in passes.items()))
    counts: dict[str, int] = {}
    for kind in (rep.get("layers") or {}).values():
        counts[kind] = counts.get(kind, 0) + 1
    if counts:
        words.append(", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    if rep.get("fallback"):
        words.append(f"fallback: {rep['fallback']}")
    return "; ".join(words)


def fmt(x, spec: str = ".2f") -> str:
    return "" if x is None else format(x, spec)


COST_MODEL = (
    "**Cost model.** The per-sample path (this release on both models) runs one "
    "forward pass and C backward passes of the whole batch (the cotangents "
    "`S[c]`, all samples at once), so its autodiff work grows linearly in N and in C "
    "and is independent of how many Gram columns there are; it then assembles the "
    "`NC × NC` Gram matrix layer by layer, from Kronecker factors (layer inputs and "
    "output gradients, per position for the transformer's linear maps) or from "
    "explicit per-sample rows `[NC, D_l]` in chunks, whichever is cheaper: "
    "`O((NC)²·min(D_l, T·(d_in + d_out)))` for a layer of `D_l` parameters applied at "
    "`T` positions, plus `O((NC)³)` for the eigendecomposition; memory is the Gram "
    "matrix `(NC)²` plus one layer's chunk of rows, never `NC × D`. The previous "
    "release's full-batch path (taken whenever its per-sample check fails, as on the "
    "transformer) runs one backward pass of the whole batch per Gram column: `N·C` "
    "passes, each `O(N)`, so `O(N²·C)` autodiff work, quadratic in N, and it holds "
    "explicit rows `[NC, D_l]` for layers whose gradients mix samples, up to "
    "`N·C·D` floats. curvlinops + eigsh costs one forward-mode and one reverse-mode "
    "pass of the whole batch (`O(N)`) per GGN-vector product and as many products "
    "as the Lanczos iteration needs for the top 10 (set by the spectral gaps, not "
    "by N or C; counted in the table), with memory `O(D·ncv)`."
)


def markdown(result: dict, tag: str) -> str:
    recs, comps = result["records"], result["comparisons"]
    measured = [r for r in recs if ok(r)]
    mach = result["machine"]
    lines = [
        f"# Transformer and MobileNet: top-10 GGN eigenpairs, float32 ({tag})",
        "",
        f"Machine: cpu={mach['cpu']}, cores={mach['cores']}, torch={mach['torch']}, "
        f"torch threads={result['threads']}; measured {result['measured']}"
        + (
            " (**quick run**: tiny models, no timing targets)"
            if result["quick"]
            else ""
        ),
        "",
        "Each (method, model, N) in a fresh process, warm-up on N = 4 (not in quick "
        "runs), one timed call. Peak RSS is `VmHWM` of the timed call, its mark "
        "reset after the warm-up "
        + (
            "(every measured row)"
            if all(r.get("peak_rss_reset") for r in measured)
            else "(**not** for every row: those include the warm-up's)"
        )
        + ", baseline (Python, torch, model, data) included; 1 GiB = 2³⁰ bytes. "
        f"`previous` is lowrank_ggn at `{result['previous']}`; it and curvlinops see "
        "the transformer behind `Packed` (one `[N, 64]` int64 tensor), this release "
        "the tuple `(tokens, mask)`. curvlinops runs the transformer under "
        "`sdpa_kernel(SDPBackend.MATH)`.",
        "",
        "| model | N | D | method | path / engine | time [s] | peak RSS [GiB] "
        "| baseline RSS [GiB] | top-10 rel. dev. |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    devs = {(c["model"], c["N"]): c for c in comps}
    for r in recs:
        D = f"{r['D']:,}" if "D" in r else ""
        head = f"| {r['model']} | {r['N']} | {D} | {r['method']} |"
        if not ok(r):
            what = (
                f"failed: {r['error'][:100]}"
                if "error" in r
                else f"skipped: {r['skipped']}"
            ).replace("|", "\\|")
            lines.append(head + f" {what} | | | | |")
            continue
        c = devs[(r["model"], r["N"])]
        dev = (
            "reference"
            if c["reference"] == r["method"]
            else fmt(c["agreement"].get(r["method"]), ".1e")
        )
        lines.append(
            head + f" {engine_cell(r)} | {r['time_s']:.2f} | "
            f"{r['peak_rss_bytes'] / 2**30:.2f} | {r['baseline_rss_bytes'] / 2**30:.2f} "
            f"| {dev} |"
        )
    lines += [
        "",
        "Top-10 rel. dev.: `max_i |λ_i − λ_i^ref| / λ_max^ref` against the reference "
        f"(lowrank_ggn unless it failed); bar {AGREEMENT_RTOL:g} in float32.",
        "",
        "| model | N | t(previous) / t(lowrank_ggn) | t(curvlinops) / t(lowrank_ggn) "
        "| t(curvlinops) / t(lowrank_ggn_f32) "
        f"| top-10 within {AGREEMENT_RTOL:g}·λ_max |",
        "|---|---|---|---|---|---|",
    ]
    for c in comps:
        agree = c["agreement"]
        within = (
            ""
            if not agree
            else "yes"
            if all(v <= AGREEMENT_RTOL for v in agree.values())
            else "**no**"
        )
        lines.append(
            f"| {c['model']} | {c['N']} | {fmt(c['speedup_vs_previous'])} | "
            f"{fmt(c['speedup_vs_curvlinops'])} | "
            f"{fmt(c.get('f32_speedup_vs_curvlinops'))} | {within} |"
        )
    notes = sorted(
        {r["without_math_backend"] for r in recs if r.get("without_math_backend")}
    )
    if notes:
        lines += [
            "",
            "curvlinops on the transformer without the math attention backend "
            "(N = 2): " + "; ".join(notes) + ".",
        ]
    lines += [
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for t in result["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {fmt(t['value'])} | {met} |")
    lines += ["", COST_MODEL]
    return "\n".join(lines) + "\n"


def write(result: dict, tag: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"models_{tag}.json").write_text(json.dumps(result, indent=1))
    (out / f"models_{tag}.md").write_text(markdown(result, tag))


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--worker", metavar="CASE_JSON", help=argparse.SUPPRESS)
    p.add_argument("--N", type=int, nargs="+", default=[32, 128], help="batch sizes")
    p.add_argument("--only", nargs="+", choices=MODELS, help="these models only")
    p.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods"
    )
    p.add_argument(
        "--previous",
        default=PREVIOUS,
        metavar="REV",
        help=f"git revision of the previous release (default {PREVIOUS})",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per worker")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny models, N = 4, no warm-up, no timing targets (smoke test); without "
        "--out it writes into a fresh temporary folder",
    )
    p.add_argument(
        "--out", type=Path, default=None, help=f"results folder (default: {RESULTS})"
    )
    args = p.parse_args()
    if args.worker:
        case = Case(**json.loads(args.worker))
        print(json.dumps(worker(case, args.threads)))
        return
    if args.out is None:
        args.out = (
            Path(tempfile.mkdtemp(prefix="bench_models_")) if args.quick else RESULTS
        )
    tag = "quick" if args.quick else "cpu"
    result = drive(args)
    write(result, tag, args.out)
    print((args.out / f"models_{tag}.md").read_text())
    print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
