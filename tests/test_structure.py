"""Structure audit: flags, named modules, rendering, and what never raises."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from cases import DTYPE, MIXING_CASES
from torch import nn
from utils import assert_state_equal, state_of

from lowrank_ggn import SampleMixingWarning, audit_structure, gradient_moments
from lowrank_ggn.core.model import FunctionalModel
from lowrank_ggn.diagnostics import audit, probe, structure_report
from lowrank_ggn.diagnostics import warnings as mixing_warnings
from lowrank_ggn.diagnostics.probe import (
    locate_mixing_modules,
    probe_sample_mixing,
    scan_and_probe,
)
from lowrank_ggn.diagnostics.warnings import (
    per_component_explanation,
    warn_sample_mixing,
)

#: The modules that mix samples in each mixing case (qualified names).
EXPECTED_MIXING = {
    "bn1d-train-ce": ("1",),
    "bn1d-train-mse-sum": ("1",),
    "bn1d-train-bce": ("1",),
    "bn2d-train-ce": ("1",),
    "resnet-bn-train-ce": ("1.bn",),
    "depthwise-bn-train-ce": ("3",),
    "fused-bn-act-train-ce": ("1", "3"),
    "inplace-relu-train-ce": ("2.bn1", "2.bn2"),
}
#: The input probe flags a module whose input is still per-sample: on a path with two
#: BatchNorm layers in a row, the first.
EXPECTED_LOCATED = {
    **EXPECTED_MIXING,
    "fused-bn-act-train-ce": ("1",),
    "inplace-relu-train-ce": ("2.bn1",),
}


def test_expected_mixing_covers_the_case_list():
    assert set(EXPECTED_MIXING) == {c.name for c in MIXING_CASES}


def test_audit_flags_each_case(case):
    model, loss, X, y = case.make()
    before = state_of(model)
    report = audit_structure(model, loss, X, y)
    assert_state_equal(before, model)
    expected = EXPECTED_MIXING.get(case.name, ())
    assert report.sample_independent == (not case.mixing)
    assert report.mixing_modules == expected
    # the input probe localises the same modules without the module scan
    assert report.located_modules == EXPECTED_LOCATED.get(case.name, ())
    assert report.deterministic and report.random_modules == ()
    assert report.check("SIMD forward pass").holds == (not case.mixing)
    for name in (
        "model/loss split",
        "loss reduces per-sample terms",
        "loss is per-sample + reduction",
        "deterministic forward pass",
    ):
        assert report.check(name).holds, report.check(name)
    assert report.path.name == ("full_batch" if case.mixing else "per_sample")
    assert ("not the contribution of sample n" in report.explanation) == case.mixing


def _row(text: str, first: str) -> str:
    """The table row (first line) that starts with ``first``."""
    return next(line for line in text.splitlines() if line.startswith(first))


@pytest.mark.parametrize("mixing", [True, False])
def test_str_renders_structure_and_quantity_tables(mixing):
    case = MIXING_CASES[0]
    model, loss, X, y = case.make()
    if not mixing:
        model.eval()
    text = str(audit_structure(model, loss, X, y))
    assert "structure" in text and "holds?" in text and "consequence" in text
    assert _row(text, "model/loss split").split()[2] == "yes"
    simd = _row(text, "SIMD forward pass")
    assert simd.split()[3] == ("NO" if mixing else "yes")
    per_sample = _row(text, "per-sample gradients")
    assert ("not defined" in per_sample) == mixing
    assert "defined, they sum to the batch gradient" in _row(
        text, "per-component gradients"
    )
    assert "valid" in _row(text, "GGN square-root factorisation")
    assert ("not a sampling variance" in _row(text, "gradient variance")) == mixing
    assert "how checked:" in text and "input probe" in text


class BatchCentering(nn.Module):
    """``x − mean_batch(x)``: mixes samples without being a BatchNorm."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True)


class CenteredInForward(nn.Module):
    """Mixes samples in its own ``forward``, outside any submodule."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 5)
        self.outer = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.inner(x))
        return self.outer(h - h.mean(0))


class BatchSizeScaled(nn.Module):
    """``f(x_n) / N``: no input leaks into other samples, but ``F_n`` depends on N."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x) / x.shape[0]


