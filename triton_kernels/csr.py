"""CSR (unstructured) sparse kernels in Triton: forward SpMM, transposed SpMM (dX) and SDDMM (dW).

A weight W of shape (out, in) is stored as CSR ``rowptr (out+1,)``, ``col (nnz,)`` with values ``(nnz,)``, and
its transpose index ``colptr (in+1,)``, ``row (nnz,)``, ``perm (nnz,)`` (W^T's values are ``values[perm]``).
Activations are row-major ``(batch, features)``.

Layout: the kernels gather whole feature rows of the activations, so they run on *feature-major* copies
(``x.t().contiguous()``, shape (features, batch)): the batch elements a nonzero touches are then contiguous and
a gather is one coalesced load of a batch tile. The outputs are written in the row-major layout the caller
expects. Accumulation is in float32 for every input dtype; outputs have the input dtype.

* :func:`csr_spmm`: one program per (``BLOCK_R`` output rows, batch tile); it walks the rows' nonzeros in
  chunks of ``BLOCK_K`` (the shorter rows masked) and accumulates a (BLOCK_R, BLOCK_K, BLOCK_B) tile, reduced
  once at the end; each batch row of the output tile is ``BLOCK_R`` contiguous elements.
* :func:`csr_spmm_t`: the same kernel over the transpose index, reading ``values[perm]``: no atomics, so the
  result is deterministic.
* :func:`csr_sddmm`: one program per ``BLOCK_K`` consecutive nonzeros; each finds its row by a binary search in
  ``rowptr`` and reduces ``dy[:, row] * x[:, col]`` over the batch in tiles.

The loops are software-pipelined (``tl.range(..., num_stages=...)``: the next chunks' loads are in flight while
one accumulates) and the launch shapes are autotuned over short lists keyed on the batch and the mean row length
(see :mod:`triton_kernels._common`). A (batch, features) input that is a transposed view of a contiguous
(features, batch) tensor costs no copy: ``sparsecore``'s backward hands dy to both backward kernels that way.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _common as C

try:  # only for the ``tl.constexpr`` annotations below; the kernels are jitted lazily at their first call
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    class tl:  # type: ignore[no-redef]  # noqa: N801 - stand-in so the kernel definitions parse
        constexpr = None

__all__ = ["csr_spmm", "csr_spmm_t", "csr_sddmm"]


# ============================================================================================= kernels
def _csr_spmm_kernel(X, V, PTR, IDX, PERM, PERM_PTR, BIAS, Y, n_rows, B, KEY_B, KEY_LEN,
                     stride_xf, stride_xb, stride_yb, stride_yf,
                     HAS_PERM: tl.constexpr, PERM_OFFSETS: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Y[b, r] = sum_{k in PTR[r]:PTR[r+1]} V[k or PERM[k]] * X[IDX[k], b] (+ BIAS[r]); X feature-major.

    With PERM_OFFSETS (a compact pattern's transpose: int16 IDX and PERM) the value of entry k is
    V[PERM_PTR[IDX[k]] + PERM[k]], PERM_PTR being W's rowptr.

    One program computes a (BLOCK_R rows, BLOCK_B batch) tile of Y. KEY_B and KEY_LEN are unused here: they are
    the autotuner's key (batch and mean row length, rounded to powers of two).
    """
    pr = tl.program_id(0)
    pb = tl.program_id(1)
    offs_r = pr * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < n_rows
    start = tl.load(PTR + offs_r, mask=mask_r, other=0)
    length = tl.load(PTR + offs_r + 1, mask=mask_r, other=0) - start
    n_max = tl.max(length, axis=0)  # the tile's rows are walked together, the shorter ones masked
    offs_b = pb * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    offs_b64 = offs_b.to(tl.int64)
    offs_j = tl.arange(0, BLOCK_K)
    # (rows, nonzeros, batch) partial products, reduced over the nonzeros once at the end
    acc = tl.zeros((BLOCK_R, BLOCK_K, BLOCK_B), dtype=tl.float32)
    # Pipelined: the index loads and the gathers of the next chunks are in flight while this one accumulates.
    for j0 in tl.range(0, n_max, BLOCK_K, num_stages=NUM_STAGES):
        mask_k = (j0 + offs_j)[None, :] < length[:, None]
        k = start[:, None] + j0 + offs_j[None, :]
        c = tl.load(IDX + k, mask=mask_k, other=0).to(tl.int64)
        if HAS_PERM:
            kv = tl.load(PERM + k, mask=mask_k, other=0).to(tl.int64)
            if PERM_OFFSETS:
                kv += tl.load(PERM_PTR + c, mask=mask_k, other=0).to(tl.int64)
        else:
            kv = k.to(tl.int64)
        v = tl.load(V + kv, mask=mask_k, other=0.0).to(tl.float32)
        xp = X + c[:, :, None] * stride_xf + offs_b64[None, None, :] * stride_xb
        xv = tl.load(xp, mask=mask_k[:, :, None] & mask_b[None, None, :], other=0.0).to(tl.float32)
        acc += xv * v[:, :, None]
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(BIAS + offs_r, mask=mask_r, other=0.0).to(tl.float32)[:, None]
    # Y is row-major (B, n_rows): each batch row of the tile is BLOCK_R contiguous outputs (a whole 32-byte
    # sector for 16 bf16 or 8 fp32 rows), not one element every n_rows as with one row per program.
    yp = Y + offs_b64[None, :] * stride_yb + offs_r.to(tl.int64)[:, None] * stride_yf
    tl.store(yp, out.to(Y.dtype.element_ty), mask=mask_r[:, None] & mask_b[None, :])


