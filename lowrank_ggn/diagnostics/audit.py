r"""Which structure of the loss holds for a model, batch and loss, and what follows.

The mini-batch loss ``L(F(X, θ), Y)`` can carry four structures, from the weakest to
the strongest (Dangel, *Structural implications of batch normalization*, 2021; the
ViViT paper https://arxiv.org/abs/2106.02624 assumes all of them):

1. **model/loss split**: ``L`` sees the data only through the outputs ``F(X, θ)``;
2. **reduction** (loss): ``L = R(L̂_1, …, L̂_N)``, here ``L = ρ Σ_n ℓ_n``;
3. **SIMD + reduction** (loss): ``ℓ_n = ℓ(F_n, y_n)`` depends on sample ``n`` only, so
   ``∇²_F L`` is block diagonal;
4. **SIMD forward pass**: ``F_n(X, θ) = f(x_n, θ)``.

With all four, ``J_θF_nᵀ ∂L/∂F_n = ρ ∇_θ ℓ(f(x_n, θ), y_n)`` is ρ times a *per-sample
gradient*. Without (4), e.g. BatchNorm in train mode, the same vector-Jacobian product
is a *per-component gradient*: the gradient through output component ``F_n``, which
depends on every input. Per-component gradients still sum to the batch gradient, and
the GGN still factorises as ``G = V Vᵀ`` (needs 1–3 only), but the mean, variance and
SNR of the components are no sampling statistics: the components are not independent
draws, and none of them is "the gradient of one sample".

**How (4) is checked** (:func:`audit_structure`), three ways, all of which must pass:

* *module scan*: BatchNorm layers that normalise with batch statistics;
* *input probe*: forward-mode AD with a tangent on the input of ONE sample ``m``
  (``m = 0`` and ``m = N − 1``); the model's outputs ``n ≠ m`` must not move. Forward
  hooks read the tangent entering and leaving every submodule, and a module whose
  input tangent is zero at the other samples but whose output tangent is not is where
  samples mix. The innermost such modules are named (``"1.bn"``, not its parent
  ``"1"``). This localises mixing done by any module, including ones the scan does not
  know; it assumes the batch sits in dim 0 of the module's tensors;
* *parameter probe* (:func:`lowrank_ggn.core.paths.choose_path`): evaluating the
  model one sample at a time reproduces the batch outputs and a random
  parameter-Jacobian-vector product (this also catches a dependence on the batch size).

Active dropout makes the loss a random function of ``θ``; the audit reports it (the
computations of lowrank_ggn refuse such models) and runs the structural probes with the
dropout layers in eval mode, which does not affect the question whether samples mix.
"""

from __future__ import annotations

import math
import textwrap
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import grad, vjp, vmap
from torch.utils._pytree import tree_flatten

from lowrank_ggn.core.loss_factors import check_targets, reduction_factor
from lowrank_ggn.core.model import FunctionalModel
from lowrank_ggn.core.paths import (
    EnginePath,
    _tolerance,
    active_dropout_modules,
    batch_statistic_modules,
    choose_path,
)
from lowrank_ggn.core.state import model_preserved
from lowrank_ggn.core.validation import (
    check_call,
    check_model,
    check_outputs,
    check_params_finite,
)


class SampleMixingWarning(UserWarning):
    """Per-component quantities of a forward pass that mixes samples were returned.

    Issued once per call by every function that returns per-component quantities
    (:func:`lowrank_ggn.gradient_moments`, :func:`lowrank_ggn.directional_derivatives`)
    when output ``F_n`` depends on other inputs than ``x_n``. Filter it with
    ``warnings.simplefilter("ignore", SampleMixingWarning)``.
    """


# --------------------------------------------------------------------------- texts


def per_component_explanation(sample_mixing: bool, modules: Sequence[str] = ()) -> str:
    """What row ``n`` of a per-component quantity means, for the result's ``.explanation``.

    Args:
        sample_mixing: Whether the forward pass mixes samples.
        modules: Qualified names of the modules that mix them (may be empty).

    Returns:
        A paragraph of plain text.

    """
    if not sample_mixing:
        return (
            "The forward pass processes samples independently (F_n = f(x_n, θ)), so "
            "row n is ρ times the per-sample gradient ∇_θ ℓ(f(x_n, θ), y_n). The rows "
            "sum to the batch gradient; their mean, variance and SNR are sample "
            "statistics of per-sample quantities."
        )
    where = (
        f"module(s) {', '.join(modules)} mix samples in the forward pass"
        if modules
        else "the forward pass mixes samples (found numerically; no module named)"
    )
    return (
        f"Per-sample quantities do not exist here: {where}, so output F_n depends on "
        "every input x_m. Row n is a per-component quantity, the derivative through "
        "output component F_n (J_θF_nᵀ ∂L/∂F_n for gradients), not the contribution "
        "of sample n alone. The rows still sum to the batch gradient (resp. their "
        "ρ-weighted curvatures to eᵀGe), but their mean, variance and SNR describe "
        "the spread of the components, not a sampling variance of per-sample "
        "gradients: the components are not independent draws."
    )


