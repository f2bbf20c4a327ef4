r"""Which structure of the loss holds for a model, batch and loss, and what follows.

The mini-batch loss ``L(F(X, θ), Y)`` can carry four structures, from the weakest to
the strongest (Dangel, *Structural implications of batch normalization*, 2021; the
ViViT paper https://arxiv.org/abs/2106.02624 assumes all of them):

1. **model/loss split**: ``L`` sees the data only through the outputs ``F(X, θ)``;
2. **reduction** (loss): ``L = R(L̂_1, …, L̂_N)``, here ``L = ρ Σ_n ℓ_n`` (``ρ = 1/N`` or 1);
3. **SIMD + reduction** (loss): ``ℓ_n = ℓ(F_n, y_n)`` depends on sample ``n`` only, so
   ``∇²_F L`` is block diagonal;
4. **SIMD forward pass**: ``F_n(X, θ) = f(x_n, θ)``.

With all four, ``J_θF_nᵀ ∂L/∂F_n`` is ρ times the *per-sample gradient*
``∇_θ ℓ(f(x_n, θ), y_n)``; without (4), e.g. BatchNorm in train mode, it is a
*per-component gradient* (see :mod:`lowrank_ggn.diagnostics.warnings`), while
``G = V Vᵀ`` needs 1–3 only. (4) holds if three checks pass: the module scan and the
input probe of :mod:`lowrank_ggn.diagnostics.probe`, which also name the modules that
mix samples, and the parameter probe of :func:`lowrank_ggn.core.paths.choose_path`
(one-sample evaluation reproduces the batch outputs and a random vector-Jacobian
product). (2) and (3) are checked numerically for every loss
(:func:`lowrank_ggn.core.losses.autodiff.structure_deviations`).

Active dropout (a random loss, which the computations of lowrank_ggn refuse) is
reported; the structural probes run with dropout in eval mode, as it mixes no samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lowrank_ggn.core.inputs import as_inputs
from lowrank_ggn.core.loss_targets import check_targets
from lowrank_ggn.core.losses.autodiff import (
    AutodiffLoss,
    loss_name,
    sample_weight_of,
    structure_deviations,
)
from lowrank_ggn.core.losses.registry import resolve_loss
from lowrank_ggn.core.model import FunctionalModel, labelled_module
from lowrank_ggn.core.outputs import OutputSpec, check_output
from lowrank_ggn.core.paths import (
    EnginePath,
    active_dropout_modules,
    choose_path,
)
from lowrank_ggn.core.state import model_preserved
from lowrank_ggn.core.tolerances import roundoff_rtol
from lowrank_ggn.core.validation import (
    check_call,
    check_model,
    check_outputs,
    check_params_finite,
)
from lowrank_ggn.diagnostics.probe import InputProbe, scan_and_probe
from lowrank_ggn.diagnostics.structure_report import StructureCheck, StructureReport
from lowrank_ggn.diagnostics.warnings import per_component_explanation


def _rel_err(a: Tensor, b: Tensor) -> float:
    """``max |a − b|`` relative to the larger of ``max |a|`` and ``max |b|``."""
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-300)
    return (a - b).abs().max().item() / scale


def _loss_checks(
    loss_func: nn.Module, outputs: Tensor, targets: object
) -> tuple[StructureCheck, StructureCheck, StructureCheck, float]:
    """The loss structures, weakest first: split, reduction, SIMD; and ``ρ``.

    Checked numerically for every loss, closed forms included
    (:func:`lowrank_ggn.core.losses.autodiff.structure_deviations`): ``ℓ_n`` is the
    loss of sample ``n`` alone, and the batch loss, its gradient and a random
    Hessian-vector product must equal ``ρ`` times the per-sample ones.
    """
    split = StructureCheck(
        "model/loss split",
        True,
        "by construction: the loss is a separate module that sees the data only "
        "through the outputs F(X, θ) and the targets",
        "the GGN Jᵀ (∇²_F L) J is defined",
    )
    tol = roundoff_rtol(outputs.dtype)
    N, name = outputs.shape[0], _loss_label(loss_func)
    wrapped = loss_func if isinstance(loss_func, AutodiffLoss) else AutodiffLoss(loss_func)
    errors = structure_deviations(wrapped, outputs, targets)
    reduction = min(errors, key=lambda r: max(errors[r]))  # the better-fitting ρ
    value_err, grad_err, hvp_err = errors[reduction]
    rho = sample_weight_of(reduction, N)
    known = "by type" if wrapped.reduction_known else "found numerically"
    reduces = StructureCheck(
        "loss reduces per-sample terms",
        value_err <= tol,
        f"{known}: {name} is a scaled sum, ρ = {_fmt_rho(rho)}; numerically: the "
        f"batch loss equals ρ Σ_n ℓ_n with ℓ_n the loss of sample n alone "
        f"(relative deviation {value_err:.1e})",
        "L = ρ Σ_n ℓ_n: the batch gradient is a sum of N per-component terms",
    )
    simd = StructureCheck(
        "loss is per-sample + reduction",
        grad_err <= tol and hvp_err <= tol,
        f"numerically: ∂L/∂F_n = ρ ∂ℓ_n/∂F_n (relative deviation {grad_err:.1e}) "
        f"and a random Hessian-vector product of L equals ρ times the per-sample "
        f"ones (relative deviation {hvp_err:.1e})",
        "∇²_F L is block diagonal: G = ρ Σ_n J_nᵀ ∇²ℓ_n J_n = V Vᵀ with rank ≤ N·C; "
        "the GGN square-root factorisation is valid",
    )
    return split, reduces, simd, rho


def _loss_label(loss_func: object) -> str:
    """E.g. ``CrossEntropyLoss(reduction='mean')`` or a function's name."""
    return loss_name(loss_func)


