r"""The machine a benchmark ran on: CPU, cores, platform, Python, torch, device."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine(device: str = "cpu") -> dict:
    """CPU model name, core count, platform, Python and torch versions, ``device``
    (and the GPU's name on CUDA)."""
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_line(result: dict) -> str:
    """``Machine: cpu=…, cores=…, …, torch threads=T`` of a result with ``machine``
    and ``threads``."""
    return (
        "Machine: "
        + ", ".join(f"{k}={v}" for k, v in result["machine"].items())
        + f", torch threads={result['threads']}"
    )


def machine_words(m: dict) -> str:
    """``AMD EPYC, 2 cores, torch 2.13.0`` of a machine description."""
    return f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}"
