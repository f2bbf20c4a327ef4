r"""The GGN diagonal of a whole data set, from many batches (and many processes).

For batches ``b = 1, …, B`` with ``N_b`` samples each, every batch runs its own
forward pass (train-mode BatchNorm uses that batch's statistics, as in training) and
has its own GGN ``G_b``; the data-set GGN of :func:`lowrank_ggn.ggn_spectrum_dataset`,

.. math::
    G = \sum_b w_b G_b, \qquad
    w_b = \begin{cases} N_b / \sum_{b'} N_{b'} & \text{'mean'} \\ 1 & \text{'sum'}
    \end{cases},

has the diagonal ``diag(G) = Σ_b w_b diag(G_b)``: no cross-batch term, so each batch's
diagonal (:meth:`lowrank_ggn.GGN.diagonal`, exact or Monte-Carlo, ``V`` never formed)
is computed and dropped before the next batch is read. Memory: one batch's call plus
``D`` for the running sum; time: the sum of the batches' calls. Under
``torch.distributed`` every rank sums its own batches and one all-reduce of ``D + 2``
numbers adds the ranks' sums (and sample and batch counts); a rank that fails raises on every
rank (:mod:`lowrank_ggn.approx.distributed`).

Monte-Carlo factors (``mc_samples=M``): one seed ``s`` is drawn from ``generator``
and batch ``b`` (global index, rank order) draws from a generator seeded ``s + b``, so
the estimate does not depend on how the batches are split across ranks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowrank_ggn.approx.dataset_batches import (
    batch_generator,
    check_batches,
    handshake,
    read_batches,
    unpack,
)
from lowrank_ggn.approx.distributed import Comm, check_sync_batch_norm
from lowrank_ggn.core.diagonal import DiagonalValues
from lowrank_ggn.core.inputs import batch_size_of
from lowrank_ggn.core.losses.registry import check_loss_func, resolve_loss
from lowrank_ggn.core.options import GGNOptions
from lowrank_ggn.core.validation import check_model
from lowrank_ggn.curvature import GGN

#: ``GGN`` keywords that are not :meth:`GGNOptions.of`'s (checked by ``GGN`` itself).
_GGN_ONLY = ("params", "batch_size")


@dataclass
class DatasetDiagonal(DiagonalValues):
    """Result of :func:`ggn_diagonal_dataset`.

    Attributes:
        per_param: ``diag(G)`` of the data-set GGN per parameter, shaped like it, in
            the order of ``params`` (default: the parameters that require grad).
        num_samples: ``Σ_b N_b`` over all batches (all ranks).
        num_batches: ``B``, all ranks.
        mc_samples: ``M`` of the Monte-Carlo factors, ``None`` if exact.
        bytes_exchanged: Bytes this rank sent and received (0 for one process).
    """

    per_param: list[Tensor]
    num_samples: int
    num_batches: int
    mc_samples: int | None
    bytes_exchanged: int


def ggn_diagonal_dataset(
    model: nn.Module,
    loss_func: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    mc_samples: int | None = None,
    generator: torch.Generator | None = None,
    process_group: object | None = None,
    timeout: float | None = None,
    **options,
) -> DatasetDiagonal:
    r"""``diag(Σ_b w_b G_b)`` over many batches: the data-set GGN's diagonal.

    See the module docstring for the math and the weights ``w_b``.

    Args:
        model: The module; never changed.
        loss_func: A supported loss; its reduction sets ``w_b``.
        batches: Iterable of ``(inputs, targets)`` pairs, consumed once; sizes may
            differ (train-mode BatchNorm needs ``N_b ≥ 2``).
        mc_samples: ``M`` Monte-Carlo factor columns per sample (unbiased estimate).
        generator: ``torch.Generator`` for the Monte-Carlo draws (see the module
            docstring); the same seeded generator on every rank.
        process_group: A ``torch.distributed`` process group (``None``: one
            process). Every rank passes its own batches and gets the diagonal over
            the union of all ranks' batches; every rank must pass the same model,
            loss and options.
        timeout: Seconds any one collective wait may last
            (:mod:`lowrank_ggn.approx.distributed`).
        **options: Options of :class:`lowrank_ggn.GGN` for every batch (``params``,
            ``strategy``, ``engine``, ``chunk``, ``memory_budget``, ``output``, …);
            not ``subsampling`` (sub-sample the batches instead).

    Returns:
        A :class:`DatasetDiagonal` (``.per_param``, ``.flat``, ``.trace``); under
        ``torch.distributed`` the same on every rank, or
        :class:`~lowrank_ggn.approx.distributed.RankFailed` raised on every rank
        when one fails, disagrees, dies or does not answer.

    Example:
        >>> from lowrank_ggn.reference import dense_ggn
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3),
        ...                           torch.nn.ReLU(), torch.nn.Linear(3, 2)).double()
        >>> mse = torch.nn.MSELoss(reduction="sum")
        >>> A, B = torch.randn(4, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
        >>> tA, tB = torch.randn(4, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
        >>> res = ggn_diagonal_dataset(net, mse, [(A, tA), (B, tB)])  # 'sum': w_b = 1
        >>> G = dense_ggn(net, mse, A, tA) + dense_ggn(net, mse, B, tB)
        >>> assert torch.allclose(res.flat, G.diagonal()) and res.num_samples == 7

    """
    check_model(model)
    check_loss_func(loss_func)
    check_sync_batch_norm(model)
    check_batches(batches)
    if "subsampling" in options:
        raise ValueError(
            "ggn_diagonal_dataset takes no subsampling: every sample of every batch "
            "counts; pass fewer or smaller batches instead."
        )
    typed = GGNOptions.of(  # every option checked before any batch is read
        mc_samples=mc_samples,
        generator=generator,
        **{k: v for k, v in options.items() if k not in _GGN_ONLY},
    )
    comm = Comm(process_group, timeout)
    if comm.distributed:  # before any data collective: the same call on every rank
        params = options.get("params")
        comm.handshake(handshake(model, loss_func, params, typed, call="diagonal"))
    batches, first = read_batches(batches, comm)
    base_seed = None
    if mc_samples is not None:  # batch b draws from its own generator (any split)
        base_seed = int(torch.randint(2**62, (1,), generator=generator).item())
    # one resolved loss for every batch: a callable's reduction, found numerically
    # on the first batch, then holds for all
    loss_func = resolve_loss(loss_func)
    total: Tensor | None = None  # Σ_b N_b diag(G_b) ('mean') or Σ_b diag(G_b)
    shapes: list[torch.Size] = []
    samples = num_batches = 0
    error = None
    try:
        for b, item in enumerate(batches):
            num_batches += 1
            X, y = unpack(item, b)
            draw = {}
            if mc_samples is not None:
                gen = batch_generator(generator, base_seed, first + b)
                draw = {"mc_samples": mc_samples, "generator": gen}
            ggn = GGN(model, loss_func, X, y, **options, **draw)
            diag = ggn.diagonal().per_param
            shapes = [d.shape for d in diag]
            flat = torch.cat([d.reshape(-1) for d in diag])
            n = batch_size_of(X, options.get("batch_size"))
            flat = flat * n if loss_func.reduction == "mean" else flat
            total = flat if total is None else total.add_(flat)
            samples += n
            del ggn, diag, flat
    except Exception as err:  # noqa: BLE001 - re-raised by comm.agree
        error = err
    comm.agree(error, "the agreement after every batch's diagonal")
    if total is None:  # this rank had no batches: zeros of the others' shape
        total = _zeros_like_params(model, options)
        shapes = [p.shape for p in _params(model, options)]
    counts = torch.tensor(
        [samples, num_batches], dtype=total.dtype, device=total.device
    )
    summed = comm.all_reduce_(torch.cat([total, counts]))  # D + 2 numbers
    total = summed[:-2]
    samples, num_batches = (int(round(float(v))) for v in summed[-2:])
    if samples == 0:
        raise ValueError("batches is empty: pass at least one (inputs, targets) pair.")
    if loss_func.reduction == "mean":
        total = total / samples
    per_param = list(total.split([s.numel() for s in shapes]))
    return DatasetDiagonal(
        [d.reshape(s) for d, s in zip(per_param, shapes)],
        samples,
        num_batches,
        mc_samples,
        comm.bytes,
    )


def _params(model: nn.Module, options: dict) -> list[Tensor]:
    chosen = options.get("params")
    if chosen is None:
        return [p for p in model.parameters() if p.requires_grad]
    return list(chosen)


def _zeros_like_params(model: nn.Module, options: dict) -> Tensor:
    params = _params(model, options)
    D = sum(p.numel() for p in params)
    return torch.zeros(D, dtype=params[0].dtype, device=params[0].device)


__all__ = ["DatasetDiagonal", "ggn_diagonal_dataset"]
