r"""Which modules mix samples: a module scan and a forward-mode input probe.

A forward pass is SIMD when ``F_n(X, θ) = f(x_n, θ)``. Two checks name the modules
that break this:

* *module scan* (:func:`lowrank_ggn.core.paths.batch_statistic_modules`): BatchNorm
  layers that normalise with batch statistics;
* *input probe* (:func:`probe_sample_mixing`): forward-mode AD with a tangent on the
  input of ONE sample ``m`` (``m = 0`` and ``m = N − 1``); the model's outputs
  ``n ≠ m`` must not move. Forward hooks read the tangent entering and leaving every
  submodule, and a module whose input tangent is zero at the other samples but whose
  output tangent is not is where samples mix. The innermost such modules are named
  (``"1.bn"``, not its parent ``"1"``). This localises mixing done by any module,
  including ones the scan does not know; it assumes the batch sits in dim 0 of the
  module's tensors.

:func:`locate_mixing_modules` combines both for the computations that return
per-component quantities (:func:`scan_and_probe` runs both and keeps a failing
probe's reason); :func:`lowrank_ggn.audit_structure` reports them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from lowrank_ggn.core.inputs import as_inputs
from lowrank_ggn.core.model import FunctionalModel, module_label
from lowrank_ggn.core.paths import batch_statistic_modules
from lowrank_ggn.core.tolerances import roundoff_rtol


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

    def __str__(self) -> str:
        """The outcome in one clause, as :func:`lowrank_ggn.audit_structure` shows it."""
        if not self.applicable:
            return f"input probe: not applicable ({self.reason})"
        where = f", first at {', '.join(self.modules)}" if self.modules else ""
        return (
            "input probe: perturbing one sample's input moves the other samples' "
            f"outputs by {self.max_leak:.1e} (relative){where}"
        )


def _tangents(obj: object) -> list[Tensor]:
    """Forward-mode tangents of the floating-point tensors in ``obj`` (zero if none)."""
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
        inputs: The batch (a tensor ``[N, *in]``, or tuple/dict entries; the
            floating entries are perturbed).

    Returns:
        The :class:`InputProbe`.

    """
    inputs = as_inputs(inputs)
    N = inputs.size
    if not any(t.is_floating_point() for t in inputs.tensors):
        return InputProbe(False, False, 0.0, (), "integer inputs")
    if N == 1:
        return InputProbe(True, False, 0.0, ())
    model = fmodel.model
    tol = roundoff_rtol(inputs.first_float_dtype())
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
            with fwAD.dual_level():
                duals = []
                for x in inputs.tensors:  # a tangent on sample m of each float entry
                    if not x.is_floating_point():
                        duals.append(x)
                        continue
                    tangent = torch.zeros_like(x)
                    noise = torch.randn(x.shape[1:], generator=gen, dtype=x.dtype)
                    tangent[m] = noise.to(x.device)
                    duals.append(fwAD.make_dual(x, tangent))
                out = fmodel(fmodel.primals(), inputs.with_tensors(duals))
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
    modules = tuple(module_label(n) for n in sorted(inner, key=order.index))
    return InputProbe(True, max_leak > tol, max_leak, modules)


def scan_and_probe(
    fmodel: FunctionalModel, inputs: Tensor
) -> tuple[tuple[str, ...], InputProbe]:
    """Run the module scan and the input probe; a probe that fails says why.

    Args:
        fmodel: The model as a function of the selected parameters.
        inputs: ``[N, *in]``.

    Returns:
        The modules that normalise with batch statistics, and the
        :class:`InputProbe` (not applicable, with the error as its reason, if
        forward-mode AD fails on the model).

    """
    scan = tuple(batch_statistic_modules(fmodel.model))
    try:
        probe = probe_sample_mixing(fmodel, inputs)
    except Exception as err:  # noqa: BLE001 - e.g. an op without forward-mode AD
        first = str(err).splitlines()[0][:120] if str(err) else ""
        probe = InputProbe(False, False, 0.0, (), f"{type(err).__name__}: {first}")
    return scan, probe


def locate_mixing_modules(fmodel: FunctionalModel, inputs: Tensor) -> tuple[str, ...]:
    """Qualified names of modules that mix samples: module scan, then the input probe.

    Args:
        fmodel: The model as a function of the selected parameters.
        inputs: ``[N, *in]``.

    Returns:
        The modules the scan finds, followed by those only the input probe locates
        (the scan alone if forward-mode AD fails on the model).

    """
    scan, probe = scan_and_probe(fmodel, inputs)
    return scan + tuple(n for n in probe.modules if n not in scan)
