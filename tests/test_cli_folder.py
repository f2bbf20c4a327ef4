"""The ``lowrank-ggn`` command's output folder: checked first, never left mixed.

The folder is checked before any work; ``--overwrite`` replaces an earlier run and
keeps the user's other files; an interruption at any point of the writing (every
file-system call, SIGKILL at random moments) leaves one complete run, the earlier or
the new one, and no leftovers.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowrank_ggn.app.cli import main
from lowrank_ggn.app.report import OUTPUTS, write_outputs
from lowrank_ggn.app.results_folder import INTERNAL, MANIFEST, current_run, publish


def test_output_folder_is_checked_before_any_work(tmp_path, capsys, monkeypatch):
    """A non-empty folder, a file: usage errors (exit 2) before any computation."""
    import lowrank_ggn.app.cli as cli

    def no_work(args):
        raise AssertionError("computed before the output folder was checked")

    monkeypatch.setattr(cli, "_run", no_work)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("x")
    for out, match in ((tmp_path / "old", "not empty"), (tmp_path / "file", "is a file")):
        with pytest.raises(SystemExit) as info:
            main(["--out", str(out)])
        assert info.value.code == 2
        assert match in capsys.readouterr().err


def test_output_folder_problems_and_a_killed_first_run(tmp_path, capsys, monkeypatch):
    import lowrank_ggn.app.cli as cli

    monkeypatch.setattr(cli, "_run", lambda args: 0)
    (tmp_path / "dir" / "spectrum.json").mkdir(parents=True)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / INTERNAL).write_text("x")
    for out, match in ((tmp_path / "dir", "holds a folder 'spectrum.json'"),
                       (tmp_path / "odd", "is not a folder of lowrank-ggn")):  # fmt: skip
        with pytest.raises(SystemExit) as info:
            main(["--out", str(out), "--overwrite"])
        assert info.value.code == 2 and match in capsys.readouterr().err
    # a first run killed before its commit: dangling links and its folder; no run
    killed = tmp_path / "killed"
    (killed / INTERNAL / "runs" / "staging").mkdir(parents=True)
    (killed / "spectrum.json").symlink_to(f"{INTERNAL}/current/spectrum.json")
    assert main(["--out", str(killed)]) == 0  # empty for all purposes
    publish(killed, fake_writer("A", RUN_A), {}, OUTPUTS)
    with pytest.raises(SystemExit, match="2"):
        main(["--out", str(killed)])  # a committed run: needs --overwrite
    assert "not empty" in capsys.readouterr().err


def test_overwrite_replaces_an_earlier_run_and_keeps_other_files(tmp_path, monkeypatch):
    """Real runs: the folder's layout, the manifest, Ctrl-C at the switch (the next
    run's cleanup: test_an_interruption_at_any_point_leaves_one_complete_run)."""
    import lowrank_ggn.app.results_folder as results_folder

    out = tmp_path / "run"
    out.mkdir()
    (out / "approximation.png").write_bytes(b"stale")  # an earlier run's extra figure
    (out / "notes.txt").write_text("mine")
    argv = ["--model", "mlp", "--train-steps", "0", "--batch-size", "8", "--top-k", "2"]
    assert main([*argv, "--out", str(out), "--overwrite"]) == 0
    names = {p.name for p in out.iterdir()}
    assert "approximation.png" not in names and "notes.txt" in names
    assert {"spectrum.json", "spectrum.png", "top_eigenvectors.pt"} <= names
    first = assert_one_run(out, (out,), None)  # None: any complete run
    assert set(first) == {f"spectrum.{e}" for e in ("json", "png", "pdf")} | {
        "top_eigenvectors.pt"
    }
    manifest = json.loads((current_run(out) / MANIFEST).read_text())
    assert manifest["settings"]["models"] == ["mlp"]
    assert all((out / n).is_symlink() for n in first)
    # Ctrl-C at the switch of a second run: the first run's files, nothing staged
    monkeypatch.setattr(results_folder, "_switch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--per-layer", "--out", str(out), "--overwrite"])
    assert assert_one_run(out, (out,), first) == first
    assert [p.name for p in (out / INTERNAL / "runs").iterdir()] == [
        current_run(out).name
    ]


