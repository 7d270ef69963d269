"""Block-sparse (BSR) kernels in Triton: forward SpMM, transposed SpMM (dX) and SDDMM (dW), on tensor cores.

A weight W of shape (out, in) is stored at block granularity ``bs``: ``rowptr (out/bs+1,)``, ``col (nnzb,)``
(block columns), values ``(nnzb, bs, bs)`` with ``values[k, a, b] = W[brow(k)*bs + a, col[k]*bs + b]``, and the
transpose index ``colptr (in/bs+1,)``, ``row (nnzb,)``, ``perm (nnzb,)``. Activations are row-major
``(batch, features)`` and are read in place: a block touches ``bs`` contiguous features of each batch row.

* :func:`bsr_spmm` / :func:`bsr_spmm_t`: one program per (block row, batch tile) that loops over the row's
  blocks, ``acc (BLOCK_B, bs) += x_tile (BLOCK_B, bs) @ block (bs, bs)`` with ``tl.dot`` (float32 accumulator).
  The transposed product is the same kernel over the transpose index, reading the blocks ``values[perm]``
  untransposed: no atomics, deterministic.
* :func:`bsr_sddmm`: one program per block, ``dW_k = dy_tile^T (bs, BLOCK_B) @ x_tile (BLOCK_B, bs)`` summed over
  batch tiles; the block row comes from a binary search in ``rowptr``. When there are too few blocks to fill the
  GPU (low density, large blocks) the batch is split into slices, one program per (block, slice), whose float32
  partial sums are added in a fixed order afterwards (deterministic).

The block loops are software-pipelined (``tl.range(..., num_stages=...)``) and the batch tile, warps and stages
are autotuned over short lists keyed on the batch and the block size (see :mod:`triton_kernels._common`).

Any block size up to 128 that divides both dimensions works: blocks are padded (masked) to a power of two of at
least 16, the smallest ``tl.dot`` shape, so 16, 32, 64 and 128 run unpadded.
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

__all__ = ["bsr_spmm", "bsr_spmm_t", "bsr_sddmm"]


# ============================================================================================= kernels
def _bsr_spmm_kernel(X, V, PTR, IDX, PERM, BIAS, Y, B, BS, KEY_B,
                     stride_xb, stride_xf, stride_yb, stride_yf, stride_vi, stride_vo,
                     HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_B: tl.constexpr, BS_P: tl.constexpr, UPCAST: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Y[b, r*BS + o] = sum_k sum_i X[b, IDX[k]*BS + i] * V[k', i*stride_vi + o*stride_vo] (+ BIAS).

    k runs over PTR[r]:PTR[r+1] and k' = PERM[k] if HAS_PERM else k. Forward: (stride_vi, stride_vo) = (1, BS)
    reads each block transposed; transposed product: (BS, 1) reads it as stored. KEY_B (the batch rounded to a
    power of two) is unused here: it is the autotuner's key.
    """
    r = tl.program_id(0)
    pb = tl.program_id(1)
    offs_b = (pb * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    mask_b = offs_b < B
    offs_e = tl.arange(0, BS_P)  # position inside a block (input side i, output side o)
    mask_e = offs_e < BS
    w_mask = mask_e[:, None] & mask_e[None, :]
    x_mask = mask_b[:, None] & mask_e[None, :]
    # loop-invariant pointer tiles; each block only moves them by a scalar offset
    x_ptrs = X + offs_b[:, None] * stride_xb + offs_e[None, :] * stride_xf
    w_ptrs = V + offs_e[:, None] * stride_vi + offs_e[None, :] * stride_vo
    start = tl.load(PTR + r)
    end = tl.load(PTR + r + 1)
    acc = tl.zeros((BLOCK_B, BS_P), dtype=tl.float32)
    # Pipelined: the next blocks' x tiles and weights are copied to shared memory while this one multiplies.
    for k in tl.range(start, end, num_stages=NUM_STAGES):
        c = tl.load(IDX + k).to(tl.int64)
        if HAS_PERM:
            kv = tl.load(PERM + k).to(tl.int64)
        else:
            kv = tl.cast(k, tl.int64)
        xv = tl.load(x_ptrs + c * BS * stride_xf, mask=x_mask, other=0.0)
        w = tl.load(w_ptrs + kv * BS * BS, mask=w_mask, other=0.0)
        if UPCAST:  # interpreter only (see _upcast)
            xv, w = xv.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(xv, w, acc, input_precision=PREC)
    offs_o = r.to(tl.int64) * BS + offs_e
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_o, mask=mask_e, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_b[:, None] * stride_yb + offs_o[None, :] * stride_yf, acc.to(Y.dtype.element_ty), mask=x_mask)


