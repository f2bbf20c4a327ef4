"""The largest batch whose exact (and Monte-Carlo) GGN spectrum fits a memory budget.

ViViT's Figure 2a (Dangel, Tatzel & Hennig, TMLR 2022, https://arxiv.org/abs/2106.02624)
on the zoo's digits ``cnn`` and ``cnn-bn`` (BatchNorm in train mode), float32,
cross-entropy, ``C = 10``, a fixed budget ``B`` (64 MiB). For the exact spectrum
(``N·C`` Gram columns) and the Monte-Carlo one (``mc_samples=1``: ``N`` columns), all
eigenvalues and one eigenvector, each method gets the same test and the same search:

* **lowrank_ggn**, for each strategy (``auto``: ``strategy=None`` lets the cost model
  choose; and every forced strategy that applies):
  ``ggn_spectrum(..., eigenvectors=1, memory_budget=B)``;
* **vivit** (``vivit-for-pytorch``, where installed; it has no budget):
  ``EighComputation``, all eigenvalues, one eigenvector.

A batch size ``N`` *fits* when the real call, in a fresh subprocess, succeeds (the
package does not refuse it with ``MemoryBudgetExceeded``) **and** its measured peak
resident memory above its start is at most ``B``: after a warm-up call on 4 other
samples, freed heap is handed back and the kernel's peak mark reset
(``/proc/self/clear_refs``), then the peak of the call is read (``VmHWM``) minus the
resident set before it (:func:`_common.peak_rss_of`). The driver draws each probe's
batches and hands them to the worker in a file, so that workers never import
scikit-learn. One process per probe, not one per search: a process that has run a larger
call reuses memory it still holds (``streamed`` on ``cnn-bn``, MC, ``N = 288``: 30 MiB
after three calls against 65 MiB fresh), even after ``malloc_trim``. Fresh peaks of one
call still vary between processes (``bn_split`` on ``cnn-bn``, exact, ``N = 80``: 49 to
67 MiB over 8 runs), so a limit near ``B`` may move by a step between runs. The bar is
the largest fitting ``N`` on a grid of ``step`` (4 exact, 32 MC), found coarse to fine:
from a hint (the bar's limit in the previous ``results.json`` with the same budget and
grid, then its neighbour, so that two probes confirm an unchanged limit; else 96 exact,
768 MC), the search extrapolates from the measured peaks until one ``N`` fits and one
does not, then bisects; every subprocess result is kept; two searches run at a time
(``jobs``). Recorded per bar: the run at the limit (peak, the package's own estimate
``sum(engine_report.memory_estimate)``, the strategy it took, seconds) and the run one
step above (refused, or over budget with its peak).

Per model and variant, the package's own admission limit is recorded too: the
largest batch its refusal names (``The budget fits a batch of at most … samples``),
checked by a refused call one sample above it, and the measured peak of a call at it.
Batches beyond the 1,797 digits are drawn with replacement (memory does not depend on
the values).

    python experiments/batch_size_limits/run.py [--quick] [--out PATH]
"""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # experiments/_common.py
sys.path.insert(0, str(HERE))  # search.py

from _common import (  # noqa: E402
    digits_inputs,
    installed,
    peak_rss_of,
    run_main,
    timed,
)
from search import largest_within, previous_limits  # noqa: E402

SEED = 0
MiB = 2**20
FULL = {
    "budget_bytes": 64 * MiB,
    "dtype": "float32",
    "step": {"exact": 4, "mc": 32},
    "hint": {"exact": 96, "mc": 768},
    "all_strategies": True,
    "subprocess": True,
    "hints_from": "results.json",
    "jobs": 2,  # searches at a time: `make figures` runs on 2 cores
}
#: quick: a smaller budget, one strategy per model, measured in this process (no
#: clean memory peak)
QUICK = {
    **FULL,
    "budget_bytes": 8 * MiB,
    "hint": {"exact": 16, "mc": 128},
    "all_strategies": False,
    "subprocess": False,
    "hints_from": None,
    "jobs": 1,
}
#: (label, zoo model, strategies that apply)
MODELS = [
    ("cnn", "cnn", ["auto", "per_sample", "columns", "streamed"]),
    ("cnn-bn (train mode)", "cnn-bn", ["auto", "bn_split", "columns", "streamed"]),
]
C = 10
COLUMNS = {"exact": C, "mc": 1}
#: the package's refusal names the largest batch that fits its estimate
_FITS = re.compile(r"fits a batch of at most (\d+) samples")


# ------------------------------------------------------------------------- workers
def _lowrank_kwargs(case: dict) -> dict:
    kwargs = {"memory_budget": case["budget"], "progress": False, "eigenvectors": 1}
    if case["method"] != "auto":
        kwargs["strategy"] = case["method"]
    if case["variant"] == "mc":
        kwargs["mc_samples"] = 1
        kwargs["generator"] = torch.Generator().manual_seed(SEED)
    return kwargs


