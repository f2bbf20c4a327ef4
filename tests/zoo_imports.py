"""Test-only imports of timm and transformers, which may be missing.

torchvision's wheel is built against a CUDA torch: on the CPU torch its C operators
do not load, and its ``torch.library.register_fake`` registrations raise at import.
timm imports torchvision, and transformers imports it when it is installed, so
:func:`zoo` imports torchvision once with those registrations tolerated (the models
used here need none of its operators), then the libraries. Missing libraries skip
the calling test module.
"""

from __future__ import annotations

import types

import pytest
import torch


def _import_torchvision() -> None:
    original = torch.library.register_fake

    def tolerant(*args, **kwargs):
        try:
            register = original(*args, **kwargs)
        except Exception:  # noqa: BLE001 - an operator this CPU torch lacks
            return lambda fn: fn

        def wrap(fn):
            try:
                return register(fn)
            except Exception:  # noqa: BLE001
                return fn

        return wrap

    torch.library.register_fake = tolerant
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    finally:
        torch.library.register_fake = original


def zoo() -> tuple[types.ModuleType, types.ModuleType]:
    """``(timm, transformers)``, or skip the module if either is not installed."""
    _import_torchvision()
    timm = pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return timm, transformers