def _bsr_sddmm_kernel(DY, X, PTR, IDX, OUT, nnzb, n_brows, B, BS, n_iter, KEY_B,
                      stride_db, stride_df, stride_xb, stride_xf,
                      PREC: tl.constexpr, BLOCK_B: tl.constexpr, BS_P: tl.constexpr, UPCAST: tl.constexpr,
                      NUM_STAGES: tl.constexpr):
    """OUT[s, k, a, i] = sum_{b in slice s} DY[b, brow(k)*BS + a] * X[b, IDX[k]*BS + i]; brow(k) by binary search.

    Program (k, s) reduces block k over batch slice s of the ``tl.num_programs(1)`` slices (whole BLOCK_B tiles
    each); with one slice OUT is the (nnzb, BS, BS) result, else float32 partial sums the caller adds up.
    """
    k = tl.program_id(0)
    s = tl.program_id(1)
    tiles_per_slice = tl.cdiv(tl.cdiv(B, BLOCK_B), tl.num_programs(1))
    b_lo = s * tiles_per_slice * BLOCK_B
    b_hi = tl.minimum(B, b_lo + tiles_per_slice * BLOCK_B)
    c = tl.load(IDX + k).to(tl.int64)
    # brow(k) = the largest r in [0, n_brows) with PTR[r] <= k (skips empty block rows)
    lo = k * 0
    hi = k * 0 + (n_brows - 1)
    for _ in range(n_iter):
        mid = (lo + hi + 1) // 2
        go = tl.load(PTR + mid) <= k
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid - 1)
    r = lo.to(tl.int64)
    offs_e = tl.arange(0, BS_P)
    mask_e = offs_e < BS
    acc = tl.zeros((BS_P, BS_P), dtype=tl.float32)
    for b0 in tl.range(b_lo, b_hi, BLOCK_B, num_stages=NUM_STAGES):
        offs_b = (b0 + tl.arange(0, BLOCK_B)).to(tl.int64)
        mask_b = offs_b < b_hi
        # dy tile transposed: (BS_P, BLOCK_B)
        d = tl.load(DY + offs_b[None, :] * stride_db + (r * BS + offs_e)[:, None] * stride_df,
                    mask=mask_e[:, None] & mask_b[None, :], other=0.0)
        xv = tl.load(X + offs_b[:, None] * stride_xb + (c * BS + offs_e)[None, :] * stride_xf,
                     mask=mask_b[:, None] & mask_e[None, :], other=0.0)
        if UPCAST:  # interpreter only (see _upcast)
            d, xv = d.to(tl.float32), xv.to(tl.float32)
        acc = tl.dot(d, xv, acc, input_precision=PREC)
    # every program writes its whole block, zeros for an empty slice
    o_off = (s.to(tl.int64) * nnzb + k) * BS * BS + offs_e[:, None] * BS + offs_e[None, :]
    tl.store(OUT + o_off, acc.to(OUT.dtype.element_ty), mask=mask_e[:, None] & mask_e[None, :])


_KERNEL_NAMES = ("_bsr_spmm_kernel", "_bsr_sddmm_kernel")
_JIT: dict = {}


# ============================================================================================= launch shapes
MAX_BLOCK = 128


def _bs_pad(bs: int) -> int:
    """Blocks are padded (masked) to a power of two, at least 16: the smallest tl.dot shape."""
    return max(16, C.next_pow2(bs))


def _cfg(num_warps, num_stages, **blocks):
    return dict(blocks, num_warps=num_warps, num_stages=num_stages)