def warn_sample_mixing(
    modules: Sequence[str], what: str, sums_to: str, stacklevel: int = 3
) -> None:
    """Issue one :class:`SampleMixingWarning` for a call that returned ``what``.

    Args:
        modules: Qualified names of the mixing modules (may be empty).
        what: The call and what it returned, e.g. ``"gradient_moments returned
            per-component gradients"``.
        sums_to: The batch quantity that the components sum to.
        stacklevel: Passed to :func:`warnings.warn`; 3 points at the user's call.

    """
    where = (
        f"module(s) {', '.join(modules)} mix samples"
        if modules
        else "the forward pass mixes samples"
    )
    warnings.warn(
        f"{what}: {where} in the forward pass, so these are per-component, not "
        f"per-sample quantities. They sum to {sums_to}, but their variance is not a "
        "sampling variance. See result.explanation.",
        SampleMixingWarning,
        stacklevel=stacklevel,
    )


# --------------------------------------------------------------------- input probe


@dataclass(frozen=True)
class InputProbe:
    """Outcome of perturbing one sample's input with forward-mode AD.

    Attributes:
        applicable: ``False`` for inputs that cannot be perturbed (integer dtype).
        leaks: Whether another sample's output moved.
        max_leak: ``max_{n≠m} |∂F_n/∂x_m · t|`` relative to ``max |∂F/∂x_m · t|``.
        modules: Innermost modules where the perturbation first reaches other samples.
        reason: Why the probe was not applicable (empty otherwise).

    """

    applicable: bool
    leaks: bool
    max_leak: float
    modules: tuple[str, ...]
    reason: str = ""


def _tangents(obj: object) -> list[Tensor]:
    leaves, _ = tree_flatten(obj)
    out = []
    for t in leaves:
        if isinstance(t, Tensor) and t.is_floating_point():
            tangent = fwAD.unpack_dual(t).tangent
            out.append(torch.zeros_like(t) if tangent is None else tangent)
    return out


def _off_sample(tangents: list[Tensor], m: int, batch: int) -> tuple[float, float]:
    """``(max |t| at samples ≠ m, max |t|)`` over tensors whose dim 0 is the batch."""
    off, scale = 0.0, 0.0
    for t in tangents:
        if t.dim() == 0 or t.shape[0] != batch:
            continue
        rest = torch.cat([t[:m], t[m + 1 :]])
        if rest.numel():
            off = max(off, rest.abs().max().item())
        if t.numel():
            scale = max(scale, t.abs().max().item())
    return off, scale


def probe_sample_mixing(fmodel: FunctionalModel, inputs: Tensor) -> InputProbe:
    r"""Perturb the input of one sample and see which outputs, and where, move.

    For ``m ∈ {0, N−1}`` one forward-mode pass computes ``∂F/∂X · T`` with a random
    tangent ``T`` that is zero except at sample ``m``. SIMD requires the result to
    vanish at every ``n ≠ m`` (exactly: sample-wise operations propagate exact zeros;
    a tolerance of round-off size is allowed). Forward hooks record, per submodule,
    whether its input tangents are zero off sample ``m`` while its output tangents are
    not; the innermost such modules are returned.

    Args:
        fmodel: The model as a function of the selected parameters.
        inputs: ``[N, *in]``.

    Returns:
        The :class:`InputProbe`.

    """
    N = inputs.shape[0]
    if not inputs.is_floating_point():
        return InputProbe(False, False, 0.0, (), "integer inputs")
    if N == 1:
        return InputProbe(True, False, 0.0, ())
    model = fmodel.model
    tol = _tolerance(inputs.dtype)
    names = {id(m): name for name, m in model.named_modules()}
    flagged: set[str] = set()
    probe = {"m": 0}

    def hook(module: nn.Module, args: tuple, output: object) -> None:
        m = probe["m"]
        off_in, _ = _off_sample(_tangents(args), m, N)
        off_out, scale = _off_sample(_tangents(output), m, N)
        if off_in == 0.0 and off_out > tol * scale:
            flagged.add(names[id(module)])

    gen = torch.Generator(device="cpu").manual_seed(0)
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    max_leak = 0.0
    try:
        for m in sorted({0, N - 1}):
            probe["m"] = m
            tangent = torch.zeros_like(inputs)
            noise = torch.randn(inputs.shape[1:], generator=gen, dtype=inputs.dtype)
            tangent[m] = noise.to(inputs.device)
            with fwAD.dual_level():
                out = fmodel(fmodel.primals(), fwAD.make_dual(inputs, tangent))
                off, scale = _off_sample(_tangents(out), m, N)
            max_leak = max(max_leak, off / scale if scale > 0 else 0.0)
    finally:
        for h in handles:
            h.remove()
    # innermost: drop a module if one of its descendants is flagged
    inner = [
        n
        for n in flagged
        if not any(o != n and (n == "" or o.startswith(n + ".")) for o in flagged)
    ]
    order = [name for name, _ in model.named_modules()]
    modules = tuple((n or "<root>") for n in sorted(inner, key=order.index))
    return InputProbe(True, max_leak > tol, max_leak, modules)