def _measured_lowrank(model, loss, X: Tensor, y: Tensor, kwargs: dict, budget: int):
    """One measured ``ggn_spectrum`` call on the batch ``X, y`` (after the warm-up)."""
    from lowrank_ggn import MemoryBudgetExceeded, MemoryBudgetWarning, ggn_spectrum

    N = len(y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MemoryBudgetWarning)
        try:
            (res, sec), peak = peak_rss_of(
                lambda: timed(ggn_spectrum, model, loss, X, y, **kwargs)
            )
        except MemoryBudgetExceeded as err:
            return {"N": N, "outcome": "refused", "error": str(err)}
    rep = res.engine_report
    return {
        "N": N,
        "outcome": _outcome(peak, budget),
        "peak_bytes": peak,
        "estimate_bytes": sum(rep.memory_estimate.values()),
        "memory_estimate": dict(rep.memory_estimate),
        "reported_peak_bytes": rep.memory_peak,
        "strategy_run": str(rep.strategy.value),
        "fallback": rep.fallback,
        "seconds": sec,
        "num_eigenvalues": res.rank,
        "warnings": [
            str(w.message)[:300]
            for w in caught
            if issubclass(w.category, MemoryBudgetWarning)
        ],
    }


def _outcome(peak: int | None, budget: int) -> str:
    if peak is None:
        return "not measured"  # the peak mark cannot be reset (not Linux)
    return "fits" if peak <= budget else "over budget"


def _batches(case: dict) -> dict[str, tuple[Tensor, Tensor]]:
    """``{"warm": 4 other digits, "batch": N digits}``: drawn here, or loaded from the
    file that the driver wrote (``case["data"]``), so that a worker never imports
    scikit-learn (a second per launch, as much as its warm-up)."""
    if "data" in case:
        return torch.load(case["data"])
    return {
        "warm": digits_inputs(4, SEED + 1, torch.float32),
        "batch": digits_inputs(case["N"], SEED, torch.float32),
    }


def _warmed_lowrank(case: dict, warm: tuple[Tensor, Tensor]):
    """``case``'s model, loss and ``ggn_spectrum`` keywords, after a warm-up call on
    ``warm`` (lazy imports, allocator pools) so that a peak is the call's own."""
    from lowrank_ggn import ggn_spectrum
    from lowrank_ggn.app.models import build_model

    model = build_model(case["model"], SEED, torch.float32)
    loss = nn.CrossEntropyLoss()
    kwargs = _lowrank_kwargs(case)
    ggn_spectrum(model, loss, *warm, **{**kwargs, "memory_budget": None})
    return model, loss, kwargs


def worker(case: dict) -> dict:
    """One measured call in this (fresh) process; or the package's admission limit."""
    if case.get("admission"):
        return _admission(case)
    data = _batches(case)
    if case["method"] != "vivit":
        model, loss, kwargs = _warmed_lowrank(case, data["warm"])
        return _measured_lowrank(model, loss, *data["batch"], kwargs, case["budget"])
    from _peers_vivit import vivit_spectrum

    from lowrank_ggn.app.models import build_model

    model = build_model(case["model"], SEED, torch.float32)
    loss = nn.CrossEntropyLoss()
    mc = case["variant"] == "mc"
    warnings.filterwarnings("ignore", "Full backward hook is firing")
    vivit_spectrum(copy.deepcopy(model), loss, *data["warm"], mc)  # warm-up
    X, y = data["batch"]
    (n, sec), peak = peak_rss_of(lambda: timed(vivit_spectrum, model, loss, X, y, mc))
    return {
        "N": case["N"],
        "outcome": _outcome(peak, case["budget"]),
        "peak_bytes": peak,
        "seconds": sec,
        "num_eigenvalues": n,
    }


def _admission(case: dict) -> dict:
    """The package's own limit: its refusal of a too large batch names the largest
    batch that fits its estimate (refused after a 4-sample probe, before the batch's
    forward pass); one sample more is refused, the limit itself runs."""
    from lowrank_ggn import MemoryBudgetExceeded, ggn_spectrum

    model, loss, kwargs = _warmed_lowrank(
        case, digits_inputs(4, SEED + 1, torch.float32)
    )
    try:
        ggn_spectrum(
            model, loss, *digits_inputs(case["N"], SEED, torch.float32), **kwargs
        )
    except MemoryBudgetExceeded as err:
        refusal = str(err)
    else:
        return {"package_largest_N": None, "error": f"N={case['N']} was admitted"}
    match = _FITS.search(refusal)
    if match is None:
        return {"package_largest_N": None, "error": refusal[:400]}
    limit = int(match.group(1))
    at, above = (
        _measured_lowrank(
            model, loss, *digits_inputs(n, SEED, torch.float32), kwargs, case["budget"]
        )
        for n in (limit, limit + 1)
    )
    return {
        "package_largest_N": limit,
        "run_at_limit": at,
        "run_above_limit": above,
        "confirmed": at["outcome"] != "refused" and above["outcome"] == "refused",
    }


