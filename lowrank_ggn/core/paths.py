r"""Does output ``n`` depend on input ``m ≠ n``? Choosing the engine's path.

The per-sample path (C batched backward passes) is exact only if the model has the
SIMD structure ``F_n(X, θ) = f(x_n, θ)``, so that ``J_θ F_n`` is the Jacobian of a
function of ``x_n`` alone. Otherwise (BatchNorm in train mode, attention over the
batch dimension, anything that reads batch statistics) each of the ``N·C`` columns
``J_θF_nᵀ s_nc`` needs its own full-batch vector-Jacobian product.

A wrong guess would be a wrong spectrum, silently, so the decision is made in two
steps and the per-sample path is taken only when both pass:

1. **Module scan.** Modules known to mix samples (``_BatchNorm`` subclasses that use
   batch statistics: train mode, or ``track_running_stats=False``) select the
   full-batch path directly, by their qualified names.
2. **Numerical check, reverse mode only.** Otherwise up to four probe samples
   (first, last and two between) are evaluated one at a time (``vmap`` over batches
   of one, or a loop of batches of one for modules without batching rules such as
   ``nn.LSTM``). They must reproduce the batch outputs *and* a vector-Jacobian
   product: with random cotangents ``w_n`` on the probe samples (zero elsewhere),
   ``Σ_n J_θ f(x_n)ᵀ w_n`` must equal the batch product ``J_θF(X)ᵀ W``, one backward
   pass through the linearisation's own graph. The difference is
   ``Σ_n Δ_nᵀ w_n`` with ``Δ_n = J_θF_n − J_θ f(x_n)``; it vanishes for random ``w``
   only if every ``Δ_n = 0`` (almost surely), which is what the per-sample path
   relies on. No forward-mode AD is needed, so LSTMs and CPU attention are checked
   too. A model that cannot be evaluated per sample, or disagrees beyond round-off,
   takes the full-batch path, which is always exact.

The linearisation also runs the batch forward pass twice and refuses
non-deterministic models (active dropout), whose GGN is not a function of the
parameters (:func:`check_deterministic`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap

from lowrank_ggn.core.autodiff import no_rule, quiet_fallbacks, vmappable
from lowrank_ggn.core.inputs import ModelInputs, as_inputs
from lowrank_ggn.core.model import FunctionalModel, module_label
from lowrank_ggn.core.modes import PathName
from lowrank_ggn.core.tolerances import roundoff_close

PER_SAMPLE = PathName.PER_SAMPLE
FULL_BATCH = PathName.FULL_BATCH


@dataclass(frozen=True)
class EnginePath:
    """Which path the engine took, and why.

    Attributes:
        name: ``"per_sample"`` (C batched backward passes give all N·C columns) or
            ``"full_batch"`` (the columns need full-batch derivatives; how they are
            obtained is the engine's strategy, :mod:`lowrank_ggn.core.engine.report`).
        reason: A sentence explaining the choice.
        mixing_modules: Qualified names of modules found to mix samples.
        sample_mixing: ``True`` when the forward pass mixes samples (or could not be
            shown not to).

    """

    name: PathName
    reason: str
    mixing_modules: tuple[str, ...] = field(default_factory=tuple)
    sample_mixing: bool = False

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


def uses_batch_statistics(module: nn.Module) -> bool:
    """Whether a normalization module normalizes with statistics of the batch."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        return False
    return module.training or module.running_mean is None


def batch_statistic_modules(model: nn.Module) -> list[str]:
    """Qualified names of modules that mix samples through batch statistics."""
    return [
        module_label(name)
        for name, m in model.named_modules()
        if uses_batch_statistics(m)
    ]


def active_dropout_modules(model: nn.Module) -> list[str]:
    """Qualified names of dropout modules in train mode with ``p > 0``."""
    return [
        module_label(name)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0
    ]


def check_deterministic(
    fmodel: FunctionalModel,
    inputs: Tensor,
    outputs: Tensor,
    again: Tensor | None = None,
) -> None:
    """Raise a ``ValueError`` if a second forward pass gives different outputs.

    Args:
        fmodel: The model.
        inputs: The batch.
        outputs: The first pass's outputs.
        again: A second pass's outputs if one ran already; else one forward pass
            runs.
    """
    dropout = active_dropout_modules(fmodel.model)
    if again is None and not dropout:
        again = fmodel.evaluate(inputs)  # the recorded pass's kernels, no graph kept
    # round-off apart: the captured pass recomputes BatchNorm from its statistics
    if dropout or not roundoff_close(again, outputs):
        where = f" Active dropout: {', '.join(dropout)}." if dropout else ""
        raise ValueError(
            "model is not deterministic: two forward passes on the same inputs gave "
            f"different outputs, so its GGN is not a function of the parameters.{where}"
            " Put the random modules in eval mode (module.eval()) before the call."
        )


def _probe_per_sample(
    fmodel: FunctionalModel, probe_inputs: ModelInputs, cotangents: Tensor
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Per-sample outputs ``f(x_n)`` and ``Σ_n J_θ f(x_n)ᵀ w_n`` of the probe samples.

    ``vmap`` over samples where every module has batching rules; otherwise a loop
    over batches of one sample (``nn.LSTM``).
    """
    theta = fmodel.primals()

    def per_sample(th: tuple[Tensor, ...]) -> Tensor:
        return vmap(
            lambda split: fmodel.single(th, probe_inputs.with_tensors(split, 1))
        )(probe_inputs.tensors)

    try:
        if vmappable(fmodel.model):
            with quiet_fallbacks():
                single_out, fn = vjp(per_sample, theta)
                return single_out, fn(cotangents)[0]
    except (RuntimeError, NotImplementedError) as err:
        if not no_rule(err):
            raise
    params = [t.detach().requires_grad_(True) for t in theta]
    outs = []
    with torch.enable_grad():
        for n in range(probe_inputs.size):
            outs.append(fmodel(params, probe_inputs.select([n])).squeeze(0))
        single_out = torch.stack(outs)
        grads = torch.autograd.grad(single_out, params, cotangents, allow_unused=True)
    grads = tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, params))
    return single_out.detach(), grads


def choose_path(
    fmodel: FunctionalModel,
    inputs: ModelInputs,
    outputs: Tensor,
    graph: Tensor | None = None,
) -> EnginePath:
    """Decide between the per-sample and the full-batch path (see module docstring).

    Args:
        fmodel: The model as a function of the selected parameters.
        inputs: The batch (:class:`~lowrank_ggn.core.inputs.ModelInputs`).
        outputs: ``F(θ, X)`` of that batch, ``[N, *out]``.
        graph: The same outputs in the autograd graph of ``fmodel.params`` (the
            linearisation's forward pass); one backward pass through it gives the
            batch side of the check. ``None``: a forward pass with graph runs here.

    Returns:
        The chosen :class:`EnginePath`.

    """
    mixing = batch_statistic_modules(fmodel.model)
    if mixing:
        return EnginePath(
            FULL_BATCH,
            f"modules {', '.join(mixing)} normalize with batch statistics, so output n "
            "depends on every input; the Gram's columns come from full-batch "
            "derivatives (see engine_report.strategy)",
            tuple(mixing),
            True,
        )
    inputs = as_inputs(inputs)
    N = inputs.size
    if N == 1:
        return EnginePath(PER_SAMPLE, "a batch of one sample cannot mix samples")
    # per-sample evaluation of a few samples (first, last, two in between) suffices:
    # the batch pass already involves every sample
    probe = sorted({0, N - 1, N // 3, (2 * N) // 3})
    gen = torch.Generator(device="cpu").manual_seed(0)
    w = torch.randn(
        (len(probe), *outputs.shape[1:]), generator=gen, dtype=outputs.dtype
    ).to(outputs.device)
    try:
        single_out, single_vjp = _probe_per_sample(fmodel, inputs.select(probe), w)
    except Exception as err:  # noqa: BLE001 - any failure means "cannot show SIMD"
        return EnginePath(
            FULL_BATCH,
            "the model could not be evaluated one sample at a time "
            f"({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
            "treating it as sample-mixing",
            (),
            True,
        )
    if graph is None:
        with torch.enable_grad():
            graph = fmodel(tuple(fmodel.params), inputs)
    W = torch.zeros_like(outputs)
    W[probe] = w
    batch_vjp = torch.autograd.grad(
        graph, fmodel.params, W, retain_graph=True, allow_unused=True
    )
    batch_vjp = [
        torch.zeros_like(p) if g is None else g for g, p in zip(batch_vjp, fmodel.params)
    ]
    if (
        single_out.shape == outputs[probe].shape
        and roundoff_close(single_out, outputs[probe])
        and roundoff_close(fmodel.flatten(single_vjp), fmodel.flatten(batch_vjp))
    ):
        return EnginePath(
            PER_SAMPLE,
            "no module uses batch statistics, and per-sample evaluation reproduces "
            "the batch outputs and a random vector-Jacobian product of probe samples",
        )
    return EnginePath(
        FULL_BATCH,
        "per-sample evaluation does not reproduce the batch outputs or their "
        "parameter Jacobian, so output n depends on other inputs",
        (),
        True,
    )
