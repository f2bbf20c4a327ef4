"""The ``lowrank-ggn`` command: end to end in a subprocess, options, errors.

The JSON it writes must agree with a direct :func:`lowrank_ggn.ggn_spectrum` call on
the same model and batch (float64, ``RTOL``).
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
import torch
from torch import nn
from utils import RTOL, report_close

from lowrank_ggn import ggn_block_spectra, ggn_spectrum, per_layer_groups
from lowrank_ggn.app.cli import build_parser, main
from lowrank_ggn.app.data import digits_batch
from lowrank_ggn.app.models import build_model
from lowrank_ggn.app.problems import subsampling_indices
from lowrank_ggn.app.report import OUTPUTS, write_outputs
from lowrank_ggn.app.results_folder import INTERNAL, MANIFEST, current_run, publish
from lowrank_ggn.reference import dense_gradient

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m lowrank_ggn ARGS`` with ``tests/`` on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, "-m", "lowrank_ggn", *args],
        capture_output=True,
        check=False,
        text=True,
        env=env,
        cwd=cwd or ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def load_json(out: Path) -> dict:
    return json.loads((out / "spectrum.json").read_text())


def assert_top_vectors_match(saved: torch.Tensor, direct: torch.Tensor) -> None:
    """Eigenvectors agree up to sign (the top eigenvalues here are simple)."""
    signs = torch.sign((saved * direct).sum(1, keepdim=True))
    report_close(saved * signs, direct, name="top eigenvectors")


def test_end_to_end_matches_direct_api_call(tmp_path):
    out = tmp_path / "out"
    proc = run_cli(
        *("--model", "cnn-bn", "mlp", "--batch-size", "6", "--train-steps", "0"),
        *("--top-k", "3", "--out", str(out)),
    )
    for name in (
        "spectrum.json",
        "spectrum.png",
        "spectrum.pdf",
        "top_eigenvectors.pt",
    ):
        assert (out / name).stat().st_size > 0, f"{name} is empty"
    report = load_json(out)
    assert report["settings"]["dtype"] == "float64"
    assert list(report["models"]) == ["cnn-bn", "mlp"]
    vectors = torch.load(out / "top_eigenvectors.pt")
    X, y = digits_batch(6, seed=0, dtype=torch.float64)
    for name, entry in report["models"].items():
        model = build_model(name, seed=0, dtype=torch.float64)
        direct = ggn_spectrum(model, nn.CrossEntropyLoss(), X, y)
        saved = torch.tensor(entry["eigenvalues"], dtype=torch.float64)
        report_close(saved, direct.eigenvalues, name=f"{name} eigenvalues")
        assert entry["num_nonzero"] == direct.rank
        top = ggn_spectrum(
            model, nn.CrossEntropyLoss(), X, y, top_k=3, eigenvectors=True
        )
        assert_top_vectors_match(vectors[name], top.eigenvectors)
        check = entry["trace_check"]
        assert check["relative_difference"] <= RTOL
        assert check["max_eigenvector_residual_rel"] <= RTOL
        audit = entry["structure_audit"]
        assert audit["sample_independent"] == (name == "mlp")
        assert audit["checks"]["SIMD forward pass"] == (name == "mlp")
        gradient = dense_gradient(model, nn.CrossEntropyLoss(), X, y)
        moments = entry["gradient_moments"]
        assert (
            abs(moments["gradient_norm"] - gradient.norm().item())
            <= RTOL * gradient.norm().item()
        )
        assert moments["sample_mixing"] == (name != "mlp")
        # curvatures along the eigenvectors are the eigenvalues
        curv = torch.tensor(entry["directional"]["curvatures"], dtype=torch.float64)
        report_close(curv, top.eigenvalues, name=f"{name} e_kᵀ G e_k")
        mixing_warned = any("SampleMixingWarning" in w for w in entry["warnings"])
        assert mixing_warned == (name != "mlp")
    # the report names the path and the trace check of both models
    assert "full_batch" in proc.stdout and "per_sample" in proc.stdout
    assert proc.stdout.count("trace check") == 2
    assert (
        proc.stdout.count("SIMD forward pass") == 2
        and "per-component SNR" in proc.stdout
    )
    assert "training" not in proc.stderr  # no progress bar without training


def test_setup_entry_point(tmp_path):
    out = tmp_path / "out"
    proc = run_cli(
        "--setup", "cli_setup_tiny:make", "--dtype", "float64", "--out", str(out)
    )
    report = load_json(out)
    ((name, entry),) = report["models"].items()
    assert name == "cli_setup_tiny:make"
    sys.path.insert(0, str(TESTS))
    try:
        from cli_setup_tiny import make
    finally:
        sys.path.pop(0)
    model, loss, (X, y) = make()
    model, X = model.double(), X.double()
    direct = ggn_spectrum(model, loss, X, y)
    report_close(
        torch.tensor(entry["eigenvalues"], dtype=torch.float64),
        direct.eigenvalues,
        name="setup eigenvalues",
    )
    assert entry["path"]["name"] == "full_batch"  # BatchNorm1d in train mode
    assert "from --setup cli_setup_tiny:make" in proc.stdout


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--setup", "cli_setup_tiny"], "MODULE:FUNCTION"),
        (["--setup", "cli_setup_tiny:make", "--model", "cnn"], "replaces --model"),
        (["--setup", "cli_setup_tiny:make", "--train-steps", "3"], "train your model"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--model", "vgg"], "invalid choice"),
        (["--batch-size", "100000"], "--batch-size must be <= 1797"),
        (["--device", "bogus"], "--device 'bogus' is not usable here"),
        (["--device", "cuda:7"], "--device 'cuda:7' is not usable here"),
        (["--subsampling", "4", "--subsampling", "0,1"], "more than once"),
        (["--subsampling", "a,b"], "comma-separated list"),
        (["--subsampling", "500"], "must lie in [1, 64]"),
    ],
)
def test_bad_options_exit_with_a_message(argv, match, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("no_such_module_xyz:make", "cannot import module 'no_such_module_xyz'"),
        ("cli_setup_tiny:missing", "has no function 'missing'"),
        ("cli_setup_tiny:not_a_problem", r"must return \(model, loss_func"),
    ],
)
def test_bad_setup_exits_with_a_message(spec, match, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    with pytest.raises(SystemExit, match=match):
        main(["--setup", spec, "--out", str(tmp_path)])


def test_help_documents_every_option_with_an_example():
    proc = run_cli("--help")
    parser = build_parser()
    options = [
        s for a in parser._actions for s in a.option_strings if s.startswith("--")
    ]
    assert len(options) >= 14
    for option in options:
        assert option in proc.stdout, f"{option} missing from --help"
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert "e.g." in action.help, f"{action.option_strings} has no example"
    assert "examples:" in proc.stdout and "--setup mysetup:make" in proc.stdout


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "lowrank-ggn"
    if not script.exists():
        pytest.skip("lowrank-ggn not installed next to this interpreter")
    proc = subprocess.run(
        [str(script), "--help"], capture_output=True, check=True, text=True
    )
    assert proc.returncode == 0 and "usage: lowrank-ggn" in proc.stdout


def test_training_is_seeded_and_reported(tmp_path, capsys):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        argv = ["--model", "mlp", "--batch-size", "4", "--train-steps", "3"]
        assert main([*argv, "--out", str(out)]) == 0
    a, b = (load_json(o)["models"]["mlp"] for o in outs)
    assert a["eigenvalues"] == b["eigenvalues"]
    assert a["training"]["steps"] == 3
    assert "trained for 3 SGD steps" in capsys.readouterr().out
    init = ggn_spectrum(
        build_model("mlp", 0, torch.float64),
        nn.CrossEntropyLoss(),
        *digits_batch(4, 0, torch.float64),
    )
    assert a["eigenvalues"] != init.eigenvalues.tolist()  # training moved θ


def test_mse_loss_uses_one_hot_targets(tmp_path):
    out = tmp_path / "out"
    main(["--model", "mlp", "--loss", "mse", "--batch-size", "3", "--train-steps", "0",
          "--out", str(out)])  # fmt: skip
    X, labels = digits_batch(3, 0, torch.float64)
    Y = nn.functional.one_hot(labels, 10).double()
    direct = ggn_spectrum(build_model("mlp", 0, torch.float64), nn.MSELoss(), X, Y)
    saved = torch.tensor(
        load_json(out)["models"]["mlp"]["eigenvalues"], dtype=torch.float64
    )
    report_close(saved, direct.eigenvalues, name="MSE eigenvalues")


def test_subsampling_indices():
    assert subsampling_indices(None, 8, 0) is None
    assert subsampling_indices("0,3,5", 8, 0) == [0, 3, 5]
    assert subsampling_indices("3,", 8, 0) == [3]
    drawn = subsampling_indices("4", 8, 0)
    assert len(set(drawn)) == 4 and drawn == subsampling_indices("4", 8, 0)
    for bad in ("9", "0", "1,8", "a,b", "x"):
        with pytest.raises(SystemExit, match="--subsampling"):
            subsampling_indices(bad, 8, 0)


def test_layer_groups_cover_every_parameter_once():
    model = build_model("resnet-bn")
    groups = per_layer_groups(model)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert [g["name"] for g in groups][:2] == ["0", "1.bn1"]


# --- options that map to the approximation keywords of ggn_spectrum -------------
def _tiny(tmp_path, *extra: str) -> dict:
    argv = ["--model", "cnn-bn", "--batch-size", "5", "--train-steps", "0"]
    assert main([*argv, *extra, "--out", str(tmp_path)]) == 0
    return load_json(tmp_path)["models"]["cnn-bn"]


def _tiny_problem():
    X, y = digits_batch(5, 0, torch.float64)
    return build_model("cnn-bn", 0, torch.float64), nn.CrossEntropyLoss(), X, y


def test_mc_samples_option(tmp_path):
    entry = _tiny(tmp_path, "--mc-samples", "2", "--seed", "0")
    model, loss, X, y = _tiny_problem()
    direct = ggn_spectrum(
        model, loss, X, y, mc_samples=2, generator=torch.Generator().manual_seed(0)
    )
    report_close(
        torch.tensor(entry["eigenvalues"], dtype=torch.float64), direct.eigenvalues
    )
    exact = ggn_spectrum(model, loss, X, y)
    report_close(
        torch.tensor(entry["exact_eigenvalues"], dtype=torch.float64), exact.eigenvalues
    )
    assert (tmp_path / "approximation.png").stat().st_size > 0


def test_subsampling_option(tmp_path):
    entry = _tiny(tmp_path, "--subsampling", "0,2,3")
    model, loss, X, y = _tiny_problem()
    direct = ggn_spectrum(model, loss, X, y, subsampling=[0, 2, 3])
    report_close(
        torch.tensor(entry["eigenvalues"], dtype=torch.float64), direct.eigenvalues
    )
    assert entry["approximation"] == {"subsampling": [0, 2, 3]}


def test_per_layer_option(tmp_path):
    entry = _tiny(tmp_path, "--per-layer")
    model, loss, X, y = _tiny_problem()
    groups = per_layer_groups(model)
    direct = ggn_block_spectra(
        model, loss, X, y, [{"params": g["params"]} for g in groups]
    )
    assert list(entry["blocks"]) == [g["name"] for g in groups]
    for (name, block), res in zip(entry["blocks"].items(), direct):
        report_close(
            torch.tensor(block["eigenvalues"], dtype=torch.float64),
            res.eigenvalues,
            name=name,
        )
    # the diagonal blocks keep the trace
    total = sum(sum(b["eigenvalues"]) for b in entry["blocks"].values())
    assert abs(total - sum(entry["eigenvalues"])) <= RTOL * sum(entry["eigenvalues"])
    assert (tmp_path / "per_layer.png").stat().st_size > 0


def test_approximation_options_are_wired_as_keyword_arguments(tmp_path, monkeypatch, capsys):
    """A recording GGN checks exactly which keyword arguments the CLI passes."""
    import lowrank_ggn.app.analysis as analysis
    from lowrank_ggn import GGN

    calls, block_groups = [], []

    class Recording(GGN):
        def __init__(self, model, loss_func, inputs, targets, **kwargs):
            calls.append(kwargs)
            super().__init__(model, loss_func, inputs, targets, **kwargs)

        def block_spectra(self, param_groups, *args, **kwargs):
            block_groups.append(param_groups)
            return super().block_spectra(param_groups, *args, **kwargs)

    monkeypatch.setattr(analysis, "GGN", Recording)
    argv = ["--model", "mlp", "--batch-size", "4", "--train-steps", "0", "--seed", "5"]
    extra = ["--mc-samples", "3", "--subsampling", "1,2", "--per-layer"]
    assert main([*argv, *extra, "--out", str(tmp_path)]) == 0
    approx = [c for c in calls if c.get("mc_samples") is not None]
    assert len(approx) == 1  # one object: spectrum, per-layer blocks, moments
    for c in approx:
        assert c["mc_samples"] == 3 and c["subsampling"] == [1, 2]
        assert isinstance(c["generator"], torch.Generator)
        assert c["generator"].initial_seed() == 5
    assert [c for c in calls if c.get("mc_samples") is None] == [{}]  # exact spectrum
    (groups,) = block_groups
    model = build_model("mlp", 5)
    expected = [[p.shape for p in g["params"]] for g in per_layer_groups(model)]
    assert [[p.shape for p in g["params"]] for g in groups] == expected
    assert all(set(g) == {"params"} for g in groups)
    entry = load_json(tmp_path)["models"]["mlp"]
    assert entry["approximation"] == {"mc_samples": 3, "subsampling": [1, 2]}
    assert list(entry["blocks"]) == ["1", "3"]
    for name in ("approximation.png", "per_layer.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "eigenvalues are estimates" in capsys.readouterr().out


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