def _fmt_rho(rho: float) -> str:
    """``1``, ``1/N`` or the number."""
    inv = round(1.0 / rho)
    exact = math.isclose(1.0 / rho, inv)
    return ("1" if inv == 1 else f"1/{inv}") if exact else f"{rho:.3g}"


def audit_structure(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: object,
    targets: object,
    *,
    params: Sequence[Tensor] | None = None,
    batch_size: int | None = None,
    output: OutputSpec = None,
) -> StructureReport:
    r"""Report which structures of the loss hold, and which quantities are defined.

    Checks the four structures of the module docstring and determinism for this
    model, batch and loss. Active dropout is reported, not raised.

    Args:
        model: Module mapping ``inputs`` to ``[N, *out]``; never changed.
        loss_func: The loss (see :class:`lowrank_ggn.GGN`).
        inputs: The batch: a tensor, tuple or dict (:mod:`lowrank_ggn.core.inputs`).
        targets: Its targets.
        params: Parameters of ``model``; default: all that require grad.
        batch_size: ``N`` when the first input entry is not the batched one.
        output: Which tensor of the model's return value the loss takes
            (:mod:`lowrank_ggn.core.outputs`).

    Returns:
        A :class:`StructureReport`; ``print(report)`` shows the tables.

    Example:
        >>> import torch
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
        ...                             torch.nn.ReLU(), torch.nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
        >>> report = audit_structure(model, torch.nn.CrossEntropyLoss(), X, y)
        >>> report.sample_independent, report.mixing_modules
        (False, ('1',))
        >>> assert "per-sample gradients" in str(report)
        >>> model.eval()  # doctest: +ELLIPSIS
        Sequential(...)
        >>> assert audit_structure(model, torch.nn.CrossEntropyLoss(), X, y).sample_independent

    """
    check_model(model)
    check_output(output)
    with model_preserved(model):
        selected = check_call(model, loss_func, inputs, params, targets, batch_size)
        inputs = as_inputs(inputs, batch_size)
        fmodel = FunctionalModel(model, selected, output)
        check_params_finite(fmodel.params, fmodel.names)
        outputs = fmodel.evaluate(inputs)
        check_outputs(outputs, inputs.size)
        loss_func = resolve_loss(loss_func)
        check_targets(loss_func, outputs, targets, structure=False)
        again = fmodel.evaluate(inputs)
        dropout = tuple(active_dropout_modules(model))
        deterministic = not dropout and torch.equal(again, outputs)
        for name in dropout:  # probes below run without dropout (restored on exit)
            labelled_module(model, name).eval()
        if dropout:
            outputs = fmodel.evaluate(inputs)
        scan, probe = scan_and_probe(fmodel, inputs)
        path = choose_path(fmodel, inputs, outputs)
        mixing = scan + tuple(n for n in probe.modules if n not in scan)
        forward = _forward_check(scan, probe, path, mixing)
        independent = forward.holds
        *loss, rho_value = _loss_checks(loss_func, outputs, targets)
        checks = (*loss, forward, _determinism_check(dropout, deterministic))
        loss_ok = all(c.holds for c in loss)
        N, C = outputs.shape[0], math.prod(outputs.shape[1:])
        rho = _fmt_rho(rho_value)
        summary = (
            f"Structure audit: N = {N} samples, {C} outputs per sample, "
            f"{_loss_label(loss_func)}, ρ = {rho}, D = {fmodel.num_params} parameters."
        )
        return StructureReport(
            checks=checks,
            quantities=_quantities(
                independent, mixing, loss_ok, dropout, deterministic, path
            ),
            sample_independent=independent,
            mixing_modules=mixing,
            deterministic=deterministic,
            random_modules=dropout,
            path=path,
            explanation=per_component_explanation(not independent, mixing),
            located_modules=probe.modules,
            summary=summary,
        )