# --- the folder switches between two complete runs -------------------------------
RUN_A = ("spectrum.json", "spectrum.png", "approximation.png")
RUN_B = ("spectrum.json", "spectrum.png", "per_layer.png", "top_eigenvectors.pt")
RUN_C = ("spectrum.json", "top_eigenvectors.pt")
#: Every call that changes a folder: an interruption before each is one case.
MUTATIONS = ("replace", "rename", "symlink", "link", "unlink", "rmdir", "mkdir")


def interrupted(*args, **kwargs):
    raise KeyboardInterrupt


def interrupt_before(patch: pytest.MonkeyPatch, k: int) -> None:
    """Raise KeyboardInterrupt instead of the ``k``-th change of any folder."""
    calls = 0

    def counting(original):
        def mutation(*args, **kwargs):
            nonlocal calls
            calls += 1
            if calls == k:
                raise KeyboardInterrupt
            return original(*args, **kwargs)

        return mutation

    for name in MUTATIONS:
        patch.setattr(os, name, counting(getattr(os, name)))


def fake_writer(tag: str, names: tuple[str, ...]):
    """``write`` for :func:`publish`: ``names`` with the content ``tag:name``."""

    def write(folder: Path) -> list[Path]:
        for name in names:
            (folder / name).write_text(f"{tag}:{name}")
        return [folder / name for name in names]

    return write


def expected(tag: str, names: tuple[str, ...]) -> dict[str, str]:
    return {name: f"{tag}:{name}" for name in names}


def shown(out: Path) -> dict[str, bytes]:
    """The result files ``out`` shows (a link that resolves to nothing shows none)."""
    if not out.exists():
        return {}
    return {p.name: p.read_bytes() for p in out.iterdir() if p.name in OUTPUTS
            and p.exists()}  # fmt: skip


def assert_one_run(out: Path, user: tuple[Path, ...], *runs) -> dict:
    """``out`` shows exactly one of ``runs`` (``None``: whatever run ``current`` names).

    A run is ``{name: content}`` (``str`` or ``bytes``); whenever ``current`` names a
    run folder, its manifest lists exactly the files shown, with their SHA-256.
    """
    state = shown(out)
    run = current_run(out) if out.exists() else None
    if run is not None:
        files = json.loads((run / MANIFEST).read_text())["files"]
        assert set(files) == set(state), f"manifest {sorted(files)} vs {sorted(state)}"
        for name, data in state.items():
            assert hashlib.sha256(data).hexdigest() == files[name]["sha256"], name
    as_bytes = [
        r if r is None else {n: c if isinstance(c, bytes) else c.encode()
                             for n, c in r.items()}
        for r in runs
    ]  # fmt: skip
    assert state in as_bytes or (None in as_bytes and run is not None and state), (
        f"a mixed folder: {state}"
    )
    for folder in user:
        assert (folder / "notes.txt").read_text() == "mine"
    return state


def assert_no_leftovers(out: Path) -> None:
    """One run folder (the current one), no temporary links, no dangling links."""
    home = out / INTERNAL
    assert {p.name for p in home.iterdir()} == {"runs", "current", "lock"}
    assert [p.name for p in (home / "runs").iterdir()] == [current_run(out).name]
    assert all(p.exists() for p in out.iterdir()), "a dangling link is left"


def _fresh(out: Path) -> dict:
    return {}


def _earlier_run(out: Path) -> dict:
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "mine").mkdir()
    (out / "mine" / "notes.txt").write_text("mine")
    publish(out, fake_writer("A", RUN_A), {"run": "A"}, OUTPUTS)
    return expected("A", RUN_A)


def _older_layout(out: Path) -> dict:
    """Plain result files, as the per-file renames of earlier versions left them."""
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for name in RUN_A:
        (out / name).write_text(f"A:{name}")
    return expected("A", RUN_A)


def _leftovers_of_a_killed_run(out: Path) -> dict:
    state = _earlier_run(out)
    home = out / INTERNAL
    (home / "runs" / "killed").mkdir()
    (home / "runs" / "killed" / "per_layer.png").write_text("K:per_layer.png")
    (home / "link-dead").symlink_to(f"{INTERNAL}/current/per_layer.png")
    (out / "per_layer.png").symlink_to(f"{INTERNAL}/current/per_layer.png")
    return state


