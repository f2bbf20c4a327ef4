r"""Which modules the engine captures, and each one's operands.

A module is captured when its parameter gradients are bilinear in a per-sample
input-side operand and its output gradient (see :mod:`~lowrank_ggn.core.engine.operands`):

=======================  ======================================================  ======
module                   input-side operand                                      layout
=======================  ======================================================  ======
``Linear`` (subclasses)  input ``[N, P, I]`` over any leading positions          dense
``Conv1d/2d/3d``         unfolded input (explicitly padded for ``padding_mode``   dense
                         ``reflect/replicate/circular``); ``groups``: per group
``ConvTranspose1d/2d/3d``  input at its own positions; the output gradient is     dense,
                         unfolded there (stride, dilation, padding, groups)      transp.
``Embedding``,           token indices (``padding_idx`` positions masked;        index
``EmbeddingBag``         bags: 2d input or offsets, sum/mean, per-sample
                         weights)
``LayerNorm``,           the normalised input ``x̂`` (recomputed from the input   elem.
``GroupNorm``,           with the module's ``eps``/groups)
``RMSNorm``
=======================  ======================================================  ======

Subclasses are captured when they inherit the forward computation. A ``Linear``
subclass with its own ``forward`` (attention's ``out_proj`` is plain) is captured on
trust: the engine's self-check detects a wrong assumption and the engine then runs
again without it. Calls that no module hook sees (``F.linear``/``addmm`` with a
parameter weight, normalisations with the model's affine, products and sums with a
broadcast parameter: :mod:`~lowrank_ggn.core.engine.calls`) get their operands from
:func:`linear_call_operand` and :func:`scale_call_operand`. Anything else
(``nn.MultiheadAttention``'s projections, embeddings with
``max_norm``/``scale_grad_by_freq``/``sparse``, ``EmbeddingBag`` in ``mode='max'``,
``InstanceNorm``, ``Bilinear``, recurrent layers, parameters used through other
functions) stays generic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowrank_ggn.core.engine.operands import (
    DenseOperand,
    ElementwiseOperand,
    IndexOperand,
    Operand,
)
from lowrank_ggn.core.modes import Mode

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORMS = tuple(
    c for c in (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None)) if c
)


class Kind(Mode):
    """How a captured module's operands are built."""

    LINEAR = "linear"
    CONV = "conv"
    CONV_TRANSPOSE = "conv_transpose"
    EMBEDDING = "embedding"
    EMBEDDING_BAG = "embedding_bag"
    NORM = "norm"


def _inherits(m: nn.Module, base: type, *names: str) -> bool:
    return all(getattr(type(m), n) is getattr(base, n) for n in names)


def classify(m: nn.Module) -> tuple[Kind, bool] | None:
    """``(kind, on_trust)`` for a capturable module, else ``None``.

    ``on_trust``: a ``Linear`` subclass with its own ``forward``, captured on the
    assumption that it computes ``x Wᵀ + b``.
    """
    if isinstance(m, nn.Linear):
        return Kind.LINEAR, not _inherits(m, nn.Linear, "forward")
    conv = next((c for c in _CONVS if isinstance(m, c)), None)
    if conv is not None and _inherits(m, conv, "forward", "_conv_forward"):
        return Kind.CONV, False
    tconv = next((c for c in _TRANSPOSED if isinstance(m, c)), None)
    if tconv is not None and _inherits(m, tconv, "forward"):
        return Kind.CONV_TRANSPOSE, False
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        # max_norm renormalises W in place; scale_grad_by_freq scales gradients by
        # batch counts; sparse gradients; max bags: not a fixed linear map of W
        plain = m.max_norm is None and not m.scale_grad_by_freq and not m.sparse
        if isinstance(m, nn.Embedding) and _inherits(m, nn.Embedding, "forward"):
            return (Kind.EMBEDDING, False) if plain else None
        if _inherits(m, nn.EmbeddingBag, "forward") and m.mode in ("sum", "mean"):
            return (Kind.EMBEDDING_BAG, False) if plain else None
        return None
    norm = next((c for c in _NORMS if isinstance(m, c)), None)
    if norm is not None and _inherits(m, norm, "forward"):
        return Kind.NORM, False
    return None


