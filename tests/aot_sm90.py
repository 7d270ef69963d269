"""Compile the Triton kernels for an H100/H200 (sm_90) on a machine without a GPU, the way a real launch would.

A real launch is recorded (the public functions run on CPU tensors up to the kernel launch, which is replaced by a
recorder), then each candidate configuration of that launch is compiled with Triton's own argument
specialization (pointer alignment, integers equal to 1 or divisible by 16: what decides vector widths and
whether loads can be pipelined) and ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``. The cubin's resource
use and SASS (from the ``cuobjdump`` that ships with Triton) say what the interpreter cannot: registers, spills
(stack frame, ``LDL``/``STL``), asynchronous copies of pipelined loads (``LDGSTS``) and tensor-core instructions
(``HGMMA``: wgmma, ``HMMA``: mma.sync).

Used by ``tests/test_triton_kernels.py``; run it directly for the whole table::

    python tests/aot_sm90.py            # every kernel, configuration, dtype and block size

It relies on Triton internals (``create_function_from_signature``, ``JITFunction._pack_args``) that were checked
with triton 3.6 and 3.9; :func:`supported` says whether this triton has them.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import triton_kernels as tk  # noqa: E402
from triton_kernels import _common as C  # noqa: E402
from triton_kernels import bsr, csr  # noqa: E402

from torch_index import csr_index  # noqa: E402  (tests/ is on sys.path: pytest's rootdir, or this script's folder)

SASS_OPS = ("LDGSTS", "HGMMA", "HMMA", "LDL", "STL")


@dataclass
class Launch:
    name: str  # kernel name, e.g. "_csr_spmm_kernel"
    kernel: object
    args: tuple
    consts: dict
    default: dict
    candidates: List[dict] = field(default_factory=list)  # the default and the kept autotune configurations


@dataclass
class Compiled:
    regs: int
    stack: int  # bytes of stack frame per thread (spills live there)
    shared: int  # bytes of shared memory
    ops: Dict[str, int]  # SASS instruction counts for SASS_OPS

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.ops.get("LDL", 0) > 0 or self.ops.get("STL", 0) > 0


def supported() -> Optional[str]:
    """None when this triton can compile ahead of time here, else the reason it cannot."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except ImportError as e:
        return f"this triton lacks an API the ahead-of-time compile uses ({e})"
    if not hasattr(JITFunction, "_pack_args"):
        return "this triton's JITFunction has no _pack_args"
    return None


@contextlib.contextmanager
def recording(out: List[Launch]):
    """Inside the block, kernel launches are recorded into ``out`` instead of run (outputs stay unwritten)."""
    real = C.launch

    def record(kernels, name, grid, args, consts, default, device, config=None):
        kernel = kernels[name]
        tuning = {"_csr_spmm_kernel": csr._TUNING, "_csr_sddmm_kernel": csr._TUNING,
                  "_bsr_spmm_kernel": bsr._TUNING, "_bsr_sddmm_kernel": bsr._TUNING}[name][name]
        named = dict(zip(kernel.arg_names, args), **consts)
        kept = [c for c in tuning.configs if tuning.keep is None or tuning.keep(c, named)]
        cands = [default] + [c for c in kept if c != default]
        out.append(Launch(name, kernel, tuple(args), dict(consts), default, cands))

    def devices(kernel, **tensors):  # compiled kernels refuse CPU tensors; these launches are never run
        return next(t for t in tensors.values() if t is not None).device

    real_devices = C.check_devices
    C.launch, C.check_devices = record, devices
    try:
        yield out
    finally:
        C.launch, C.check_devices = real, real_devices


