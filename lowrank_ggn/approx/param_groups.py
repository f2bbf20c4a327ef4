r"""Diagonal blocks of the GGN for groups of parameters, from one linearisation.

Split the parameters into disjoint groups ``θ = (θ_1, …, θ_G)``. The rows of ``V``
split accordingly, ``V = [V_1; …; V_G]`` with ``V_g = J_{θ_g}ᵀ S`` (``D_g × N·C``),
and the diagonal block of the GGN that belongs to group ``g`` is

.. math::
    G_{gg} = V_g V_g^⊤, \qquad \text{nonzero spectrum from } 𝒢_g = V_g^⊤ V_g
    \ (N·C × N·C), \qquad e_k = V_g u_k / \sqrt{λ_k} ∈ ℝ^{D_g}.

This is ViViT's per-layer (block-diagonal) curvature
(https://arxiv.org/abs/2106.02624). All groups share one forward pass, one set of
loss factors and one backward pass for ``V``: the engine's factor blocks
``Vᵀ`` (``[N·C, D]``) are sliced into each group's parameter columns, so the cost is
that of one Gram matrix plus ``G`` products ``V_gᵀ V_g`` (``O(N²C² D)`` in total).
Memory is that of ``Vᵀ``, ``N·C·D`` numbers. The blocks are exact for any model,
BatchNorm in train mode included (``J`` is the full-batch Jacobian).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from lowrank_ggn.core.model import module_label
from lowrank_ggn.core.validation import check_model


def per_layer_groups(model: nn.Module) -> list[dict]:
    """One parameter group per module that directly owns trainable parameters.

    Args:
        model: The model.

    Returns:
        ``[{"name": qualified module name, "params": [its own parameters]}, …]`` in
        ``model.named_modules()`` order, for parameters with ``requires_grad``; a
        parameter shared between modules appears only in the first. The root module
        is named ``"<root>"``.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
        >>> [g["name"] for g in per_layer_groups(net)]
        ['0', '2']

    """
    check_model(model)
    seen: set[int] = set()
    groups = []
    for name, module in model.named_modules():
        own = []
        for p in module.parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                own.append(p)
        if own:
            groups.append({"name": module_label(name), "params": own})
    return groups


def resolve_param_groups(
    model: nn.Module,
    param_groups: Sequence[Mapping] | None,
    params: Sequence[Tensor] | None,
) -> tuple[list[Tensor], list[slice]] | None:
    """Check ``param_groups`` and flatten them into one parameter list.

    Args:
        model: The model that owns the parameters.
        param_groups: ``[{"params": [...]}, …]`` (other keys are ignored), or ``None``.
        params: Must be ``None`` when groups are given.

    Returns:
        ``None`` without groups; else ``(params, columns)``: the concatenated group
        parameters and, per group, its column range in the flattened parameters.

    Raises:
        ValueError: For empty groups, a missing ``"params"`` key, a parameter in two
            groups, or ``params`` given together with ``param_groups``.
        TypeError: For a group that is not a mapping.

    """
    if param_groups is None:
        return None
    if params is not None:
        raise ValueError(
            "pass either params or param_groups, not both; param_groups already "
            "lists the parameters."
        )
    if isinstance(param_groups, Mapping) or not isinstance(param_groups, Iterable):
        raise TypeError(
            "param_groups must be a list of dicts like [{'params': [...]}, ...]; got "
            f"{type(param_groups).__name__}."
        )
    groups = list(param_groups)
    if not groups:
        raise ValueError("param_groups is empty; pass at least one group, or None.")
    owned = {id(p) for p in model.parameters()}
    flat: list[Tensor] = []
    columns: list[slice] = []
    group_of: dict[int, int] = {}
    start = 0
    for g, group in enumerate(groups):
        if not isinstance(group, Mapping) or "params" not in group:
            raise TypeError(
                f"param_groups[{g}] must be a dict with key 'params' (as for "
                f"torch.optim); got {type(group).__name__}."
            )
        members = group["params"]
        members = [members] if isinstance(members, Tensor) else list(members)
        if not members:
            raise ValueError(f"param_groups[{g}]['params'] is empty.")
        for p in members:
            if not isinstance(p, Tensor) or id(p) not in owned:
                raise ValueError(
                    f"param_groups[{g}] holds an object that is not a parameter of "
                    "model; pass tensors from model.parameters()."
                )
            if id(p) in group_of:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} is in param_groups"
                    f"[{group_of[id(p)]}] and param_groups[{g}]; groups must be "
                    "disjoint."
                )
            group_of[id(p)] = g
        size = sum(p.numel() for p in members)
        columns.append(slice(start, start + size))
        start += size
        flat.extend(members)
    return flat, columns


def groups_within(
    model: nn.Module, params: Sequence[Tensor], param_groups: Sequence[Mapping]
) -> tuple[list[list[Tensor]], list[Tensor]]:
    """Check groups of a subset of ``params``; the engine's partition and positions.

    Args:
        model: The model that owns the parameters.
        params: The parameters of a linearisation, in flattening order.
        param_groups: ``[{"params": [...]}, …]``, disjoint, each inside ``params``.

    Returns:
        ``(groups, positions)``: every group's parameters plus, last, the rest of
        ``params`` (if any), a partition of ``params``; and per requested group the
        flat positions ``[D_g]`` of its parameters in the group's order.

    Raises:
        ValueError: As :func:`resolve_param_groups`, or for a parameter outside
            ``params``.
    """
    flat, columns = resolve_param_groups(model, param_groups, None)
    offsets, start = {}, 0
    for p in params:
        offsets[id(p)] = start
        start += p.numel()
    groups = params_by_group(flat, columns)
    positions = []
    for g, members in enumerate(groups):
        missing = [p for p in members if id(p) not in offsets]
        if missing:
            raise ValueError(
                f"param_groups[{g}] holds a parameter (shape {tuple(missing[0].shape)})"
                " this GGN does not differentiate; add it to params= or leave "
                "params=None."
            )
        positions.append(
            torch.cat(
                [
                    torch.arange(offsets[id(p)], offsets[id(p)] + p.numel())
                    for p in members
                ]
            ).to(params[0].device)
        )
    grouped = {id(p) for members in groups for p in members}
    rest = [p for p in params if id(p) not in grouped]
    return groups + ([rest] if rest else []), positions


def params_by_group(
    params: Sequence[Tensor], columns: Sequence[slice]
) -> list[list[Tensor]]:
    """Split ``params`` (flattened in order) into the groups given by column ranges."""
    groups: list[list[Tensor]] = [[] for _ in columns]
    start = 0
    for p in params:
        g = next(i for i, cols in enumerate(columns) if cols.start <= start < cols.stop)
        groups[g].append(p)
        start += p.numel()
    return groups
