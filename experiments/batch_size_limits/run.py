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
(``/proc/self/clear_refs``), then the peak of the call is read (``VmHWM``) minus
the resident set before it (:func:`_common.peak_rss_of`). The bar is the largest
fitting ``N`` on a grid of ``step`` (4 exact, 32 MC), found coarse to fine: from a
hint (the same method's limit on the other model, else the previous method's), the
search extrapolates from the measured peaks until one ``N`` fits and one does not, then
bisects; every subprocess result is kept. Recorded per bar: the run at the limit (peak,
the package's own estimate ``sum(engine_report.memory_estimate)``, the strategy it
took, seconds) and the run one step above (refused, or over budget with its peak).

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
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # experiments/_common.py

from _common import (  # noqa: E402
    digits_inputs,
    installed,
    peak_rss_of,
    run_main,
    timed,
)

SEED = 0
MiB = 2**20
FULL = {
    "budget_bytes": 64 * MiB,
    "dtype": "float32",
    "step": {"exact": 4, "mc": 32},
    "hint": {"exact": 96, "mc": 768},
    "all_strategies": True,
    "subprocess": True,
}
#: quick: a smaller budget, one strategy per model, measured in this process (no
#: clean memory peak)
QUICK = {
    **FULL,
    "budget_bytes": 8 * MiB,
    "hint": {"exact": 16, "mc": 128},
    "all_strategies": False,
    "subprocess": False,
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


def _measured_lowrank(model, loss, N: int, kwargs: dict, budget: int) -> dict:
    """One measured ``ggn_spectrum`` call on ``N`` digits (after the warm-up)."""
    from lowrank_ggn import MemoryBudgetExceeded, MemoryBudgetWarning, ggn_spectrum

    X, y = digits_inputs(N, SEED, torch.float32)
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


def worker(case: dict) -> dict:
    """One measured call in this (fresh) process; or the package's admission limit."""
    from lowrank_ggn import MemoryBudgetExceeded, ggn_spectrum
    from lowrank_ggn.app.models import build_model

    model = build_model(case["model"], SEED, torch.float32)
    loss = nn.CrossEntropyLoss()
    mc = case["variant"] == "mc"
    warm = digits_inputs(4, SEED + 1, torch.float32)
    if case["method"] == "vivit":
        from _peers_vivit import vivit_spectrum

        warnings.filterwarnings("ignore", "Full backward hook is firing")
        vivit_spectrum(copy.deepcopy(model), loss, *warm, mc)  # warm-up
        X, y = digits_inputs(case["N"], SEED, torch.float32)
        (n, sec), peak = peak_rss_of(
            lambda: timed(vivit_spectrum, model, loss, X, y, mc)
        )
        return {
            "N": case["N"],
            "outcome": _outcome(peak, case["budget"]),
            "peak_bytes": peak,
            "seconds": sec,
            "num_eigenvalues": n,
        }
    kwargs = _lowrank_kwargs(case)
    # warm up (lazy imports, allocator pools) so that the peak is the call's own
    ggn_spectrum(model, loss, *warm, **{**kwargs, "memory_budget": None})
    if not case.get("admission"):
        return _measured_lowrank(model, loss, case["N"], kwargs, case["budget"])
    # the package's own limit: its refusal of a too large batch names the largest
    # batch that fits its estimate (refused after a 4-sample probe, before the
    # batch's forward pass); one sample more is refused, the limit itself runs
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
    at = _measured_lowrank(model, loss, limit, kwargs, case["budget"])
    above = _measured_lowrank(model, loss, limit + 1, kwargs, case["budget"])
    return {
        "package_largest_N": limit,
        "run_at_limit": at,
        "run_above_limit": above,
        "confirmed": at["outcome"] != "refused" and above["outcome"] == "refused",
    }


def in_subprocess(case: dict, isolate: bool = True) -> dict:
    """:func:`worker` in a fresh interpreter (``isolate``), else in this process."""
    if not isolate:
        return worker(case)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(case)],
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


