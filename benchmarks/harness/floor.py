r"""The floor of a spectrum call's work on this machine, measured in the same run.

Whatever route a Gram-based spectrum takes, it cannot do less than (issue 27):

* **forward**: one forward pass of the batch through the model and the loss;
* **backward**: ``C`` backward passes of the whole batch, one per output column
  (vector-Jacobian products of the logits ``[N, C]`` with cotangents ``[N, C]``,
  all samples at once, to the parameters);
* **gram**: the Gram matrix's multiply-adds over the explicit blocks,
  ``V Vᵀ`` for ``V`` ``[N·C, D_e]`` with ``D_e`` the parameters of the layers
  whose per-sample rows the engine forms explicitly (Kronecker-factored layers cost
  a few small GEMMs and are left out): BLAS ``syrk`` on the CPU (one triangle, half
  a GEMM's work; scipy's BLAS, limited to torch's thread count where threadpoolctl
  is installed), ``V @ V.T`` elsewhere (``floor_gram_kernel`` says which). A
  ``V`` of more than :data:`MAX_ELEMENTS` entries is timed on a block of columns
  and the time scaled to ``D_e`` (the work is linear in ``D_e``; a ResNet-18's
  ``V`` would not fit in memory, which the engine streams too);
* **eigh**: ``torch.linalg.eigh`` of an ``[N·C, N·C]`` symmetric matrix.

Every part runs in the model's dtype and device (so in float32 for a float32 model:
the float32 floor, whatever precision the call accumulates in), on random data of
the right shapes (the cost of dense kernels does not depend on the values), each the
fastest of ``repeats``. :func:`spectrum_floor` returns the seconds of each part and
their sum; a benchmark reports ``time / floor`` (:func:`over_floor`), how far a call
is from what this machine can do.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from functools import partial

#: Layer treatments (``EngineReport.layers``) whose Gram needs no explicit rows.
FACTORED = {"kronecker", "split_kronecker"}
#: Largest ``V`` block the floor allocates (entries; 1 GiB in float32: 3c3d at N = 128
#: in one block).
MAX_ELEMENTS = 2**28


def explicit_parameters(model, layers: dict) -> int:
    """``D_e``: parameters of the layers an engine report lists as not factored.

    ``layers`` maps qualified module names to treatments (enums or their values).
    """
    total = 0
    for name, kind in layers.items():
        if str(getattr(kind, "value", kind)) in FACTORED:
            continue
        module = model.get_submodule(name)
        total += sum(p.numel() for p in module.parameters(recurse=False))
    return total


def _backward(out, params: list, cotangents) -> None:
    """One backward pass of the batch per output column: ``S[c]`` ``[N, C]`` → the
    parameters, the graph kept for the next."""
    import torch

    for c in range(cotangents.shape[0]):
        torch.autograd.grad(out, params, cotangents[c], retain_graph=True)


def _gram_kernel(V) -> tuple[Callable[[], object], str]:
    """The cheapest ``V Vᵀ`` this device offers: BLAS ``syrk`` on the CPU (float32 or
    float64, through scipy), else torch's GEMM."""
    import torch

    if V.device.type == "cpu" and V.dtype in (torch.float32, torch.float64):
        from scipy.linalg import blas

        syrk = blas.ssyrk if V.dtype == torch.float32 else blas.dsyrk
        A = V.numpy().T  # [D_e, N·C], Fortran order: no copy; syrk forms AᵀA
        return partial(syrk, 1.0, A, trans=1), "syrk (scipy BLAS)"
    return partial(torch.mm, V, V.T), "gemm (torch)"


def _blas_threads():
    """scipy's BLAS limited to torch's threads (threadpoolctl), else a no-op."""
    import contextlib

    import torch

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(torch.get_num_threads(), user_api="blas")


def _fastest(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def spectrum_floor(
    model, loss, X, y, explicit: int, repeats: int = 2, seed: int = 0
) -> dict:
    """Seconds of the floor's parts for ``(model, loss, X, y)`` and their sum.

    Runs on a copy of the model (train-mode BatchNorm statistics of the original
    stay as they are). Returns ``floor_forward_s``, ``floor_backward_s``,
    ``floor_gram_s``, ``floor_eigh_s``, ``floor_s`` (the sum) and
    ``floor_gram_shape`` (``[N·C, D_e]``) with ``floor_gram_kernel``.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    >>> X, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    >>> floor = spectrum_floor(model, torch.nn.CrossEntropyLoss(), X, y, 15)
    >>> assert floor["floor_gram_shape"] == [15, 15] and floor["floor_s"] > 0
    """
    import torch

    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    sync = torch.cuda.synchronize if X.device.type == "cuda" else (lambda: None)
    gen = torch.Generator(device=X.device).manual_seed(seed)
    kw = {"dtype": params[0].dtype, "device": X.device, "generator": gen}

    def forward():
        out = model(X)
        loss(out, y)
        return out

    parts = {"floor_forward_s": _fastest(forward, repeats, sync)}
    out = forward()
    N, C = out.shape[0], out[0].numel()
    cotangents = torch.randn(C, *out.shape, **kw)  # one [N, C] per output column

    backward = partial(_backward, out, params, cotangents)
    parts["floor_backward_s"] = _fastest(backward, repeats, sync)
    del backward, cotangents, out  # the graph goes before the Gram's operand comes
    width = min(explicit, max(1, MAX_ELEMENTS // (N * C)))  # a block of columns
    V = torch.randn(N * C, width, **kw)  # explicit rows [N·C, D_e], block by block
    gram, kernel = _gram_kernel(V)
    with _blas_threads():
        block_s = _fastest(gram, repeats, sync) if explicit else 0.0
    parts["floor_gram_s"] = block_s * explicit / width
    del gram, V
    B = torch.randn(N * C, N * C, **kw)
    eigh = partial(torch.linalg.eigh, B @ B.T / (N * C))  # symmetric [N·C, N·C]
    del B
    parts["floor_eigh_s"] = _fastest(eigh, repeats, sync)
    return {
        **parts,
        "floor_s": sum(parts.values()),
        "floor_gram_shape": [N * C, explicit],
        "floor_gram_kernel": kernel,
        "floor_gram_block_columns": width,
    }


def floor_of(model, loss, X, y, layers: dict | None, repeats: int = 2) -> dict:
    """:func:`spectrum_floor` with ``D_e`` from an engine report's ``layers`` and
    ``explicit_params`` recorded; ``{}`` where the report lists no layers (the
    ``streamed`` strategy keeps none, a previous release may not report them)."""
    if not layers:
        return {}
    explicit = explicit_parameters(model, layers)
    return {
        "explicit_params": explicit,
        **spectrum_floor(model, loss, X, y, explicit, repeats),
    }


def over_floor(record: dict) -> float | None:
    """``time_s / floor_s`` of a record with both, else ``None``."""
    if record.get("floor_s") and record.get("time_s") is not None:
        return record["time_s"] / record["floor_s"]
    return None
