r"""The data-set GGN's batches: read, agreed on by every rank, linearised, collected.

:func:`lowrank_ggn.approx.dataset.ggn_spectrum_dataset` validates its arguments,
then calls :func:`handshake` (what every rank must agree on), :func:`read_batches`
(global batch indices), :func:`collect` (every batch's linearisation or factors
``Vᵀ_b``, the weights ``w_b`` and the Gram's row offsets per rank) and its solver.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Sequence, Sized
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowrank_ggn.approx.dataset_solvers import check_budget
from lowrank_ggn.approx.distributed import Comm
from lowrank_ggn.core.engine.report import EngineReport
from lowrank_ggn.core.engine.rows import layerwise_rows
from lowrank_ggn.core.inputs import as_inputs
from lowrank_ggn.core.linearization import Linearization, linearize
from lowrank_ggn.core.modes import Solver
from lowrank_ggn.core.options import GGNOptions
from lowrank_ggn.core.paths import EnginePath
from lowrank_ggn.core.state import fingerprint
from lowrank_ggn.core.subsampling import check_subsampling
from lowrank_ggn.core.validation import check_call

#: With ``progress=None``, a progress bar is shown for at least this many batches.
PROGRESS_MIN_BATCHES = 20


@dataclass
class Collected:
    """What the batches gave, on this rank and (``flat``) on every rank in order."""

    lins: list[Linearization]  # Lanczos: every batch's linearisation
    blocks: list[Tensor]  # dense: every batch's ``Vᵀ_b`` ``[N_b·C, D]``
    # (N_b, columns, path, engine report or None for Lanczos), all ranks
    flat: list[tuple[int, int, EnginePath, EngineReport | None]]
    offsets: list[int]  # first Gram row of each rank, and Ñ
    weights: list[float]  # w_b, all ranks
    scales: list[float]  # √w_b of this rank's batches


def progress_bar(batches: Iterable, progress: bool | None) -> Iterable:
    total = len(batches) if isinstance(batches, Sized) else None
    show = progress if progress is not None else (total or 0) >= PROGRESS_MIN_BATCHES
    if not show:
        return batches
    try:
        from tqdm.auto import tqdm
    except ImportError:  # optional dependency
        return batches
    return tqdm(batches, total=total, file=sys.stderr, desc="GGN batches", unit="batch")


def check_batches(batches: object) -> None:
    """Refuse one ``(inputs, targets)`` pair where an iterable of pairs belongs."""
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


def unpack(item: object, b: int) -> tuple[Tensor, Tensor]:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise TypeError(
            f"batches[{b}] must be a pair (inputs, targets); got {type(item).__name__}"
            f"{f' of length {len(item)}' if isinstance(item, (tuple, list)) else ''}."
        )
    return item[0], item[1]


def projected_columns(
    batches: Iterable, lin: Linearization, subsampling: object = None
) -> int | None:
    """Total columns of a list of batches, from the first batch's columns per sample."""
    if not isinstance(batches, Sequence):
        return None
    if subsampling is not None:  # the same positions in every batch
        return lin.num_columns * len(batches)
    per_sample = lin.num_columns // lin.num_samples
    try:
        return per_sample * sum(int(item[0].shape[0]) for item in batches)
    except (TypeError, AttributeError, IndexError):
        return None


def stable_name(obj: object) -> object:
    """What a handshake compares of a callable: the same text on every rank."""
    if obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, nn.Module):
        return type(obj).__name__
    return getattr(obj, "__qualname__", type(obj).__name__)


