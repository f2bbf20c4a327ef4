r"""The output folder of ``lowrank-ggn``: one atomic switch from one run's files to the next.

No run writes its result files into ``--out`` itself. The folder looks like::

    out/
      spectrum.json -> .lowrank-ggn/current/spectrum.json   one link per result file
      ...
      notes.txt                                             anything else: never touched
      .lowrank-ggn/
        current -> runs/<run id>                            the switch
        runs/<run id>/spectrum.json, ..., manifest.json     one run's files
        lock                                                one run at a time

Every result name in ``out`` resolves through ``current``, so at every instant it
names a file of the run that ``current`` points to, or nothing. :func:`publish`

1. takes the lock and removes what a killed run left (run folders that ``current``
   does not name, temporary links): only ``current`` is ever read as results;
2. writes the new run's files and its ``manifest.json`` (names, sizes and SHA-256 of
   the files, the run's settings) into a new ``runs/<run id>`` that nothing names yet
   (an exception before step 5, Ctrl-C included, removes it again);
3. adopts result files of the older layout (plain files with result names): they are
   hard-linked (or copied) into a run folder of their own, ``current`` is switched
   there and each plain file is replaced by its link to the same content;
4. adds a link for each name of the new run (up to step 5 a new name resolves to
   nothing: the previous run has no such file);
5. replaces ``current`` by a link to the new run folder with one ``os.replace``, which
   is atomic: this is the commit;
6. removes the links of names the new run lacks (resolving to nothing since step 5)
   and the previous run's folder.

A run killed before step 5 leaves the previous run's files, one killed after it the
new run's; the next run clears the rest. A reader that must not see a switch while it
reads resolves ``.lowrank-ggn/current`` once and reads inside that folder. POSIX only
(symbolic links, ``fcntl`` lock).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock
    fcntl = None

#: The folder inside ``--out`` that holds the runs, ``current`` and the lock.
INTERNAL = ".lowrank-ggn"
#: Written into every run folder beside the results (not linked into ``--out``).
MANIFEST = "manifest.json"


def folder_problem(out: Path, overwrite: bool, names: Sequence[str]) -> str | None:
    """Why ``out`` cannot take a run's results ``names``, or ``None``.

    An existing ``out`` must be a folder without another run's results and without
    other files unless ``overwrite``; links left by a run killed before its first
    commit resolve to nothing and do not count.
    """
    if out.exists() and not out.is_dir():
        return f"--out {str(out)!r} is a file; pass a folder."
    if out.is_dir():
        home = out / INTERNAL
        if home.is_symlink() or (home.exists() and not home.is_dir()):
            return f"{str(home)!r} is not a folder of lowrank-ggn; move it away."
        for name in names:
            if (out / name).is_dir():
                return f"--out {str(out)!r} holds a folder {name!r}; move it away."
        if not overwrite and _holds_something(out):
            return (
                f"--out {str(out)!r} is not empty; pass --overwrite to replace an "
                "earlier run's results there, or choose another folder."
            )
    parent = out if out.is_dir() else next(p for p in out.parents if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        return (
            f"--out {str(out)!r} cannot be written: no permission in {str(parent)!r}."
        )
    return None


def publish(
    out: Path,
    write: Callable[[Path], list[Path]],
    settings: dict[str, Any],
    names: Sequence[str],
) -> list[Path]:
    """Write one run's results with ``write`` and switch ``out`` to them atomically.

    Args:
        out: The results folder (created if missing). Files in it other than result
            names and :data:`INTERNAL` are kept.
        write: Writes the run's files into the folder it is given and returns their
            paths; their names must be among ``names``.
        settings: Recorded in the run's ``manifest.json``.
        names: Every name a run may write: plain files with these names are an
            earlier run's results (replaced), the names this run lacks are removed.

    Returns:
        ``out / name`` for each file ``write`` wrote.

    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "out"
    >>> def write(folder):
    ...     (folder / "a.txt").write_text("new")
    ...     return [folder / "a.txt"]
    >>> publish(out, write, {"seed": 0}, ["a.txt", "b.txt"]) == [out / "a.txt"]
    True
    >>> assert (out / "a.txt").read_text() == "new" and (out / "a.txt").is_symlink()
    """
    home = out / INTERNAL
    runs = home / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    with _locked(home):
        _clear_leftovers(home)
        # 2. the new run's folder: nothing resolves into it yet
        staging = _new_run_folder(runs)
        try:
            written = [p.name for p in write(staging)]
            _write_manifest(staging, written, settings)
            # 3. plain result files of the older layout become a run of their own
            _adopt_plain_files(out, names)
            previous = _current_run(home)
            # 4. links for the new names resolve to nothing until the switch
            for name in written:
                _link_result(out, name)
            # 5. the commit
            _switch(home, staging.name)
        except BaseException:  # Ctrl-C included: nothing will name this folder
            if _current_run(home) != staging.name:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        # 6. names the new run lacks, the previous run's folder
        for entry in out.iterdir():
            if entry.name not in written and _is_result_link(entry):
                os.unlink(entry)
        if previous is not None:
            shutil.rmtree(runs / previous, ignore_errors=True)
    return [out / name for name in written]


def current_run(out: Path) -> Path | None:
    """The folder of the run whose results ``out`` shows, or ``None``."""
    run = _current_run(out / INTERNAL)
    return None if run is None else out / INTERNAL / "runs" / run


# ----------------------------------------------------------------------------------
# the steps
# ----------------------------------------------------------------------------------
def _link_target(name: str) -> str:
    """The relative target of ``out/name``: through ``current``, never a run."""
    return f"{INTERNAL}/current/{name}"


def _is_result_link(path: Path) -> bool:
    return path.is_symlink() and os.readlink(path) == _link_target(path.name)


def _holds_something(out: Path) -> bool:
    """Whether ``out`` shows anything: results, links that resolve, other files."""
    for entry in out.iterdir():
        if entry.name == INTERNAL:
            continue
        if _is_result_link(entry) and not entry.exists():
            continue  # a killed run's link to a name that no run has
        return True
    return False


def _current_run(home: Path) -> str | None:
    try:
        return Path(os.readlink(home / "current")).name
    except OSError:  # no run committed yet
        return None


@contextmanager
def _locked(home: Path) -> Iterator[None]:
    """Hold ``home/lock`` exclusively: a second run into ``out`` waits."""
    fd = os.open(home / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _clear_leftovers(home: Path) -> None:
    """Remove run folders that ``current`` does not name and temporary links."""
    keep = _current_run(home)
    for entry in (home / "runs").iterdir():
        if entry.name != keep:
            _remove(entry)
    for entry in home.iterdir():
        if entry.name not in ("runs", "current", "lock"):
            _remove(entry)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        os.unlink(path)


def _new_run_folder(runs: Path) -> Path:
    # os.mkdir honours the umask (tempfile.mkdtemp would make it private)
    folder = runs / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
    os.mkdir(folder)
    return folder


def _write_manifest(
    folder: Path, names: Sequence[str], settings: dict[str, Any] | None
) -> None:
    """``manifest.json``: the run's files (bytes, SHA-256) and settings; synced."""
    files = {}
    for name in names:
        data = (folder / name).read_bytes()
        files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        _fsync(folder / name)
    manifest = {"run": folder.name, "files": files, "settings": settings}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync(folder / MANIFEST)
    _fsync(folder)


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or a folder) to disk: the switch must not outrun it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _adopt_plain_files(out: Path, names: Sequence[str]) -> None:
    """Make result files that are not links a run of their own, content unchanged.

    The new run folder gets a hard link (or a copy) of every result name ``out``
    shows, plain or linked; ``current`` then names it (what ``out`` shows is the
    same) and each plain file is replaced by a link to the same content.
    """
    plain = [n for n in names if (out / n).is_file() and not _is_result_link(out / n)]
    if not plain:
        return
    home = out / INTERNAL
    adopted = _new_run_folder(home / "runs")
    shown = [n for n in names if (out / n).is_file()]
    for name in shown:
        source = os.path.realpath(out / name)  # os.link does not follow links on Linux
        try:
            os.link(source, adopted / name)
        except OSError:
            shutil.copy2(source, adopted / name)
    _write_manifest(adopted, shown, None)
    previous = _current_run(home)
    _switch(home, adopted.name)
    for name in plain:
        _link_result(out, name)
    if previous is not None:
        shutil.rmtree(home / "runs" / previous, ignore_errors=True)


def _link_result(out: Path, name: str) -> None:
    """Make ``out/name`` our link through ``current`` (one ``os.replace``)."""
    path = out / name
    if _is_result_link(path):
        return
    temporary = out / INTERNAL / f"link-{secrets.token_hex(4)}"
    os.symlink(_link_target(name), temporary)
    os.replace(temporary, path)


def _switch(home: Path, run: str) -> None:
    """Point ``home/current`` at ``runs/run``: one ``os.replace`` of a link."""
    temporary = home / f"current-{secrets.token_hex(4)}"
    os.symlink(f"runs/{run}", temporary)
    os.replace(temporary, home / "current")
    _fsync(home)


__all__ = ["INTERNAL", "MANIFEST", "current_run", "folder_problem", "publish"]