def locate_mixing_modules(fmodel: FunctionalModel, inputs: Tensor) -> tuple[str, ...]:
    """Qualified names of modules that mix samples: module scan, then the input probe."""
    names = list(batch_statistic_modules(fmodel.model))
    try:
        probed = probe_sample_mixing(fmodel, inputs).modules
    except Exception:  # noqa: BLE001 - forward AD unsupported: the scan must do
        probed = ()
    names += [n for n in probed if n not in names]
    return tuple(names)


# ---------------------------------------------------------------------- the report


@dataclass(frozen=True)
class StructureCheck:
    """One structure of the loss: does it hold, how was that checked, what follows.

    Attributes:
        name: The structure, e.g. ``"SIMD forward pass"``.
        holds: Whether it holds for this model, batch and loss.
        how: How it was checked (module types and numerical probes, with numbers).
        consequence: What it implies for the quantities lowrank_ggn computes.

    """

    name: str
    holds: bool
    how: str
    consequence: str


@dataclass(frozen=True)
class StructureReport:
    """Result of :func:`audit_structure`; ``str()`` renders it as tables.

    Attributes:
        checks: The :class:`StructureCheck` of each structure, weakest first.
        quantities: ``(quantity, status)`` rows: which quantities are defined.
        sample_independent: Whether ``F_n(X, θ) = f(x_n, θ)`` (SIMD forward pass).
        mixing_modules: Qualified names of the modules that mix samples (``"1"``
            for ``Sequential`` index 1, ``"1.bn"`` inside a block, ``"<root>"`` for
            the model's own forward).
        deterministic: Whether two forward passes agree (no active dropout).
        random_modules: Qualified names of active dropout modules.
        path: The path the GGN engine takes for this model and batch.
        explanation: What per-component quantities mean for this model.
        located_modules: The modules the input probe alone localised (independent
            of the module scan; empty if nothing mixes or inputs are integers).
        summary: One line on the problem (``N``, outputs per sample, loss, ``ρ``, ``D``).

    """

    checks: tuple[StructureCheck, ...]
    quantities: tuple[tuple[str, str], ...]
    sample_independent: bool
    mixing_modules: tuple[str, ...]
    deterministic: bool
    random_modules: tuple[str, ...]
    path: EnginePath
    explanation: str
    located_modules: tuple[str, ...] = ()
    summary: str = ""

    def check(self, name: str) -> StructureCheck:
        """The check called ``name``."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no structure {name!r}; have {[c.name for c in self.checks]}")

    def __str__(self) -> str:
        width = 62
        rows = [
            (c.name, "yes" if c.holds else "NO", c.consequence) for c in self.checks
        ]
        lines = [self.summary, ""] if self.summary else []
        lines += _table(("structure", "holds?", "consequence"), rows, width)
        lines += ["", "how checked:"]
        for c in self.checks:
            body = textwrap.wrap(f"{c.name}: {c.how}", 90)
            lines += ["  " + body[0]] + ["    " + b for b in body[1:]]
        lines.append("")
        lines += _table(("quantity", "status"), self.quantities, 70)
        return "\n".join(lines)


def _table(
    header: tuple[str, ...], rows: Sequence[tuple[str, ...]], width: int
) -> list[str]:
    """Fixed-width table; the last column wraps at ``width`` characters."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]

    def fmt(cells: Sequence[str]) -> list[str]:
        wrapped = textwrap.wrap(cells[-1], width) or [""]
        lead = "  ".join(c.ljust(w) for c, w in zip(cells[:-1], widths))
        pad = " " * len(lead)
        return [f"{lead}  {wrapped[0]}"] + [f"{pad}  {w}" for w in wrapped[1:]]

    rule = tuple("-" * w for w in widths) + ("-" * width,)
    out = fmt(header) + ["  ".join(rule)]
    for r in rows:
        out += fmt(r)
    return out


