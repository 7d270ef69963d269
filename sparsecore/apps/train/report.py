"""What a training report measures besides accuracy: peak memory, tensor bytes of the training state, the machine.

Memory: ``peak_memory_mb`` is the peak resident set size (Linux ``VmHWM``) of the process while it trained the
model: the high-water mark is reset (``/proc/self/clear_refs``) after the data is loaded and before the model is
built (free allocator pages are first returned to the OS with glibc's ``malloc_trim``, so memory cached by earlier
work in the same process does not hide this run's). Where the reset is not possible the peak is the process's
since it started (``resource.getrusage`` max RSS). ``state_bytes`` counts parameters, gradients, optimizer state
and buffers exactly.
"""
from __future__ import annotations

import gc
import os
import platform
import resource
import sys
from typing import Any, Dict, Optional

import numpy as np
import torch

__all__ = ["machine_info", "release_free_memory", "reset_peak_rss", "peak_rss_mb", "rss_mb", "state_bytes",
           "proc_status_kb"]


def proc_status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def release_free_memory() -> None:
    """Collect garbage and hand the allocator's free pages back to the OS (glibc ``malloc_trim``), so that the
    resident size, and its peak, reflect live memory rather than what earlier work left cached."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    kb = proc_status_kb("VmHWM")
    if kb is None:
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kb = r / 1024 if sys.platform == "darwin" else r
    return kb / 1024


def rss_mb() -> Optional[float]:
    kb = proc_status_kb("VmRSS")
    return None if kb is None else kb / 1024


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    seen = set()
    total = 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for p in model.parameters():
        add(p)
        add(p.grad)
    for b in model.buffers():
        add(b)
    for st in optimizer.state.values():
        for v in st.values():
            add(v)
    return total




def _flag(mod, name: str) -> Optional[bool]:
    v = getattr(mod, name, None)
    try:
        return bool(v()) if callable(v) else (None if v is None else bool(v))
    except Exception:  # pragma: no cover
        return None


def _kernel_isa(mod) -> Optional[str]:
    fn = getattr(mod, "kernel_isa", None)
    return fn() if callable(fn) else None


def machine_info() -> Dict[str, Any]:
    """CPU, threads and versions, for reports."""
    from ... import __version__, _C

    cpu = platform.processor() or ""
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip():  # the first processor's block is enough
                    break
    except OSError:
        pass
    if "model name" in fields:
        # "AMD EPYC" alone does not tell a Zen 3 from a Zen 4 (both are family 25; the model number differs)
        cpu = fields["model name"]
        if "cpu family" in fields and "model" in fields:
            cpu += f" (family {fields['cpu family']}, model {fields['model']})"
    try:
        avail = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        avail = os.cpu_count()
    return {
        "platform": platform.platform(), "machine": platform.machine(), "cpu": cpu,
        "cpu_count": os.cpu_count(), "cpus_available": avail, "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
        "sparsecore": __version__, "avx2": _flag(_C, "has_avx2"), "kernel_isa": _kernel_isa(_C),
        "openmp": _flag(_C, "has_openmp"),
    }


