r"""Every tolerance of the package, named, with what it means.

Round-off comparisons (``roundoff_rtol``): two evaluations of the same quantity by
different but exact routes (batch against per-sample forward passes, the engine's
``V w`` against autograd, two forward passes of a deterministic model) agree to
``rtol · max|value|``. The values leave a margin of about ``10⁶`` ulps in float64
and ``10³`` in float32 for the accumulated round-off of deep networks, and are far
below any genuine difference (a sample-mixing layer or dropout moves outputs by
``O(1)`` relative).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Round-off agreement of two exact routes, per dtype; :data:`ROUNDOFF_RTOL_OTHER`
#: for float16/bfloat16.
ROUNDOFF_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}
ROUNDOFF_RTOL_OTHER = 1e-2

#: An eigenvalue is returned if its estimated error is at most this fraction of it
#: (:mod:`lowrank_ggn.core.precision`).
RESOLVED_RTOL = 1e-3

#: Block Lanczos stops when every residual is at most this fraction of ``θ₁``. In
#: float64, ``‖r‖ ≤ tol·θ₁`` bounds eigenvalue errors by ``‖r‖²/gap`` (about
#: ``1e-12·θ₁`` for well separated eigenvalues) and eigenvector angles by
#: ``‖r‖/gap``; ``√eps ≈ 1.5e-8`` would cost 10–30 % more products for eigenvalues
#: that are already this accurate. In float32, products carry rounding of about
#: ``√n·eps₃₂ ≈ 1e-5·‖A‖`` for ``n ≈ 10⁴``, so smaller residuals are out of reach.
LANCZOS_RTOL = {torch.float64: 1e-6, torch.float32: 1e-4}

#: A new Lanczos basis direction whose QR pivot is at most this fraction of its
#: block's scale lies (numerically) in the basis already.
BREAKDOWN_RTOL = 1e-12


def roundoff_rtol(dtype: torch.dtype) -> float:
    """:data:`ROUNDOFF_RTOL` for ``dtype``."""
    return ROUNDOFF_RTOL.get(dtype, ROUNDOFF_RTOL_OTHER)


def roundoff_close(a: Tensor, b: Tensor) -> bool:
    """``max|a − b| ≤ roundoff_rtol · max(max|a|, max|b|)``."""
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-30)
    return (a - b).abs().max().item() <= roundoff_rtol(a.dtype) * scale


__all__ = [
    "BREAKDOWN_RTOL",
    "LANCZOS_RTOL",
    "RESOLVED_RTOL",
    "ROUNDOFF_RTOL",
    "ROUNDOFF_RTOL_OTHER",
    "roundoff_close",
    "roundoff_rtol",
]
