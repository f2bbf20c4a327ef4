r"""Forward passes a call makes, counted by a pre-hook on the model itself.

Counts are in full-batch equivalents: samples processed / ``N``. A vmapped
per-sample pass counts its samples (functorch's wrappers unwrapped), a
Jacobian-vector product counts as a pass. Independent of ``lowrank_ggn``, so that
it counts an older release's passes the same way.
"""

from __future__ import annotations


def samples_in(x) -> int:
    """Samples a call on ``x`` processes (vmapped batches unwrapped)."""
    from torch._C import _functorch as ft

    n = x.shape[0] if x.dim() else 1
    while ft.is_functorch_wrapped_tensor(x):
        bdim = ft.maybe_get_bdim(x) if ft.is_batchedtensor(x) else None
        x = ft.get_unwrapped(x)  # vjp/jvp/grad wrap without a mapped dimension
        n *= 1 if bdim is None else x.shape[bdim]
    return n


class ForwardPasses:
    """Samples ``model`` processes (a forward pre-hook), in batches of ``N``.

    >>> import torch
    >>> model = torch.nn.Linear(3, 2)
    >>> counter = ForwardPasses(model, 4)
    >>> _ = model(torch.ones(8, 3))
    >>> counter.passes(), counter.passes()
    (2.0, 0.0)
    >>> counter.remove()
    """

    def __init__(self, model, N: int) -> None:
        self.N, self.samples = N, 0
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, args) -> None:
        self.samples += samples_in(args[0])

    def passes(self) -> float:
        """Full-batch passes since the last call."""
        out, self.samples = self.samples / self.N, 0
        return out

    def remove(self) -> None:
        """Take the hook off the model."""
        self.handle.remove()