def in_subprocess(case: dict, isolate: bool = True) -> dict:
    """:func:`worker` in a fresh interpreter (``isolate``), else in this process.

    A probe's batches go to the worker in a file (:func:`_batches`).
    """
    if not isolate:
        return worker(case)
    with tempfile.TemporaryDirectory() as tmp:
        if not case.get("admission"):
            case = {**case, "data": str(Path(tmp) / "batches.pt")}
            torch.save(
                _batches({k: v for k, v in case.items() if k != "data"}), case["data"]
            )
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker"]
            + [json.dumps(case)],
            capture_output=True,
            text=True,
            check=False,
            timeout=900,
        )
    if proc.returncode != 0:
        return {
            "N": case.get("N"),
            "outcome": "error",
            "error": f"worker failed: {proc.stderr[-400:]}",
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------- driver
def _summary(r: dict | None) -> dict | None:
    """The fields of a measurement that the figure and the README need."""
    if r is None:
        return None
    keys = (
        "N",
        "outcome",
        "peak_bytes",
        "estimate_bytes",
        "strategy_run",
        "seconds",
        "num_eigenvalues",
        "warnings",
    )
    out = {k: r[k] for k in keys if k in r}
    if "error" in r:
        out["error"] = r["error"][:400]
    return out


def _bar(s: dict, label: str, case: dict, hint: int, tight: bool) -> dict:
    """One bar: :func:`largest_within` for ``case``, one worker per probe."""
    step = s["step"][case["variant"]]

    def measure(n: int) -> dict:
        r = in_subprocess({**case, "N": n}, s["subprocess"])
        print(
            f"  {case['model']} {case['variant']} {case['method']} N={n}: "
            f"{r['outcome']} {(r.get('peak_bytes') or 0) / MiB:.1f} MiB",
            flush=True,
        )
        return r

    N, seen = largest_within(measure, step, hint, s["budget_bytes"], tight)
    at, above = seen.get(N), seen.get(N + step)
    print(label, case["variant"], case["method"], N, flush=True)
    return {
        "model": label,
        "variant": case["variant"],
        "method": case["method"],
        "limit_N": N,
        "resolution": step,
        "run_at_limit": _summary(at),
        "run_above_limit": _summary(above),
        "confirmed": bool(
            N
            and at["outcome"] == "fits"
            and above is not None
            and above["outcome"] != "fits"
        ),
        "hint": hint,
        "probes": {str(k): _summary(v) for k, v in sorted(seen.items())},
    }


def _package_limit(s: dict, label: str, name: str, variant: str) -> dict:
    """The package's own limit (``strategy=None``): refused far above it."""
    budget = s["budget_bytes"]
    big = 4 * math.isqrt(budget // 8) // COLUMNS[variant] + 8
    case = {"model": name, "variant": variant, "method": "auto", "budget": budget}
    adm = in_subprocess({**case, "N": big, "admission": True}, s["subprocess"])
    print(label, variant, "package admits", adm.get("package_largest_N"), flush=True)
    return {
        "model": label,
        "variant": variant,
        "package_largest_N": adm.get("package_largest_N"),
        "run_at_limit": _summary(adm.get("run_at_limit")),
        "run_above_limit": _summary(adm.get("run_above_limit")),
        "confirmed": adm.get("confirmed", False),
        **({"error": adm["error"]} if "error" in adm else {}),
    }


def compute(s: dict) -> dict:
    have_vivit = installed("vivit", "backpack")
    known = previous_limits(s, HERE)
    bars, package = [], []
    for label, name, strategies in MODELS:
        methods = strategies if s["all_strategies"] else strategies[1:2]
        methods = methods + (["vivit"] if have_vivit else [])
        for variant in ("exact", "mc"):
            for method in methods:
                key = (label, variant, method)
                case = {
                    "model": name,
                    "variant": variant,
                    "method": method,
                    "budget": s["budget_bytes"],
                }
                hint = known.get(key) or s["hint"][variant]
                bars.append((label, case, hint, key in known))
            package.append((label, name, variant))
    # the searches are independent: s["jobs"] at a time, each probe its own
    # single-threaded process
    with ThreadPoolExecutor(s["jobs"]) as pool:
        rows = [pool.submit(_bar, s, *bar) for bar in bars]
        admissions = [pool.submit(_package_limit, s, *p) for p in package]
        rows = [f.result() for f in rows]
        admissions = [f.result() for f in admissions]
    return {
        "vivit": "measured"
        if have_vivit
        else "skipped: vivit-for-pytorch not installed",
        "rows": rows,
        "package_limits": admissions,
        "worker_launches": (
            sum(len(r["probes"]) for r in rows) + len(admissions)
            if s["subprocess"]
            else 0
        ),
    }


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        torch.set_num_threads(1)
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        run_main(__doc__, HERE, compute, FULL, QUICK, SEED)
