r"""``F.multi_head_attention_forward`` opened up, so that its projections are captured.

``nn.MultiheadAttention`` (and the ``nn.Transformer*`` layers built on it) calls one
function, ``F.multi_head_attention_forward``, whose inner ``F.linear`` calls a
``TorchFunctionMode`` does not see: its parameters ``in_proj_weight``,
``in_proj_bias``, ``out_proj.weight`` and ``out_proj.bias`` would take per-sample
vector-Jacobian products (the generic treatment). For self-attention
(``query is key is value``, packed in-projection) :func:`open_attention` computes the
same output as

.. math::
    [q, k, v] = x W_{in}^⊤ + b_{in}, \qquad
    a = \operatorname{attention}(q, k, v), \qquad y = a W_{out}^⊤ + b_{out},

with both projections as ``F.linear`` calls on batch-first views ``[N, L, ·]`` that
the capture's mode records (dense operands, Kronecker or explicit rows), and the
attention core — masks, causal flag, dropout, averaged weights — left to PyTorch's
own function, called with identity projections (``x I = x`` exactly). The result is
compared with the function's own output to round-off before it is used; anything
else (cross-attention, separate projection weights, ``bias_k``/``bias_v``,
``add_zero_attn``, unbatched inputs, active dropout) runs as it comes, generic.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lowrank_ggn.core.tolerances import roundoff_close

#: The function this module opens, and its parameters by name.
ATTENTION = F.multi_head_attention_forward
_SIGNATURE = inspect.signature(ATTENTION)


def _opens(call: dict[str, Any], selected: set[int]) -> bool:
    """Whether the call is self-attention with a selected packed in-projection."""
    query, W = call["query"], call["in_proj_weight"]
    return (
        isinstance(query, Tensor)
        and query.dim() == 3
        and query is call["key"] is call["value"]
        and not call["use_separate_proj_weight"]
        and isinstance(W, Tensor)
        and id(W) in selected
        and W.dim() == 2
        and call["bias_k"] is None
        and call["bias_v"] is None
        and not call["add_zero_attn"]
        and call["static_k"] is None
        and call["static_v"] is None
        and (call["dropout_p"] == 0.0 or not call["training"])
        and isinstance(call["out_proj_weight"], Tensor)
    )


def open_attention(
    args: tuple,
    kwargs: dict,
    selected: set[int],
    mode: torch.overrides.TorchFunctionMode,
) -> tuple[Tensor, Tensor | None] | None:
    """The call's ``(output, weights)`` with its projections as visible calls, or ``None``.

    Called from the mode's ``__torch_function__`` (the mode is off there); the two
    projections run with ``mode`` on, so that it records them. ``None``: the call is
    not opened (see the module docstring) or the opened output differs from the
    function's own beyond round-off; then nothing was recorded by it.

    Args:
        args: The call of ``F.multi_head_attention_forward`` as made
            (sequence-first ``[L, N, E]`` inputs, as ``nn.MultiheadAttention`` passes
            them).
        kwargs: Its keyword arguments.
        selected: ``id`` of the parameters the capture may record.
        mode: The capture's function mode.
    """
    bound = _SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    call = dict(bound.arguments)
    if not _opens(call, selected):
        return None
    with torch.no_grad():
        expected = ATTENTION(*args, **kwargs)[0]
    x, E = call["query"], call["embed_dim_to_check"]
    eye = torch.eye(E, dtype=x.dtype, device=x.device)
    with mode:
        proj = F.linear(x.transpose(0, 1), call["in_proj_weight"], call["in_proj_bias"])
        q, k, v = proj.transpose(0, 1).chunk(3, dim=-1)  # [L, N, E] each
        core = {**call, "query": q, "key": k, "value": v}
        core.update(
            in_proj_weight=None,
            in_proj_bias=None,
            use_separate_proj_weight=True,
            q_proj_weight=eye,
            k_proj_weight=eye,
            v_proj_weight=eye,
            out_proj_weight=eye,
            out_proj_bias=None,
        )
        a, weights = ATTENTION(**core)  # the mode sees it: not opened (no parameter)
        y = F.linear(a.transpose(0, 1), call["out_proj_weight"], call["out_proj_bias"])
        y = y.transpose(0, 1)
    if y.shape != expected.shape or not roundoff_close(y.detach(), expected):
        return None
    return y, weights


__all__ = ["ATTENTION", "open_attention"]
