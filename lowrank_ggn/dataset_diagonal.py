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
``torch.distributed`` every rank sums its own batches and one all-reduce of ``D + 1``
numbers adds the ranks' sums (and sample counts); a rank that fails raises on every
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

from lowrank_ggn.approx.distributed import Comm, check_sync_batch_norm
from lowrank_ggn.core.inputs import batch_size_of
from lowrank_ggn.core.loss_registry import check_loss_func, resolve_loss
from lowrank_ggn.core.loss_sampling import check_mc_samples
from lowrank_ggn.core.state import fingerprint
from lowrank_ggn.core.validation import check_model
from lowrank_ggn.curvature import GGN


@dataclass
class DatasetDiagonal:
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

    @property
    def flat(self) -> Tensor:
        """``diag(G)`` ``[D]``, parameters flattened in order."""
        return torch.cat([d.reshape(-1) for d in self.per_param])

    @property
    def trace(self) -> Tensor:
        """``tr G``, a 0-dim tensor: the sum of the data-set GGN's eigenvalues."""
        return self.flat.sum()


def _check_batches(batches: object) -> None:
    if (
        isinstance(batches, tuple)
        and len(batches) == 2
        and isinstance(batches[0], Tensor)
    ):
        raise TypeError(
            "batches must be an iterable of (inputs, targets) pairs; for one batch "
            "pass [(inputs, targets)]."
        )
    if not isinstance(batches, Iterable):
        raise TypeError(
            "batches must be an iterable of (inputs, targets) pairs; got "
            f"{type(batches).__name__}."
        )


def _describe(model: nn.Module, loss_func: nn.Module, options: dict) -> dict:
    """What every rank must agree on before any data collective."""
    return {
        "parameters": [
            (n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()
        ],
        "values": [entry[4] for entry in fingerprint(model)],
        "options": sorted(
            (k, repr(v) if not isinstance(v, (list, tuple)) else f"{len(v)} tensors")
            for k, v in options.items()
        ),
        "loss": (type(loss_func).__name__, getattr(loss_func, "reduction", None)),
    }


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
        A :class:`DatasetDiagonal` (``.per_param``, ``.flat``, ``.trace``).

    Raises:
        RankFailed: When another rank fails, disagrees, dies or does not answer.

    Example:
        >>> import torch
        >>> from lowrank_ggn.reference import dense_ggn
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
        ...                             torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        >>> loss = torch.nn.CrossEntropyLoss()
        >>> X, y = torch.randn(9, 3, dtype=torch.float64), torch.randint(0, 2, (9,))
        >>> res = ggn_diagonal_dataset(model, loss, [(X[:5], y[:5]), (X[5:], y[5:])])
        >>> G = 5 / 9 * dense_ggn(model, loss, X[:5], y[:5]) + 4 / 9 * dense_ggn(
        ...     model, loss, X[5:], y[5:])
        >>> assert torch.allclose(res.flat, G.diagonal())

    """
    check_model(model)
    check_loss_func(loss_func)
    _check_batches(batches)
    check_mc_samples(mc_samples, generator)
    check_sync_batch_norm(model)
    if "subsampling" in options:
        raise ValueError(
            "ggn_diagonal_dataset takes no subsampling: every sample of every batch "
            "counts; pass fewer or smaller batches instead."
        )
    comm = Comm(process_group, timeout)
    described = {**options, "mc_samples": mc_samples}
    if comm.distributed:  # before any data collective: the same call on every rank
        comm.handshake(_describe(model, loss_func, described))
    error: BaseException | None = None
    try:  # inside the agreement: a rank's failing iterator stops every rank
        batches = list(batches)
    except Exception as err:  # noqa: BLE001 - re-raised by comm.agree
        error, batches = err, []
    comm.agree(error, "the agreement after reading the batches")
    counts = comm.gather_objects(len(batches)) if comm.distributed else [len(batches)]
    first = sum(counts[: comm.rank])
    base_seed = None
    if mc_samples is not None:  # batch b draws from its own generator (any split)
        base_seed = int(torch.randint(2**62, (1,), generator=generator).item())
    # one resolved loss for every batch: a callable's reduction, found numerically
    # on the first batch, then holds for all
    loss_func = resolve_loss(loss_func)
    total: Tensor | None = None  # Σ_b N_b diag(G_b) ('mean') or Σ_b diag(G_b)
    shapes: list[torch.Size] = []
    samples = 0
    error = None
    try:
        for b, (X, y) in enumerate(batches):
            draw = {}
            if mc_samples is not None:
                device = generator.device if generator is not None else "cpu"
                gen = torch.Generator(device=device).manual_seed(base_seed + first + b)
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
    count = torch.tensor([float(samples)], dtype=total.dtype, device=total.device)
    summed = comm.all_reduce_(torch.cat([total, count]))
    total, samples = summed[:-1], int(round(float(summed[-1])))
    if samples == 0:
        raise ValueError("batches is empty: pass at least one (inputs, targets) pair.")
    if loss_func.reduction == "mean":
        total = total / samples
    per_param = list(total.split([s.numel() for s in shapes]))
    return DatasetDiagonal(
        [d.reshape(s) for d, s in zip(per_param, shapes)],
        samples,
        sum(counts),
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
