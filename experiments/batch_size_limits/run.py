"""The largest batch whose exact (and Monte-Carlo) GGN spectrum fits a memory budget.

ViViT's Figure 2a (Dangel, Tatzel & Hennig, TMLR 2022, https://arxiv.org/abs/2106.02624)
on the zoo's digits ``cnn`` and ``cnn-bn`` (BatchNorm in train mode), float32,
cross-entropy, ``C = 10``, a fixed budget ``B``. For each of lowrank_ggn's strategies
(``strategy=None`` lets the cost model choose) and for the exact spectrum
(``N·C`` Gram columns) and the Monte-Carlo one (``mc_samples=1``: ``N`` columns):

1. **Probe**: the largest ``N`` that the package's memory estimate admits, found by
   bisection on :func:`package_estimate`, which restates the checks that
   ``ggn_spectrum(memory_budget=B)`` makes before its backward passes (documented in
   ``lowrank_ggn.core.budget.check_linearization_memory`` and the cost model of
   ``lowrank_ggn.core.engine.plan``): the Gram matrix ``(N·C)²`` and the loss-Hessian
   factors ``S`` within ``B``, and a forced strategy's factor blocks within ``B``
   (per-sample layer-output gradients ``N·C·Σ_l P_l·O_l``, plus ``2K·D_up`` for
   ``bn_split`` or ``N·C·D_up`` for ``columns``; none for ``per_sample`` and
   ``streamed``). The estimate is free: no model call.
2. **Confirm**, each in a fresh subprocess: the real call at the limit runs
   (``ggn_spectrum(..., strategy=s, memory_budget=B)``, eigenvalues only) and its peak
   resident memory above the start is measured (Linux ``ru_maxrss`` after resetting
   the peak mark); one more sample is refused by the package.

ViViT (``vivit-for-pytorch``, where installed) has no budget: its limit is found by
bisection on the measured peak of real runs (``EighComputation``, all eigenvalues,
one eigenvector), in subprocesses. Batches beyond the 1,797 digits are drawn with
replacement (memory does not depend on the values).

    python experiments/batch_size_limits/run.py [--quick] [--out PATH]
"""

from __future__ import annotations

import json
import subprocess
import sys
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
    "budget_bytes": 16 * MiB,
    "dtype": "float32",
    "vivit_step": {"exact": 4, "mc": 32},
    "all_strategies": True,
    "subprocess": True,
}
#: quick: one strategy per model, runs in this process (no clean memory peak)
QUICK = {
    "budget_bytes": MiB // 2,
    "dtype": "float32",
    "vivit_step": {"exact": 8, "mc": 64},
    "all_strategies": False,
    "subprocess": False,
}
#: (label, zoo model, strategies that apply)
MODELS = [
    ("cnn", "cnn", ["auto", "per_sample", "columns", "streamed"]),
    ("cnn-bn (train mode)", "cnn-bn", ["auto", "bn_split", "columns", "streamed"]),
]
C = 10


def model_shape(name: str) -> dict:
    """Per-sample output sizes of captured layers, BN channels, ``D_up`` and ``D``."""
    from lowrank_ggn.app.models import build_model

    model = build_model(name, SEED)
    outs, order = [], []

    def record(module: nn.Module, args, output) -> None:
        outs.append(output[0].numel())  # per sample
        order.append(module)

    hooks = [
        m.register_forward_hook(record)
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.BatchNorm2d))
    ]
    model(digits_inputs(2, SEED, torch.float32)[0])
    for h in hooks:
        h.remove()
    bns = [m for m in order if isinstance(m, nn.BatchNorm2d)]
    last = max((order.index(b) for b in bns), default=-1)
    d_up = sum(p.numel() for m in order[:last] for p in m.parameters())
    return {
        "layer_outputs": sum(
            o for m, o in zip(order, outs) if not isinstance(m, nn.BatchNorm2d)
        ),
        "statistics": sum(2 * b.num_features for b in bns),
        "d_up": d_up,
        "num_params": sum(p.numel() for p in model.parameters()),
    }


#: Bytes per Gram entry: float32 models have their Gram summed in float64.
GRAM_ITEMSIZE = 8


def package_estimate(
    shape: dict, N: int, cols: int, strategy: str, item: int = 4
) -> dict:
    """Bytes of each check ``ggn_spectrum(memory_budget=B)`` makes (see module doc)."""
    NC = N * cols
    out = {"gram_and_factors": NC * NC * GRAM_ITEMSIZE + cols * N * C * item}
    local = NC * shape["layer_outputs"] * item
    if strategy == "bn_split":
        out["strategy_factors"] = local + shape["statistics"] * shape["d_up"] * item
    elif strategy == "columns":
        out["strategy_factors"] = local + NC * shape["d_up"] * item
    return out


def admitted(shape: dict, N: int, cols: int, strategy: str, budget: int) -> bool:
    return all(v <= budget for v in package_estimate(shape, N, cols, strategy).values())


def largest(fits, lo: int = 2, hi: int = 2**20) -> int:
    """Largest ``N ≥ lo`` with ``fits(N)`` (monotone), by bisection."""
    if not fits(lo):
        return 0
    while lo < hi - 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ------------------------------------------------------------------------- workers
