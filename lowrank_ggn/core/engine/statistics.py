r"""BatchNorm statistics directions that start below the convolution feeding them.

A statistics direction of a train-mode BatchNorm (:mod:`~lowrank_ggn.core.engine.batchnorm`)
is ``(J_θ m)ᵀ`` for one statistic ``m ∈ {μ_k, r_k}`` of channel ``k``. Its cotangent at
the BatchNorm input ``x`` ``[N, K, *pos]`` lives on channel ``k`` alone:

.. math::
    \frac{∂μ_k}{∂x_{n k p}} = \frac{1}{N P}, \qquad
    \frac{∂r_k}{∂x_{n k p}} = -\frac{r_k^2\, x̂_{n k p}}{N P}

(``P`` positions; ``r = (var + ε)^{-1/2}`` with the biased variance, ``x̂ = (x − μ) r``).
When ``x = conv(h)`` is the output of a captured convolution (any dimension, stride,
padding, dilation, groups), two things follow without a backward pass through the
convolution:

* the convolution's own rows: direction ``k`` reaches only output channel ``k`` of its
  weight, ``Σ_{n,p} c_{np} A_{np}`` over the unfolded inputs ``A`` (the patch mean for
  ``μ_k``, ``x̂``-weighted patch sums for ``r_k``: one GEMM ``[K, N·P] @ [N·P, I]`` for
  all channels), and its bias ``Σ_{n,p} c_{np}``;
* the cotangent at ``h``: a transposed convolution of one output channel per
  direction, ``1/K`` of the one autograd would run on the mostly-zero cotangent at
  ``x`` (unfolded patches of that channel times its weight row).

Backward passes for the layers below then start at ``h``'s gradient edge
(:class:`FeedingConv`).

Where nothing below ``h`` needs gradients (the network's first convolution) and the
BatchNorm alone reads ``x``, the directions of *higher* BatchNorm layers end at this
BatchNorm's output ``y`` instead (:class:`BottomBatchNorm`): for their cotangent ``δ``
there, the BatchNorm's backward is the frozen ``γ r δ`` plus the statistics' own
directions weighted by ``δ``'s two channel sums, and those directions' rows are the
closed form above, so its backward (a pass over ``[N, K, *pos]`` per direction) never
runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge

from lowrank_ggn.core.engine.batchnorm import BNLayer
from lowrank_ggn.core.engine.layer import Layer
from lowrank_ggn.core.engine.operands import DenseOperand


def _param_edge_ok(edge: tuple, captured: Tensor | None, selected: set[int]) -> bool:
    """Whether a convolution's weight or bias edge needs no backward pass.

    It does not when nothing flows there, or when it accumulates into a leaf that is
    either the layer's own selected parameter (rows in closed form) or unselected.
    """
    node = edge[0]
    if node is None:
        return True
    leaf = getattr(node, "variable", None)
    if leaf is None:  # a computed weight (parametrisation): its graph matters
        return False
    return leaf is captured or id(leaf) not in selected


@dataclass
class FeedingConv:
    """The captured convolution ``x = conv(h)`` whose output a BatchNorm normalises.

    Attributes:
        layer: The convolution's record.
        bn: The BatchNorm.
        edge: ``h``'s gradient edge (``None``: nothing below ``h`` needs gradients).
        weight: The weight the call used, detached ``[O, I/G, *kernel]``.
        stride, padding, dilation, groups: The call's arguments (explicit padding
            for ``padding_mode`` other than zeros is already part of ``h``).
        in_shape: ``h``'s shape ``[N, I, *in]``.
    """

    layer: Layer
    bn: BNLayer
    edge: GradientEdge | None
    weight: Tensor
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int
    in_shape: torch.Size

    @classmethod
    def find(
        cls, bn: BNLayer, layers: list[Layer], selected: set[int]
    ) -> FeedingConv | None:
        """The route for ``bn``, or ``None`` where its input is anything else.

        ``selected``: ``id`` of the parameters that get rows. Required: ``x`` is the
        output of one captured, unshared convolution as that convolution computed it
        (no in-place operation in between) whose weight and bias are leaves.
        """
        la = next(
            (la for la in layers if la.outputs and la.outputs[0] is bn.input), None
        )
        if la is None or la.shared or la.functional or not la.edges:
            return None
        rec, operand = la.edges[0], la.operand
        if rec is None or not isinstance(operand, DenseOperand) or operand.transposed:
            return None
        node = rec.node
        if type(node).__name__ != "ConvolutionBackward0" or node._saved_transposed:
            return None
        now = get_gradient_edge(bn.input)
        if now.node is not node or now.output_nr != rec.output_nr:
            return None  # modified in place after the convolution
        if not (
            _param_edge_ok(node.next_functions[1], la.weight, selected)
            and _param_edge_ok(node.next_functions[2], la.bias, selected)
        ):
            return None
        try:
            in_shape = node._saved_input.shape
        except RuntimeError:  # h modified in place after the call
            return None
        below = node.next_functions[0]
        return cls(
            la,
            bn,
            None if below[0] is None else GradientEdge(*below),
            node._saved_weight.detach(),
            list(node._saved_stride),
            list(node._saved_padding),
            list(node._saved_dilation),
            int(node._saved_groups),
            in_shape,
        )

    # ------------------------------------------------------------------ cotangents
    def _xhat(self) -> Tensor:
        """``x̂`` as ``[N, K, P]``."""
        x = self.bn.xhat
        return x.reshape(x.shape[0], x.shape[1], -1)

    def _scales(self) -> tuple[float, Tensor]:
        """``1/(N·P)`` and ``−r²/(N·P)`` ``[K]``."""
        x = self._xhat()
        NP = x.shape[0] * x.shape[2]
        r = self.bn.inv_std.detach()
        return 1.0 / NP, -(r * r) / NP

    def cotangents(self, start: int, stop: int) -> Tensor:
        """Cotangents at ``x`` of directions ``start…stop−1`` on their channel: ``[B, N, P]``."""
        K = self.bn.channels
        x = self._xhat()
        mean_scale, r_scale = self._scales()
        js = torch.arange(start, stop, device=x.device)
        ks = js % K
        c = x[:, ks].transpose(0, 1) * r_scale[ks][:, None, None]  # [B, N, P]
        c[js < K] = mean_scale
        return c

    def own_rows(self) -> list[Tensor]:
        """Rows ``[2K, numel]`` of the convolution's selected weight and bias.

        ``μ_k``: ``Σ_{n,p} A_{n,j(k),p} / (N·P)`` in weight row ``k``, 1 in bias entry
        ``k``; ``r_k``: ``−r_k² Σ_{n,p} x̂_{nkp} A_{n,j(k),p} / (N·P)`` and
        ``−r_k² Σ x̂_{nk·} / (N·P)``.
        """
        la, K = self.layer, self.bn.channels
        A = la.operand.A  # [N, G, P, I_g]
        N, G, P, Ig = A.shape
        Og = la.operand.channels
        x = self._xhat()  # [N, K, P]
        mean_scale, r_scale = self._scales()
        out = []
        if la.weight is not None:
            rows = A.new_zeros(2, K, K, Ig)  # [stat, k, output channel, I_g]
            diag = torch.arange(K, device=A.device)
            for j in range(G):
                Aj = A[:, j].reshape(N * P, Ig)  # a view when G = 1
                ch = diag[j * Og : (j + 1) * Og]
                rows[0, ch, ch] = Aj.sum(0) * mean_scale
                # [O_g, N·P] @ [N·P, I_g]: x̂-weighted patch sums of the group
                xj = x[:, j * Og : (j + 1) * Og].transpose(0, 1).reshape(Og, N * P)
                rows[1, ch, ch] = (xj @ Aj) * r_scale[ch, None]
            out.append(rows.reshape(2 * K, -1))
        if la.bias is not None:
            bias = x.new_zeros(2, K, K)
            diag = torch.arange(K, device=x.device)
            bias[0, diag, diag] = 1.0  # Σ_{n,p} 1/(N·P)
            bias[1, diag, diag] = x.sum((0, 2)) * r_scale
            out.append(bias.reshape(2 * K, K))
        return out

    def input_cotangents(self, start: int, stop: int) -> Tensor:
        """Cotangents at ``h`` of directions ``start…stop−1``: ``[B, *h.shape]``.

        Direction ``b`` on channel ``k_b`` (group ``j_b``) is the transposed
        convolution of its one-channel cotangent ``c_b`` with weight row ``k_b``,
        written as the convolution it is: ``c_b`` with ``s − 1`` zeros between its
        entries (stride ``s``), padded by ``d (k − 1) − p`` (cropped where negative;
        more after it where ``h`` is longer than the transposed convolution's own
        output), unfolded into patches of the flipped kernel, times that row,
        ``[I_g, k] @ [k, P_in]`` per sample: one channel of patches instead of a
        grouped convolution (slow on CPUs).
        """
        K = self.bn.channels
        c = self.cotangents(start, stop)  # [B, N, P]
        B, N = c.shape[:2]
        ks = torch.arange(start, stop, device=c.device) % K
        W = self.weight[ks]  # [B, I_g, *kernel]
        Ig, kernel = W.shape[1], W.shape[2:]
        d = len(self.stride)
        out_sp, in_sp = self.bn.xhat.shape[2:], self.in_shape[2:]
        z = c.reshape(B * N, 1, *out_sp)
        if any(s > 1 for s in self.stride):  # s − 1 zeros between the entries
            size = [(o - 1) * s + 1 for o, s in zip(out_sp, self.stride)]
            spread = c.new_zeros(B * N, 1, *size)
            spread[(..., *(slice(None, None, s) for s in self.stride))] = z
            z = spread
        pads = []  # F.pad's order: the last dimension first
        for i in reversed(range(d)):
            reach = self.dilation[i] * (kernel[i] - 1)
            natural = z.shape[2 + i] + 2 * (reach - self.padding[i]) - reach
            pads += [reach - self.padding[i], reach - self.padding[i]]
            pads[-1] += in_sp[i] - natural  # h's tail past that output
        z = F.pad(z, pads)  # negative entries crop
        for i in range(d):  # windows as views (F.unfold of one channel: slow)
            z = z.unfold(2 + i, self.dilation[i] * (kernel[i] - 1) + 1, 1)
            z = z[..., :: self.dilation[i]]
        patches = z.reshape(B, N, math.prod(in_sp), -1)  # [B, N, P_in, k]
        flipped = W.flip(list(range(2, 2 + d))).reshape(B, 1, Ig, -1)
        found = torch.matmul(flipped, patches.transpose(2, 3))  # [B, N, I_g, P_in]
        found = found.reshape(B, N, Ig, *in_sp)
        if self.groups == 1:
            return found
        cot = c.new_zeros(B, N, self.groups, Ig, *in_sp)
        js = ks // (self.weight.shape[0] // self.groups)
        cot[torch.arange(B, device=c.device), :, js] = found
        return cot.reshape(B, *self.in_shape)


def gradient_referrers(roots: list) -> dict[tuple, list]:
    """``(node, output_nr)`` -> the nodes that read it, over the graph below ``roots``.

    Each reader is listed once per input it reads the output as.
    """
    refs: dict[tuple, list] = {}
    seen = {id(r): r for r in roots if r is not None}
    stack = list(seen.values())
    while stack:
        node = stack.pop()
        for nxt, nr in node.next_functions:
            if nxt is None:
                continue
            refs.setdefault((nxt, nr), []).append(node)
            if id(nxt) not in seen:
                seen[id(nxt)] = nxt
                stack.append(nxt)
    return refs


@dataclass
class BottomBatchNorm:
    r"""A BatchNorm over a bottom convolution, where higher directions' passes end.

    Required (:meth:`find`): its :class:`FeedingConv` has nothing below its input, and
    in the graph the BatchNorm's node alone reads the convolution's output and the
    selected ``γ``, ``β``. For a direction's cotangent ``δ`` at ``y`` ``[N, K, *pos]``
    the BatchNorm's backward is

    .. math::
        \frac{∂ℓ}{∂x} = γ r δ + Σ_k \Bigl(w_{μ_k} \frac{∂μ_k}{∂x}
        + w_{r_k} \frac{∂r_k}{∂x}\Bigr), \qquad
        w_{μ_k} = −γ_k r_k Σ δ_k, \quad w_{r_k} = \frac{γ_k}{r_k} Σ δ_k x̂_k

    (sums over samples and positions), so the convolution's rows are those of ``δ``
    scaled by ``γ_k r_k`` in output channel ``k`` plus ``w`` times its own statistics
    rows (:meth:`FeedingConv.own_rows`), and ``γ``, ``β`` get ``Σ δ x̂`` and ``Σ δ``:
    two channel sums of ``δ`` instead of the BatchNorm's backward. Where the weight
    has rows, ``x_k = W_k · A + b_k`` gives the second sum from them,
    ``Σ δ_k x̂_k = r_k (W_k · R_k + (b_k − μ_k) Σ δ_k)`` with ``R_k = Σ δ_k A``
    (weight row ``k`` of ``δ``), ``O(K·I)`` per direction instead of a pass over
    ``δ``; ``Σ δ`` is the bias row where the bias has one.

    Attributes:
        feed: The convolution and the BatchNorm.
        own: The convolution's own statistics rows ``[2K, numel]`` per selected
            parameter.
        shift: ``b − μ`` ``[K]`` (``b = 0`` without a bias).
    """

    feed: FeedingConv
    own: list[Tensor]
    shift: Tensor

    @classmethod
    def find(
        cls, feed: FeedingConv | None, refs: dict[tuple, list]
    ) -> BottomBatchNorm | None:
        """The stop at ``feed.bn``, or ``None`` where passes must run through it.

        ``refs``: :func:`gradient_referrers` of the graph the directions run on.
        """
        if feed is None or feed.edge is not None or feed.bn.target is None:
            return None
        bn, rec = feed.bn, feed.layer.edges[0]
        node = bn.mean.grad_fn
        if refs.get((rec.node, rec.output_nr)) != [node]:
            return None  # x is read elsewhere too
        for p in bn.params:  # γ, β read by this BatchNorm alone
            acc = [k for k in refs if getattr(k[0], "variable", None) is p]
            if len(acc) != 1 or refs[acc[0]] != [node]:
                return None
        b = feed.layer.module.bias
        shift = -bn.mean.detach() + (0.0 if b is None else b.detach())
        return cls(feed, feed.own_rows(), shift)

    @property
    def target(self) -> GradientEdge:
        """Where the passes end: ``y``'s gradient edge."""
        return self.feed.bn.target

    def rows(self, g: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Rows ``[B, numel]`` of the convolution's and the BatchNorm's parameters.

        ``g``: the chunk's cotangents at ``y`` as the convolution's output gradients
        ``[B, N, P, K]``.
        """
        la = self.feed.layer
        K = self.feed.bn.channels
        found = la.param_rows(g)  # of δ: weight [B, K·I_g·k], bias [B, K]
        sums = found[-1] if la.bias is not None else g.sum((1, 2))  # Σ δ [B, K]
        if la.weight is not None:
            R = found[0].reshape(g.shape[0], K, -1)
            return self._combine(R, sums, found)
        # [B, N, P, K] against x̂ [N, K, P]
        dots = torch.einsum("bnpk,nkp->bk", g, self.feed._xhat())
        return self._combine(None, sums, found, dots)

    def direction_rows(self, g: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """:meth:`rows` of one direction from its cotangent at ``y`` as autograd gives it.

        ``g`` ``[N, K, *pos]``. The convolution's weight-gradient kernel computes ``R``
        and ``Σ δ`` straight from ``g`` and ``h`` (no copy of ``g`` into a chunk; on
        CPUs 7.4 against 10.7 ms per direction for 3c3d's first convolution,
        ``N = 128``). Returns rows ``[numel]`` per parameter.
        """
        feed, la = self.feed, self.feed.layer
        K = feed.bn.channels
        need_w = la.weight is not None
        _, R, sums = torch.ops.aten.convolution_backward(
            g,
            la.edges[0].node._saved_input,  # h
            feed.weight,
            [K],
            feed.stride,
            feed.padding,
            feed.dilation,
            False,
            [0] * len(feed.stride),
            feed.groups,
            [False, need_w, True],
        )
        found = [R[None]] if need_w else []
        found += [sums[None]] if la.bias is not None else []
        dots = None
        if not need_w:  # [N, K, P] against x̂ [N, K, P]
            x = feed._xhat()
            dots = torch.linalg.vecdot(g.reshape(x.shape), x).sum(0)[None]
        R = R.reshape(1, K, -1) if need_w else None
        blocks, affine = self._combine(R, sums[None], found, dots)
        return [b[0] for b in blocks], [a[0] for a in affine]

    def _combine(
        self,
        R: Tensor | None,
        sums: Tensor,
        found: list[Tensor],
        dots: Tensor | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Rows of ``B`` directions, from what ``δ`` gave.

        ``R``: its weight rows ``[B, K, I_g·k]`` (or ``None``); ``sums``: ``Σ δ``
        ``[B, K]``; ``found``: its rows ``[B, numel]`` per convolution parameter;
        ``dots``: ``Σ δ x̂`` ``[B, K]``, from ``R`` unless given.
        """
        bn = self.feed.bn
        B, K = sums.shape
        r = bn.inv_std.detach()
        scale = bn.gamma * r
        if dots is None:  # r (W_k · R_k + (b_k − μ_k) Σ δ_k)
            W = self.feed.weight.reshape(K, -1)
            dots = r * (torch.einsum("bki,ki->bk", R, W) + self.shift * sums)
        w = torch.cat([-scale * sums, (bn.gamma / r) * dots], dim=1)  # [B, 2K]
        blocks = []
        for block, own in zip(found, self.own):
            block = (block.reshape(B, K, -1) * scale[:, None]).reshape(B, -1)
            blocks.append(block.addmm_(w, own))
        affine = []
        if bn.weight is not None:
            affine.append(dots)
        if bn.bias is not None:
            affine.append(sums)
        return blocks, affine


__all__ = ["BottomBatchNorm", "FeedingConv", "gradient_referrers"]