def _csr_sddmm_kernel(DY, X, PTR, IDX, OUT, nnz, n_rows, B, n_iter, KEY_B,
                      stride_df, stride_db, stride_xf, stride_xb,
                      BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr, NUM_STAGES: tl.constexpr):
    """OUT[k] = sum_b DY[row(k), b] * X[IDX[k], b]; DY and X feature-major; row(k) by binary search in PTR."""
    pid = tl.program_id(0)
    offs_k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < nnz
    c = tl.load(IDX + offs_k, mask=mask_k, other=0).to(tl.int64)
    # row(k) = the largest r in [0, n_rows) with PTR[r] <= k (skips empty rows: PTR[r] == PTR[r+1])
    lo = tl.zeros((BLOCK_K,), dtype=tl.int32)
    hi = tl.zeros((BLOCK_K,), dtype=tl.int32) + (n_rows - 1)
    for _ in range(n_iter):
        mid = (lo + hi + 1) // 2
        go = tl.load(PTR + mid) <= offs_k
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid - 1)
    r = lo.to(tl.int64)
    acc = tl.zeros((BLOCK_K, BLOCK_B), dtype=tl.float32)
    for b0 in tl.range(0, B, BLOCK_B, num_stages=NUM_STAGES):
        offs_b = (b0 + tl.arange(0, BLOCK_B)).to(tl.int64)
        m = mask_k[:, None] & (offs_b < B)[None, :]
        d = tl.load(DY + r[:, None] * stride_df + offs_b[None, :] * stride_db, mask=m, other=0.0)
        xv = tl.load(X + c[:, None] * stride_xf + offs_b[None, :] * stride_xb, mask=m, other=0.0)
        acc += d.to(tl.float32) * xv.to(tl.float32)
    out = tl.sum(acc, axis=1)
    tl.store(OUT + offs_k, out.to(OUT.dtype.element_ty), mask=mask_k)


_KERNEL_NAMES = ("_csr_spmm_kernel", "_csr_sddmm_kernel")
_JIT: dict = {}


# ============================================================================================= launch shapes
# A batch tile of 64 makes each gathered feature row one 128-byte (bf16) or 256-byte (fp32) load. Every
# configuration below is compiled for sm_90 in CI (tests/test_triton_kernels.py) and run against the float64
# reference on every dtype (tests/test_cuda.py); keep the lists short: each one is compiled per dtype and
# specialization at the first call of a shape, and timed once per autotune key.
def _cfg(num_warps, num_stages, **blocks):
    return dict(blocks, num_warps=num_warps, num_stages=num_stages)


SPMM_CONFIGS = (
    _cfg(4, 3, BLOCK_R=16, BLOCK_K=8, BLOCK_B=64),
    _cfg(4, 3, BLOCK_R=8, BLOCK_K=16, BLOCK_B=64),
    _cfg(8, 3, BLOCK_R=16, BLOCK_K=16, BLOCK_B=64),
    _cfg(4, 4, BLOCK_R=8, BLOCK_K=8, BLOCK_B=128),
    # batches under 64 (inference, tests)
    _cfg(4, 3, BLOCK_R=16, BLOCK_K=8, BLOCK_B=32),
    _cfg(4, 3, BLOCK_R=32, BLOCK_K=8, BLOCK_B=16),
)
SDDMM_CONFIGS = (
    _cfg(4, 3, BLOCK_K=32, BLOCK_B=64),
    _cfg(8, 3, BLOCK_K=64, BLOCK_B=64),
    _cfg(8, 3, BLOCK_K=32, BLOCK_B=128),
    _cfg(4, 4, BLOCK_K=16, BLOCK_B=128),
    _cfg(4, 3, BLOCK_K=64, BLOCK_B=32),
    _cfg(4, 3, BLOCK_K=64, BLOCK_B=16),
)


