"""The data-set GGN on two gloo processes equals the single-process call (float64).

``distributed_check.py`` spawns two ranks (127.0.0.1, 60 s collective timeout); the
problems: an MLP and a train-mode BatchNorm CNN with batches split unevenly across
the ranks, dense (a forced strategy with curvature sub-sampling too) and Lanczos
(``activations="recompute"`` too), Monte-Carlo factors from a seeded generator, and
eigenvectors. A rank that fails must make every rank
raise; a rank that dies (``os._exit``) or hangs must make the survivor raise
``RankFailed`` within the call's ``timeout``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_check import CALL_TIMEOUT_S, TIMEOUT
from torch import nn

from lowrank_ggn import ggn_spectrum_dataset

SCRIPT = Path(__file__).resolve().parent / "distributed_check.py"
DENSE_RTOL = 1e-9
LANCZOS_RTOL = 1e-6
#: What a survivor may take beyond ``CALL_TIMEOUT_S``: the call's own local work and
#: a loaded machine (measured on 2 cores: 0.1 s after a crash in the iterator, 2.6 s
#: after one in a Lanczos product, 10.0 s for a rank that hangs).
SLACK_S = 5.0
#: A fault run (two processes started, each importing torch) ends within this.
FAULT_RUN_S = 90

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed not built in"
)


def _run(tmp_path: Path, *flags: str, timeout: float = 240) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), *flags],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    records = []
    for rank in range(2):
        path = tmp_path / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote nothing:\n{proc.stderr[-3000:]}"
        records.append(json.loads(path.read_text()))
    return records


def test_two_processes_equal_one(tmp_path):
    records = _run(tmp_path)
    for rank, record in enumerate(records):
        assert "crash" not in record, record.get("crash")
        for name, result in record.items():
            tol = LANCZOS_RTOL if "lanczos" in name else DENSE_RTOL
            assert result["rank"][0] == result["rank"][1], (rank, name)
            if "diagonal" in result:  # ggn_diagonal_dataset
                assert result["diagonal"] <= DENSE_RTOL, (rank, name, result)
                assert result["bytes"] > 0, (rank, name)
                continue
            assert result["eigenvalues"] <= tol, (rank, name, result)
            if "strategies" in result:  # the forced strategy, on every batch
                assert result["strategies"] == ["columns"], (rank, name, result)
            if "eigenvectors" in result:
                assert result["eigenvectors"] <= tol, (rank, name, result)
            assert result["bytes"] > 0, (rank, name)


@pytest.mark.parametrize("flag", ["--fail", "--fail-diagonal"])
def test_a_failing_rank_raises_on_every_rank(tmp_path, flag):
    """ggn_spectrum_dataset and ggn_diagonal_dataset alike."""
    records = _run(tmp_path, flag)
    raised = [r.get("raised") for r in records]
    assert all(raised), records
    assert "targets" in raised[1]  # the failing rank: its own error
    assert "rank 1" in raised[0] and "RankFailed" in raised[0]  # the other: named
    for record in records:  # timeout=None: the group's own
        assert record["default_timeout"] == TIMEOUT.total_seconds(), record


@pytest.mark.parametrize(
    ("flag", "where", "waiting_in"),
    [
        ("--die", "batch iterator", "the agreement after reading the batches"),
        ("--die-solver", "forward pass", "an all-reduce"),
    ],
)
def test_a_rank_that_dies_makes_the_survivor_raise_within_the_timeout(
    tmp_path, flag, where, waiting_in
):
    """Rank 1 calls ``os._exit(1)`` after the handshake: no agreement can report it."""
    records = _run(tmp_path, flag, timeout=FAULT_RUN_S)
    assert where in records[1].get("died", ""), records[1]
    survivor = records[0]
    raised = survivor.get("raised") or ""
    assert raised.startswith("RankFailed: rank 1 "), survivor
    assert waiting_in in raised and "check its log" in raised, survivor
    assert survivor["seconds"] < CALL_TIMEOUT_S + SLACK_S, survivor


def test_a_rank_that_hangs_makes_the_other_raise_after_the_timeout(tmp_path):
    """Rank 1 stalls in its iterator: rank 0 waits ``timeout`` seconds, no longer."""
    records = _run(tmp_path, "--hang", timeout=FAULT_RUN_S)
    survivor = records[0]
    raised = survivor.get("raised") or ""
    assert raised.startswith("RankFailed: rank 1 "), survivor
    assert f"timeout={CALL_TIMEOUT_S:g} s" in raised, survivor
    assert "did not answer" in raised and "larger timeout=" in raised, survivor
    assert CALL_TIMEOUT_S <= survivor["seconds"] < CALL_TIMEOUT_S + SLACK_S, survivor


def _unread_batches():
    raise AssertionError("the batches were read before the timeout was checked")
    yield  # a generator


@pytest.mark.parametrize(
    ("timeout", "error"),
    [
        (0, ValueError),
        (-1.0, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        ("10", TypeError),
        (True, TypeError),
    ],
)
def test_timeout_is_checked_before_any_work(timeout, error):
    """Also for one process: a script tried on one rank fails alike on many."""
    with pytest.raises(error, match="timeout must be a"):
        ggn_spectrum_dataset(
            nn.Linear(3, 2), nn.CrossEntropyLoss(), _unread_batches(), timeout=timeout
        )


def test_a_failing_batch_iterator_raises_on_every_rank(tmp_path):
    """The iterator runs inside the agreement: rank 0 does not wait for rank 1."""
    records = _run(tmp_path, "--fail-iter")
    raised = [r.get("raised") for r in records]
    assert all(raised), records
    assert "broken batch iterator" in raised[1]
    assert "rank 1" in raised[0] and "RankFailed" in raised[0]


@pytest.mark.parametrize(
    ("flag", "topic"),
    [
        ("--fail-params", "its parameters"),
        ("--fail-values", "its values"),
        ("--fail-options", "its options"),
    ],
)
def test_ranks_that_disagree_raise_on_every_rank_before_any_data(tmp_path, flag, topic):
    """Another model, other parameter values or other options on rank 1."""
    records = _run(tmp_path, flag)
    for record in records:
        raised = record.get("raised") or ""
        assert "RankFailed" in raised and "rank 1" in raised and topic in raised, record


def test_sync_batch_norm_is_refused_clearly():
    model = nn.Sequential(nn.Linear(3, 4), nn.SyncBatchNorm(4), nn.Linear(4, 2))
    X, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    with pytest.raises(ValueError, match="SyncBatchNorm in train mode"):
        ggn_spectrum_dataset(model, nn.CrossEntropyLoss(), [(X, y)])


def test_process_group_without_init_is_refused():
    model = nn.Linear(3, 2)
    X, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    with pytest.raises(ValueError, match="not initialised"):
        ggn_spectrum_dataset(
            model, nn.CrossEntropyLoss(), [(X, y)], process_group=object()
        )
