"""Shared helpers of the Triton kernels: lazy triton import, input checks, launch heuristics.

Nothing here imports triton at module import time. The kernels of ``csr.py`` and ``bsr.py`` are plain Python
functions until their first call, when :func:`jit_kernels` imports triton and decorates them with
``triton.jit`` in place. Whether they run compiled (CUDA) or under the interpreter (``TRITON_INTERPRET=1``, CPU
tensors) is therefore decided at the first kernel call, not when ``triton_kernels`` is imported.

Launches go through :func:`launch`, which
  * makes the tensors' device current for the launch (a kernel launched for tensors on ``cuda:1`` while ``cuda:0``
    is current would run on the wrong device and fault);
  * runs the kernel through ``triton.autotune`` over a short list of configurations when autotuning is on (the
    default for compiled kernels; ``SPARSECORE_TRITON_AUTOTUNE=0`` turns it off, ``=1`` turns it on under the
    interpreter too), else with one heuristic configuration.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT32_MAX = 2**31 - 1
MAX_GRID_Y = 65535  # CUDA limit on grid dimensions 1 and 2

_lock = threading.Lock()


def available() -> bool:
    """True when triton can be imported (it may still lack a GPU: see :func:`interpreting`)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising something else at import
        return False
    return True


def import_triton():
    try:
        import triton
        import triton.language as tl
    except ImportError as e:
        raise RuntimeError("the Triton kernels need triton installed (pip install 'sparsecore[gpu]')") from e
    return triton, tl


@dataclass(frozen=True)
class Tuning:
    """The autotuning of one kernel: candidate configurations and the arguments they are keyed on.

    A configuration is a plain dict of the kernel's block-size constexprs plus ``num_warps`` and ``num_stages``
    (``NUM_STAGES``, the software-pipelining depth the kernels pass to ``tl.range``, is set from ``num_stages``).
    ``key`` names kernel arguments (the tensors' dtypes are always part of the key); ``keep(config, args)`` may
    drop configurations that cannot fit (shared memory, registers) for the launch's arguments.
    """
    configs: Sequence[dict]
    key: Sequence[str]
    keep: Optional[Callable[[dict, dict], bool]] = None


AUTOTUNE_ENV = "SPARSECORE_TRITON_AUTOTUNE"
TUNED = "@tuned"  # cache suffix of the autotuned wrapper of a kernel


def jit_kernels(module_globals: dict, names: Iterable[str], cache: Dict[str, object],
                tuning: Optional[Dict[str, Tuning]] = None) -> Dict[str, object]:
    """Decorate the named plain functions of a module with ``triton.jit`` once, in place.

    The module's global names are rebound to the jitted functions (so kernels may call one another), and
    ``tl`` is bound in the module so the kernel bodies resolve ``tl.*``. For each kernel named in ``tuning``,
    ``cache[name + TUNED]`` is its ``triton.autotune`` wrapper. Returns ``cache`` filled.
    """
    if cache:
        return cache
    with _lock:
        if cache:
            return cache
        triton, tl = import_triton()
        module_globals["tl"] = tl
        module_globals["triton"] = triton
        jitted = {}
        for name in names:
            fn = module_globals[name]
            # The KEY_* arguments only key the autotuner; specializing on their values (== 1, divisible by 16)
            # would compile extra copies of the kernel for nothing.
            keys = [a for a in fn.__code__.co_varnames[:fn.__code__.co_argcount] if a.startswith("KEY_")]
            jitted[name] = fn if hasattr(fn, "fn") else triton.jit(fn, do_not_specialize=keys)  # jitted: keep
            module_globals[name] = jitted[name]
        for name, t in (tuning or {}).items():
            jitted[name + TUNED] = _autotuned(triton, jitted[name], t)
        cache.update(jitted)
    return cache


def _triton_config(triton, cfg: dict):
    consts = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
    consts["NUM_STAGES"] = cfg["num_stages"]
    return triton.Config(consts, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _autotuned(triton, kernel, t: Tuning):
    interpreted = is_interpreted(kernel)

    def bench(fn, quantiles):
        if interpreted:  # no CUDA events under the interpreter: one wall-clock run
            t0 = time.perf_counter()
            fn()
            dt = 1e3 * (time.perf_counter() - t0)
            return [dt] * len(quantiles)
        import triton.testing
        # Short runs: each configuration is timed once per key, at the first call of that shape.
        return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)

    def prune(configs, named_args, **kwargs):
        if t.keep is None:
            return configs
        args = {**named_args, **kwargs}
        kept = [c for c in configs if t.keep({**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages},
                                             args)]
        return kept or configs[:1]

    return triton.autotune([_triton_config(triton, c) for c in t.configs], key=list(t.key),
                           prune_configs_by={"early_config_prune": prune}, do_bench=bench)(kernel)


def autotune_enabled(kernel) -> bool:
    """Whether launches autotune: ``$SPARSECORE_TRITON_AUTOTUNE`` (0 or 1), else on exactly when compiled."""
    v = os.environ.get(AUTOTUNE_ENV, "").strip()
    if v not in ("", "0", "1"):
        raise ValueError(f"{AUTOTUNE_ENV} must be 0 or 1, got {v!r}")
    return (v == "1") if v else not is_interpreted(kernel)