def _forward_check(
    scan: tuple[str, ...], probe: InputProbe, path: EnginePath, mixing: tuple[str, ...]
) -> StructureCheck:
    """SIMD forward pass: module scan, input probe and parameter probe all agree."""
    scan_text = (
        f"module scan: {', '.join(scan)} normalise with batch statistics"
        if scan
        else "module scan: no module uses batch statistics"
    )
    param_text = "parameter probe: " + (
        "per-sample evaluation reproduces the batch outputs and a random parameter-JVP"
        if not path.sample_mixing
        else path.reason
    )
    independent = not scan and not probe.leaks and not path.sample_mixing
    through = f" through {', '.join(mixing)}" if mixing else ""
    consequence = (
        "F_n = f(x_n, θ): per-sample gradients exist; the engine uses the cheap "
        "per-sample path"
        if independent
        else f"F_n depends on every input{through}: per-sample gradients do not "
        "exist, only per-component ones; the engine differentiates the whole batch "
        "(engine_report.strategy: bn_split, columns or streamed)"
    )
    how = f"{scan_text}; {probe}; {param_text}"
    return StructureCheck("SIMD forward pass", independent, how, consequence)


def _determinism_check(dropout: tuple[str, ...], deterministic: bool) -> StructureCheck:
    """Active dropout, or two forward passes that differ."""
    if deterministic:
        how = "no active dropout, and two forward passes agree bitwise"
        consequence = "GGN and gradients are functions of θ"
    else:
        how = (
            f"active dropout in {', '.join(dropout)}"
            if dropout
            else "two forward passes on the same inputs differ"
        ) + " (the other probes ran with dropout in eval mode)"
        consequence = (
            "GGN and gradients are random, not functions of θ: lowrank_ggn's "
            "computations raise; call .eval() on the random modules first"
        )
    return StructureCheck("deterministic forward pass", deterministic, how, consequence)


def _quantities(
    independent: bool,
    mixing: tuple[str, ...],
    loss_ok: bool,
    dropout: tuple[str, ...],
    deterministic: bool,
    path: EnginePath,
) -> tuple[tuple[str, str], ...]:
    """``(quantity, status)`` rows: which quantities are defined, and what they are."""
    through = f" (mixed by {', '.join(mixing)})" if mixing else ""
    rows = [
        (
            "per-sample gradients",
            "defined: row n of gradient_moments(...).per_component divided by ρ"
            if independent
            else f"not defined: F_n depends on every input{through}",
        ),
        (
            "per-component gradients",
            "defined, they sum to the batch gradient"
            + ("; here they equal ρ × the per-sample gradients" if independent else "")
            if loss_ok
            else "not defined: the loss does not split into per-sample terms",
        ),
        (
            "gradient variance / SNR",
            "sampling statistics of the per-sample gradients"
            if independent
            else "spread of the per-component gradients, not a sampling variance",
        ),
        (
            "GGN square-root factorisation",
            "valid: G = V Vᵀ, rank ≤ N·C, exact spectrum from the Gram matrix"
            if loss_ok
            else "not valid: the loss Hessian is not block diagonal",
        ),
        (
            "per-sample GGN J_nᵀ ∇²ℓ_n J_n",
            "defined"
            if independent
            else "per-component only; their ρ-weighted sum is the GGN",
        ),
        ("engine path", str(path)),
    ]
    if not deterministic:
        names = f"module(s) {', '.join(dropout)}" if dropout else "the random modules"
        status = (
            f"random while {names} are active: ggn_spectrum, gradient_moments and "
            f"directional_derivatives raise; call .eval() on {names}"
        )
        rows.append(("all of the above", status))
    return tuple(rows)


__all__ = ["StructureCheck", "StructureReport", "audit_structure"]