def channels_first(m: nn.Module) -> bool:
    """Whether the module's output holds its channels in dimension 1."""
    return isinstance(m, (nn.modules.conv._ConvNd, nn.GroupNorm))


def output_grad(m: nn.Module, g: Tensor) -> Tensor:
    """Output gradients ``[B, N, *out]`` -> ``[B, N, P, O]`` (a view where possible)."""
    B, N = g.shape[:2]
    if channels_first(m):
        return g.reshape(B, N, g.shape[2], -1).transpose(2, 3)
    if isinstance(m, nn.Linear):
        width = m.out_features
    elif isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        width = m.embedding_dim
    else:  # LayerNorm / RMSNorm over the trailing normalized_shape
        width = math.prod(m.normalized_shape)
    return g.reshape(B, N, -1, width)


def unfold_nd(
    x: Tensor,
    kernel: tuple[int, ...],
    dilation: tuple[int, ...],
    stride: tuple[int, ...],
    pad: list[tuple[int, int]],
    keep: tuple[int, ...] | None = None,
) -> Tensor:
    """Patches of ``x`` ``[B, C, *sp]``: ``[B, P, C·K]`` in ``(c, k_1, …, k_d)`` order.

    ``pad``: zeros before and after each spatial dimension; ``keep``: the leading
    output positions kept per dimension (``None``: all). ``F.unfold`` for 2d, else
    ``Tensor.unfold`` along each dimension (one copy at the end).
    """
    d = x.dim() - 2
    symmetric = all(a == b for a, b in pad)
    if d == 2 and keep is None and symmetric:
        padding = tuple(a for a, _ in pad)
        return F.unfold(x, kernel, dilation, padding, stride).transpose(1, 2)
    if any(a or b for a, b in pad):
        x = F.pad(x, [v for a, b in reversed(pad) for v in (a, b)])
    for i in range(d):
        span = dilation[i] * (kernel[i] - 1) + 1
        x = x.unfold(2 + i, span, stride[i])  # appends a window dimension
        if dilation[i] > 1:
            x = x[..., :: dilation[i]]
    if keep is not None:  # [B, C, L_1..L_d, k_1..k_d]
        x = x[(slice(None), slice(None), *(slice(0, k) for k in keep))]
    B, C = x.shape[:2]
    positions = math.prod(x.shape[2 : 2 + d])
    perm = [0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d)]
    return x.permute(perm).reshape(B, positions, -1)


def _pairs(reversed_twice: list[int]) -> list[tuple[int, int]]:
    """``F.pad``'s reversed ``[before_last, after_last, …]`` -> pairs in dimension order."""
    pairs = [tuple(reversed_twice[i : i + 2]) for i in range(0, len(reversed_twice), 2)]
    return list(reversed(pairs))


