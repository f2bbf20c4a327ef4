r"""What one damped Newton step costs against the spectrum it is built on.

DeepOBS' 3c3d and its BatchNorm variant in train mode (``harness.models``, CIFAR-10
shapes, C = 10, float32, random weights), N = 64, one process: one
``DampedNewton(top_k=10).step(X, y)`` (constant damping, and bootstrap damping with
ViViT's grid and 100 resamples) against one
``ggn_spectrum(model, loss, X, y, top_k=10, eigenvectors=True)``. A warm-up call of
each comes first (on the same batch), then ``--repeat`` rounds of the three calls,
interleaved; each time is the fastest of its rounds. Every step runs on a fresh copy
of the model (copied outside the timer), so all rounds see the same parameters.
Reported: the times, the ratio ``t(step) / t(spectrum)`` (target ≤ 1.1, issue 26), the forward
passes (samples the model processed, in batches, counted by a forward pre-hook) and
the Gram engine's pass counts of both calls.

Results go to ``results/optim_<device>.json`` and ``.md`` (``optim_quick.*`` with
``--quick``, which runs the tiny BatchNorm net and 3c3d at N = 4 once).

Usage::

    python benchmarks/bench_optim.py                     # 3c3d and 3c3d-bn, N = 64
    python benchmarks/bench_optim.py --models 3c3d --repeat 5
    python benchmarks/bench_optim.py --quick --out /tmp/boq   # smoke run (tests)
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from pathlib import Path

from harness.machine import machine
from harness.models import build
from harness.passes import ForwardPasses

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RATIO_TARGET = 1.1
TOP_K = 10
DAMPING = 1e-3


def measure(model_name: str, N: int, repeat: int) -> dict:
    """Warm-up, then ``repeat`` interleaved rounds of spectrum and steps."""
    import torch

    from lowrank_ggn import SampleMixingWarning, ggn_spectrum
    from lowrank_ggn.optim import BootstrapDamping, ConstantDamping, DampedNewton

    model, loss, X, y = build(model_name, N, "cpu", seed=0)

    def spectrum(m):
        res = ggn_spectrum(
            m, loss, X, y, top_k=TOP_K, eigenvectors=True, progress=False
        )
        return {
            "num_eigenvalues": res.rank,
            "engine": str(res.engine_report),
            "engine_passes": dict(res.engine_report.passes),
            "path": res.path.name,
        }

    def stepper(policy):
        def run(m):
            opt = DampedNewton(
                m.parameters(), model=m, loss_func=loss, top_k=TOP_K, damping=policy
            )
            info = opt.step(X, y)
            return {
                "num_directions": info.num_directions,
                "damping": info.damping.tolist(),
                "step_norm": info.step_norm,
                "loss": info.loss,
                "engine": str(info.engine_report),
                "engine_passes": dict(info.engine_report.passes),
                "forward_passes_reported": info.forward_passes,
            }

        return run

    calls = {
        "spectrum": spectrum,
        "step_constant": stepper(ConstantDamping(DAMPING)),
        "step_bootstrap": stepper(
            BootstrapDamping(generator=torch.Generator().manual_seed(0))
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    info: dict[str, dict] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleMixingWarning)  # BN: per-component
        for round_ in range(repeat + 1):  # round 0 is the warm-up
            for name, fn in calls.items():
                m = copy.deepcopy(model)
                counter = ForwardPasses(m, N)
                t0 = time.perf_counter()
                out = fn(m)
                seconds = time.perf_counter() - t0
                counter.remove()
                out["forward_passes"] = counter.passes()
                if round_ == 0:
                    out["warmup_seconds"] = seconds
                    info[name] = out
                else:
                    times[name].append(seconds)
                print(f"  {model_name} N={N} {name}: {seconds:.2f} s", flush=True)
    best = {name: min(t) for name, t in times.items()}
    return {
        "model": model_name,
        "N": N,
        "C": 10 if model_name != "tiny" else 3,
        "dtype": "float32",
        "seconds": best,
        "all_seconds": times,
        "ratio_constant": best["step_constant"] / best["spectrum"],
        "ratio_bootstrap": best["step_bootstrap"] / best["spectrum"],
        "target_met": best["step_constant"] / best["spectrum"] <= RATIO_TARGET,
        "calls": info,
    }


def write_md(result: dict, path: Path) -> None:
    m = result["machine"]
    lines = [
        "# Damped Newton step vs spectrum",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}, torch "
        f"{m['torch']}, {result['threads']} thread(s). Fastest of "
        f"{result['repeat']} round(s) after a warm-up; float32, top-{TOP_K}.",
        "",
        "| model | N | spectrum [s] | step, constant [s] | ratio | step, bootstrap "
        "[s] | ratio | forward passes (spectrum / step) | engine passes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["records"]:
        s, c = r["seconds"], r["calls"]
        passes = ", ".join(
            f"{k} {v}" for k, v in c["spectrum"]["engine_passes"].items()
        )
        lines.append(
            f"| {r['model']} | {r['N']} | {s['spectrum']:.2f} | "
            f"{s['step_constant']:.2f} | **{r['ratio_constant']:.2f}** | "
            f"{s['step_bootstrap']:.2f} | {r['ratio_bootstrap']:.2f} | "
            f"{c['spectrum']['forward_passes']:.2f} / "
            f"{c['step_constant']['forward_passes']:.2f} | {passes} (both) |"
        )
    lines += [
        "",
        f"Target: step ≤ {RATIO_TARGET}× spectrum. A step adds the gradient (one "
        "backward pass of the recorded graph); γ_nk and λ_nk come from the Gram "
        "eigenvectors, no pass.",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["3c3d", "3c3d-bn"])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke run (tests)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    runs = (
        [("tiny", 8), ("3c3d", 4)] if args.quick else [(m, args.n) for m in args.models]
    )
    repeat = 1 if args.quick else args.repeat
    t0 = time.perf_counter()
    records = [measure(name, N, repeat) for name, N in runs]
    result = {
        "machine": machine("cpu"),
        "threads": torch.get_num_threads(),
        "repeat": repeat,
        "quick": args.quick,
        "ratio_target": RATIO_TARGET,
        "records": records,
        "seconds_total": time.perf_counter() - t0,
    }
    tag = "quick" if args.quick else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"optim_{tag}.json").write_text(json.dumps(result, indent=1))
    write_md(result, args.out / f"optim_{tag}.md")
    for r in records:
        print(
            f"{r['model']} N={r['N']}: step/spectrum = {r['ratio_constant']:.2f} "
            f"(bootstrap {r['ratio_bootstrap']:.2f})"
        )
    print(f"wrote {args.out / f'optim_{tag}.json'} and .md")
    return result


if __name__ == "__main__":
    main()