def _keep_spmm(cfg: dict, args: dict) -> bool:
    # no nonzero chunk wider than twice the mean row length: those lanes would mostly be masked
    return C.batch_tile_fits(cfg["BLOCK_B"], args["KEY_B"]) and cfg["BLOCK_K"] <= max(8, 2 * args["KEY_LEN"])


def _keep_sddmm(cfg: dict, args: dict) -> bool:
    return C.batch_tile_fits(cfg["BLOCK_B"], args["KEY_B"])


_TUNING = {
    "_csr_spmm_kernel": C.Tuning(SPMM_CONFIGS, key=("KEY_B", "KEY_LEN", "HAS_PERM"), keep=_keep_spmm),
    "_csr_sddmm_kernel": C.Tuning(SDDMM_CONFIGS, key=("KEY_B",), keep=_keep_sddmm),
}


def _kernels() -> dict:
    return C.jit_kernels(globals(), _KERNEL_NAMES, _JIT, _TUNING)


def _default_spmm(batch: int, avg_len: float) -> dict:
    """The configuration without autotuning: about 8K (rows x nonzeros x batch) products per program."""
    block_b = C.clamp_pow2(batch, 16, 64)
    block_k = C.clamp_pow2(int(avg_len), 8, 32)
    block_r = max(1, min(16, 8192 // (block_k * block_b)))
    return _cfg(4 if block_r * block_k * block_b <= 4096 else 8, 3, BLOCK_R=block_r, BLOCK_K=block_k,
                BLOCK_B=block_b)


def _default_sddmm(batch: int) -> dict:
    return _cfg(8, 3, BLOCK_K=32, BLOCK_B=C.clamp_pow2(batch, 16, 64))


# ============================================================================================= launch helpers
def _feature_major(t: torch.Tensor) -> torch.Tensor:
    """(batch, features) -> (features, batch) contiguous (free when t is already a transposed contiguous view)."""
    return t.t().contiguous()


def _spmm_launch(x, values, ptr, idx, perm, bias, n_out: int, config: Optional[dict] = None,
                 perm_ptr: Optional[torch.Tensor] = None) -> torch.Tensor:
    kernels = _kernels()
    batch = x.shape[0]
    y = torch.empty(batch, n_out, dtype=x.dtype, device=x.device)
    if batch == 0 or n_out == 0:
        return y
    if idx.numel() == 0:
        return y.copy_(bias.expand(batch, n_out)) if bias is not None else y.zero_()
    C.batch_grid(batch, 16)  # the smallest batch tile any configuration uses
    xt = _feature_major(x)
    values = values.contiguous()
    ptr, idx = ptr.contiguous(), idx.contiguous()
    perm = perm.contiguous() if perm is not None else None
    bias = bias.contiguous() if bias is not None else None
    avg = idx.numel() / n_out

    def grid(meta):
        return (C.cdiv(n_out, meta["BLOCK_R"]), C.cdiv(batch, meta["BLOCK_B"]))

    args = (xt, values, ptr, idx, perm if perm is not None else idx, perm_ptr if perm_ptr is not None else ptr,
            bias if bias is not None else values, y, n_out, batch, C.clamp_pow2(batch, 16, 4096),
            C.clamp_pow2(int(avg), 1, 1024), xt.stride(0), xt.stride(1), y.stride(0), y.stride(1))
    C.launch(kernels, "_csr_spmm_kernel", grid, args,
             dict(HAS_PERM=perm is not None, PERM_OFFSETS=perm_ptr is not None, HAS_BIAS=bias is not None),
             _default_spmm(batch, avg), x.device, config)
    return y


def _sddmm_launch(dy, x, rowptr, col, config: Optional[dict] = None) -> torch.Tensor:
    kernels = _kernels()
    n_rows = dy.shape[1]
    nnz, batch = col.numel(), dy.shape[0]
    out = torch.empty(nnz, dtype=dy.dtype, device=dy.device)
    if nnz == 0:
        return out
    if batch == 0:
        return out.zero_()
    dyt, xt = _feature_major(dy), _feature_major(x)

    def grid(meta):
        return (C.cdiv(nnz, meta["BLOCK_K"]),)

    args = (dyt, xt, rowptr.contiguous(), col.contiguous(), out, nnz, n_rows, batch, C.search_iters(n_rows),
            C.clamp_pow2(batch, 16, 4096), dyt.stride(0), dyt.stride(1), xt.stride(0), xt.stride(1))
    C.launch(kernels, "_csr_sddmm_kernel", grid, args, {}, _default_sddmm(batch), dy.device, config)
    return out


# ============================================================================================= public API
def csr_spmm(x: torch.Tensor, values: torch.Tensor, rowptr: torch.Tensor, col: torch.Tensor, n_out: int,
             bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Forward: ``y (B, n_out) = x (B, in) @ W^T (+ bias)`` with W in CSR (``rowptr``, ``col``, ``values``).

    x, values and bias share one float dtype (float32/float16/bfloat16); rowptr is int32, col int32 or int16 (a
    compact pattern). Returns y of x's dtype, contiguous. Accumulates in float32.
    """
    n_out = C.check_int("n_out", n_out)
    C.check_float("x", x, 2)
    C.check_float("values", values, 1)
    C.check_index("rowptr", rowptr, n_out + 1)
    C.check_index("col", col, compact=True)
    if values.numel() != col.numel():
        raise ValueError(f"values has {values.numel()} elements but col has {col.numel()}; they must match")
    C.check_nnz(col.numel())
    if bias is not None:
        C.check_float("bias", bias, 1)
        if bias.numel() != n_out:
            raise ValueError(f"bias must have n_out = {n_out} elements, got {bias.numel()}")
    C.check_same_dtype(x=x, values=values, bias=bias)
    C.check_devices(_kernels()["_csr_spmm_kernel"], x=x, values=values, rowptr=rowptr, col=col, bias=bias)
    return _spmm_launch(x, values, rowptr, col, None, bias, n_out)


def csr_spmm_t(dy: torch.Tensor, values: torch.Tensor, colptr: torch.Tensor, row: torch.Tensor,
               perm: torch.Tensor, n_in: int, rowptr: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Input gradient: ``dx (B, n_in) = dy (B, out) @ W`` through the transpose index (deterministic).

    ``colptr (n_in+1,)``, ``row (nnz,)``, ``perm (nnz,)``: W^T in CSR with values ``values[perm]``; or, for a
    compact pattern, int16 ``row`` and ``perm`` with values ``values[rowptr[row] + perm]`` (``rowptr``: W's, then
    required).
    """
    n_in = C.check_int("n_in", n_in)
    C.check_float("dy", dy, 2)
    C.check_float("values", values, 1)
    C.check_index("colptr", colptr, n_in + 1)
    C.check_index("row", row, values.numel(), compact=True)
    C.check_index("perm", perm, values.numel(), compact=True)
    offsets = perm.dtype == torch.int16
    if offsets != (row.dtype == torch.int16):
        raise TypeError(f"row and perm must both be int32 or both int16 (a compact pattern), got {row.dtype} and "
                        f"{perm.dtype}")
    if offsets:
        if rowptr is None:
            raise ValueError("a compact pattern's perm (int16 offsets inside rows) needs W's rowptr")
        C.check_index("rowptr", rowptr, dy.shape[1] + 1)
    C.check_nnz(values.numel())
    C.check_same_dtype(dy=dy, values=values)
    C.check_devices(_kernels()["_csr_spmm_kernel"], dy=dy, values=values, colptr=colptr, row=row, perm=perm,
                    rowptr=rowptr if offsets else None)
    return _spmm_launch(dy, values, colptr, row, perm, None, n_in,
                        perm_ptr=rowptr.contiguous() if offsets else None)


def csr_sddmm(dy: torch.Tensor, x: torch.Tensor, rowptr: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """Weight gradient at the live connections: ``dvalues[k] = sum_b dy[b, row(k)] * x[b, col[k]]``.

    dy (B, out) and x (B, in) share one float dtype; returns (nnz,) of that dtype (accumulated in float32).
    """
    C.check_float("dy", dy, 2)
    C.check_float("x", x, 2)
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy and x must have the same batch size, got {dy.shape[0]} and {x.shape[0]}")
    n_rows = dy.shape[1]
    C.check_index("rowptr", rowptr, n_rows + 1)
    C.check_index("col", col, compact=True)
    C.check_nnz(col.numel())
    C.check_same_dtype(dy=dy, x=x)
    C.check_devices(_kernels()["_csr_sddmm_kernel"], dy=dy, x=x, rowptr=rowptr, col=col)
    return _sddmm_launch(dy, x, rowptr, col)
