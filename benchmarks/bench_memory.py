r"""Does ``memory_budget`` bound the process? Peak resident memory against the budget.

For an MLP, a CNN (DeepOBS 3c3d), the same CNN with BatchNorm in train mode and a
transformer encoder (``harness.models_zoo``), at ``N ∈ {32, 128}`` and budgets of
64 MiB, 256 MiB and 1 GiB, each ``(model, N)`` in a fresh subprocess:

1. warm up: the same call on a batch of 4 (imports, library work space, thread pools);
2. per budget: collect garbage, hand free heap back to the OS, reset the kernel's
   peak mark (``/proc/self/clear_refs``), read the resident set size (the baseline),
   call ``ggn_spectrum(model, loss, X, y, top_k=10, memory_budget=B)`` and read the
   peak (``VmHWM``). Recorded: peak − baseline, the strategy, seconds, the engine's
   own estimate and measured peak (``EngineReport.memory_estimate/memory_peak``),
   or the refusal, and the largest batch any forward pass saw before it (a refusal
   must come before the batch's forward pass: only the 4-sample probe ran).

The bound holds when ``peak − baseline ≤ B + SLACK`` or the call was refused before
its forward pass. ``SLACK`` (module constant) covers what no estimate sees: the
allocator's free heap not yet handed back and library work space.

    python benchmarks/bench_memory.py [--quick] [--out DIR]

Results: ``results/memory_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from harness import models, models_zoo
from harness.machine import machine, machine_words
from harness.memory import peak_rss_bytes, reset_peak_rss, resident_bytes
from harness.results import write_results
from harness.workers import run_worker

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 2**20
#: Allowed excess of the measured peak over the budget: 64 MiB plus 10 %.
SLACK_FIXED, SLACK_SHARE = 64 * MiB, 0.10
MODELS = ("mlp", "cnn", "cnn-bn", "transformer")
FULL = {"N": (32, 128), "budgets": (64 * MiB, 256 * MiB, 1024 * MiB)}
QUICK = {"N": (32,), "budgets": (64 * MiB, 256 * MiB)}


def slack(budget: float) -> float:
    """Bytes a measured peak may exceed ``budget`` by."""
    return SLACK_FIXED + SLACK_SHARE * budget


def build(name: str, N: int):
    """Model (float32), loss, inputs and targets of ``name`` for ``N`` samples."""
    if name == "transformer":
        return models_zoo.build("transformer", N)
    names = {"cnn": "3c3d", "cnn-bn": "3c3d-bn", "mlp": "mlp"}
    return models.build(names[name], N)


def worker(name: str, N: int, budgets: list[int]) -> list[dict]:
    """Measure one model at one batch size for every budget (in this process)."""
    import torch

    from lowrank_ggn import MemoryBudgetExceeded, ggn_spectrum

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    model, loss, X, y = build(name, 4)
    ggn_spectrum(model, loss, X, y, top_k=4)  # warm-up
    model, loss, X, y = build(name, N)
    seen = [0]

    def largest(mod, args, kwargs):
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, torch.Tensor) and a.dim():
                seen[0] = max(seen[0], a.shape[0])

    model.register_forward_pre_hook(largest, with_kwargs=True)
    rows = []
    for budget in budgets:
        reset_peak_rss()
        seen[0] = 0
        base = resident_bytes()
        start = time.perf_counter()
        row = {"model": name, "N": N, "budget": budget}
        try:
            s = ggn_spectrum(model, loss, X, y, top_k=10, memory_budget=budget)
            rep = s.engine_report
            row.update(
                strategy=rep.strategy.value,
                estimate=sum(rep.memory_estimate.values()),
                reported_peak=rep.memory_peak,
                lambda_max=float(s.eigenvalues[0]),
            )
        except MemoryBudgetExceeded as err:  # a refusal, never a real out-of-memory
            row.update(refused=str(err).split(". ")[0], largest_batch_seen=seen[0])
        row["seconds"] = time.perf_counter() - start
        row["peak"] = peak_rss_bytes() - base
        row["within"] = bool(
            row["peak"] <= budget + slack(budget)
            or ("refused" in row and row["largest_batch_seen"] < N)
        )
        rows.append(row)
    return rows


def drive(quick: bool, models: tuple[str, ...]) -> dict:
    """Every ``(model, N)`` in its own subprocess."""
    spec = QUICK if quick else FULL
    rows: list[dict] = []
    for name in models:
        for N in spec["N"]:
            cmd = [sys.executable, __file__, "--worker", name, str(N)]
            cmd += [str(b) for b in spec["budgets"]]
            out = run_worker(cmd, 1800)  # the worker's rows, or {"error": …}
            rows += out if isinstance(out, list) else [{"model": name, "N": N, **out}]
    info = {**machine(), "threads": 1}
    return {"machine": info, "slack": [SLACK_FIXED, SLACK_SHARE], "rows": rows}


def markdown(result: dict) -> str:
    """The table of every row: outcome, peak above the baseline, bound kept."""
    where = machine_words(result["machine"])
    lines = [
        "# Peak resident memory against memory_budget",
        "",
        f"{where}, 1 thread, float32, "
        "`ggn_spectrum(top_k=10)`. Peak − baseline is `VmHWM` after the call minus "
        "`VmRSS` before it (peak mark reset). Bound: peak − baseline ≤ budget + "
        f"{SLACK_FIXED // MiB} MiB + {SLACK_SHARE:.0%}, or refused before the batch's "
        "forward pass.",
        "",
        "| model | N | budget | outcome | peak − baseline | estimate | time | bound |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['N']} | | error | | | | no |")
            continue
        outcome = (
            r.get("strategy") or f"refused (forward saw ≤ {r['largest_batch_seen']})"
        )
        est = f"{r['estimate'] / MiB:.0f} MiB" if "estimate" in r else ""
        lines.append(
            f"| {r['model']} | {r['N']} | {r['budget'] // MiB} MiB | {outcome} | "
            f"{r['peak'] / MiB:.0f} MiB | {est} | {r['seconds']:.1f} s | "
            f"{'yes' if r['within'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--worker", nargs="+")
    args = parser.parse_args(argv)
    if args.worker:
        name, N, *budgets = args.worker
        print(json.dumps(worker(name, int(N), [int(b) for b in budgets])))
        return 0
    result = drive(args.quick, tuple(args.models))
    print(write_results(args.out, "memory_cpu", result, markdown(result)).read_text())
    return 0 if all(r.get("within") for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