# Autotuned configurations (batch tile, warps, pipeline depth). Each is compiled per dtype, padded block size
# and specialization at the first call of a shape and timed once per key, so the lists are short. Every one is
# compiled for sm_90 in CI (tests/test_triton_kernels.py) and checked against float64 on a GPU
# (tests/test_cuda.py); _fits drops those whose pipeline stages or accumulator would not fit.
SPMM_CONFIGS = (
    _cfg(4, 3, BLOCK_B=64),
    _cfg(4, 3, BLOCK_B=128),
    _cfg(8, 3, BLOCK_B=128),
    _cfg(8, 4, BLOCK_B=64),
    _cfg(4, 3, BLOCK_B=32),  # batches under 64
    _cfg(4, 3, BLOCK_B=16),
)
SDDMM_CONFIGS = (
    _cfg(4, 3, BLOCK_B=64),
    _cfg(8, 3, BLOCK_B=64),
    _cfg(4, 3, BLOCK_B=128),
    _cfg(8, 4, BLOCK_B=128),
    _cfg(4, 3, BLOCK_B=32),  # batch slices under 64 rows
    _cfg(4, 3, BLOCK_B=16),
)
SMEM_BUDGET = 160 * 1024  # bytes of shared memory for the pipeline stages (an H100 block may have 227 KiB)
# float32 accumulator registers per thread (of 255) before spills threaten: 16-bit dots keep their operands in
# shared memory (wgmma); float32 ones (FMA or TF32) stage them through registers. From ptxas on sm_90
# (python tests/aot_sm90.py): the one configuration over these limits, float32 bs=64 with a 128-row tile on 4
# warps, spilled.
MAX_ACC_PER_THREAD = {2: 128, 4: 32}


def _stage_bytes(kernel: str, block_b: int, bs_p: int, elem: int) -> int:
    """Bytes one pipeline stage holds in shared memory: the operand tiles of one tl.dot."""
    if kernel == "spmm":  # x tile (BLOCK_B, bs) and one weight block (bs, bs)
        return (block_b * bs_p + bs_p * bs_p) * elem
    return 2 * block_b * bs_p * elem  # sddmm: the dy and x tiles (BLOCK_B, bs)


def _fits(kernel: str, cfg: dict, bs_p: int, elem: int) -> bool:
    acc = (cfg["BLOCK_B"] if kernel == "spmm" else bs_p) * bs_p
    return (cfg["num_stages"] * _stage_bytes(kernel, cfg["BLOCK_B"], bs_p, elem) <= SMEM_BUDGET
            and acc <= MAX_ACC_PER_THREAD[elem] * 32 * cfg["num_warps"])


def _keep(kernel: str):
    def keep(cfg: dict, args: dict) -> bool:
        elem = args["X"].element_size()
        return _fits(kernel, cfg, args["BS_P"], elem) and C.batch_tile_fits(cfg["BLOCK_B"], args["KEY_B"])
    return keep


_TUNING = {
    "_bsr_spmm_kernel": C.Tuning(SPMM_CONFIGS, key=("KEY_B", "BS_P", "HAS_PERM"), keep=_keep("spmm")),
    "_bsr_sddmm_kernel": C.Tuning(SDDMM_CONFIGS, key=("KEY_B", "BS_P"), keep=_keep("sddmm")),
}


def _kernels() -> dict:
    return C.jit_kernels(globals(), _KERNEL_NAMES, _JIT, _TUNING)


# Launch shapes without autotuning, by padded block size: (largest batch tile, warps). Chosen so that the
# kernels compile for sm_90 without register spills in bf16/fp16 (checked with ptxas -v): the pointer and
# operand tiles (BLOCK_B x bs) and the (bs x bs) block live in registers before going to the tensor cores.
_SPMM_SHAPES = {16: (128, 4), 32: (128, 8), 64: (64, 8), 128: (32, 8)}
_SDDMM_SHAPES = {16: (128, 4), 32: (128, 8), 64: (64, 8), 128: (32, 8)}


