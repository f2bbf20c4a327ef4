"""Comparison helpers that print the mismatching entries before failing."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import torch
from torch import Tensor, nn


def batch_of(inputs) -> int:
    """``N`` of a case's inputs (a tensor, tuple or dict)."""
    from lowrank_ggn.core.inputs import batch_size_of

    return batch_size_of(inputs)


def take(inputs, index):
    """The samples ``index`` of a case's inputs, in their container."""
    from lowrank_ggn.core.inputs import as_inputs

    return as_inputs(inputs).select(index).raw


def reduction_of(loss) -> str:
    """``'mean'`` or ``'sum'``: ``ρ = 1/N`` or ``1`` in ``L = ρ Σ_n ℓ_n``.

    A loss module's ``reduction`` (``'batchmean'`` is a mean); a plain function of
    the case list declares what lowrank_ggn must find numerically as
    ``expected_reduction``.
    """
    reduction = getattr(loss, "reduction", None) or loss.expected_reduction
    return "mean" if reduction == "batchmean" else reduction


def rho_of(loss, N: int) -> float:
    """``ρ`` for a batch of ``N``: ``1/N`` for a mean, 1 for a sum."""
    return 1.0 / N if reduction_of(loss) == "mean" else 1.0


def loss_value(loss, outputs: Tensor, targets) -> Tensor:
    """``loss(outputs, targets)``, a tuple of targets passed positionally."""
    return (
        loss(outputs, *targets)
        if isinstance(targets, tuple)
        else loss(outputs, targets)
    )


def take_targets(targets, index):
    """The samples ``index`` of a case's targets (a tensor or a tuple)."""
    from lowrank_ggn.core.inputs import ModelInputs

    if isinstance(targets, Tensor):
        return targets[torch.as_tensor(index)]
    return ModelInputs(targets, name="targets").select(index).raw


def cast(inputs, dtype: torch.dtype):
    """A case's inputs (or targets) with every floating entry cast to ``dtype``."""
    from lowrank_ggn.core.inputs import as_inputs

    if isinstance(inputs, Tensor) and not inputs.is_floating_point():
        return inputs  # class indices, token ids
    return as_inputs(inputs).to(dtype).raw


def call(model: nn.Module, inputs) -> Tensor:
    """``model(X)``, ``model(*X)`` or ``model(**X)``; the tensor the loss takes.

    Tensors as returned; the ``"logits"`` of a ``ModelOutput``-like return value
    (``output=None``'s rule, :mod:`lowrank_ggn.core.outputs`).
    """
    from lowrank_ggn.core.inputs import as_inputs
    from lowrank_ggn.core.outputs import select_output

    args, kwargs = as_inputs(inputs).call_args()
    return select_output(model(*args, **kwargs))


#: Tolerance of float64 results against the dense reference, relative to the
#: largest eigenvalue / the largest entry.
RTOL = 1e-8


def report_close(
    actual: Tensor, expected: Tensor, rtol: float = RTOL, name: str = "value"
) -> None:
    """Assert ``|actual − expected| ≤ rtol · max|expected|`` entrywise, with a report."""
    assert actual.shape == expected.shape, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    scale = max(expected.abs().max().item(), 1e-300) if expected.numel() else 1.0
    err = (actual - expected).abs()
    bad = err > rtol * scale
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        lines = [
            f"  at {i}: got {actual[tuple(i)].item():.6e}, expected {expected[tuple(i)].item():.6e}"
            for i in idx
        ]
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} entries off by more than "
            f"{rtol:g}·{scale:.3e} (max err {err.max().item():.3e}):\n"
            + "\n".join(lines)
        )


def assert_spectrum_matches(evals: Tensor, G: Tensor, rtol: float = RTOL) -> None:
    """``evals`` are the nonzero eigenvalues of ``G``; the rest of ``G``'s are ~0."""
    dense = torch.linalg.eigvalsh(G).flip(0)
    r = evals.numel()
    scale = dense[0].abs().item()
    report_close(evals, dense[:r], rtol, "eigenvalues")
    rest = dense[r:]
    if rest.numel():
        assert rest.abs().max() <= 1e3 * rtol * scale, (
            f"dense GGN has an eigenvalue {rest.abs().max().item():.3e} that the engine "
            f"dropped as zero (λ_max = {scale:.3e})"
        )


def state_of(model: nn.Module) -> dict:
    """Everything the toolkit promises to keep, deep-copied."""
    return {
        "state": copy.deepcopy(model.state_dict(keep_vars=False)),
        "modes": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [
            None if p.grad is None else p.grad.clone() for p in model.parameters()
        ],
        "grad_ids": [id(p.grad) for p in model.parameters()],
        "param_ids": [id(p) for p in model.parameters()],
    }


def assert_state_equal(before: dict, model: nn.Module) -> None:
    """The model's state is bitwise what :func:`state_of` recorded."""
    after = state_of(model)
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), f"model entry {k} changed"
    assert before["modes"] == after["modes"], "train/eval mode changed"
    assert before["requires_grad"] == after["requires_grad"], "requires_grad changed"
    assert before["param_ids"] == after["param_ids"], "parameter objects replaced"
    assert before["grad_ids"] == after["grad_ids"], ".grad objects replaced"
    for g0, g1 in zip(before["grads"], after["grads"]):
        assert (g0 is None) == (g1 is None) and (g0 is None or torch.equal(g0, g1)), (
            ".grad changed"
        )


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_quick_benchmark(script: str, tmp_path: Path, *args: str) -> Path:
    """Run ``benchmarks/<script> --quick --out <tmp>/results *args``; return that folder.

    The script runs from another working directory (it must not depend on it) and
    must exit with 0; its stderr is shown otherwise.
    """
    out = tmp_path / "results"
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    cmd = [
        sys.executable,
        str(BENCHMARKS / script),
        "--quick",
        "--out",
        str(out),
        *args,
    ]
    proc = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def budget_above_fixed(model, loss, X, y, extra: int, **options) -> int:
    """A ``memory_budget`` that fits a dense spectrum call's fixed parts and the
    ``streamed`` minimum (:mod:`lowrank_ggn.core.footprint`) plus ``extra`` bytes:
    what the engine's strategy then gets for its own blocks.
    """
    from lowrank_ggn import GGN
    from lowrank_ggn.core.footprint import streamed_minimum

    ggn = GGN(model, loss, X, y, memory_budget=2**40, **options)
    with ggn._observing():
        ggn._fit(grams=1, eigh=True)
    minimum = sum(b for b, _ in streamed_minimum(ggn._budget.shape).values())
    return int(ggn._budget.last.total + minimum + extra)
