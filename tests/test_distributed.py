"""The data-set GGN on two gloo processes equals the single-process call (float64).

``distributed_check.py`` spawns two ranks (127.0.0.1, 60 s collective timeout); the
problems: an MLP and a train-mode BatchNorm CNN with batches split unevenly across
the ranks, dense and Lanczos (``activations="recompute"`` too), Monte-Carlo factors
from a seeded generator, and eigenvectors. A rank that fails must make every rank
raise, within the timeout.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lowrank_ggn import ggn_spectrum_dataset

SCRIPT = Path(__file__).resolve().parent / "distributed_check.py"
DENSE_RTOL = 1e-9
LANCZOS_RTOL = 1e-6

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed not built in"
)


def _run(tmp_path: Path, *flags: str) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), *flags],
        capture_output=True,
        text=True,
        timeout=240,
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
            assert result["eigenvalues"] <= tol, (rank, name, result)
            if "eigenvectors" in result:
                assert result["eigenvectors"] <= tol, (rank, name, result)
            assert result["bytes"] > 0, (rank, name)


def test_a_failing_rank_raises_on_every_rank(tmp_path):
    records = _run(tmp_path, "--fail")
    raised = [r.get("raised") for r in records]
    assert all(raised), records
    assert "targets" in raised[1]  # the failing rank: its own error
    assert "rank 1" in raised[0] and "RankFailed" in raised[0]  # the other: named


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
