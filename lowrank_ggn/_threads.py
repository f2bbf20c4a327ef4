"""Idle BLAS threads: let scipy's OpenBLAS sleep soon after each call.

The Gram's explicit rows go through BLAS ``syrk`` from scipy
(:func:`lowrank_ggn.core.engine.accumulate.lower_rank_k_update`), whose OpenBLAS keeps
its worker threads spinning for about ``2**28`` cycles after every call. On a machine
with as many cores as threads, those spinning threads take the cores from torch's next
kernels: on 2 cores (2 threads), ResNet-18 in eval mode (N = 64, top-5) took 3.04–3.34 s
against 2.82–2.90 s with a short spin, the transformer of ``bench_models.py`` (N = 128,
top-10) 2.56–2.80 s against 1.92–2.43 s (three calls each, several runs). Child
processes inherit the setting, and so does any OpenBLAS loaded later (numpy's, if
imported after lowrank_ggn): idle threads then sleep after 16 cycles instead of
spinning, which costs a wake-up on the next call. OpenBLAS reads ``OPENBLAS_THREAD_TIMEOUT`` (spin ``2**n`` cycles,
``n ≥ 4``) once, when the library loads; importing lowrank_ggn before scipy sets it to
4 unless the environment sets it already. Imported scipy first: no effect, no harm.
"""

from __future__ import annotations

import os

#: ``OPENBLAS_THREAD_TIMEOUT`` unless the environment gives one (OpenBLAS's minimum).
OPENBLAS_THREAD_TIMEOUT = "4"

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", OPENBLAS_THREAD_TIMEOUT)