def _rel_err(a: Tensor, b: Tensor) -> float:
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-300)
    return (a - b).abs().max().item() / scale


def _loss_checks(
    loss_func: nn.Module, outputs: Tensor, targets: Tensor
) -> tuple[StructureCheck, StructureCheck]:
    """Reduction and SIMD-loss structure: by type, confirmed numerically."""
    N, tol = outputs.shape[0], _tolerance(outputs.dtype)
    rho = reduction_factor(loss_func, outputs)
    rho_1 = reduction_factor(loss_func, outputs[:1])
    name = f"{type(loss_func).__name__}(reduction={loss_func.reduction!r})"

    def single(f: Tensor, y: Tensor) -> Tensor:
        # ℓ_n: the loss of one sample alone, without its reduction factor
        return loss_func(f.unsqueeze(0), y.unsqueeze(0)) / rho_1

    def batch(f: Tensor) -> Tensor:
        return loss_func(f, targets)

    ell = vmap(single)(outputs, targets)  # [N]
    L = batch(outputs)
    red_err = _rel_err(L.reshape(1), (rho * ell.sum()).reshape(1))
    reduction = StructureCheck(
        "loss reduces per-sample terms",
        red_err <= tol,
        f"by type: {name} is a scaled sum, ρ = {_fmt_rho(rho, N)}; numerically: the "
        f"batch loss equals ρ Σ_n ℓ_n with ℓ_n the loss of sample n alone "
        f"(relative deviation {red_err:.1e})",
        "L = ρ Σ_n ℓ_n: the batch gradient is a sum of N per-component terms",
    )
    # ∂L/∂F_n from the batch must equal ρ ∂ℓ(F_n, y_n)/∂F_n; an HVP with a tangent on
    # sample 0 must not reach ∇_{F_n} L for n ≠ 0 (block-diagonal Hessian)
    g_batch = grad(batch)(outputs)
    g_single = rho * vmap(grad(single))(outputs, targets)
    grad_err = _rel_err(g_batch, g_single)
    tangent = torch.zeros_like(outputs)
    tangent[0] = 1.0
    _, hvp_fn = vjp(grad(batch), outputs)  # ∇²_F L is symmetric: VJP = HVP
    (hvp,) = hvp_fn(tangent)
    scale = max(hvp.abs().max().item(), 1e-300)
    leak = hvp[1:].abs().max().item() / scale if N > 1 else 0.0
    simd = StructureCheck(
        "loss is per-sample + reduction",
        grad_err <= tol and leak <= tol,
        f"by type: {name} applies ℓ(F_n, y_n) sample-wise; numerically: ∂L/∂F_n = "
        f"ρ ∂ℓ_n/∂F_n (relative deviation {grad_err:.1e}) and a Hessian-vector "
        f"product with a tangent on sample 0 leaves the other samples at "
        f"{leak:.1e} (relative)",
        "∇²_F L is block diagonal: G = ρ Σ_n J_nᵀ ∇²ℓ_n J_n = V Vᵀ with rank ≤ N·C; "
        "the GGN square-root factorisation is valid",
    )
    return reduction, simd


def _fmt_rho(rho: float, N: int) -> str:
    if rho == 1.0:
        return "1"
    inv = 1.0 / rho
    return f"1/{round(inv)}" if math.isclose(inv, round(inv)) else f"{rho:.3g}"


