"""Fixtures over the shared case list (see ``tests/cases.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from cases import CASE_IDS, CASES  # noqa: E402

# the test problems are tiny: one thread avoids oversubscribing CI's two cores
torch.set_num_threads(1)


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request):
    """One case of the shared list."""
    return request.param


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
