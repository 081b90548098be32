"""Helpers shared by the benchmarks: process memory, machine description, atomic JSON."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from lrlora._atomic import atomic_write

ROOT = Path(__file__).resolve().parent.parent  # the repository: benchmarks run as `python -m benchmarks.NAME` from it

# glibc otherwise raises its mmap threshold after the first large free and keeps freed blocks resident,
# so peak RSS would measure the allocator's caching, not the computation. Set in each worker's env.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 17)}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """The process's peak RSS since start or since the last ``reset_peak_rss``."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def machine_info(device: str) -> dict:
    info = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json_atomic(obj: dict, path: Path) -> None:
    atomic_write(path, json.dumps(obj, indent=2))  # readers never see half a file