def handshake(
    model: nn.Module,
    loss_func: nn.Module,
    params: object,
    options: GGNOptions,
    **spectrum: object,
) -> dict:
    """What every rank must agree on before the first data collective.

    ``spectrum``: the call's other options (``top_k``, ``eigenvectors``, ``rtol``,
    ``path``, ``solver``, ``activations``, ``subsampling``), as the user passed them.
    """
    shapes = (
        [tuple(getattr(p, "shape", ())) for p in params]
        if isinstance(params, (list, tuple))
        else type(params).__name__
    )
    return {
        "parameters": [
            (n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()
        ],
        "values": [entry[4] for entry in fingerprint(model)],
        "options": {
            "params": None if params is None else repr(shapes),
            **spectrum,
            "strategy": getattr(options.strategy, "value", None),
            "accumulate": getattr(options.accumulate, "value", None),
            "chunk": options.chunk,
            "mc_samples": options.mc_samples,
            "memory_budget": options.memory_budget,
            "output": stable_name(options.output),
        },
        "loss": (stable_name(loss_func), getattr(loss_func, "reduction", None)),
    }


def read_batches(batches: Iterable, comm: Comm) -> tuple[Iterable, int]:
    """The batches (a list on several ranks) and this rank's first global index."""
    if not comm.distributed:
        return batches, 0
    failure = None  # every rank's count first: global batch indices
    try:  # inside the agreement: a rank's failing iterator stops every rank
        batches = list(batches)
    except Exception as err:  # noqa: BLE001 - re-raised by comm.agree
        failure, batches = err, []
    comm.agree(failure, "the agreement after reading the batches")
    return batches, sum(comm.gather_objects(len(batches))[: comm.rank])


def collect(
    model: nn.Module,
    loss_func: nn.Module,
    batches: Iterable,
    params: Sequence[Tensor] | None,
    options: GGNOptions,
    solver: Solver,
    comm: Comm,
    first: int,
    subsampling: Sequence[int] | Tensor | None = None,
) -> Collected:
    """Linearise every batch; keep its rows ``Vᵀ_b`` (dense) or linearisation (Lanczos).

    Dense: each batch's forward pass is captured and its rows come from the
    layer-wise engine (:func:`~lowrank_ggn.core.engine.rows.layerwise_rows`, the
    strategy of ``options`` or the cost model's), within what the data set's rows and
    Gram so far leave of the memory budget. ``subsampling``: the batch positions whose
    curvature every batch keeps (:mod:`lowrank_ggn.core.subsampling`).
    """
    base_seed = None
    if options.mc_samples is not None:  # batch b draws from its own generator
        base_seed = int(torch.randint(2**62, (1,), generator=options.generator).item())
    lins: list[Linearization] = []
    blocks: list[Tensor] = []
    local: list[tuple[int, int, EnginePath, EngineReport | None]] = []
    error = None
    dense = solver is Solver.DENSE
    try:
        for b, item in enumerate(progress_bar(batches, options.progress)):
            X, y = unpack(item, b)
            selected = check_call(model, loss_func, X, params, y)
            index = batch_positions(subsampling, X, b)
            batch = dataclasses.replace(
                options,
                generator=batch_generator(options.generator, base_seed, first + b),
            )
            capture = dense and not options.generic  # the engine's forward pass
            lin = linearize(
                model, loss_func, X, y, selected, batch, index, capture=capture
            )
            if not dense:
                lins.append(lin)
                local.append((lin.batch_size, lin.num_columns, lin.path, None))
                continue
            if b == 0 and not comm.distributed:
                projected = projected_columns(batches, lin, subsampling)
                if projected is not None:
                    check_budget(projected, lin, options, "of this data set")
            so_far = sum(c for _, c, _, _ in local) + lin.num_columns
            held = check_budget(so_far, lin, options, f"after {b + 1} batches")
            # the engine's blocks: what the rows and the Gram leave of the budget
            work = max(options.memory_budget - held, options.memory_budget // 16)
            rows, report = layerwise_rows(lin, batch, work)
            blocks.append(rows)  # [N_b·C, D]
            local.append((lin.batch_size, lin.num_columns, lin.path, report))
        if not local:
            where = (
                f" on every rank (rank {comm.rank} has none)"
                if comm.distributed
                else ""
            )
            raise ValueError(
                f"batches is empty; pass at least one (inputs, targets){where}."
            )
    except Exception as err:  # noqa: BLE001 - raised on every rank by agree
        error = err
    comm.agree(error, "the agreement after every batch's factors")
    everyone = comm.gather_objects(local)
    flat = [entry for rank in everyone for entry in rank]
    sizes = [entry[0] for entry in flat]
    weights = [n / sum(sizes) if loss_func.reduction == "mean" else 1.0 for n in sizes]
    offsets = [0]
    for rank_entries in everyone:
        offsets.append(offsets[-1] + sum(entry[1] for entry in rank_entries))
    start = sum(len(entries) for entries in everyone[: comm.rank])
    scales = [w**0.5 for w in weights[start : start + len(local)]]
    return Collected(lins, blocks, flat, offsets, weights, scales)


def batch_positions(
    subsampling: Sequence[int] | Tensor | None, X: object, b: int
) -> Tensor | None:
    """Batch ``b``'s checked sub-sampling positions (``None``: every sample)."""
    if subsampling is None:
        return None
    inputs = as_inputs(X)
    try:
        return check_subsampling(subsampling, inputs.size, inputs.device)
    except ValueError as err:
        raise ValueError(
            f"batches[{b}]: {err} The same positions apply to every batch: keep "
            "them below the smallest batch size (a data loader's drop_last=True "
            "drops a short last batch)."
        ) from None


def stack_scaled(blocks: list[Tensor], scales: list[float]) -> Tensor:
    """``[s_1 V_1ᵀ; s_2 V_2ᵀ; …]``, freeing each block as it is copied (one copy held)."""
    out = blocks[0].new_empty(sum(b.shape[0] for b in blocks), blocks[0].shape[1])
    start = 0
    for i, s in enumerate(scales):
        rows = blocks[i].shape[0]
        torch.mul(blocks[i], s, out=out[start : start + rows])
        blocks[i], start = None, start + rows
    return out


def batch_generator(
    generator: torch.Generator | None, base_seed: int | None, b: int
) -> torch.Generator | None:
    """Batch ``b``'s Monte-Carlo generator: seeded ``base + b`` (``None``: no MC)."""
    if base_seed is None:
        return None
    device = generator.device if generator is not None else "cpu"
    return torch.Generator(device=device).manual_seed(base_seed + b)


__all__ = [
    "Collected",
    "batch_generator",
    "check_batches",
    "batch_positions",
    "collect",
    "handshake",
    "read_batches",
    "stack_scaled",
]
