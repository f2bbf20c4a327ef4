r"""The collectives of the data-set GGN over ``torch.distributed`` (or one process).

:class:`Comm` wraps a process group (``None``: one process, every collective a
no-op), counts the bytes this rank sends and receives, and makes failures collective:
:meth:`Comm.agree` is called after every phase of local work, so that a rank that
failed raises on every rank instead of leaving the others waiting in the next
collective. Collectives run on the device of the tensors passed (gloo on CPU, NCCL
on CUDA); objects are pickled into byte tensors on the group's object device.

Every collective is started with ``async_op=True`` and waited for at most
``timeout`` seconds (``work.wait(timeout=...)``): a wait that runs out, or a
collective that fails because a peer closed its connection (gloo: "Connection
closed by peer" when a rank crashed), raises :class:`RankFailed` naming the rank that
did not answer (the other rank of two; the candidates of more), the seconds waited
and what to do. A wait starts when this rank enters the collective, so the timeout
must exceed the longest any rank lags behind another between two collectives (one
rank's extra batches, say). Default: the group's own timeout
(``init_process_group(timeout=...)``, 30 min for gloo unless set), which also caps
any larger value: the backend gives up then. After such a failure the group is
unusable (a collective is left pending); destroying it, or the interpreter's exit,
may wait for that collective until the peer's connection closes or the group's own
timeout ends (measured with gloo: ``ProcessGroup.abort`` does not shorten it).
"""

from __future__ import annotations

import math
import numbers
import pickle
import time
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch
from torch import Tensor

from lowrank_ggn.core.model import module_label

#: Seconds waited when the process group's own timeout cannot be read (gloo's default).
FALLBACK_TIMEOUT_S = 1800.0


class RankFailed(RuntimeError):
    """Another rank of the process group failed, disagreed, died or did not answer."""