def _problem(model):
    torch.manual_seed(3)
    model = model.to(DTYPE)
    return (
        model,
        nn.CrossEntropyLoss(),
        torch.randn(6, 4, dtype=DTYPE),
        torch.arange(6) % 3,
    )


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (
            nn.Sequential(
                nn.Linear(4, 5), BatchCentering(), nn.Tanh(), nn.Linear(5, 3)
            ),
            ("1",),
        ),
        (CenteredInForward(), ("<root>",)),
        (BatchSizeScaled(), ()),
    ],
    ids=["module", "root-forward", "batch-size"],
)
def test_mixing_without_batchnorm_is_found_numerically(model, expected):
    model, loss, X, y = _problem(model)
    before = state_of(model)
    report = audit_structure(model, loss, X, y)
    assert_state_equal(before, model)
    assert not report.sample_independent
    assert report.mixing_modules == expected == report.located_modules
    assert report.path.name == "full_batch"
    assert (
        "module scan: no module uses batch statistics"
        in report.check("SIMD forward pass").how
    )


def test_a_loss_that_couples_samples_is_reported_not_raised():
    """The audit reports what a computation would refuse: here the loss structure."""
    model, _, X, y = _problem(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))

    def coupled(out, t):  # cross-entropy times the batch mean of the outputs
        return nn.functional.cross_entropy(out, t) * out.mean()

    def per_sample_sum(out, t):
        return nn.functional.cross_entropy(out, t, reduction="sum")

    before = state_of(model)
    report = audit_structure(model, coupled, X, y)
    assert_state_equal(before, model)
    assert not report.check("loss is per-sample + reduction").holds
    assert report.check("SIMD forward pass").holds
    with pytest.raises(ValueError, match="is not a per-sample loss plus reduction"):
        gradient_moments(model, coupled, X, y)
    ok = audit_structure(model, per_sample_sum, X, y)  # a function: ρ = 1 found
    assert ok.check("loss is per-sample + reduction").holds
    assert "ρ = 1," in str(ok) and "found numerically" in str(ok)


def test_dropout_is_reported_not_raised():
    model, loss, X, y = _problem(
        nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Tanh(), nn.Linear(5, 3))
    )
    before = state_of(model)
    report = audit_structure(model, loss, X, y)
    assert_state_equal(before, model)  # dropout is back in train mode
    assert model[1].training
    assert not report.deterministic
    assert report.random_modules == ("1",)
    assert report.sample_independent  # dropout is elementwise: no mixing
    text = str(report)
    assert "active dropout in 1" in text
    assert _row(text, "deterministic forward pass").split()[3] == "NO"
    assert "random while module(s) 1 are active" in _row(text, "all of the above")
    assert "call .eval() on module(s) 1" in text
    with pytest.raises(ValueError, match="not deterministic"):
        gradient_moments(model, loss, X, y)
    assert_state_equal(before, model)


def test_integer_inputs_skip_the_input_probe():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 3), nn.Flatten(), nn.Linear(6, 2)).to(DTYPE)
    X, y = torch.randint(0, 7, (5, 2)), torch.randint(0, 2, (5,))
    report = audit_structure(model, nn.CrossEntropyLoss(), X, y)
    assert report.sample_independent
    assert "input probe: not applicable" in report.check("SIMD forward pass").how


def test_check_names_the_available_structures():
    model, loss, X, y = MIXING_CASES[0].make()
    with pytest.raises(KeyError, match="no structure 'SIMD'"):
        audit_structure(model, loss, X, y).check("SIMD")


def test_errors_are_early_and_clear():
    model, loss, X, y = MIXING_CASES[0].make()
    before = state_of(model)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        audit_structure("model", loss, X, y)
    with pytest.raises(NotImplementedError, match="reduction='none' is not supported"):
        audit_structure(model, nn.CrossEntropyLoss(reduction="none"), X, y)
    with pytest.raises(ValueError, match="at least 2 samples"):
        audit_structure(model, loss, X[:1], y[:1])
    with pytest.raises(ValueError, match="batch size"):
        audit_structure(model, loss, X, y[:2])
    with pytest.raises(ValueError, match="dtype"):
        audit_structure(model, loss, X.float(), y)
    assert_state_equal(before, model)