@pytest.mark.parametrize(
    "before", [_fresh, _earlier_run, _older_layout, _leftovers_of_a_killed_run]
)
def test_an_interruption_at_any_point_leaves_one_complete_run(tmp_path, before):
    """KeyboardInterrupt before the k-th folder change, for every k of a commit.

    The folder must show the earlier run or the new run, never a mix; files other
    than results are kept; the next run clears what the interrupted one left.
    """
    new = expected("B", RUN_B)
    outcomes = []
    for k in range(1, 200):
        out = tmp_path / str(k) / "out"
        out.parent.mkdir()
        old = before(out)
        user = tuple(f for f in (out, out / "mine") if (f / "notes.txt").exists())
        with pytest.MonkeyPatch.context() as patch:
            interrupt_before(patch, k)
            try:
                publish(out, fake_writer("B", RUN_B), {"run": "B"}, OUTPUTS)
                finished = True
            except KeyboardInterrupt:
                finished = False
        state = assert_one_run(out, user, old, new)
        outcomes.append(state == shown_of(new))
        # the next run completes and clears the rest
        publish(out, fake_writer("C", RUN_C), {"run": "C"}, OUTPUTS)
        assert_one_run(out, user, expected("C", RUN_C))
        assert_no_leftovers(out)
        if finished:
            break
    assert finished and k > 8, f"the commit made only {k - 1} changes"
    assert outcomes[-1] and not outcomes[0]  # interrupted before and after the switch
    assert outcomes == sorted(outcomes)  # the earlier run up to one point, then the new


def shown_of(run: dict[str, str]) -> dict[str, bytes]:
    return {n: c.encode() for n, c in run.items()}


def test_write_outputs_is_the_switch(tmp_path, monkeypatch):
    """The CLI's writer goes through :func:`publish` (its files, its settings)."""
    import lowrank_ggn.app.report as report

    write = fake_writer("B", RUN_B)
    monkeypatch.setattr(report, "_write_files", lambda r, folder: write(folder))
    written = write_outputs({"settings": {"seed": 3}}, tmp_path / "out")
    assert written == [tmp_path / "out" / n for n in RUN_B]
    assert_one_run(tmp_path / "out", (), expected("B", RUN_B))
    manifest = json.loads((current_run(tmp_path / "out") / MANIFEST).read_text())
    assert manifest["settings"] == {"seed": 3}


SIGKILL_CHILD = r"""
import importlib.util, pathlib, sys
spec = importlib.util.spec_from_file_location("results_folder", sys.argv[1])
folder = importlib.util.module_from_spec(spec)
spec.loader.exec_module(folder)
out, runs, first = pathlib.Path(sys.argv[2]), eval(sys.argv[3]), int(sys.argv[4])
everything = sorted({n for names in runs for n in names})
i = first
while True:
    names = runs[i % len(runs)]
    def write(run, i=i, names=names):
        for n in names:
            (run / n).write_text(f"{i}:{n}")
        return [run / n for n in names]
    folder.publish(out, write, {"i": i}, everything)
    if i == first:
        print("ready", flush=True)
    i += 1
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_sigkill_at_random_moments_leaves_one_complete_run(tmp_path):
    """A child commits runs A, B, A, ... in a loop and is killed at a random moment."""
    import lowrank_ggn.app.results_folder as results_folder

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    runs = (RUN_A, RUN_B)
    rng = random.Random(0)
    for trial in range(12):
        first = 1000 * trial
        child = subprocess.Popen(
            [sys.executable, "-c", SIGKILL_CHILD, results_folder.__file__, str(out),
             repr(runs), str(first)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert child.stdout.readline() == "ready\n"
            time.sleep(rng.uniform(0, 0.05))
        finally:
            child.kill()
            child.wait()
        state = shown(out)
        tags = {c.split(b":")[0] for c in state.values()}
        assert len(tags) == 1, f"a mixed folder after SIGKILL: {state}"
        i = int(tags.pop())
        assert i >= first
        assert_one_run(out, (out,), expected(str(i), runs[i % 2]))
    publish(out, fake_writer("C", RUN_C), {}, OUTPUTS)
    assert_one_run(out, (out,), expected("C", RUN_C))
    assert_no_leftovers(out)