def audit_structure(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    params: Sequence[Tensor] | None = None,
) -> StructureReport:
    r"""Report which structures of the loss hold, and which quantities are defined.

    Checks, for this model, batch and loss, the model/loss split, the reduction and
    SIMD structure of the loss, the SIMD structure of the forward pass (module scan,
    one-sample input probe with forward-mode AD, per-sample parameter probe; see the
    module docstring), and determinism (active dropout). Nothing raises for a
    random model: it is reported.

    Args:
        model: Module mapping ``inputs`` ``[N, *in]`` to ``[N, *out]``; never changed.
        loss_func: ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss``
            (reduction ``'mean'`` or ``'sum'``).
        inputs: The batch.
        targets: Its targets.
        params: Parameters of ``model``; default: all that require grad.

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
    with model_preserved(model):
        selected = check_call(model, loss_func, inputs, params, targets)
        fmodel = FunctionalModel(model, selected)
        check_params_finite(fmodel.params, fmodel.names)
        with torch.no_grad():
            outputs = fmodel(fmodel.primals(), inputs)
            check_outputs(outputs, inputs.shape[0])
            check_targets(loss_func, outputs, targets)
            again = fmodel(fmodel.primals(), inputs)
        dropout = tuple(active_dropout_modules(model))
        deterministic = not dropout and torch.equal(again, outputs)
        for name in dropout:  # probes below run without dropout (restored on exit)
            model.get_submodule("" if name == "<root>" else name).eval()
        if dropout:
            with torch.no_grad():
                outputs = fmodel(fmodel.primals(), inputs)

        scan = tuple(batch_statistic_modules(model))
        try:
            probe = probe_sample_mixing(fmodel, inputs)
        except Exception as err:  # noqa: BLE001 - e.g. an op without forward-mode AD
            first = str(err).splitlines()[0][:120] if str(err) else ""
            probe = InputProbe(False, False, 0.0, (), f"{type(err).__name__}: {first}")
        path = choose_path(fmodel, inputs, outputs)
        mixing = scan + tuple(n for n in probe.modules if n not in scan)
        independent = not scan and not probe.leaks and not path.sample_mixing
        reduction, simd_loss = _loss_checks(loss_func, outputs, targets)
        checks = (
            StructureCheck(
                "model/loss split",
                True,
                "by construction: the loss is a separate module that sees the data "
                "only through the outputs F(X, θ) and the targets",
                "the GGN Jᵀ (∇²_F L) J is defined",
            ),
            reduction,
            simd_loss,
            _forward_check(scan, probe, path, mixing, independent),
            _determinism_check(dropout, deterministic),
        )
        loss_ok = reduction.holds and simd_loss.holds
        N, C = outputs.shape[0], math.prod(outputs.shape[1:])
        summary = (
            f"Structure audit: N = {N} samples, {C} outputs per sample, "
            f"{type(loss_func).__name__}(reduction={loss_func.reduction!r}), "
            f"ρ = {_fmt_rho(reduction_factor(loss_func, outputs), N)}, "
            f"D = {fmodel.num_params} parameters."
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
    scan: tuple[str, ...],
    probe: InputProbe,
    path: EnginePath,
    mixing: tuple[str, ...],
    independent: bool,
) -> StructureCheck:
    scan_text = (
        f"module scan: {', '.join(scan)} normalise with batch statistics"
        if scan
        else "module scan: no module uses batch statistics"
    )
    if not probe.applicable:
        probe_text = f"input probe: not applicable ({probe.reason})"
    else:
        where = f", first at {', '.join(probe.modules)}" if probe.modules else ""
        probe_text = (
            "input probe: perturbing one sample's input moves the other samples' "
            f"outputs by {probe.max_leak:.1e} (relative){where}"
        )
    param_text = "parameter probe: " + (
        "per-sample evaluation reproduces the batch outputs and a random parameter-JVP"
        if not path.sample_mixing
        else path.reason
    )
    consequence = (
        "F_n = f(x_n, θ): per-sample gradients exist; the engine uses the cheap "
        "per-sample path"
        if independent
        else (
            f"F_n depends on every input{' through ' + ', '.join(mixing) if mixing else ''}: "
            "per-sample gradients do not exist, only per-component ones; the engine "
            "differentiates the whole batch (engine_report.strategy: bn_split, "
            "columns or streamed)"
        )
    )
    return StructureCheck(
        "SIMD forward pass",
        independent,
        f"{scan_text}; {probe_text}; {param_text}",
        consequence,
    )


def _determinism_check(dropout: tuple[str, ...], deterministic: bool) -> StructureCheck:
    if deterministic:
        return StructureCheck(
            "deterministic forward pass",
            True,
            "no active dropout, and two forward passes agree bitwise",
            "GGN and gradients are functions of θ",
        )
    how = (
        f"active dropout in {', '.join(dropout)}"
        if dropout
        else "two forward passes on the same inputs differ"
    )
    return StructureCheck(
        "deterministic forward pass",
        False,
        how + " (the other probes ran with dropout in eval mode)",
        "GGN and gradients are random, not functions of θ: lowrank_ggn's computations "
        "raise; call .eval() on the random modules first",
    )


def _quantities(
    independent: bool,
    mixing: tuple[str, ...],
    loss_ok: bool,
    dropout: tuple[str, ...],
    deterministic: bool,
    path: EnginePath,
) -> tuple[tuple[str, str], ...]:
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
        rows.append(
            (
                "all of the above",
                f"random while {names} are active: ggn_spectrum, gradient_moments "
                f"and directional_derivatives raise; call .eval() on {names}",
            )
        )
    return tuple(rows)
