r"""The Gram matrix ``Vᵀ V`` of the backpropagated loss-Hessian factors.

.. math::
    G = V V^⊤ ∈ ℝ^{D×D}, \qquad \mathcal{G} = V^⊤ V ∈ ℝ^{NC×NC},
    \qquad \mathcal{G}_{(n,c),(m,c')} = ⟨J_θF_n^⊤ s_{nc},\; J_θF_m^⊤ s_{mc'}⟩ .

Both matrices share their nonzero eigenvalues, and ``G e = λ e`` with
``e = V u / √λ`` for ``𝒢 u = λ u`` (Dangel, Tatzel & Hennig, TMLR 2022,
https://arxiv.org/abs/2106.02624).

Rows and columns of ``𝒢`` are ordered **sample-major**: index ``n·C + c`` is factor
column ``c`` of sample ``n``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lowrank_ggn._state import model_preserved
from lowrank_ggn._validation import check_linearization_memory, check_options
from lowrank_ggn.factors import DEFAULT_CHUNK, Linearization, linearize


def gram_from_linearization(lin: Linearization, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """``Vᵀ V`` ``[N·C, N·C]`` for a linearised model (symmetric by construction)."""
    Vt = lin.factors_matrix(chunk)  # [N·C, D]
    gram = Vt @ Vt.T
    return 0.5 * (gram + gram.T)


def gram_matrix(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    params: Sequence[Tensor] | None = None,
    chunk: int = DEFAULT_CHUNK,
    path: str | None = None,
    memory_budget: float | None = None,
) -> Tensor:
    r"""The ``[N·C, N·C]`` Gram matrix ``Vᵀ V`` of the mini-batch GGN.

    Works for any model, BatchNorm in train mode included: the engine checks whether
    the forward pass mixes samples and then uses full-batch vector-Jacobian products
    (see :mod:`lowrank_ggn.sample_mixing`).

    Args:
        model: Module mapping ``inputs`` ``[N, *in]`` to outputs ``[N, *out]``. It is
            observed, never changed (parameters, buffers, mode, grads).
        loss_func: ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss`` with
            reduction ``'mean'`` or ``'sum'``.
        inputs: The batch, ``[N, *in]``.
        targets: Targets for the batch.
        params: Parameters of ``model``; default: all that require grad.
        chunk: Factor columns per vmapped backward pass (time/memory trade-off).
        path: ``None`` (automatic), ``"per_sample"`` or ``"full_batch"``.
        memory_budget: Bytes that ``Vᵀ`` ``[N·C, D]``, the Gram matrix and ``S`` may
            take together; ``None``: ``LOWRANK_GGN_MEMORY_BUDGET`` or 8 GiB.
            Checked after the forward pass, before any backward pass.

    Returns:
        ``[N·C, N·C]`` in the parameters' dtype and device, rows ordered sample-major
        (``n·C + c``), where ``C`` is the number of factor columns per sample
        (``C = Π out`` for all supported losses). Its trace is ``tr G``.

    Example:
        >>> import torch
        >>> from lowrank_ggn.reference import dense_ggn
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
        >>> K = gram_matrix(model, torch.nn.CrossEntropyLoss(), X, y)
        >>> G = dense_ggn(model, torch.nn.CrossEntropyLoss(), X, y)
        >>> assert K.shape == (8, 8) and torch.allclose(K.trace(), G.trace())

    """
    check_options(chunk=chunk, memory_budget=memory_budget)
    with model_preserved(model):
        lin = linearize(model, loss_func, inputs, targets, params, path, memory_budget)
        check_linearization_memory(lin, memory_budget)
        return gram_from_linearization(lin, chunk)


__all__ = ["gram_matrix", "gram_from_linearization"]