def test_each_name_lives_in_its_module():
    for module, names in (
        (mixing_warnings, ("SampleMixingWarning", "per_component_explanation")),
        (mixing_warnings, ("warn_sample_mixing",)),
        (probe, ("InputProbe", "probe_sample_mixing", "locate_mixing_modules")),
        (structure_report, ("StructureCheck", "StructureReport")),
        (audit, ("audit_structure",)),
    ):
        for name in names:
            assert getattr(module, name).__module__ == module.__name__, name
    # no re-exports: audit imports only what the report itself uses
    for name in ("SampleMixingWarning", "warn_sample_mixing", "locate_mixing_modules"):
        assert not hasattr(audit, name), name


def test_locate_mixing_modules_scan_then_probe():
    model, _, X, _ = MIXING_CASES[0].make()
    fmodel = FunctionalModel(model, [p for p in model.parameters() if p.requires_grad])
    assert locate_mixing_modules(fmodel, X) == EXPECTED_MIXING[MIXING_CASES[0].name]
    model, _, X, _ = _problem(
        nn.Sequential(nn.Linear(4, 5), BatchCentering(), nn.Tanh(), nn.Linear(5, 3))
    )
    fmodel = FunctionalModel(model, list(model.parameters()))
    assert locate_mixing_modules(fmodel, X) == ("1",)
    probe = probe_sample_mixing(fmodel, X)
    assert probe.applicable and probe.leaks and probe.modules == ("1",)
    assert "first at 1" in str(probe)


class NoForwardAD(nn.Module):
    """Sample-wise, but its op refuses forward-mode AD."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        if fwAD.unpack_dual(x).tangent is not None:
            raise RuntimeError("no forward-mode AD here\nsecond line")
        return self.lin(x)


def test_failing_input_probe_reports_why_and_scan_remains():
    model, _, X, _ = _problem(NoForwardAD())
    fmodel = FunctionalModel(model, list(model.parameters()))
    scan, probe = scan_and_probe(fmodel, X)
    assert scan == () and not probe.applicable and probe.modules == ()
    assert probe.reason == "RuntimeError: no forward-mode AD here"
    assert str(probe) == f"input probe: not applicable ({probe.reason})"
    assert locate_mixing_modules(fmodel, X) == ()


def test_audit_of_a_single_sample():
    model, loss, X, y = _problem(nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3)))
    report = audit_structure(model, loss, X[:1], y[:1])
    assert report.sample_independent
    assert all(c.holds for c in report.checks)
    assert "ρ = 1," in report.summary


def test_warning_texts():
    assert "per-sample gradient" in per_component_explanation(False)
    text = per_component_explanation(True, ("1.bn", "3"))
    assert "module(s) 1.bn, 3 mix samples" in text
    assert "no module named" in per_component_explanation(True)
    with pytest.warns(SampleMixingWarning, match=r"f returned x: module\(s\) 1 mix"):
        warn_sample_mixing(("1",), "f returned x", "the batch gradient", stacklevel=2)
    with pytest.warns(SampleMixingWarning, match="the forward pass mixes samples"):
        warn_sample_mixing((), "f returned x", "the batch gradient", stacklevel=2)


@pytest.mark.parametrize(
    "call",
    ["method_moments", "gradient_moments", "method_directional", "directional"],
)
def test_mixing_warning_points_at_the_callers_line(call):
    """Method or one-call function: the warning names this file, not the package."""
    from lowrank_ggn import GGN, directional_derivatives

    model, loss, X, y = _problem(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5)))
    ggn = GGN(model, loss, X, y)
    D = sum(p.numel() for p in model.parameters())
    direction = torch.ones(1, D, dtype=DTYPE)
    calls = {
        "method_moments": ggn.moments,
        "gradient_moments": lambda: gradient_moments(model, loss, X, y),
        "method_directional": lambda: ggn.directional_derivatives(direction),
        "directional": lambda: directional_derivatives(model, loss, X, y, direction),
    }
    with pytest.warns(SampleMixingWarning) as caught:
        calls[call]()
    assert [w.filename for w in caught] == [__file__]
