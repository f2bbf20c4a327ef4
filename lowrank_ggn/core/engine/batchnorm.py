r"""BatchNorm recomputed with its statistics as gated graph nodes.

During the capture's forward pass (:mod:`~lowrank_ggn.core.engine.capture`), a forward
hook replaces the output of every BatchNorm module (``SyncBatchNorm`` excluded) by

.. math::
    y = γ ⊙ (x − μ) ⊙ r + β, \qquad μ = \operatorname{mean}(x), \quad
    r = (\operatorname{var}(x) + ε)^{-1/2}

per channel ``k = 1…K``, over the batch and all positions (biased variance, as PyTorch
does in train mode); ``x``, ``y`` ``[N, K, *pos]``, ``μ``, ``r`` ``[K]``. With running
statistics (eval mode) ``μ`` and ``r`` are the module's buffers, constants. ``μ`` and
``r`` are kept as graph nodes, and a :class:`FreezeSwitch` gates the gradients that
flow into them: while frozen, backward passes see the network with its statistics held
fixed, which is sample-independent (the frozen backward of ``y`` is ``γ r δ`` per
sample). Under :attr:`~lowrank_ggn.core.engine.report.Strategy.BN_SPLIT` a parameter
block is then ``V_p = V_{f,p} + B_p W``: the frozen rows plus the statistics
directions ``B_p`` ``[2K, numel]`` weighted by the coefficients
:meth:`BNLayer.coefficients` ``W`` ``[2K, NC]``.

The recomputed output equals the module's; the module itself is never changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lowrank_ggn.core.paths import uses_batch_statistics


class FreezeSwitch:
    """Gate for the gradients into BatchNorm statistics: zero while :attr:`frozen`."""

    def __init__(self) -> None:
        self.frozen = False

    def gate(self, grad: Tensor) -> Tensor:
        """Tensor hook: pass ``grad`` on, or zero it while frozen."""
        return torch.zeros_like(grad) if self.frozen else grad

    @contextmanager
    def freeze(self) -> Iterator[None]:
        """Backward passes inside this block hold the statistics fixed."""
        self.frozen = True
        try:
            yield
        finally:
            self.frozen = False


@dataclass
class BNLayer:
    """A BatchNorm, recomputed with its statistics ``μ``, ``r`` as graph nodes.

    Attributes:
        name: Qualified module name.
        module: The module.
        weight: ``γ`` if selected, else ``None``; likewise ``bias`` (``β``).
        gamma: ``γ`` as values ``[K]`` (ones for ``affine=False``), detached.
        output: ``y`` in the graph, ``[N, K, *pos]``.
        mean: ``μ`` ``[K]`` in the graph; ``inv_std``: ``r`` ``[K]``.
        xhat: ``(x − μ) r`` ``[N, K, *pos]``, detached.
        sums: Per column, ``Σ_pos δ`` and ``Σ_pos δ ⊙ x̂`` of the frozen output
            cotangent ``δ``, each ``[NC, K]``.
        calls: How often the module ran in the forward pass (captured if once).
        batch_stats: Whether it normalises with batch statistics (else running
            statistics, constants).
        input: ``x`` in the graph (identifies the layer that feeds it).
    """

    name: str
    module: nn.Module
    weight: Tensor | None
    bias: Tensor | None
    gamma: Tensor | None = None
    output: Tensor | None = None
    mean: Tensor | None = None
    inv_std: Tensor | None = None
    xhat: Tensor | None = None
    sums: tuple[list[Tensor], list[Tensor]] = field(default_factory=lambda: ([], []))
    calls: int = 0
    batch_stats: bool = True
    input: Tensor | None = None

    @property
    def params(self) -> list[Tensor]:
        """The selected affine parameters, ``γ`` first."""
        return [p for p in (self.weight, self.bias) if p is not None]

    @property
    def channels(self) -> int:
        """``K``."""
        return self.module.num_features

    @property
    def num_statistics(self) -> int:
        """``2K`` with batch statistics (``μ`` and ``r``); 0 with running statistics."""
        return 2 * self.channels if self.batch_stats else 0

    def coefficients(self) -> Tensor:
        """``W_l = ∂_{(μ,r)} F̃ᵀ S``, ``[2K, NC]``: rows ``μ_1…μ_K``, then ``r_1…r_K``.

        ``∂y/∂μ_k = −γ_k r_k`` and ``∂y/∂r_k = γ_k (x − μ_k) = (γ_k / r_k) x̂``, summed
        against each column's frozen cotangent.
        """
        s_delta, s_dx = (torch.cat(s) for s in self.sums)  # [NC, K] each
        if not self.batch_stats:
            return s_delta.new_zeros(0, s_delta.shape[0])
        r = self.inv_std.detach()
        w_mean = -(self.gamma * r) * s_delta
        w_r = (self.gamma / r) * s_dx
        return torch.cat([w_mean, w_r], dim=1).T

    def affine_rows(self) -> list[Tensor]:
        """Frozen per-column rows of the selected ``γ`` (``Σ δ x̂``) and ``β`` (``Σ δ``)."""
        s_delta, s_dx = (torch.cat(s) for s in self.sums)
        rows = []
        if self.weight is not None:
            rows.append(s_dx)
        if self.bias is not None:
            rows.append(s_delta)
        return rows


def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` holds a BatchNorm module that the capture recomputes."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        and not isinstance(m, nn.SyncBatchNorm)
        for m in model.modules()
    )


def batch_norm_layers(model: nn.Module, selected: set[int]) -> list[BNLayer]:
    """Every BatchNorm module (``SyncBatchNorm`` excluded), flagged by its statistics.

    Running-statistics (eval-mode) layers are recomputed too, so that their affine
    parameters get per-column rows under the frozen passes.
    """
    found = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) or isinstance(
            m, nn.SyncBatchNorm
        ):
            continue
        w, b = m.weight, m.bias
        found.append(
            BNLayer(
                name or "<root>",
                m,
                w if w is not None and id(w) in selected else None,
                b if b is not None and id(b) in selected else None,
                batch_stats=uses_batch_statistics(m),
            )
        )
    return found


def recompute_batch_norm(bn: BNLayer, x: Tensor, switch: FreezeSwitch) -> Tensor:
    """``y = γ (x − μ) r + β`` with ``μ``, ``r`` as gated graph nodes.

    Fills ``bn``'s graph nodes and values; ``x`` ``[N, K, *pos]`` -> ``y`` likewise.
    """
    m = bn.module
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    if not bn.batch_stats:  # running statistics: constants
        mean = m.running_mean.detach()
        inv_std = torch.rsqrt(m.running_var.detach() + m.eps)
    else:
        mean = x.mean(dims)
        inv_std = torch.rsqrt(x.var(dims, unbiased=False) + m.eps)
    if mean.requires_grad:
        mean.register_hook(switch.gate)
        inv_std.register_hook(switch.gate)
    xhat = (x - mean.view(shape)) * inv_std.view(shape)
    y = xhat
    if m.weight is not None:
        y = y * m.weight.view(shape) + m.bias.view(shape)
    bn.mean, bn.inv_std, bn.xhat, bn.output = mean, inv_std, xhat.detach(), y
    bn.input = x
    gamma = m.weight.detach() if m.weight is not None else torch.ones_like(mean)
    bn.gamma = gamma.detach()
    bn.calls += 1
    return y


__all__ = [
    "BNLayer",
    "FreezeSwitch",
    "batch_norm_layers",
    "has_batch_norm",
    "recompute_batch_norm",
]
