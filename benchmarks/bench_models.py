r"""Top-10 GGN eigenpairs of a token transformer and a MobileNet: lowrank_ggn vs its
previous release vs curvlinops + eigsh.

Models (:mod:`harness.models_zoo`, float32, random weights from a fixed seed,
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
  path, the engine report's strategy, pass counts and per-layer treatments (a top-k
  call of a float32 model sums the Gram in float32 where the error model resolves
  the top 10 there, as here, else in float64: ``res.accumulate`` is recorded);
* ``lowrank_ggn_f64``: the same with ``accumulate="float64"`` (the Gram always summed
  in float64, what every call did before);
* ``previous``: the same call on the previous release (git revision ``--previous``,
  default ``6642272``, exported with ``git archive`` and put first on ``sys.path``).
  That release takes a single input tensor, so the transformer runs behind
  :class:`harness.models_zoo.Packed` (``x = cat([tokens, mask.long()], 1)``, ``[N, 64]``
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
back to the OS, resets the kernel's peak-RSS mark (``harness.memory.measure``)
and times one call (``time.perf_counter``); peak RSS is ``VmHWM`` after it,
including the baseline resident at its start (also recorded). A worker that fails or
times out is an error row; the driver never stops.

Analysis: every method's top-10 against lowrank_ggn's (``max_i |λ_i − λ_i^ref| /
λ_max^ref``; bar ``1e-4``, float32), speed-ups ``t(previous) / t(lowrank_ggn)`` and
``t(curvlinops) / t(lowrank_ggn)`` at each N, and the targets on the transformer at
N = 128: at least 5× faster than the previous release, at least 3× faster than
curvlinops. MobileNet gets the same ratios, without a target.

Results: ``results/models_<device>.json`` and ``.md`` (the analysis and the markdown
in :mod:`models_report`).

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
import sys
import tempfile
import time
import warnings
from pathlib import Path

from harness.cli import add_run_options, parser
from harness.machine import machine
from harness.memory import measure
from harness.models_zoo import build
from harness.peers import available, curvlinops_eigsh, ggn_operator
from harness.results import ok, plain_data
from harness.results import write_results as write_files
from harness.workers import announce, outcome, previous_release, run_worker
from models_report import AGREEMENT_RTOL, METHODS, analyse, engine_cell, markdown
from models_report import targets as speedup_targets

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODELS = ("transformer", "mobilenet")
PREVIOUS = "6642272"  # the previous release
TOP_K = 10
WARMUP_N = 4


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
        "accumulate": getattr(res, "accumulate", None),  # where the Gram was summed
    }
    return [float(v) for v in res.eigenvalues[:TOP_K]], info


def run_method(case: Case, N: int, seed: int) -> tuple[list[float], dict, int]:
    """Build the case's model at ``N`` and run its method: eigenvalues, info, ``D``."""
    # only this release takes tuple inputs
    packed = not case.method.startswith("lowrank_ggn")
    model, loss, X, y = build(case.model, N, seed, case.quick, packed=packed)
    D = sum(p.numel() for p in model.parameters())
    if case.method == "curvlinops":
        with math_attention(case.model):
            evals, info = curvlinops_eigsh(model, loss, X, y)
        return evals, info, D
    # lowrank_ggn_f64: the Gram summed in float64 (accumulate="float64")
    sums = {"accumulate": "float64"} if case.method == "lowrank_ggn_f64" else {}
    evals, info = lowrank(model, loss, X, y, **sums)
    return evals, info, D


def without_math_backend(case: Case) -> str:
    """Whether curvlinops runs on the transformer at N = 2 with the default backends."""
    model, loss, X, y = build(case.model, 2, 1, case.quick, packed=True)
    try:
        _one_product(model, loss, X, y)
    except Exception as e:  # noqa: BLE001 - the failure is the finding
        return f"fails: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return "works"


def _one_product(model, loss, X, y) -> None:
    """One curvlinops GGN-vector product (enough to hit forward-mode AD)."""
    import torch

    op = ggn_operator(model, loss, X, y)
    op @ torch.ones(op.shape[1])


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
        (evals, info, D), cost = measure(lambda: run_method(case, case.N, seed=0))
    rec.update(
        D=D,
        **cost,
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
    announce(f"{case.model:12s} N={case.N:4d} {case.method:12s}")
    if not available(case.method):
        return outcome({**fields, "skipped": "not installed"})
    cmd = [sys.executable, __file__, "--worker", json.dumps(dataclasses.asdict(case))]
    rec = run_worker(cmd + ["--threads", str(args.threads)], args.timeout)
    rec = outcome(rec if "error" not in rec else {**fields, **rec})
    if ok(rec):
        print(f"    {engine_cell(rec)}", file=sys.stderr)
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


def drive(args) -> dict:
    rev = args.previous if "previous" in args.methods else None
    with previous_release(rev) as args.previous_dir:
        records = [run_case(case, args) for case in cases(args)]
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
        "targets": speedup_targets(comparisons, args.quick),
    }


# ----------------------------------------------------------------------------- output
def write(result: dict, tag: str, out: Path) -> Path:
    """``models_<tag>.json`` and ``.md``; the latter's path."""
    return write_files(out, f"models_{tag}", result, markdown(result, tag))


def main() -> None:
    p = parser(__doc__)
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
    quick = (
        "tiny models, N = 4, no warm-up, no timing targets (smoke test); without "
        "--out it writes into a fresh temporary folder"
    )
    add_run_options(p, quick=quick, out=None, results=RESULTS, threads=2)
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
    print(write(result, tag, args.out).read_text())
    print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