def worker(case: dict) -> dict:
    """One measured call in this (fresh) process."""
    from lowrank_ggn import ggn_spectrum
    from lowrank_ggn.app.models import build_model

    model = build_model(case["model"], SEED, torch.float32)
    X, y = digits_inputs(case["N"], SEED, torch.float32)
    loss = nn.CrossEntropyLoss()
    mc = case["variant"] == "mc"
    if case["method"] == "vivit":
        import copy

        from _peers_vivit import vivit_spectrum

        warm = digits_inputs(4, SEED + 1, torch.float32)
        vivit_spectrum(copy.deepcopy(model), loss, *warm, mc)  # warm-up
        (n, sec), peak = peak_rss_of(
            lambda: timed(vivit_spectrum, model, loss, X, y, mc)
        )
        return {"ok": True, "peak_bytes": peak, "seconds": sec, "num_eigenvalues": n}
    kwargs = {"memory_budget": case["budget"], "progress": False}
    if case["method"] != "auto":
        kwargs["strategy"] = case["method"]
    if mc:
        kwargs["mc_samples"] = 1
        kwargs["generator"] = torch.Generator().manual_seed(SEED)
    if case.get("bisect"):  # the package's own limit: accepted below, refused above
        lo, hi = case["bisect"]

        def accepted(n: int) -> bool:
            Xn, yn = digits_inputs(n, SEED, torch.float32)
            try:
                ggn_spectrum(model, loss, Xn, yn, **kwargs)
            except (ValueError, MemoryError):
                return False
            return True

        return {"ok": True, "limit_N": largest(accepted, lo, hi)}
    # warm up (lazy imports, allocator pools) so that the peak is the call's own
    ggn_spectrum(
        model,
        loss,
        *digits_inputs(4, SEED + 1, torch.float32),
        **{**kwargs, "memory_budget": None},
    )
    try:
        (res, sec), peak = peak_rss_of(
            lambda: timed(ggn_spectrum, model, loss, X, y, **kwargs)
        )
    except (ValueError, MemoryError) as err:
        return {"ok": False, "error": f"{type(err).__name__}: {str(err)[:300]}"}
    return {
        "ok": True,
        "peak_bytes": peak,
        "seconds": sec,
        "num_eigenvalues": res.rank,
        "strategy_run": str(res.engine_report.strategy),
        "fallback": res.engine_report.fallback,
    }


def in_subprocess(case: dict, isolate: bool = True) -> dict:
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
        return {"ok": False, "error": f"worker failed: {proc.stderr[-400:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------- driver
def compute(s: dict) -> dict:
    budget, rows = s["budget_bytes"], []
    have_vivit = installed("vivit", "backpack")
    for label, name, strategies in MODELS:
        shape = model_shape(name)
        for variant, cols in (("exact", C), ("mc", 1)):
            for strategy in strategies if s["all_strategies"] else strategies[1:2]:
                N = estimated = largest(
                    lambda n, sh=shape, c=cols, st=strategy: admitted(
                        sh, n, c, st, budget
                    )
                )
                case = {
                    "model": name,
                    "variant": variant,
                    "method": strategy,
                    "budget": budget,
                }
                at = in_subprocess({**case, "N": N}, s["subprocess"])
                above = in_subprocess({**case, "N": N + 1}, s["subprocess"])
                if not (
                    at["ok"] and not above["ok"]
                ):  # the estimate missed: ask the package
                    hi = 2 * N + 2
                    N = in_subprocess(
                        {**case, "N": 2, "bisect": [2, hi]}, s["subprocess"]
                    )
                    N = N["limit_N"]
                    at = in_subprocess({**case, "N": N}, s["subprocess"])
                    above = in_subprocess({**case, "N": N + 1}, s["subprocess"])
                row = {
                    "model": label,
                    "variant": variant,
                    "method": strategy,
                    "limit_N": N,
                    "estimated_limit_N": estimated,
                    "estimate_matches_package": estimated == N,
                    "estimate_at_limit": package_estimate(shape, N, cols, strategy),
                    "run_at_limit": at,
                    "run_above_limit": above,
                    "confirmed": at["ok"] and not above["ok"],
                }
                rows.append(row)
                print(
                    label,
                    variant,
                    strategy,
                    N,
                    row["confirmed"],
                    at.get("peak_bytes"),
                    flush=True,
                )
            if not have_vivit:
                continue
            step = s["vivit_step"][variant]
            probes: dict[int, dict] = {}

            def fits(
                n: int, step=step, probes=probes, name=name, variant=variant
            ) -> bool:
                n = n * step
                probes[n] = in_subprocess(
                    {
                        "model": name,
                        "variant": variant,
                        "method": "vivit",
                        "N": n,
                        "budget": budget,
                    },
                    s["subprocess"],
                )
                p = probes[n]
                return (
                    p["ok"]
                    and p["peak_bytes"] is not None
                    and p["peak_bytes"] <= budget
                )

            lo = max(1, 2 // step + 1)
            hint = max(
                r["limit_N"]
                for r in rows
                if r["model"] == label and r["variant"] == variant
            )
            N = step * largest(fits, lo, max(lo + 1, 2 * hint // step + 2))
            rows.append(
                {
                    "model": label,
                    "variant": variant,
                    "method": "vivit",
                    "limit_N": N,
                    "resolution": step,
                    "probes": {str(k): v for k, v in sorted(probes.items())},
                    "run_at_limit": probes.get(N),
                    "confirmed": N > 0 and probes.get(N, {}).get("ok", False),
                }
            )
            print(label, variant, "vivit", N, flush=True)
    return {
        "shapes": {name: model_shape(name) for _, name, _ in MODELS},
        "vivit": "measured"
        if have_vivit
        else "skipped: vivit-for-pytorch not installed",
        "rows": rows,
    }


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        torch.set_num_threads(1)
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        run_main(__doc__, HERE, compute, FULL, QUICK, SEED)
