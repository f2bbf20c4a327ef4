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
2. **Numerical check.** Otherwise the model is evaluated per sample (``vmap`` over
   batches of one, for up to four probe samples: first, last and two between) and
   must reproduce the batch outputs *and* the batch Jacobian-vector product
   ``J_θF · v`` for a random parameter direction ``v``. Equal
   JVPs for a random ``v`` mean ``J_θF_n = J_θ f(x_n)`` almost surely, which is what
   the per-sample path relies on. A model that cannot be evaluated per sample, or
   disagrees beyond round-off, takes the full-batch path, which is always exact.

The check also runs the batch forward pass twice and refuses non-deterministic
models (active dropout), whose GGN is not a function of the parameters.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import jvp, vmap

from lowrank_ggn.core.model import FunctionalModel
from lowrank_ggn.core.tolerances import roundoff_close


class PathName(str, enum.Enum):
    """The engine's two paths (a ``str``: ``PathName.FULL_BATCH == "full_batch"``)."""

    PER_SAMPLE = "per_sample"
    FULL_BATCH = "full_batch"

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)


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


def check_path(path: str | None) -> None:
    """``path`` must be ``None``, ``"per_sample"`` or ``"full_batch"``."""
    if path not in (None, PER_SAMPLE, FULL_BATCH):
        raise ValueError(
            f"path must be None, {PER_SAMPLE!r} or {FULL_BATCH!r}; got {path!r}."
        )


def uses_batch_statistics(module: nn.Module) -> bool:
    """Whether a normalization module normalizes with statistics of the batch."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        return False
    return module.training or module.running_mean is None


def batch_statistic_modules(model: nn.Module) -> list[str]:
    """Qualified names of modules that mix samples through batch statistics."""
    return [
        name or "<root>"
        for name, m in model.named_modules()
        if uses_batch_statistics(m)
    ]


def active_dropout_modules(model: nn.Module) -> list[str]:
    """Qualified names of dropout modules in train mode with ``p > 0``."""
    return [
        name or "<root>"
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
        again: A second pass's outputs if one ran already (the path check's
            Jacobian-vector product computes them); else one forward pass runs.
    """
    dropout = active_dropout_modules(fmodel.model)
    if again is None and not dropout:
        with torch.no_grad():
            again = fmodel(fmodel.primals(), inputs)
    # round-off apart: the captured pass recomputes BatchNorm from its statistics
    if dropout or not roundoff_close(again, outputs):
        where = f" Active dropout: {', '.join(dropout)}." if dropout else ""
        raise ValueError(
            "model is not deterministic: two forward passes on the same inputs gave "
            f"different outputs, so its GGN is not a function of the parameters.{where}"
            " Put the random modules in eval mode (module.eval()) before the call."
        )


def choose_path(
    fmodel: FunctionalModel, inputs: Tensor, outputs: Tensor
) -> tuple[EnginePath, Tensor | None]:
    """Decide between the per-sample and the full-batch path (see module docstring).

    Args:
        fmodel: The model as a function of the selected parameters.
        inputs: The batch ``[N, *in]``.
        outputs: ``F(θ, X)`` of that batch, ``[N, *out]``.

    Returns:
        The chosen :class:`EnginePath`, and the batch outputs of the check's own
        full-batch pass (``None`` if it ran none): a second forward pass, which
        :func:`check_deterministic` compares with the first.

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
        ), None
    if inputs.shape[0] == 1:
        return EnginePath(PER_SAMPLE, "a batch of one sample cannot mix samples"), None
    theta = fmodel.primals()
    gen = torch.Generator(device="cpu").manual_seed(0)
    direction = tuple(
        torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) for t in theta
    )
    # per-sample evaluation of a few samples (first, last, two in between) suffices:
    # the batch pass already involves every sample
    N = inputs.shape[0]
    probe = sorted({0, N - 1, N // 3, (2 * N) // 3})
    probe_inputs = inputs[probe]

    def per_sample(th: tuple[Tensor, ...]) -> Tensor:
        return vmap(fmodel.single, in_dims=(None, 0))(th, probe_inputs)

    try:
        single_out, single_dir = jvp(per_sample, (theta,), (direction,))
    except Exception as err:  # noqa: BLE001 - any failure means "cannot show SIMD"
        return EnginePath(
            FULL_BATCH,
            "the model could not be evaluated one sample at a time "
            f"({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
            "treating it as sample-mixing",
            (),
            True,
        ), None
    again, batch_dir = jvp(lambda th: fmodel(th, inputs), (theta,), (direction,))
    if (
        single_out.shape == outputs[probe].shape
        and roundoff_close(single_out, outputs[probe])
        and roundoff_close(single_dir, batch_dir[probe])
    ):
        return EnginePath(
            PER_SAMPLE,
            "no module uses batch statistics, and per-sample evaluation reproduces "
            "the batch outputs and a random parameter-Jacobian-vector product",
        ), again
    return EnginePath(
        FULL_BATCH,
        "per-sample evaluation does not reproduce the batch outputs or their "
        "parameter Jacobian, so output n depends on other inputs",
        (),
        True,
    ), again
