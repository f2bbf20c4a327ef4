"""Two gloo processes against one: the data-set GGN under torch.distributed (float64).

Run by ``tests/test_distributed.py`` as a script (``python distributed_check.py OUT
[--MODE]``): it starts two ranks on 127.0.0.1 (separate processes, joined one by one,
so that a rank that dies leaves the other running), each passes its own batches to
``ggn_spectrum_dataset(..., process_group=WORLD)`` and ``ggn_diagonal_dataset``, and
each rank compares the result with the single-process call over all batches. Every rank writes
``OUT/rank<r>.json``: the largest relative deviations per problem, or the exception
it raised (``--fail``: rank 1 gets a batch with an out-of-range target;
``--fail-diagonal`` the same for ``ggn_diagonal_dataset``; other ``--fail-*``
see ``worker``), the seconds until it raised and the group's default timeout. The
faults that no agreement can report pass ``timeout=CALL_TIMEOUT_S``: ``--die``, rank 1
calls ``os._exit(1)`` in its batch iterator after the handshake; ``--die-solver``, in
its tenth forward pass (in a Lanczos product); ``--hang``, rank 1 stalls in its iterator
until rank 0 has written its record, then exits. A rank that dies writes
``{"died": where}`` first.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

F64 = torch.float64
WORLD = 2
TIMEOUT = timedelta(seconds=60)
#: ``timeout=`` of the calls with a rank that dies or hangs (seconds).
CALL_TIMEOUT_S = 10.0
DIE_AT_FORWARD = 10  # --die-solver: the forward pass in which rank 1 exits


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def bn_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 3),
    )


def batches(shape: tuple[int, ...], sizes: list[int], seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, *shape, generator=gen, dtype=F64),
            torch.randint(0, 3, (n,), generator=gen),
        )
        for n in sizes
    ]


#: name -> (model, input shape, batch sizes, batches of rank 0, keyword arguments)
PROBLEMS = {
    "mlp-dense": (mlp, (4,), [6, 5, 7, 4, 6], 3, dict(eigenvectors=True)),
    "mlp-lanczos": (
        mlp,
        (4,),
        [6, 5, 7, 4, 6],
        3,
        dict(solver="lanczos", top_k=4, eigenvectors=True),
    ),
    "bn-cnn-dense": (bn_cnn, (2, 4, 4), [5, 3, 6, 4], 1, dict(eigenvectors=True)),
    "bn-cnn-columns-subsampled": (
        bn_cnn,
        (2, 4, 4),
        [5, 3, 6, 4],
        1,
        dict(strategy="columns", subsampling=[2, 0], eigenvectors=True),
    ),
    "bn-cnn-lanczos-recompute": (
        bn_cnn,
        (2, 4, 4),
        [5, 3, 6, 4],
        1,
        dict(solver="lanczos", top_k=3, activations="recompute"),
    ),
    "mlp-mc": (mlp, (4,), [6, 5, 7, 4], 2, dict(mc_samples=2)),
}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(b.abs().max().item(), 1e-300)
    return (a - b).abs().max().item() / scale


def _generator(kwargs: dict) -> dict:
    """The same seeded generator on every rank (and for the reference) where the
    call draws Monte-Carlo samples."""
    if "mc_samples" not in kwargs:
        return {}
    return {"generator": torch.Generator().manual_seed(7)}


def _distributed_and_reference(call, problem: tuple, group) -> tuple:
    """``call`` on this rank's share of a problem's batches over ``group``, and in this
    process alone on all of them (the reference); the model is seeded (0), float64,
    in train mode."""
    build, shape, sizes, split, kwargs = problem
    torch.manual_seed(0)
    model = build().double().train()
    loss = nn.CrossEntropyLoss()
    data = batches(shape, sizes, seed=1)
    mine = data[:split] if dist.get_rank() == 0 else data[split:]
    res = call(model, loss, mine, process_group=group, **kwargs, **_generator(kwargs))
    ref = call(model, loss, data, **kwargs, **_generator(kwargs))
    return res, ref


def run_problem(name: str, group) -> dict:
    from lowrank_ggn import ggn_spectrum_dataset

    problem = PROBLEMS[name]
    res, ref = _distributed_and_reference(ggn_spectrum_dataset, problem, group)
    out = {
        "eigenvalues": _relative(res.eigenvalues, ref.eigenvalues),
        "rank": [res.rank, ref.rank],
        "bytes": res.bytes_exchanged,
    }
    if "strategy" in problem[4]:  # every batch of every rank took it
        out["strategies"] = sorted({str(r.strategy) for r in res.engine_reports})
    if ref.eigenvectors is not None:
        overlap = (res.eigenvectors @ ref.eigenvectors.T).abs().diagonal()
        out["eigenvectors"] = (overlap - 1).abs().max().item()
    return out


#: name -> (model, input shape, batch sizes, batches of rank 0, keyword arguments)
DIAGONAL_PROBLEMS = {
    "mlp-diagonal": (mlp, (4,), [6, 5, 7, 4, 6], 3, {}),
    "bn-cnn-diagonal": (bn_cnn, (2, 4, 4), [5, 3, 6, 4], 1, {}),
    "mlp-diagonal-mc": (mlp, (4,), [6, 5, 7, 4], 2, dict(mc_samples=2)),
}


def run_diagonal_problem(name: str, group) -> dict:
    """``ggn_diagonal_dataset`` over two ranks against one process over all batches."""
    from lowrank_ggn import ggn_diagonal_dataset

    problem = DIAGONAL_PROBLEMS[name]
    res, ref = _distributed_and_reference(ggn_diagonal_dataset, problem, group)
    return {
        "diagonal": _relative(res.flat, ref.flat),
        "rank": [res.num_batches, ref.num_batches],
        "bytes": res.bytes_exchanged,
    }


def _broken_batches(X, y):
    """A batch iterator that fails on this rank (``--fail-iter``)."""
    yield X, y
    raise ValueError("broken batch iterator")


def _die(out: str, where: str) -> None:
    """Record where this rank dies, then end the process at once (no clean-up)."""
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps({"died": where}))
    os._exit(1)


def _dying_batches(X, y, out: str):
    """A batch iterator whose rank dies after the handshake (``--die``)."""
    yield X, y
    _die(out, "batch iterator")


def _hanging_batches(X, y, out: str):
    """A batch iterator that stalls until rank 0 has raised, then dies (``--hang``)."""
    yield X, y
    deadline = time.monotonic() + 120
    while not Path(out, "rank0.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    _die(out, "batch iterator, after stalling")


def _die_in_forward(model: nn.Module, out: str) -> None:
    """Make this rank die in its ``DIE_AT_FORWARD``-th forward pass (``--die-solver``)."""
    calls = [0]

    def hook(module, args):
        calls[0] += 1
        if calls[0] == DIE_AT_FORWARD:
            _die(out, f"forward pass {calls[0]}")

    model.register_forward_pre_hook(hook)


def worker(rank: int, port: int, out: str, fail: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    import lowrank_ggn  # noqa: F401 - imported before the rendezvous: ranks in step

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=TIMEOUT,
    )
    record: dict = {}
    try:
        if fail:
            from lowrank_ggn import ggn_spectrum_dataset
            from lowrank_ggn.approx.distributed import Comm

            record["default_timeout"] = Comm(dist.group.WORLD).timeout

            torch.manual_seed(0)
            model = mlp().double()
            data = batches((4,), [4, 4], seed=1)
            X, y = data[rank]
            items, options = [(X, y)], {}
            if rank == 1 and fail == "--fail-params":  # another architecture
                model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
                model = model.double()
            elif rank == 1 and fail == "--fail-values":  # the same, other values
                with torch.no_grad():
                    next(model.parameters()).add_(1e-3)
            elif rank == 1 and fail == "--fail-options":  # another solver: would hang
                options = {"solver": "lanczos", "top_k": 2}
            if rank == 1 and fail in ("--fail", "--fail-diagonal"):
                y = y.clone()
                y[0] = 7  # out of range for 3 classes
                items = [(X, y)]
            elif rank == 1 and fail == "--fail-iter":  # the rank's own iterator raises
                items = _broken_batches(X, y)
            if fail in ("--die", "--die-solver", "--hang"):  # no agreement reports it
                options = {"timeout": CALL_TIMEOUT_S}
            if fail == "--die-solver":  # every rank, for the same options
                options.update(solver="lanczos", top_k=2, activations="recompute")
            if rank == 1 and fail == "--die":
                items = _dying_batches(X, y, out)
            elif rank == 1 and fail == "--die-solver":
                _die_in_forward(model, out)
            elif rank == 1 and fail == "--hang":
                items = _hanging_batches(X, y, out)
            start = time.monotonic()
            call = ggn_spectrum_dataset
            if fail == "--fail-diagonal":  # the data-set diagonal, same fault
                from lowrank_ggn import ggn_diagonal_dataset as call
            try:
                call(
                    model,
                    nn.CrossEntropyLoss(),
                    items,
                    process_group=dist.group.WORLD,
                    **options,
                )
                record["raised"] = None
            except Exception as err:  # noqa: BLE001 - recorded for the test
                record["raised"] = f"{type(err).__name__}: {err}"
            record["seconds"] = time.monotonic() - start
        else:
            for name in PROBLEMS:
                record[name] = run_problem(name, dist.group.WORLD)
            for name in DIAGONAL_PROBLEMS:
                record[name] = run_diagonal_problem(name, dist.group.WORLD)
    except Exception:  # noqa: BLE001 - recorded for the test
        record["crash"] = traceback.format_exc()
    finally:
        Path(out, f"rank{rank}.json").write_text(json.dumps(record))
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    out_dir = sys.argv[1]
    mode = next((a for a in sys.argv[2:] if a.startswith("--")), "")
    # not mp.spawn: it terminates every rank as soon as one exits with an error
    context = mp.get_context("spawn")
    port = free_port()
    ranks = [
        context.Process(target=worker, args=(rank, port, out_dir, mode))
        for rank in range(WORLD)
    ]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join()
