r"""The data-set GGN on one process against two (gloo, CPU): time, memory, bytes.

A data set of 16 batches of DeepOBS' 3c3d (CIFAR-10 shapes, ``harness.models``,
random weights, float32) at N = 32. Both solvers of ``ggn_spectrum_dataset``:
``dense`` (the whole spectrum) and ``lanczos`` (``top_k=10``), with one Monte-Carlo
factor column per sample (``mc_samples=1``, seeded: Ñ = 512 columns; the exact
``C = 10`` columns would make the dense solver hold Ñ·D = 5120 × 895,210 floats,
18 GB). Each configuration runs in fresh processes (``torch.multiprocessing``,
127.0.0.1, one thread each), after a warm-up call on one batch. Recorded per rank:
seconds of the call, peak RSS (reset after the warm-up), bytes sent and received
in collectives; and the largest eigenvalue difference against the one-process run.

It is also the runnable example of the README's "Many processes" section::

    torchrun --nproc-per-node 2 benchmarks/bench_distributed.py --example

prints the spectrum and the time on every rank. Results of the comparison go to
``results/distributed_cpu.{json,md}``::

    python benchmarks/bench_distributed.py
    python benchmarks/bench_distributed.py --quick --out /tmp/bd   # smoke (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

from harness.machine import machine, machine_words
from harness.memory import peak_rss_bytes, reset_peak_rss
from harness.models import build
from harness.results import write_results

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TOP_K = 10


def problem(quick: bool):
    """Model, loss and all batches (the same on every rank)."""
    name, N, B = ("tiny", 4, 4) if quick else ("3c3d", 32, 16)
    model, loss, _, _ = build(name, N, "cpu", seed=0)
    batches = [build(name, N, "cpu", seed=1 + b)[2:] for b in range(B)]
    return model, loss, batches


def call(model, loss, batches, solver: str, group) -> tuple:
    """One ``ggn_spectrum_dataset`` call; (result, seconds)."""
    import torch

    from lowrank_ggn import ggn_spectrum_dataset

    extra = {"top_k": TOP_K} if solver == "lanczos" else {}
    start, cpu = time.perf_counter(), time.process_time()
    res = ggn_spectrum_dataset(
        model,
        loss,
        batches,
        solver=solver,
        mc_samples=1,
        generator=torch.Generator().manual_seed(0),
        process_group=group,
        progress=False,
        **extra,
    )
    return res, time.perf_counter() - start, time.process_time() - cpu


def worker(rank: int, world: int, port: int, solver: str, quick: bool, out: str):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    group = None
    if world > 1:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=1800),
        )
        group = dist.group.WORLD
    model, loss, batches = problem(quick)
    share = len(batches) // world
    mine = batches[rank * share : (rank + 1) * share]
    call(model, loss, batches[:1], "dense", None)  # warm-up, one process
    reset_peak_rss()
    res, seconds, cpu_seconds = call(model, loss, mine, solver, group)

    record = {
        "rank": rank,
        "world": world,
        "solver": solver,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "bytes_exchanged": res.bytes_exchanged,
        "num_columns": res.num_columns,
        "eigenvalues": res.eigenvalues[:TOP_K].tolist(),
    }
    Path(out, f"{solver}-{world}-{rank}.json").write_text(json.dumps(record))
    if world > 1:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def example(quick: bool) -> int:
    """Under torchrun: this rank's share of the batches, the spectrum, the time."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, loss, batches = problem(quick)
    mine = batches[rank::world]
    res, seconds, _ = call(model, loss, mine, "lanczos", dist.group.WORLD)
    print(
        f"rank {rank}/{world}: {len(mine)} batches, top-{TOP_K} eigenvalues "
        f"{[f'{v:.4g}' for v in res.eigenvalues.tolist()]}, {seconds:.1f} s, "
        f"{res.bytes_exchanged / 2**20:.1f} MiB exchanged"
    )
    dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--example", action="store_true", help="run under torchrun")
    parser.add_argument("--solvers", nargs="+", default=["dense", "lanczos"])
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--note", default="", help="a line on the run's conditions")
    args = parser.parse_args(argv)
    if args.example:
        return example(args.quick)
    import torch.multiprocessing as mp

    out = Path(args.out)
    scratch = out / "distributed_runs"
    scratch.mkdir(parents=True, exist_ok=True)
    rows = []
    for solver in args.solvers:
        for world in (1, 2):
            mp.spawn(
                worker,
                args=(world, free_port(), solver, args.quick, str(scratch)),
                nprocs=world,
                join=True,
            )
            for rank in range(world):
                path = scratch / f"{solver}-{world}-{rank}.json"
                rows.append(json.loads(path.read_text()))
                path.unlink()
    scratch.rmdir()
    one = {r["solver"]: r["eigenvalues"] for r in rows if r["world"] == 1}
    for r in rows:
        ref = one[r["solver"]]
        r["max_rel_diff_vs_one_process"] = max(
            abs(a - b) / max(abs(b), 1e-30) for a, b in zip(r["eigenvalues"], ref)
        )
    info = machine("cpu")
    lines = [
        f"# Data-set GGN, 1 vs 2 processes ({machine_words(info)}, gloo)",
        "",
        "16 batches of 3c3d, N = 32, float32, mc_samples=1 (Ñ = 512); one thread per "
        "process. CPU seconds: this rank's own work (wall time includes waiting).",
        *([args.note] if args.note else []),
        "",
        "| solver | processes | rank | seconds | CPU seconds | peak RSS (GiB) | "
        "MiB exchanged | max rel. diff. vs 1 process |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['solver']} | {r['world']} | {r['rank']} | {r['seconds']:.1f} | "
            f"{r['cpu_seconds']:.1f} | "
            f"{r['peak_rss_bytes'] / 2**30:.2f} | {r['bytes_exchanged'] / 2**20:.1f} | "
            f"{r['max_rel_diff_vs_one_process']:.1e} |"
        )
    stem = f"distributed_{'quick' if args.quick else 'cpu'}"
    result = {"machine": info, "rows": rows}
    print(write_results(out, stem, result, "\n".join(lines) + "\n").read_text())
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
