r"""The collectives of the data-set GGN over ``torch.distributed`` (or one process).

:class:`Comm` wraps a process group (``None``: one process, every collective a
no-op), counts the bytes this rank sends and receives, and makes failures collective:
:meth:`Comm.agree` is called after every phase of local work, so that a rank that
failed raises on every rank instead of leaving the others waiting in the next
collective. Collectives run on the device of the tensors passed (gloo on CPU, NCCL
on CUDA); objects are exchanged with :func:`torch.distributed.all_gather_object`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class RankFailed(RuntimeError):
    """Another rank of the process group failed; its message is attached."""


class Comm:
    """A process group seen by the data-set GGN.

    Args:
        group: A ``torch.distributed`` process group, or ``None`` (one process).
    """

    def __init__(self, group: object | None) -> None:
        self.group = group
        self.bytes = 0
        if group is None:
            self.rank, self.world = 0, 1
            return
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "process_group was given but torch.distributed is not initialised; "
                "call torch.distributed.init_process_group(...) on every rank first, "
                "or pass process_group=None for one process."
            )
        self.dist = dist
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world > 1

    def _global(self, rank: int) -> int:
        return self.dist.get_global_rank(self.group, rank)

    def gather_objects(self, obj: object) -> list:
        """Every rank's ``obj``, in rank order (pickled; for small metadata)."""
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world
        self.dist.all_gather_object(out, obj, group=self.group)
        return out

    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank if any rank failed (``error``: this rank's, or ``None``)."""
        if not self.distributed:
            if error is not None:
                raise error
            return
        text = None if error is None else f"{type(error).__name__}: {error}"
        failed = [(r, t) for r, t in enumerate(self.gather_objects(text)) if t]
        if error is not None:
            raise error
        if failed:
            rank, text = failed[0]
            raise RankFailed(
                f"rank {rank} of the process group failed, so this rank stops too: "
                f"{text}"
            )

    def handshake(self, description: dict) -> None:
        """Raise :class:`RankFailed` on every rank unless all ranks describe the same call.

        ``description`` maps a topic (parameters, values, options, loss) to plain
        data; every rank compares every rank's with rank 0's, so all raise alike, with
        the first rank and topic that differ, before any data collective.
        """
        if not self.distributed:
            return
        every = self.gather_objects(description)
        for rank, other in enumerate(every):
            for topic, mine in every[0].items():
                theirs = other.get(topic)
                if theirs != mine:
                    raise RankFailed(
                        f"rank {rank} of the process group differs from rank 0 in "
                        f"its {topic}: {_first_difference(mine, theirs)}. Every rank "
                        "must call ggn_spectrum_dataset with the same model (names, "
                        "shapes, dtypes and values of its parameters and buffers), "
                        "loss and options."
                    )

    def all_reduce_(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the ranks, in place."""
        if self.distributed:
            self.dist.all_reduce(tensor, group=self.group)
            self.bytes += 2 * tensor.numel() * tensor.element_size()
        return tensor

    def broadcast_(self, tensor: Tensor, src: int) -> Tensor:
        """``tensor`` of rank ``src`` (group rank) on every rank, in place."""
        if self.distributed:
            self.dist.broadcast(tensor, src=self._global(src), group=self.group)
            self.bytes += tensor.numel() * tensor.element_size()
        return tensor

    def broadcast_objects(self, objects: Sequence, src: int = 0) -> list:
        """Rank ``src``'s ``objects`` on every rank (pickled)."""
        if not self.distributed:
            return list(objects)
        out = list(objects)
        self.dist.broadcast_object_list(out, src=self._global(src), group=self.group)
        return out


def _first_difference(a: object, b: object) -> str:
    """The first entry where two descriptions differ, as text."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return f"entry {i}: {x!r} on rank 0, {y!r} here"
        return f"{len(a)} entries on rank 0, {len(b)} here"
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                return f"{k}: {a.get(k)!r} on rank 0, {b.get(k)!r} here"
    return f"{a!r} on rank 0, {b!r} here"


def check_sync_batch_norm(model: torch.nn.Module) -> None:
    """Refuse ``SyncBatchNorm`` in train mode: it normalises across ranks.

    The data-set GGN normalises every batch with that batch's statistics (the
    single-process semantics, which the distributed call reproduces); statistics
    synchronised across ranks would make every rank's GGN depend on the others'.
    """
    names = [
        name or "<root>"
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.SyncBatchNorm) and m.training
    ]
    if names:
        raise ValueError(
            f"module(s) {', '.join(names)} are SyncBatchNorm in train mode: they "
            "normalise with statistics across ranks, but the data-set GGN "
            "normalises every batch with its own statistics. Convert them to "
            "BatchNorm (e.g. a copy of the model with nn.BatchNorm2d modules holding "
            "the same parameters and buffers), or put them in eval mode."
        )


__all__ = ["Comm", "RankFailed", "check_sync_batch_norm"]
