"""The ``lowrank-ggn`` command: end to end in a subprocess, options, errors.

The JSON it writes must agree with a direct :func:`lowrank_ggn.ggn_spectrum` call on
the same model and batch (float64, ``RTOL``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