def device_guard(device: torch.device):
    """Make ``device`` current for a launch: Triton launches on the current CUDA device and its current stream."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernels: Dict[str, object], name: str, grid: Callable[[dict], tuple], args: Sequence,
           consts: dict, default: dict, device: torch.device, config: Optional[dict] = None) -> None:
    """Launch kernel ``name`` on ``grid(meta)`` with positional ``args`` and the fixed constexprs ``consts``.

    The block sizes, ``num_warps`` and ``num_stages`` come from ``config`` if given (tests run every candidate
    this way), else from the autotuner when autotuning is on and the kernel has a tuning, else from ``default``.
    """
    kernel = kernels[name]
    tuned = kernels.get(name + TUNED)
    with device_guard(device):
        if config is None and tuned is not None and autotune_enabled(kernel):
            tuned[grid](*args, **consts)
            return
        cfg = config or default
        meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
        kernel[grid](*args, **consts, **meta, NUM_STAGES=cfg["num_stages"], num_warps=cfg["num_warps"],
                     num_stages=cfg["num_stages"])


def tuned_configs(kernels: Dict[str, object]) -> Dict[str, Dict[str, str]]:
    """{kernel: {autotune key: chosen config}} of the autotuned kernels run so far (for benchmark reports)."""
    out = {}
    for name, k in kernels.items():
        if name.endswith(TUNED) and getattr(k, "cache", None):
            out[name[:-len(TUNED)]] = {str(key): str(cfg) for key, cfg in k.cache.items()}
    return out


def is_interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


# --------------------------------------------------------------------------------------------- checks
def check_float(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_index(name: str, t, length: Optional[int] = None, compact: bool = False) -> None:
    """An index tensor: int32, or with ``compact`` also int16 (the entry indices of a compact pattern, see
    sparsecore.pattern)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32 and not (compact and t.dtype == torch.int16):
        raise TypeError(f"{name} must be an int32 index tensor{' (or int16: a compact pattern)' if compact else ''}, "
                        f"got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if length is not None and t.numel() != length:
        raise ValueError(f"{name} must have {length} elements, got {t.numel()}")


def check_int(name: str, v) -> int:
    if isinstance(v, (bool, float, torch.Tensor)) or not hasattr(v, "__index__"):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    v = int(v)
    if v < 0 or v > INT32_MAX:
        raise ValueError(f"{name} must be in [0, 2**31-1], got {v}")
    return v


def check_same_dtype(**tensors) -> None:
    items = [(k, t) for k, t in tensors.items() if t is not None]
    k0, t0 = items[0]
    for k, t in items[1:]:
        if t.dtype != t0.dtype:
            raise TypeError(f"{k} has dtype {t.dtype} but {k0} has dtype {t0.dtype}; they must match")


def check_devices(kernel, **tensors) -> torch.device:
    """All tensors on one device; CUDA unless the kernels run under the interpreter (then CPU)."""
    items = [(k, t) for k, t in tensors.items() if t is not None]
    k0, t0 = items[0]
    for k, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{k} is on {t.device} but {k0} is on {t0.device}; all tensors must be on one device")
    dev = t0.device
    if is_interpreted(kernel):
        if dev.type != "cpu":
            raise ValueError(f"TRITON_INTERPRET=1 runs the kernels on CPU tensors, got tensors on {dev}")
    elif dev.type != "cuda":
        raise ValueError(f"the Triton kernels need CUDA tensors, got tensors on {dev} "
                         "(set TRITON_INTERPRET=1 before the first kernel call to run them on CPU)")
    return dev


def check_nnz(nnz: int) -> None:
    if nnz > INT32_MAX:
        raise ValueError(f"nnz = {nnz} does not fit int32 indices")


# --------------------------------------------------------------------------------------------- heuristics
def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def clamp_pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_pow2(n)))


def tf32_allowed() -> bool:
    """Whether torch allows TF32 for float32 matmuls; never raises.

    Recent torch has two APIs: ``torch.backends.cuda.matmul.fp32_precision`` ("ieee", "tf32", or "none" =
    inherit) and the legacy ``torch.get_float32_matmul_precision()``, which raises once the two have been mixed.
    The new one is read first (it reflects legacy settings too); where neither answers, TF32 is off (the exact
    choice: never less precise than asked).
    """
    try:
        p = torch.backends.cuda.matmul.fp32_precision
    except Exception:  # torch without the new API
        p = "none"
    if p in ("ieee", "tf32"):
        return p == "tf32"
    try:
        return torch.get_float32_matmul_precision() != "highest"
    except Exception:  # "mix of the legacy and new APIs" and the like
        return False


def dot_precision(dtype: torch.dtype) -> Optional[str]:
    """``tl.dot`` input precision: for float32, TF32 only where torch allows it for matmuls; else default."""
    if dtype != torch.float32:
        return None
    return "tf32" if tf32_allowed() else "ieee"


def search_iters(n: int) -> int:
    """Steps of the binary search of a row in rowptr of ``n`` rows (enough to converge: ceil(log2 n) + 1)."""
    return max(1, int(n).bit_length() + 1)


INTERPRETER_SMS = 4  # "multiprocessors" under the interpreter: small, so the tests reach the split paths


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (launch heuristics size the grid to them); INTERPRETER_SMS on CPU."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _SMS.get(idx)
    if n is None:
        n = _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


_SMS: Dict[int, int] = {}


def batch_tile_fits(block_b: int, key_b: int) -> bool:
    """Autotune pruning: batch tiles of 64 or 128 rows for batches of 64 and more, tiles no wider than the batch
    below that (their extra lanes would all be masked)."""
    return block_b >= 64 if key_b >= 64 else block_b <= max(16, key_b)


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def batch_grid(batch: int, block_b: int) -> int:
    g = -(-batch // block_b)
    if g > MAX_GRID_Y:
        raise ValueError(f"batch {batch} is too large for one launch (more than {MAX_GRID_Y} tiles of {block_b})")
    return g

