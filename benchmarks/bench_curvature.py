r"""One curvature object against separate calls: forward passes, backward passes, time.

The sequence a figure or an optimiser step needs on one batch: the top-``k``
eigenpairs (``k = 10``), the gradient moments, and the directional derivatives along
those eigenvectors. Two ways:

* ``object``: ``GGN(model, loss, X, y)``, ``.spectrum(top_k=k, eigenvectors=True)``,
  ``.moments()``, ``.directional_derivatives(spectrum)``;
* ``functions``: ``ggn_spectrum(..., top_k=k, eigenvectors=True)``,
  ``gradient_moments(...)``, ``directional_derivatives(..., spectrum)``.

Forward passes are counted by a pre-hook on the model itself, in full-batch
equivalents (samples processed / ``N``; vmapped per-sample passes count their
samples, Jacobian-vector products count as passes). Both ways run in the same
process on the same weights, after a warm-up of each at N = 2. ``--lowrank-ggn PATH`` imports lowrank_ggn from another
checkout (e.g. a ``git worktree`` of an older commit, which has only the functions).

Models: 3c3d and 3c3d-BN (train mode) on CIFAR-10 shapes (``harness.models``),
random weights, float32, C = 10. Results: ``results/curvature_<device>.json`` and
``.md``.

Usage::

    python benchmarks/bench_curvature.py --N 64
    python benchmarks/bench_curvature.py --quick --out /tmp/bc   # smoke run (tests)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from harness.machine import machine, machine_words
from harness.models import build
from harness.passes import ForwardPasses

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TOP_K = 10


def run_sequence(kind: str, model, loss, X, y) -> dict:
    """Run one way; forward passes of the batch, engine passes and seconds."""
    import lowrank_ggn as L

    counter = ForwardPasses(model, X.shape[0])
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kind == "object":
                ggn = L.GGN(model, loss, X, y, progress=False)
                spec = ggn.spectrum(top_k=TOP_K, eigenvectors=True)
                ggn.moments()
                ggn.directional_derivatives(spec)
            else:
                spec = L.ggn_spectrum(
                    model, loss, X, y, top_k=TOP_K, eigenvectors=True, progress=False
                )
                L.gradient_moments(model, loss, X, y)
                L.directional_derivatives(model, loss, X, y, spec)
    finally:
        counter.remove()
    seconds = time.perf_counter() - start
    report = spec.engine_report
    return {
        "kind": kind,
        "forward_passes": counter.passes(),
        "engine_passes": dict(report.passes) if report is not None else None,
        "strategy": str(report.strategy) if report is not None else None,
        "seconds": seconds,
    }


def render(stem: Path) -> None:
    """The Markdown table of ``stem.json``."""
    data = json.loads(stem.with_suffix(".json").read_text())
    where = f"{machine_words(data['machine'])}, {data['machine']['device']}"
    lines = [
        f"# Spectrum + moments + directional derivatives, one batch ({where})",
        "",
        f"top-{data['top_k']} eigenpairs, gradient moments, directional derivatives",
        "along the eigenvectors; float32, C = 10, one thread. Forward passes in",
        "full-batch equivalents, counted by a hook on the model.",
        "",
        "| code | model | N | way | forward passes | engine passes | strategy | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['label']} | {r['model']} | {r['N']} | {r['kind']} | "
            f"{r['forward_passes']:.2f} | {r['engine_passes']} | {r['strategy']} | "
            f"{r['seconds']:.2f} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--N", type=int, default=64)
    parser.add_argument("--models", nargs="+", default=["3c3d", "3c3d-bn"])
    parser.add_argument("--kinds", nargs="+", default=["object", "functions"])
    parser.add_argument("--lowrank-ggn", default=None, help="checkout to import from")
    parser.add_argument("--label", default="current")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (tests)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument(
        "--render-only", action="store_true", help="rewrite the .md from the .json"
    )
    args = parser.parse_args(argv)
    if args.render_only:
        render(Path(args.out) / "curvature_cpu")
        return 0
    if args.lowrank_ggn:
        sys.path.insert(0, str(Path(args.lowrank_ggn).resolve()))
    import torch

    torch.set_num_threads(1)
    N = 4 if args.quick else args.N
    for name in args.models:  # warm-up: first calls pay for torch.func's set-up
        for kind in args.kinds:
            run_sequence(kind, *build(name, 2, "cpu", seed=1))
    rows = []
    for name in args.models:
        for kind in args.kinds:
            model, loss, X, y = build(name, N, "cpu", seed=0)
            row = run_sequence(kind, model, loss, X, y)
            row.update(model=name, N=N, label=args.label)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"curvature_{'quick' if args.quick else 'cpu'}"
    previous = []
    if stem.with_suffix(".json").exists() and not args.quick:
        previous = json.loads(stem.with_suffix(".json").read_text())["rows"]
        previous = [r for r in previous if r["label"] != args.label]
    rows = previous + rows
    stem.with_suffix(".json").write_text(
        json.dumps({"machine": machine("cpu"), "top_k": TOP_K, "rows": rows}, indent=1)
    )
    render(stem)
    print(f"written to {stem}.json/.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