def compile_sm90(launch: Launch, cfg: dict) -> Compiled:
    """Compile one recorded launch with configuration ``cfg`` for sm_90; resource use and SASS counts."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(GPUTarget("cuda", 90, 32))
    meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
    kwargs = dict(launch.consts, **meta, NUM_STAGES=cfg["num_stages"], num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"])
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    k = compile(ASTSource(fn, signature, constexprs, attrs), target=backend.target, options=options.__dict__)
    return _inspect(k.asm["cubin"], int(k.metadata.shared))


def _inspect(cubin: bytes, shared: int) -> Compiled:
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.cubin")
        with open(p, "wb") as f:
            f.write(cubin)
        res = subprocess.run([tool, "-res-usage", p], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", p], capture_output=True, text=True, check=True).stdout
    fields = dict(tok.split(":", 1) for tok in res.split() if ":" in tok and tok.split(":", 1)[1].isdigit())
    ops = {o: sum(1 for line in sass.splitlines() if f" {o}" in line) for o in SASS_OPS}
    return Compiled(int(fields.get("REG", -1)), int(fields.get("STACK", 0)), shared, ops)


# ============================================================================================= the launches
def _csr_case(dtype, batch=4096, out_f=1024, in_f=1024, density=0.01):
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(out_f, in_f, generator=g) < density
    rowptr, col, colptr, row, perm = csr_index(mask)
    v = torch.randn(col.numel(), generator=g).to(dtype)
    x = torch.randn(batch, in_f, generator=g).to(dtype)
    dy = torch.randn(batch, out_f, generator=g).to(dtype)
    b = torch.randn(out_f, generator=g).to(dtype)
    return {"fwd": lambda: tk.csr_spmm(x, v, rowptr, col, out_f, b),
            "dx": lambda: tk.csr_spmm_t(dy, v, colptr, row, perm, in_f, rowptr=rowptr),
            "dw": lambda: tk.csr_sddmm(dy, x, rowptr, col)}


def _bsr_case(dtype, bs, batch=4096, out_f=1024, in_f=1024, density=0.05):
    g = torch.Generator().manual_seed(0)
    bm = torch.rand(out_f // bs, in_f // bs, generator=g) < density
    bm[0, 0] = True
    rowptr, col, colptr, row, perm = csr_index(bm)
    v = torch.randn(col.numel(), bs, bs, generator=g).to(dtype)
    x = torch.randn(batch, in_f, generator=g).to(dtype)
    dy = torch.randn(batch, out_f, generator=g).to(dtype)
    b = torch.randn(out_f, generator=g).to(dtype)
    return {"fwd": lambda: tk.bsr_spmm(x, v, rowptr, col, out_f, b),
            "dx": lambda: tk.bsr_spmm_t(dy, v, colptr, row, perm, in_f),
            "dw": lambda: tk.bsr_sddmm(dy, x, rowptr, col, bs)}


def record(fn) -> List[Launch]:
    out: List[Launch] = []
    with recording(out):
        fn()
    return out


def launches(dtypes=(torch.bfloat16, torch.float16, torch.float32), block_sizes=(16, 32, 64, 128)):
    """{label: [Launch]} for the forward, dX and dW kernels of CSR and BSR in each dtype and block size."""
    out = {}
    for dt in dtypes:
        name = str(dt).replace("torch.", "")
        for op, fn in _csr_case(dt).items():
            out[f"csr {op} {name}"] = record(fn)
        for bs in block_sizes:
            for op, fn in _bsr_case(dt, bs).items():
                out[f"bsr{bs} {op} {name}"] = record(fn)
    return out


def main() -> int:
    why = supported()
    if why:
        print(why)
        return 2
    import triton
    print(f"triton {triton.__version__}, sm_90")
    print(f"{'launch':<22} {'config':<58} {'regs':>4} {'stack':>5} {'smem':>6}  " + " ".join(SASS_OPS))
    for label, recs in launches().items():
        for rec in recs:
            for cfg in rec.candidates:
                try:
                    r = compile_sm90(rec, cfg)
                    line = (f"{r.regs:>4} {r.stack:>5} {r.shared:>6}  "
                            + " ".join(f"{r.ops[o]:>{len(o)}}" for o in SASS_OPS))
                except Exception as e:  # noqa: BLE001 - a table row per failure
                    line = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:80]}"
                tag = "*" if cfg is rec.default else " "
                cs = ",".join(f"{k}={v}" for k, v in cfg.items())
                print(f"{label:<22}{tag}{cs:<58} {line}", flush=True)
    print("* = the configuration used without autotuning")
    return 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