def _launch_shape(table, batch: int, bs_p: int, dtype: torch.dtype):
    max_b, warps = table[bs_p]
    if dtype == torch.float32:  # float32 tiles are twice the size (and IEEE dots run on FMA units)
        max_b = max(16, max_b // 2)
    return C.clamp_pow2(batch, 16, max_b), warps


def _default(kernel: str, batch: int, bs_p: int, dtype: torch.dtype) -> dict:
    """The configuration without autotuning: the table's tile, as many pipeline stages (<= 3) as fit."""
    block_b, warps = _launch_shape(_SPMM_SHAPES if kernel == "spmm" else _SDDMM_SHAPES, batch, bs_p, dtype)
    elem = torch.empty(0, dtype=dtype).element_size()
    stages = next((s for s in (3, 2) if s * _stage_bytes(kernel, block_b, bs_p, elem) <= SMEM_BUDGET), 1)
    return _cfg(warps, stages, BLOCK_B=block_b)


# The SDDMM has one program per block; at low density that is too few to fill the GPU (164 blocks of 64 for a
# 1%-dense 8192x8192 layer, on 132 multiprocessors), so the batch is then split into slices reduced in float32.
SPLIT_PROGRAMS_PER_SM = 4  # programs wanted per multiprocessor
SPLIT_MIN_ROWS = 256  # batch rows per slice at least: the partial sums cost nnzb*bs*bs*4 bytes per slice
MAX_SPLIT = 64


def _sddmm_split(nnzb: int, batch: int, n_sm: int) -> int:
    """Batch slices for the SDDMM: 1 when there are enough blocks, else up to SPLIT_PROGRAMS_PER_SM per SM."""
    want = C.cdiv(SPLIT_PROGRAMS_PER_SM * n_sm, max(nnzb, 1))
    return max(1, min(want, batch // SPLIT_MIN_ROWS, MAX_SPLIT))


def _upcast(kernel, dtype: torch.dtype) -> bool:
    """The Triton interpreter's tl.dot gives wrong results on bfloat16 operands (seen with triton 3.9: it
    multiplies the raw bits), so under the interpreter bfloat16 tiles are cast to float32 before the dot.
    Compiled kernels always feed the tensor cores bfloat16."""
    return dtype == torch.bfloat16 and C.is_interpreted(kernel)


def _check_values(values, nnzb: Optional[int] = None) -> int:
    C.check_float("values", values, 3)
    bs = values.shape[1]
    if values.shape[2] != bs or bs < 1:
        raise ValueError(f"values must have shape (nnz_blocks, bs, bs), got {tuple(values.shape)}")
    _check_bs(bs)
    if nnzb is not None and values.shape[0] != nnzb:
        raise ValueError(f"values has {values.shape[0]} blocks but the index has {nnzb}; they must match")
    return bs


def _check_bs(bs: int) -> None:
    if bs > MAX_BLOCK:
        raise ValueError(f"block size {bs} is not supported by the Triton kernels (at most {MAX_BLOCK})")


def _check_features(name: str, n: int, bs: int) -> int:
    if n % bs:
        raise ValueError(f"{name} = {n} is not a multiple of the block size {bs}")
    return n // bs


def _spmm_launch(x, values, ptr, idx, perm, bias, n_out: int, bs: int, transpose: bool,
                 config: Optional[dict] = None) -> torch.Tensor:
    kernels = _kernels()
    k = kernels["_bsr_spmm_kernel"]
    batch = x.shape[0]
    y = torch.empty(batch, n_out, dtype=x.dtype, device=x.device)
    if batch == 0 or n_out == 0:
        return y
    if idx.numel() == 0:
        return y.copy_(bias.expand(batch, n_out)) if bias is not None else y.zero_()
    C.batch_grid(batch, 16)  # the smallest batch tile any configuration uses
    x, values = x.contiguous(), values.contiguous()
    ptr, idx = ptr.contiguous(), idx.contiguous()
    perm = perm.contiguous() if perm is not None else None
    bias = bias.contiguous() if bias is not None else None
    bs_p = _bs_pad(bs)
    stride_vi, stride_vo = (bs, 1) if transpose else (1, bs)

    def grid(meta):
        return (n_out // bs, C.cdiv(batch, meta["BLOCK_B"]))

    args = (x, values, ptr, idx, perm if perm is not None else idx, bias if bias is not None else values, y,
            batch, bs, C.clamp_pow2(batch, 16, 4096), x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            stride_vi, stride_vo)
    consts = dict(HAS_PERM=perm is not None, HAS_BIAS=bias is not None, PREC=C.dot_precision(x.dtype),
                  BS_P=bs_p, UPCAST=_upcast(k, x.dtype))
    C.launch(kernels, "_bsr_spmm_kernel", grid, args, consts, _default("spmm", batch, bs_p, x.dtype), x.device,
             config)
    return y


def _sddmm_launch(dy, x, rowptr, col, bs: int, config: Optional[dict] = None,
                  split: Optional[int] = None) -> torch.Tensor:
    kernels = _kernels()
    k = kernels["_bsr_sddmm_kernel"]
    nnzb, batch = col.numel(), dy.shape[0]
    out = torch.empty(nnzb, bs, bs, dtype=dy.dtype, device=dy.device)
    if nnzb == 0:
        return out
    if batch == 0:
        return out.zero_()
    dy, x = dy.contiguous(), x.contiguous()
    n_br = dy.shape[1] // bs
    bs_p = _bs_pad(bs)
    split = split or _sddmm_split(nnzb, batch, C.sm_count(dy.device))
    # one slice: the result directly; more: float32 partial sums, added in a fixed order below (deterministic)
    dst = out if split == 1 else torch.empty(split, nnzb, bs, bs, dtype=torch.float32, device=dy.device)
    args = (dy, x, rowptr.contiguous(), col.contiguous(), dst, nnzb, n_br, batch, bs, C.search_iters(n_br),
            C.clamp_pow2(C.cdiv(batch, split), 16, 4096), dy.stride(0), dy.stride(1), x.stride(0), x.stride(1))
    consts = dict(PREC=C.dot_precision(dy.dtype), BS_P=bs_p, UPCAST=_upcast(k, dy.dtype))
    C.launch(kernels, "_bsr_sddmm_kernel", lambda meta: (nnzb, split), args, consts,
             _default("sddmm", C.cdiv(batch, split), bs_p, dy.dtype), dy.device, config)
    if split > 1:
        out.copy_(dst.sum(dim=0))
    return out


# ============================================================================================= public API
def bsr_spmm(x: torch.Tensor, values: torch.Tensor, rowptr: torch.Tensor, col: torch.Tensor, n_out: int,
             bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Forward: ``y (B, n_out) = x (B, in) @ W^T (+ bias)`` with W block-sparse, values ``(nnzb, bs, bs)``.

    The block size is ``values.shape[1]``; it must divide ``n_out`` and ``x.shape[1]``. Returns y of x's dtype.
    """
    n_out = C.check_int("n_out", n_out)
    C.check_float("x", x, 2)
    bs = _check_values(values)
    n_br = _check_features("n_out", n_out, bs)
    _check_features("x.shape[1] (in_features)", x.shape[1], bs)
    C.check_index("rowptr", rowptr, n_br + 1)
    C.check_index("col", col, values.shape[0])
    C.check_nnz(values.numel())
    if bias is not None:
        C.check_float("bias", bias, 1)
        if bias.numel() != n_out:
            raise ValueError(f"bias must have n_out = {n_out} elements, got {bias.numel()}")
    C.check_same_dtype(x=x, values=values, bias=bias)
    C.check_devices(_kernels()["_bsr_spmm_kernel"], x=x, values=values, rowptr=rowptr, col=col, bias=bias)
    return _spmm_launch(x, values, rowptr, col, None, bias, n_out, bs, transpose=False)


def bsr_spmm_t(dy: torch.Tensor, values: torch.Tensor, colptr: torch.Tensor, row: torch.Tensor,
               perm: torch.Tensor, n_in: int) -> torch.Tensor:
    """Input gradient: ``dx (B, n_in) = dy (B, out) @ W`` through the block transpose index (deterministic)."""
    n_in = C.check_int("n_in", n_in)
    C.check_float("dy", dy, 2)
    bs = _check_values(values)
    n_bc = _check_features("n_in", n_in, bs)
    _check_features("dy.shape[1] (out_features)", dy.shape[1], bs)
    C.check_index("colptr", colptr, n_bc + 1)
    C.check_index("row", row, values.shape[0])
    C.check_index("perm", perm, values.shape[0])
    C.check_nnz(values.numel())
    C.check_same_dtype(dy=dy, values=values)
    C.check_devices(_kernels()["_bsr_spmm_kernel"], dy=dy, values=values, colptr=colptr, row=row, perm=perm)
    return _spmm_launch(dy, values, colptr, row, perm, None, n_in, bs, transpose=True)


def bsr_sddmm(dy: torch.Tensor, x: torch.Tensor, rowptr: torch.Tensor, col: torch.Tensor,
              block_size: int) -> torch.Tensor:
    """Weight gradient at the live blocks: ``dW[k] = dy[:, brow(k) block]^T @ x[:, col[k] block]``.

    dy (B, out) and x (B, in) share one float dtype; returns (nnzb, bs, bs) of that dtype.
    """
    bs = C.check_int("block_size", block_size)
    if bs < 1:
        raise ValueError(f"block_size must be positive, got {bs}")
    _check_bs(bs)
    C.check_float("dy", dy, 2)
    C.check_float("x", x, 2)
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy and x must have the same batch size, got {dy.shape[0]} and {x.shape[0]}")
    n_br = _check_features("dy.shape[1] (out_features)", dy.shape[1], bs)
    _check_features("x.shape[1] (in_features)", x.shape[1], bs)
    C.check_index("rowptr", rowptr, n_br + 1)
    C.check_index("col", col)
    C.check_nnz(col.numel() * bs * bs)
    C.check_same_dtype(dy=dy, x=x)
    C.check_devices(_kernels()["_bsr_sddmm_kernel"], dy=dy, x=x, rowptr=rowptr, col=col)
    return _sddmm_launch(dy, x, rowptr, col, bs)