# ------------------------------------------------------------------------- search
def largest_within(
    measure: Callable[[int], dict], step: int, hint: int, budget: int
) -> tuple[int, dict[int, dict]]:
    """Largest multiple ``N`` of ``step`` whose ``measure(N)`` fits; and all results.

    Coarse to fine: from ``hint``, extrapolate from the measured peaks (up from a
    fitting ``N`` as if the peak grew like ``N²``, at most doubling; down from one over
    budget as if it grew like ``N``, else halving) until one ``N`` fits and one does
    not, then bisect to ``step``. Assumes the outcome is monotone in ``N``; ``0`` when
    not even ``step`` fits.
    """
    seen: dict[int, dict] = {}

    def fits(n: int) -> bool:
        if n not in seen:
            seen[n] = measure(n)
        return seen[n]["outcome"] == "fits"

    def peak(n: int) -> float | None:
        return seen[n].get("peak_bytes") or None

    lo, hi = 0, None
    n = max(step, step * round(hint / step))
    while True:
        if fits(n):
            lo = n
        else:
            hi = n
        if hi is not None and hi - lo <= step:
            return lo, seen
        if hi is None:  # everything fits so far: up from lo
            p = peak(lo)
            guess = lo * math.sqrt(budget / p) if p else 2 * lo
            n = step * math.ceil(min(max(guess, lo + step), 2 * lo) / step)
        elif lo == 0:  # nothing fits yet: down from hi
            p = peak(hi)
            guess = hi * budget / p if p and p > budget else hi / 2
            n = max(step, step * math.floor(min(guess, hi - step) / step))
        else:  # bisect the bracket
            n = step * ((lo + hi) // (2 * step))
        if n in seen:  # cannot happen for a monotone outcome; stop safely
            return lo, seen


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


def compute(s: dict) -> dict:
    budget, rows, admissions = s["budget_bytes"], [], []
    have_vivit = installed("vivit", "backpack")
    limits: dict[tuple[str, str], int] = {}  # (variant, method) -> last limit
    for label, name, strategies in MODELS:
        methods = strategies if s["all_strategies"] else strategies[1:2]
        methods = methods + (["vivit"] if have_vivit else [])
        for variant in ("exact", "mc"):
            step, previous = s["step"][variant], s["hint"][variant]
            for method in methods:
                case = {
                    "model": name,
                    "variant": variant,
                    "method": method,
                    "budget": budget,
                }
                hint = limits.get((variant, method)) or previous

                def measure(n: int, case=case) -> dict:
                    r = in_subprocess({**case, "N": n}, s["subprocess"])
                    print(
                        f"  {case['model']} {case['variant']} {case['method']} "
                        f"N={n}: {r['outcome']} "
                        f"{(r.get('peak_bytes') or 0) / MiB:.1f} MiB",
                        flush=True,
                    )
                    return r

                N, seen = largest_within(measure, step, hint, budget)
                previous = limits[(variant, method)] = N or previous
                at, above = seen.get(N), seen.get(N + step)
                rows.append(
                    {
                        "model": label,
                        "variant": variant,
                        "method": method,
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
                        "probes": {
                            str(k): _summary(v) for k, v in sorted(seen.items())
                        },
                    }
                )
                print(label, variant, method, N, flush=True)
            # the package's own limit (strategy=None): refused far above it
            big = 4 * math.isqrt(budget // 8) // COLUMNS[variant] + 8
            adm = in_subprocess(
                {
                    "model": name,
                    "variant": variant,
                    "method": "auto",
                    "budget": budget,
                    "N": big,
                    "admission": True,
                },
                s["subprocess"],
            )
            adm = {
                "model": label,
                "variant": variant,
                "package_largest_N": adm.get("package_largest_N"),
                "run_at_limit": _summary(adm.get("run_at_limit")),
                "run_above_limit": _summary(adm.get("run_above_limit")),
                "confirmed": adm.get("confirmed", False),
                **({"error": adm["error"]} if "error" in adm else {}),
            }
            admissions.append(adm)
            print(label, variant, "package admits", adm["package_largest_N"])
    return {
        "vivit": "measured"
        if have_vivit
        else "skipped: vivit-for-pytorch not installed",
        "rows": rows,
        "package_limits": admissions,
    }


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        torch.set_num_threads(1)
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        run_main(__doc__, HERE, compute, FULL, QUICK, SEED)
