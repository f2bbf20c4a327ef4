"""``heap_reuse``: large freed blocks stay on the C heap inside lowrank_ggn's calls.

Each case runs in a fresh interpreter (the allocator's settings are process-wide):
a 64 MiB tensor freed inside the context stays resident (reused by the next
temporary instead of a fresh ``mmap`` and its page faults), freed after it, it is
returned at once; an environment that tunes glibc's allocator, or opts out, keeps
its own behaviour; every entry point enters it on CPU models and leaves the heap
trimmed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _has_glibc() -> bool:
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError):  # not a name this platform knows
        return False


glibc = pytest.mark.skipif(
    not Path("/proc/self/statm").exists() or not _has_glibc(),
    reason="needs Linux with glibc",
)

PROBE = """
import json, torch
from torch import nn
import lowrank_ggn
from lowrank_ggn.core import memory
from lowrank_ggn.core.resident import resident_bytes

def kept():
    base = resident_bytes()
    x = torch.ones(2**24)  # 64 MiB: above glibc's largest mmap threshold
    del x
    return (resident_bytes() - base) / 2**20

with memory.heap_reuse():
    with memory.heap_reuse():  # nested: the outer one restores
        pass
    inside = kept()
after = kept()
seen = []
real = memory.heap_reuse
def spy(enabled=True):
    seen.append(enabled)
    return real(enabled)
import lowrank_ggn.core.state as state
state.heap_reuse = spy
model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
lowrank_ggn.ggn_spectrum(model, nn.CrossEntropyLoss(), torch.randn(5, 3),
                         torch.randint(0, 2, (5,)), progress=False)
print(json.dumps({"inside": inside, "after": after, "entered": seen,
                  "exited": memory._Open.depth == 0}))
"""


def _probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    clean.pop("LOWRANK_GGN_HEAP_REUSE", None)
    clean.update(env)
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=clean,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_freed_blocks_stay_on_the_heap_inside_and_not_after():
    got = _probe()
    assert got["inside"] > 48, got  # the 64 MiB block stayed resident
    assert got["after"] < 16, got  # unmapped at once, the defaults back
    assert got["entered"] and all(got["entered"]) and got["exited"], got


@pytest.mark.parametrize(
    "env", [{"LOWRANK_GGN_HEAP_REUSE": "0"}, {"MALLOC_MMAP_THRESHOLD_": "131072"}]
)
@glibc
def test_an_environment_that_tunes_the_allocator_is_left_alone(env):
    got = _probe(**env)
    assert got["inside"] < 16, got
    assert got["after"] < 16, got