def _conv_operand(m: nn.Module, x: Tensor, y: Tensor) -> DenseOperand | None:
    d = len(m.kernel_size)
    if x.dim() != d + 2:
        return None
    pads = _pairs(list(m._reversed_padding_repeated_twice))
    if m.padding_mode != "zeros":  # as nn.Conv's _conv_forward does
        x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
        pads = [(0, 0)] * d
    cols = unfold_nd(x, m.kernel_size, m.dilation, m.stride, pads)  # [N, P, Cin·K]
    N, P = cols.shape[:2]
    if P != math.prod(y.shape[2:]):
        return None
    G = m.groups
    A = cols.reshape(N, P, G, -1).transpose(1, 2).contiguous()  # [N, G, P, I_g]
    return DenseOperand(A, m.out_channels // G)


def _conv_transpose_operand(m: nn.Module, x: Tensor, y: Tensor) -> DenseOperand | None:
    d = len(m.kernel_size)
    if x.dim() != d + 2 or y.dim() != d + 2:
        return None
    N, Cin = x.shape[:2]
    G = m.groups
    # inputs at their own positions, by group: [N, G, P_in, Cin_g]
    A = x.reshape(N, G, Cin // G, -1).transpose(2, 3).contiguous()
    in_sp, out_sp = tuple(x.shape[2:]), tuple(y.shape[2:])
    pads = [(p, p) for p in m.padding]

    def patches(part: Tensor) -> Tensor:
        # dW[ci, co, k] = Σ_p x[ci, p] g[co, p·s + k·d − pad]: unfold g at the input
        # positions (output_padding can leave extra trailing ones: dropped)
        lead, c = part.shape[:-2], part.shape[-1]
        raw = part.transpose(-1, -2).reshape(-1, c, *out_sp)
        U = unfold_nd(raw, m.kernel_size, m.dilation, m.stride, pads, in_sp)
        return U.reshape(*lead, U.shape[1], U.shape[2])

    channels = m.out_channels // G
    K = math.prod(m.kernel_size)
    return DenseOperand(A, channels, True, patches, channels * K)


def _index_operand(m: nn.Module, idx: Tensor, coef: Tensor) -> IndexOperand:
    tokens = torch.unique(idx[coef != 0])
    return IndexOperand(idx, coef, m.num_embeddings, m.embedding_dim, tokens)


def _bag_operand(
    m: nn.EmbeddingBag, x: Tensor, y: Tensor, args: tuple, kwargs: dict
) -> IndexOperand | None:
    """Bags of an ``EmbeddingBag`` call (2d input, or 1d input with offsets)."""
    offsets = args[1] if len(args) > 1 else kwargs.get("offsets")
    weights = args[2] if len(args) > 2 else kwargs.get("per_sample_weights")
    if x.dim() == 2 and offsets is None:
        idx = x[:, None, :]  # [N, 1, L]
        inside = torch.ones_like(idx, dtype=torch.bool)
        w = None if weights is None else weights.reshape(idx.shape)
    elif x.dim() == 1 and isinstance(offsets, Tensor) and offsets.dim() == 1:
        ends = torch.cat([offsets[1:], offsets.new_tensor([x.numel()])])
        starts = offsets
        if m.include_last_offset:
            starts, ends = offsets[:-1], offsets[1:]
        length = int((ends - starts).max().item()) if starts.numel() else 0
        pos = starts[:, None] + torch.arange(length, device=x.device)  # [N, L]
        inside = (pos < ends[:, None])[:, None]
        pos = pos.clamp(max=max(0, x.numel() - 1))
        idx = x[pos][:, None]
        w = None if weights is None else weights[pos][:, None]
    else:
        return None
    if y.shape != (idx.shape[0], m.embedding_dim):
        return None
    valid = inside if m.padding_idx is None else inside & (idx != m.padding_idx)
    coef = valid.to(y.dtype)
    if w is not None:
        coef = coef * w.to(y.dtype)
    if m.mode == "mean":  # padding leaves the count too
        coef = coef / valid.sum(-1, keepdim=True).clamp(min=1)
    return _index_operand(m, idx, coef)


def linear_call_operand(
    x: Tensor, y: Tensor, batch_size: int, io_layout: bool
) -> DenseOperand | None:
    """The operand of a recorded ``F.linear``/``addmm`` call (``[I, O]`` weights: transposed).

    ``x`` ``[N, *, I]``, or ``[R, I]`` with ``R`` a multiple of ``N`` (``addmm`` on
    flattened positions): the rows are taken as the samples' positions, sample-major
    (the engine's self-check verifies it); ``[T, N, I]`` (sequence-first) is refused.
    """
    if x.dim() < 2 or y.shape[:-1] != x.shape[:-1] or x.shape[:-1].numel() % batch_size:
        return None
    if x.dim() > 2 and x.shape[0] != batch_size:
        return None
    A = x.reshape(batch_size, 1, -1, x.shape[-1]).contiguous()  # [N, 1, P, I]
    return DenseOperand(A, y.shape[-1], transposed=io_layout)


def scale_call_operand(
    xhat: Tensor | None, shape: tuple[int, ...], y: Tensor, batch_size: int
) -> tuple[ElementwiseOperand, tuple[int, ...]] | None:
    """The operand of a recorded elementwise affine ``y = x̂ ⊙ γ + β``, and its layout.

    ``shape``: ``γ``/``β`` broadcast against ``y`` ``[N, *out]``. The output's
    dimensions are ordered broadcast ones first (``perm``), so that ``x̂`` becomes
    ``[N, P, O]`` with ``O`` the parameter's entries in order.
    """
    if y.dim() != len(shape) or y.dim() < 1 or y.shape[0] != batch_size:
        return None
    if shape[0] != 1 or any(s not in (1, o) for s, o in zip(shape, y.shape)):
        return None
    spread = [d for d in range(1, y.dim()) if shape[d] == 1]
    kept = [d for d in range(1, y.dim()) if shape[d] != 1]
    perm = (0, *spread, *kept)
    O = math.prod(shape)
    if xhat is None:  # a bias alone: the operand only carries the layout
        return ElementwiseOperand(y.new_zeros(batch_size, 1, O)), perm
    try:
        full = xhat.expand(y.shape)
    except RuntimeError:
        return None
    return ElementwiseOperand(full.permute(perm).reshape(batch_size, -1, O)), perm


def make_operand(
    kind: Kind, m: nn.Module, args: tuple, kwargs: dict, y: Tensor
) -> Operand | None:
    """The input-side operand from one call's arguments and output ``y``.

    ``None`` when the shapes are not the batched ones the formulas assume (then the
    module stays generic).
    """
    x = args[0] if args else next(iter(kwargs.values()), None)
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        return None
    N = x.shape[0] if x.dim() else 0
    if kind is Kind.LINEAR:
        if x.dim() < 2 or y.shape[:-1] != x.shape[:-1]:
            return None
        A = x.reshape(N, 1, -1, x.shape[-1]).contiguous()  # [N, 1, P, I]
        return DenseOperand(A, m.out_features)
    if kind is Kind.CONV:
        return _conv_operand(m, x, y)
    if kind is Kind.CONV_TRANSPOSE:
        return _conv_transpose_operand(m, x, y)
    if kind is Kind.EMBEDDING:
        if x.dim() < 1 or y.shape != (*x.shape, m.embedding_dim):
            return None
        idx = x.reshape(N, -1, 1)  # [N, P, 1]: one token per position
        coef = torch.ones(idx.shape, dtype=y.dtype, device=y.device)
        if m.padding_idx is not None:
            coef = coef * (idx != m.padding_idx)
        return _index_operand(m, idx, coef)
    if kind is Kind.EMBEDDING_BAG:
        return _bag_operand(m, x, y, args, kwargs)
    if isinstance(m, nn.GroupNorm):
        if x.dim() < 2 or x.shape[1] != m.num_channels:
            return None
        xhat = F.group_norm(x, m.num_groups, None, None, m.eps)
        return ElementwiseOperand(xhat.reshape(N, x.shape[1], -1).transpose(1, 2))
    shape = tuple(m.normalized_shape)
    if x.dim() <= len(shape) or tuple(x.shape[-len(shape) :]) != shape:
        return None
    if isinstance(m, nn.LayerNorm):
        xhat = F.layer_norm(x, shape, None, None, m.eps)
    else:
        xhat = F.rms_norm(x, shape, None, m.eps)
    return ElementwiseOperand(xhat.reshape(N, -1, math.prod(shape)))


__all__ = [
    "Kind",
    "channels_first",
    "classify",
    "linear_call_operand",
    "scale_call_operand",
    "make_operand",
    "output_grad",
    "unfold_nd",
]
