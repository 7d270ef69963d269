"""Which kernels run: the C++ CPU kernels (``"cpu"``), the Triton kernels (``"triton"``), or ``"auto"``.

``"auto"`` (the default) picks by device: C++ for CPU tensors, Triton for CUDA tensors. ``"triton"`` also runs
on CPU tensors when ``TRITON_INTERPRET=1`` is set before triton is imported, which is how CI tests the GPU
kernels without a GPU::

    with sparsecore.use_backend("triton"):
        y = layer(x)

The C++ kernels are compiled for three instruction sets and run the widest the CPU supports (``generic``,
``avx2``, ``avx512``, and ``avx512bf16``: the AVX-512 copy plus AVX512-BF16 in the bfloat16 kernels;
``sparsecore._C.kernel_isa()`` says which). ``SPARSECORE_MAX_ISA=avx2`` in the environment caps them, e.g. on a
CPU whose clock drops under 512-bit arithmetic; it is read once, at import.
"""
from __future__ import annotations

import contextlib
import os
import threading

_BACKENDS = ("auto", "cpu", "triton")
_state = threading.local()


def get_backend() -> str:
    return getattr(_state, "backend", "auto")


def set_backend(name: str) -> None:
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    _state.backend = name


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: run sparsecore ops on backend ``name`` ("auto", "cpu" or "triton") inside the block."""
    old = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        _state.backend = old


def resolve(device) -> str:
    """The backend that runs for tensors on ``device`` under the current setting: "cpu" or "triton"."""
    b = get_backend()
    if b == "auto":
        return "cpu" if device.type == "cpu" else "triton"
    if b == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' (C++ kernels) needs CPU tensors, got tensors on {device}")
    return b


def apply_isa_cap_from_env() -> None:
    """Cap the C++ kernels' instruction set at $SPARSECORE_MAX_ISA, if set (ValueError naming a bad value)."""
    name = os.environ.get("SPARSECORE_MAX_ISA", "").strip()
    if name:
        from . import _C

        try:
            _C._set_max_isa(name)
        except ValueError as e:
            raise ValueError(f"SPARSECORE_MAX_ISA: {e}") from None
