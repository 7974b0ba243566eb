"""Small measurement helpers shared by the core (timing, peak memory, seeding)."""
from __future__ import annotations

import random
import resource
import sys
from pathlib import Path

import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def reset_peak_memory(device: torch.device) -> bool:
    """Start a fresh peak-memory window: CUDA stats, or on Linux the process's VmHWM
    (``/proc/self/clear_refs``), so the peak belongs to the work that follows, not to whatever
    the process did before (e.g. loading a model). False if the CPU peak cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated memory. CPU: peak resident set since the last reset (Linux VmHWM),
    else the process's lifetime peak (ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