def check_timeout(timeout: object) -> None:
    """Refuse a ``timeout`` that is not ``None`` or a positive finite number of seconds."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(
            "timeout must be a number of seconds (or None: the process group's own "
            f"timeout); got {type(timeout).__name__} {timeout!r}."
        )
    if not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(
            "timeout must be a positive finite number of seconds (or None: the "
            f"process group's own timeout); got {timeout!r}."
        )


class Comm:
    """A process group seen by the data-set GGN.

    Args:
        group: A ``torch.distributed`` process group, or ``None`` (one process).
        timeout: Seconds any one collective wait may last before :class:`RankFailed`
            (``None``: the group's own timeout; see the module docstring). Checked
            for one process too.
    """

    def __init__(self, group: object | None, timeout: float | None = None) -> None:
        check_timeout(timeout)
        self.group = group
        self.bytes = 0
        self.timeout = None if timeout is None else float(timeout)
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
        self.device = _object_device(group)
        if self.timeout is None:
            self.timeout = _group_timeout(group, self.device)

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world > 1

    def _global(self, rank: int) -> int:
        return self.dist.get_global_rank(self.group, rank)

    def _run(self, what: str, collective: Callable[[], object]) -> None:
        """Start ``collective`` (an ``async_op=True`` call); wait ``timeout`` at most."""
        start = time.monotonic()
        try:
            collective().wait(timeout=timedelta(seconds=self.timeout))
        except RuntimeError as err:  # gloo/NCCL: timed out, connection closed, ...
            raise RankFailed(self._lost(what, err, time.monotonic() - start)) from err

    def _lost(self, what: str, err: BaseException, waited: float) -> str:
        """The message of a collective that failed or ran out of time."""
        others = [str(r) for r in range(self.world) if r != self.rank]
        who = f"rank {others[0]}"  # two ranks: the other one
        if len(others) > 1:
            who = f"one of ranks {', '.join(others)} (their logs tell which)"
        detail = (str(err).strip().splitlines() or [""])[0]
        if "timed out" in detail.lower() or "timeout" in detail.lower():
            what_happened = (
                f"did not answer within {waited:.1f} s (timeout={self.timeout:g} s) in "
                f"{what}: it hung, died, or lags further behind than that (more or "
                "larger batches than the others): check its log, or pass a larger "
                "timeout="
            )
        else:
            what_happened = (
                f"failed or closed its connection after {waited:.1f} s in {what} "
                "(it probably crashed: check its log)"
            )
        return (
            f"{who} of the process group {what_happened}. This rank ({self.rank}) "
            "stops; the group is unusable now (a collective is left pending): "
            "destroy it or end the process, and start again. "
            f"[{type(err).__name__}: {detail}]"
        )

    def gather_objects(
        self, obj: object, what: str = "an exchange of metadata"
    ) -> list:
        """Every rank's ``obj``, in rank order (pickled; for small metadata)."""
        if not self.distributed:
            return [obj]
        data = _to_bytes(obj, self.device)
        # the lengths first ([1] per rank), then the bytes padded to the longest
        size = torch.tensor([data.numel()], dtype=torch.int64, device=self.device)
        sizes = [torch.empty_like(size) for _ in range(self.world)]
        self._run(what, lambda: self._all_gather(sizes, size))
        lengths = [int(s.item()) for s in sizes]
        padded = data.new_zeros(max(lengths))
        padded[: data.numel()] = data
        out = [torch.empty_like(padded) for _ in range(self.world)]
        self._run(what, lambda: self._all_gather(out, padded))
        return [_from_bytes(t[:n]) for t, n in zip(out, lengths)]

    def _all_gather(self, out: list[Tensor], tensor: Tensor) -> object:
        return self.dist.all_gather(out, tensor, group=self.group, async_op=True)

    def _broadcast(self, tensor: Tensor, src: int) -> object:
        return self.dist.broadcast(
            tensor, src=self._global(src), group=self.group, async_op=True
        )

    def agree(
        self, error: BaseException | None, what: str = "the agreement after local work"
    ) -> None:
        """Raise on every rank if any rank failed (``error``: this rank's, or ``None``)."""
        if not self.distributed:
            if error is not None:
                raise error
            return
        text = None if error is None else f"{type(error).__name__}: {error}"
        try:
            texts = self.gather_objects(text, what)
        except RankFailed:
            if error is not None:  # this rank's own error is the news here
                raise error from None
            raise
        failed = [(r, t) for r, t in enumerate(texts) if t]
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
        every = self.gather_objects(description, "the handshake before any data")
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
            what = f"an all-reduce of {list(tensor.shape)} {tensor.dtype}"
            self._run(
                what,
                lambda: self.dist.all_reduce(tensor, group=self.group, async_op=True),
            )
            self.bytes += 2 * tensor.numel() * tensor.element_size()
        return tensor

    def broadcast_(self, tensor: Tensor, src: int) -> Tensor:
        """``tensor`` of rank ``src`` (group rank) on every rank, in place."""
        if self.distributed:
            what = f"a broadcast of rank {src}'s {list(tensor.shape)} {tensor.dtype}"
            self._run(what, lambda: self._broadcast(tensor, src))
            self.bytes += tensor.numel() * tensor.element_size()
        return tensor

    def broadcast_objects(self, objects: Sequence, src: int = 0) -> list:
        """Rank ``src``'s ``objects`` on every rank (pickled)."""
        if not self.distributed:
            return list(objects)
        what = f"a broadcast of rank {src}'s results"
        data = _to_bytes(list(objects), self.device)
        # the length first ([1]), then the bytes
        size = torch.tensor([data.numel()], dtype=torch.int64, device=self.device)
        self._run(what, lambda: self._broadcast(size, src))
        if self.rank != src:
            data = data.new_empty(int(size.item()))
        self._run(what, lambda: self._broadcast(data, src))
        return _from_bytes(data)


def _to_bytes(obj: object, device: torch.device) -> Tensor:
    """``obj`` pickled into a ``uint8`` tensor on ``device``."""
    raw = bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
    return torch.frombuffer(raw, dtype=torch.uint8).to(device)


def _from_bytes(data: Tensor) -> object:
    """The object that :func:`_to_bytes` pickled into ``data``."""
    return pickle.loads(data.cpu().numpy().tobytes())  # the group's own ranks' data


def _object_device(group: object) -> torch.device:
    """Where the group exchanges pickled objects: CPU for gloo, the current GPU for NCCL."""
    from torch.distributed import distributed_c10d as c10d

    try:  # torch's own choice for all_gather_object (a private helper)
        kind = c10d._get_object_coll_device(group)
    except Exception:  # noqa: BLE001 - another torch version: CPU unless NCCL only
        kind = "cpu"
    if kind == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(kind)


def _group_timeout(group: object, device: torch.device) -> float:
    """The group's own timeout in seconds (``FALLBACK_TIMEOUT_S`` if unreadable)."""
    try:  # the backend's options (a private attribute of torch's process groups)
        own = group._get_backend(device).options._timeout
        return float(own.total_seconds())
    except Exception:  # noqa: BLE001 - another backend or torch version
        return FALLBACK_TIMEOUT_S


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
        module_label(name)
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
