"""The sparse linear op: ``y = x W^T + b`` with W stored as a :class:`~sparsecore.pattern.Pattern` and values.

Three ``torch.library`` custom ops do the work, each with a fake (meta) implementation so ``torch.compile`` can
trace them, an autograd rule and an autocast rule:

    sparsecore::spmm    y  (B, out) = x (B, in) W^T + b         forward
    sparsecore::spmm_t  dx (B, in)  = dy (B, out) W             through the transpose index: no atomics
    sparsecore::sddmm   dW          = (dy^T x) at the live entries only  (values-shaped, never (out, in))

and db = sum over the batch of dy. The op is bilinear in (x, W), so the gradient of each op is made of the three
ops again: gradients of gradients (``create_graph=True``, e.g. a gradient penalty) are exact. Kernels: C++
(``sparsecore._C``) for CPU tensors, Triton for CUDA tensors, see :mod:`sparsecore.backend`.

Dtypes. On the CPU: float32, float64 and bfloat16, the same for x, values and bias; outputs (y, dx, dW) have x's
dtype. The bfloat16 kernels read bf16, accumulate in fp32 and round each output once to nearest even, as
``tensor.to(torch.bfloat16)`` rounds (``sparsecore._C.kernel_isa() == "avx512bf16"``: the SDDMM's dot products
use AVX512-BF16). float16 is not supported on the CPU (a TypeError says so); it runs on the Triton backend. Users
call :func:`sparse_linear`, which checks its inputs and raises clear
errors; the raw ops assume checked inputs. In eager mode :func:`sparse_linear` runs the same implementations
through a plain ``autograd.Function`` (the custom-op dispatch costs more than the kernels of a very sparse
layer); under ``torch.compile`` it calls the custom ops.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _C
from .backend import resolve
from .pattern import Pattern

__all__ = ["sparse_linear", "feature_major", "spmm", "spmm_t", "sddmm"]

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _np(t: Tensor):
    """Zero-copy numpy view of a CPU tensor for the C++ kernels; detach() (a new tensor object) only when autograd
    tracks t. numpy has no bfloat16: a bf16 tensor goes over as its int16 view (the same 16-bit words), which the
    ``*_bf16`` kernels read as bf16."""
    if t.requires_grad:
        t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy()


def _cpu_kernel(name: str, dtype: torch.dtype):
    """The C++ kernel ``name`` for tensors of ``dtype``: its ``_bf16`` twin for bfloat16 (the float32/float64
    overloads dispatch on the numpy dtype)."""
    return getattr(_C, name + "_bf16") if dtype == torch.bfloat16 else getattr(_C, name)


def _triton():
    try:
        import triton_kernels
    except ImportError as e:  # pragma: no cover - only without the package's triton_kernels
        raise RuntimeError("the Triton backend needs the triton_kernels package") from e
    if not triton_kernels.available():
        raise RuntimeError("the Triton backend needs triton installed (pip install 'sparsecore[gpu]')")
    return triton_kernels


def _check_cpu_dtype(t: Tensor) -> None:
    if t.dtype == torch.float16:
        raise TypeError("the C++ CPU kernels support float32, float64 and bfloat16, got torch.float16: on the CPU "
                        "use bfloat16 as the half-precision type (float16 runs on the Triton backend, CUDA)")
    if t.dtype not in _CPU_DTYPES:
        raise TypeError(f"the C++ CPU kernels support float32, float64 and bfloat16, got {t.dtype}")


# ----------------------------------------------------------------------------------------------- kernels
# The three implementations below pick the backend for the tensors' device and call one kernel; they assume
# checked inputs (sparse_linear checks) and never record autograd history.

def _is_fm(t: Tensor) -> bool:
    """Whether a 2-D (B, K) tensor is feature-major: stored as a contiguous (K, B) array, i.e. ``t.t()`` is
    contiguous and ``t`` is not (the C++ CSR kernels then read and write it in place, without transposing)."""
    return t.dim() == 2 and t.shape[0] > 1 and t.shape[1] > 1 and t.stride() == (1, t.shape[0])


def _empty(rows: int, cols: int, dtype: torch.dtype, fm: bool) -> Tensor:
    """An uninitialised (rows, cols) tensor, feature-major (stored (cols, rows)) with ``fm``."""
    # empty_strided: one call (empty(cols, rows).t() is two, ~1.3 us more on every kernel call)
    return torch.empty_strided((rows, cols), (1, rows), dtype=dtype) if fm else torch.empty(rows, cols, dtype=dtype)


def _row_major(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


# The C++ CSR kernels are called by address (``_C.spmm_ptr`` / ``_C.sddmm_ptr``): building numpy views of five to
# seven tensors cost ~20 us a call, more than the arithmetic of a very sparse layer. These helpers check what the
# kernels assume and C++ cannot see: the layout, the dtype, int32 contiguous indices of the right length.
_DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}


def _csr_layout(t: Tensor) -> bool:
    """Whether the 2-D operand t is feature-major (True) or row-major (False); anything else is an error."""
    if t.dtype not in _DTYPE_CODE or t.device.type != "cpu":
        raise TypeError(f"the C++ CSR kernels take CPU float32/float64/bfloat16 tensors, got {t.dtype} on {t.device}")
    if t.dim() != 2:
        raise ValueError(f"the C++ CSR kernels take 2-D operands, got shape {tuple(t.shape)}")
    if _is_fm(t):
        return True
    if not t.is_contiguous():
        raise ValueError("the C++ CSR kernels take row-major (contiguous) or feature-major operands")
    return False


def _check_index(*ts: Tensor) -> None:
    """rowptr / colptr: contiguous int32."""
    for t in ts:
        if t.dtype != torch.int32 or not t.is_contiguous():
            raise TypeError(f"pattern index tensors must be contiguous int32, got {t.dtype}")


def _index_bytes(*ts: Tensor) -> int:
    """The width of the entry indices (col, row, perm): 4 (int32) or 2 (int16, a compact pattern), one for all."""
    dtype = ts[0].dtype
    for t in ts:
        if t.dtype not in (torch.int32, torch.int16) or t.dtype != dtype or not t.is_contiguous():
            raise TypeError(f"pattern entry indices (col, row, perm) must be contiguous int32, or int16 for a compact "
                            f"pattern, all of one dtype; got {[u.dtype for u in ts]}")
    return 2 if dtype == torch.int16 else 4


def _values_ptr(values: Tensor, index: Tensor, dtype: torch.dtype) -> int:
    """values' address, after checking it matches the pattern's entries (one per index entry, contiguous) and the
    operand's dtype."""
    if values.shape != index.shape or not values.is_contiguous() or values.dtype != dtype:
        raise ValueError(f"values must be contiguous {dtype} with shape {tuple(index.shape)}, got {values.dtype} "
                         f"{tuple(values.shape)}")
    return values.data_ptr()


def _bias_ptr(bias: Optional[Tensor], n_out: int, dtype: torch.dtype) -> int:
    if bias is None:
        return 0
    if bias.shape != (n_out,) or not bias.is_contiguous() or bias.dtype != dtype:
        raise ValueError(f"bias must be contiguous {dtype} with shape ({n_out},), got {bias.dtype} "
                         f"{tuple(bias.shape)}")
    return bias.data_ptr()


def _spmm_impl(x: Tensor, values: Tensor, bias: Optional[Tensor], rowptr: Tensor, col: Tensor, n_out: int,
               block_size: int, out_fm: Optional[bool] = None, relu: bool = False) -> Tensor:
    """y (B, n_out) = x W^T + bias, then ReLU'd with ``relu`` (as torch.relu: NaN and -0.0 kept; fused into the
    C++ CSR kernels' stores). On the C++ CSR kernels x may be row-major or feature-major, and y is feature-major
    when ``out_fm`` is true (default: x's layout); elsewhere both are row-major."""
    if resolve(x.device) == "triton":
        tk = _triton()
        x = _row_major(x)
        if block_size == 1:
            y = tk.csr_spmm(x, values, rowptr, col, n_out, bias)
        else:
            y = tk.bsr_spmm(x, values, rowptr, col, n_out, bias)
        return y.relu_() if relu else y
    if block_size == 1:
        x_fm = _csr_layout(x)
        if rowptr.shape[0] != n_out + 1:
            raise ValueError(f"spmm: rowptr has {rowptr.shape[0]} entries for {n_out} output rows")
        _check_index(rowptr)
        out_fm = x_fm if out_fm is None else bool(out_fm) and x.shape[0] > 1 and n_out > 1
        y = _empty(x.shape[0], n_out, x.dtype, out_fm)
        if bias is not None and not bias.is_contiguous():  # the kernel reads it by address
            bias = bias.contiguous()
        _C.spmm_ptr(_DTYPE_CODE[x.dtype], x.data_ptr(), x.shape[0], x.shape[1], x_fm, rowptr.data_ptr(),
                    col.data_ptr(), _values_ptr(values, col, x.dtype), col.shape[0], 0,
                    _bias_ptr(bias, n_out, x.dtype), y.data_ptr(), n_out, out_fm, torch.get_num_threads(), relu, 0,
                    _index_bytes(col))
        return y
    b = None if bias is None else _np(bias)
    x = _row_major(x)
    y = torch.empty(x.shape[0], n_out, dtype=x.dtype)
    _cpu_kernel("bsr_spmm", x.dtype)(_np(x), _np(rowptr), _np(col), _np(values), b, _np(y), torch.get_num_threads())
    return y.relu_() if relu else y


def _relu_mask(dx: Tensor, mask: Optional[Tensor]) -> Tensor:
    """The ReLU's backward on dx, from the ReLU's output ``mask``: 0 where mask <= 0."""
    return dx if mask is None else torch.ops.aten.threshold_backward(dx, mask, 0)


def _spmm_t_impl(dy: Tensor, values: Tensor, rowptr: Tensor, colptr: Tensor, row: Tensor, perm: Tensor, n_in: int,
                 block_size: int, out_fm: Optional[bool] = None, mask: Optional[Tensor] = None) -> Tensor:
    """dx (B, n_in) = dy W; layouts as in :func:`_spmm_impl` (dx feature-major with ``out_fm``, default dy's).
    With ``mask`` (the output of a ReLU whose input was x, shaped as dx), the ReLU's backward too: dx = 0 where
    mask <= 0 (fused into the C++ CSR kernel's stores when dx is feature-major and laid out as mask). W's
    ``rowptr`` is read for a compact pattern, whose ``perm`` holds offsets inside rows."""
    if resolve(dy.device) == "triton":
        tk = _triton()
        if block_size == 1:
            return _relu_mask(tk.csr_spmm_t(dy, values, colptr, row, perm, n_in, rowptr=rowptr), mask)
        return _relu_mask(tk.bsr_spmm_t(_row_major(dy), values, colptr, row, perm, n_in), mask)
    if block_size == 1:
        dy_fm = _csr_layout(dy)
        if colptr.shape[0] != n_in + 1:
            raise ValueError(f"spmm_t: colptr has {colptr.shape[0]} entries for {n_in} input columns")
        out_fm = dy_fm if out_fm is None else bool(out_fm) and dy.shape[0] > 1 and n_in > 1
        dx = _empty(dy.shape[0], n_in, dy.dtype, out_fm)
        if perm.shape != row.shape:
            raise ValueError(f"spmm_t: perm has shape {tuple(perm.shape)}, row {tuple(row.shape)}")
        _check_index(colptr)
        index_bytes = _index_bytes(row, perm)
        if index_bytes == 2:
            _check_index(rowptr)
            if rowptr.shape[0] != dy.shape[1] + 1:
                raise ValueError(f"spmm_t: rowptr has {rowptr.shape[0]} entries for {dy.shape[1]} output rows")
        fused = (mask is not None and out_fm and mask.dtype == dx.dtype and mask.shape == dx.shape
                 and mask.stride() == dx.stride() and mask.device == dx.device)
        _C.spmm_ptr(_DTYPE_CODE[dy.dtype], dy.data_ptr(), dy.shape[0], dy.shape[1], dy_fm, colptr.data_ptr(),
                    row.data_ptr(), _values_ptr(values, row, dy.dtype), row.shape[0], perm.data_ptr(), 0,
                    dx.data_ptr(), n_in, out_fm, torch.get_num_threads(), False, mask.data_ptr() if fused else 0,
                    index_bytes, rowptr.data_ptr() if index_bytes == 2 else 0)
        return dx if fused else _relu_mask(dx, mask)
    dy = _row_major(dy)
    dx = torch.empty(dy.shape[0], n_in, dtype=dy.dtype)
    _cpu_kernel("bsr_spmm_t", dy.dtype)(_np(dy), _np(colptr), _np(row), _np(perm), _np(values), _np(dx),
                                        torch.get_num_threads())
    return _relu_mask(dx, mask)


def _sddmm_impl(dy: Tensor, x: Tensor, rowptr: Tensor, col: Tensor, block_size: int) -> Tensor:
    """dW at the live entries; dy and x each row-major or (C++ CSR kernels) feature-major."""
    if resolve(dy.device) == "triton":
        tk = _triton()
        x = _row_major(x)
        if block_size == 1:
            return tk.csr_sddmm(dy, x, rowptr, col)
        return tk.bsr_sddmm(_row_major(dy), x, rowptr, col, block_size)
    nnz = col.shape[0]
    shape = (nnz,) if block_size == 1 else (nnz, block_size, block_size)
    out = torch.empty(shape, dtype=dy.dtype)
    if block_size == 1:
        dy_fm, x_fm = _csr_layout(dy), _csr_layout(x)
        if x.dtype != dy.dtype or x.shape[0] != dy.shape[0] or dy.shape[1] != rowptr.shape[0] - 1:
            raise ValueError(f"sddmm: dy {tuple(dy.shape)} {dy.dtype} and x {tuple(x.shape)} {x.dtype} do not match "
                             f"a pattern of {rowptr.shape[0] - 1} rows")
        _check_index(rowptr)
        _C.sddmm_ptr(_DTYPE_CODE[dy.dtype], dy.data_ptr(), x.data_ptr(), dy.shape[0], dy.shape[1], x.shape[1], dy_fm,
                     x_fm, rowptr.data_ptr(), col.data_ptr(), nnz, out.data_ptr(), torch.get_num_threads(),
                     _index_bytes(col))
    else:
        _cpu_kernel("bsr_sddmm", dy.dtype)(_np(_row_major(dy)), _np(_row_major(x)), _np(rowptr), _np(col), _np(out),
                                           torch.get_num_threads())
    return out


def _n_out(rowptr: Tensor, block_size: int) -> int:
    return (rowptr.shape[0] - 1) * block_size


# ----------------------------------------------------------------------------------------------- custom ops
# Every op takes the whole pattern (rowptr, col and the transpose index colptr, row, perm), so that each op's
# backward can be written with the three ops themselves: the set is closed under differentiation, and double
# backward (create_graph=True) is exact to any order. The index tensors are those of a Pattern (pattern.tensors()):
# rowptr and colptr int32; col, row and perm all int32 (perm = CSR positions), or all int16 for a compact pattern
# (perm = offsets inside W's rows, read with rowptr). int16 tensors whose perm holds positions would read the wrong
# values: build indices with Pattern, never by casting an int32 pattern's tensors.

@torch.library.custom_op("sparsecore::spmm", mutates_args=())
def spmm(x: Tensor, values: Tensor, bias: Optional[Tensor], rowptr: Tensor, col: Tensor, colptr: Tensor,
         row: Tensor, perm: Tensor, n_out: int, block_size: int) -> Tensor:
    """y (B, n_out) = x (B, in) W^T + bias: x, values (nnz,) or (nnz, bs, bs), bias (n_out,) or None of one dtype
    (CPU: float32, float64, bfloat16); y has it too. Inputs are assumed checked (see :func:`sparse_linear`)."""
    return _spmm_impl(_row_major(x), values, bias, rowptr, col, n_out, block_size, out_fm=False)


@spmm.register_fake
def _(x, values, bias, rowptr, col, colptr, row, perm, n_out, block_size):
    return x.new_empty(x.shape[0], n_out)


@torch.library.custom_op("sparsecore::spmm_t", mutates_args=())
def spmm_t(dy: Tensor, values: Tensor, rowptr: Tensor, col: Tensor, colptr: Tensor, row: Tensor, perm: Tensor,
           n_in: int, block_size: int) -> Tensor:
    """dx (B, n_in) = dy (B, out) W, over the column-ordered index (W^T's values are values[perm])."""
    return _spmm_t_impl(_row_major(dy), values, rowptr, colptr, row, perm, n_in, block_size, out_fm=False)


@spmm_t.register_fake
def _(dy, values, rowptr, col, colptr, row, perm, n_in, block_size):
    return dy.new_empty(dy.shape[0], n_in)


@torch.library.custom_op("sparsecore::sddmm", mutates_args=())
def sddmm(dy: Tensor, x: Tensor, rowptr: Tensor, col: Tensor, colptr: Tensor, row: Tensor, perm: Tensor,
          block_size: int) -> Tensor:
    """dW at the live entries: (nnz,) or (nnz, bs, bs), entry k = sum_b dy[b, rows of k] x[b, cols of k].

    dy (B, out) and x (B, in) of one dtype (CPU: float32, float64, bfloat16); dW has it too (bf16: the sum over
    the whole batch is taken in fp32 and rounded once)."""
    return _sddmm_impl(_row_major(dy), _row_major(x), rowptr, col, block_size)


@sddmm.register_fake
def _(dy, x, rowptr, col, colptr, row, perm, block_size):
    nnz = col.shape[0]
    shape = (nnz,) if block_size == 1 else (nnz, block_size, block_size)
    return dy.new_empty(shape)


# ---- autograd of the ops: y = x W^T + b is bilinear in (x, W), so every gradient is one of the three ops
def _grad_layout(dy: Tensor, block_size: int) -> Tensor:
    """dy as the backward kernels read it: the Triton CSR kernels read it feature-major in both dX and dW (a
    (B, out) view of one (out, B) copy, made here once instead of in each); the C++ CSR kernels take it row-major
    or feature-major as it comes; the BSR kernels row-major."""
    if block_size == 1 and resolve(dy.device) == "triton":
        return dy.t().contiguous().t()
    if block_size == 1 and _is_fm(dy):
        return dy
    return dy.contiguous()


def _spmm_setup(ctx, inputs, output):
    x, values, bias, rowptr, col, colptr, row, perm, n_out, block_size = inputs
    ctx.save_for_backward(x, values, rowptr, col, colptr, row, perm)
    ctx.has_bias, ctx.block_size = bias is not None, block_size


def _spmm_backward(ctx, dy):
    x, values, rowptr, col, colptr, row, perm = ctx.saved_tensors
    bs, (need_x, need_v, need_b) = ctx.block_size, ctx.needs_input_grad[:3]
    dy = _grad_layout(dy, bs)
    dx = spmm_t(dy, values, rowptr, col, colptr, row, perm, x.shape[1], bs) if need_x else None
    dv = sddmm(dy, x, rowptr, col, colptr, row, perm, bs) if need_v else None
    db = dy.sum(0) if (ctx.has_bias and need_b) else None
    return (dx, dv, db) + (None,) * 7


def _spmm_t_setup(ctx, inputs, output):
    dy, values, rowptr, col, colptr, row, perm, n_in, block_size = inputs
    ctx.save_for_backward(dy, values, rowptr, col, colptr, row, perm)
    ctx.block_size = block_size


def _spmm_t_backward(ctx, g):
    # dx = dy W:  d(dy) = g W^T (the forward op),  d(W) = (dy^T g) at the live entries (the SDDMM)
    dy, values, rowptr, col, colptr, row, perm = ctx.saved_tensors
    bs, (need_dy, need_v) = ctx.block_size, ctx.needs_input_grad[:2]
    g = g.contiguous()
    ddy = spmm(g, values, None, rowptr, col, colptr, row, perm, _n_out(rowptr, bs), bs) if need_dy else None
    dv = sddmm(dy, g, rowptr, col, colptr, row, perm, bs) if need_v else None
    return (ddy, dv) + (None,) * 7


def _sddmm_setup(ctx, inputs, output):
    dy, x, rowptr, col, colptr, row, perm, block_size = inputs
    ctx.save_for_backward(dy, x, rowptr, col, colptr, row, perm)
    ctx.block_size = block_size


def _sddmm_backward(ctx, h):
    # dW = (dy^T x) at the live entries:  d(dy) = x H^T (forward op with values h),  d(x) = dy H (transposed op)
    dy, x, rowptr, col, colptr, row, perm = ctx.saved_tensors
    bs, (need_dy, need_x) = ctx.block_size, ctx.needs_input_grad[:2]
    h = h.contiguous()
    ddy = spmm(x, h, None, rowptr, col, colptr, row, perm, _n_out(rowptr, bs), bs) if need_dy else None
    dx = spmm_t(dy, h, rowptr, col, colptr, row, perm, x.shape[1], bs) if need_x else None
    return (ddy, dx) + (None,) * 6


spmm.register_autograd(_spmm_backward, setup_context=_spmm_setup)
spmm_t.register_autograd(_spmm_t_backward, setup_context=_spmm_t_setup)
sddmm.register_autograd(_sddmm_backward, setup_context=_sddmm_setup)


# ---- autocast: cast to the autocast region's dtype at call time (torch.library.register_autocast fixes one dtype
# at registration; a region may ask for float16 or bfloat16), as nn.Linear does: floating tensors of the region's
# device except float64, then run the op with autocast off.
def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype of the enclosing ``torch.autocast`` region for ``device_type``, or None outside one."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _autocast_cast(t, device_type: str, dtype: torch.dtype):
    if isinstance(t, Tensor) and t.is_floating_point() and t.device.type == device_type and t.dtype != torch.float64:
        return t.to(dtype)
    return t


def _register_autocast(op, device_type: str) -> None:
    # As CustomOpDef.register_autocast does, with the dtype read at call time instead of fixed at registration.
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(keyset):
            return op._opoverload(*(_autocast_cast(a, device_type, dtype) for a in args))

    op._lib.impl(op._name, kernel, key_name, with_keyset=True)


for _op in (spmm, spmm_t, sddmm):
    for _device_type in ("cpu", "cuda"):
        _register_autocast(_op, _device_type)


# ----------------------------------------------------------------------------------------------- eager autograd
# The same forward and backward as the custom ops, without the dispatcher: in eager mode torch.library's Python
# custom ops cost ~0.3 ms per layer and step, which at high sparsity is more than the kernels. The pattern goes in
# as one Python object, not five tensors: apply() costs per argument, and the index tensors need no version checks
# (a pattern is never modified in place; edits install new tensors). A backward run with create_graph=True (grad
# mode on inside it) goes through the differentiable Functions below, so gradients of gradients are exact; the
# usual backward calls the kernels directly.

def _eager_spmm_t(dy, values, p, out_fm=None):
    if torch.is_grad_enabled() and (dy.requires_grad or values.requires_grad):
        return _EagerSpmmT.apply(dy, values, p)
    return _spmm_t_impl(dy, values, p.rowptr, p.colptr, p.row, p.perm, p.shape[1], p.block_size, out_fm)


def _eager_sddmm(dy, x, p):
    if torch.is_grad_enabled() and (dy.requires_grad or x.requires_grad):
        return _EagerSddmm.apply(dy, x, p)
    return _sddmm_impl(dy, x, p.rowptr, p.col, p.block_size)


def _eager_spmm(x, values, p):
    if torch.is_grad_enabled() and (x.requires_grad or values.requires_grad):
        return _EagerSparseLinear.apply(x, values, None, p, None)
    return _spmm_impl(x, values, None, p.rowptr, p.col, p.shape[0], p.block_size)


class _EagerSparseLinear(torch.autograd.Function):
    """y = x W^T + b (the ``spmm`` op without the dispatcher). dX comes back in x's layout (row-major or
    feature-major), so that the ReLU before the layer sees its output and its gradient in one layout (mixed
    layouts make torch's elementwise backward ~30x slower)."""

    @staticmethod
    def forward(ctx, x, values, bias, pattern, out_fm):
        ctx.save_for_backward(x, values)
        ctx.pattern, ctx.has_bias = pattern, bias is not None
        return _spmm_impl(x, values, bias, pattern.rowptr, pattern.col, pattern.shape[0], pattern.block_size,
                          out_fm)

    @staticmethod
    def backward(ctx, dy):
        x, values = ctx.saved_tensors
        p, (need_x, need_v, need_b) = ctx.pattern, ctx.needs_input_grad[:3]
        dy = _grad_layout(dy, p.block_size)
        dx = _eager_spmm_t(dy, values, p, _is_fm(x)) if need_x else None
        dv = _eager_sddmm(dy, x, p) if need_v else None
        db = dy.sum(0) if (ctx.has_bias and need_b) else None
        return dx, dv, db, None, None


class _EagerSpmmT(torch.autograd.Function):
    """dx = dy W (the ``spmm_t`` op without the dispatcher); only built for create_graph backward passes."""

    @staticmethod
    def forward(ctx, dy, values, pattern):
        ctx.save_for_backward(dy, values)
        ctx.pattern = pattern
        return _spmm_t_impl(dy, values, pattern.rowptr, pattern.colptr, pattern.row, pattern.perm,
                            pattern.shape[1], pattern.block_size)

    @staticmethod
    def backward(ctx, g):
        dy, values = ctx.saved_tensors
        p, (need_dy, need_v) = ctx.pattern, ctx.needs_input_grad[:2]
        g = g.contiguous()
        return (_eager_spmm(g, values, p) if need_dy else None, _eager_sddmm(dy, g, p) if need_v else None, None)


class _EagerSddmm(torch.autograd.Function):
    """dW = (dy^T x) at the live entries (the ``sddmm`` op without the dispatcher); create_graph passes only."""

    @staticmethod
    def forward(ctx, dy, x, pattern):
        ctx.save_for_backward(dy, x)
        ctx.pattern = pattern
        return _sddmm_impl(dy, x, pattern.rowptr, pattern.col, pattern.block_size)

    @staticmethod
    def backward(ctx, h):
        dy, x = ctx.saved_tensors
        p, (need_dy, need_x) = ctx.pattern, ctx.needs_input_grad[:2]
        h = h.contiguous()
        return (_eager_spmm(x, h, p) if need_dy else None, _eager_spmm_t(dy, h, p) if need_x else None, None)


# ----------------------------------------------------------------------------------------------- user entry
def sparse_linear(x: Tensor, values: Tensor, pattern: Pattern, bias: Optional[Tensor] = None, *,
                  feature_major: bool = False) -> Tensor:
    """``y = x W^T + bias`` with W given by ``pattern`` and ``values`` (CSR order, shape ``pattern.values_shape``).

    Layout: a 2-D x may be row-major or feature-major (``x.t()`` contiguous, see :func:`sparsecore.feature_major`);
    the CPU CSR kernels read either in place, and y comes back in x's layout, or feature-major with
    ``feature_major=True``. Between sparse layers, feature-major activations save every transpose of a batch
    tile; a feature-major tensor is not contiguous, so ``.view`` on it fails (``.reshape`` works).

    x: (..., in_features); values: ``pattern.values_shape``; bias: (out_features,) or None. All three of one
    floating dtype: float32, float64 or bfloat16 on the CPU (bf16: fp32 accumulation, outputs rounded once to
    nearest even); float32, float16 or bfloat16 on the Triton backend. Inside ``torch.autocast`` the rule is
    ``nn.Linear``'s: x, values and bias (those that are floating and not float64) are cast to the region's dtype,
    the op computes and returns that dtype, and the gradients of values and bias come back in their own dtype (the
    cast is part of the graph). Returns (..., out_features). Differentiable in x, values and bias, to any order.
    """
    if not isinstance(x, Tensor) or not isinstance(values, Tensor):
        raise TypeError("x and values must be torch.Tensor")
    out_f, in_f = pattern.shape
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(f"input has shape {tuple(x.shape)}: its last dimension must be in_features = {in_f}")
    if tuple(values.shape) != pattern.values_shape:
        raise ValueError(f"values must have shape {pattern.values_shape}, got {tuple(values.shape)}")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
    for name, t in (("values", values), ("bias", bias), ("pattern", pattern.col)):
        if t is not None and t.device != x.device:
            raise ValueError(f"input is on {x.device} but {name} is on {t.device}")
    # Autocast is applied here, in eager mode and under torch.compile alike (the ops' own autocast rule then finds
    # nothing left to cast): the dtype check below must see the dtypes the kernels will get.
    autocast = _autocast_dtype(x.device.type)
    if autocast is not None:
        x, values = _autocast_cast(x, x.device.type, autocast), _autocast_cast(values, x.device.type, autocast)
        bias = _autocast_cast(bias, x.device.type, autocast)
    if x.dtype != values.dtype or (bias is not None and bias.dtype != x.dtype):
        got = f"input {x.dtype}, weights {values.dtype}" + ("" if bias is None else f", bias {bias.dtype}")
        raise TypeError(f"input, weights and bias must have one dtype, got {got}"
                        + (f" (inside torch.autocast({autocast}): float64 tensors are not cast)" if autocast else ""))
    backend = resolve(x.device)
    if backend == "cpu":
        _check_cpu_dtype(x)
    elif x.dtype not in _TRITON_DTYPES:
        raise TypeError(f"the Triton kernels support {_TRITON_DTYPES}, got {x.dtype}")
    # A 2-D input goes in as it is: a reshape would add two view nodes to the autograd graph (~20 us a step).
    x2 = x if x.dim() == 2 else x.reshape(-1, in_f)
    compiling = torch.compiler.is_compiling()
    in_place_layouts = backend == "cpu" and pattern.block_size == 1 and not compiling  # row- or feature-major
    if not (x2.is_contiguous() or (in_place_layouts and _is_fm(x2))):
        x2 = x2.contiguous()
    values = values if values.is_contiguous() else values.contiguous()
    out_fm = (feature_major or _is_fm(x2)) if in_place_layouts else False
    if compiling:
        y = spmm(x2, values, bias, pattern.rowptr, pattern.col, pattern.colptr, pattern.row, pattern.perm, out_f,
                 pattern.block_size)
    elif torch.is_grad_enabled() and (x2.requires_grad or values.requires_grad
                                      or (bias is not None and bias.requires_grad)):
        y = _EagerSparseLinear.apply(x2, values, bias, pattern, out_fm)
    else:  # inference: no graph to record, so no autograd.Function (~15 us a call)
        y = _spmm_impl(x2, values, bias, pattern.rowptr, pattern.col, out_f, pattern.block_size, out_fm)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_f)


def feature_major(x: Tensor) -> Tensor:
    """``x`` (B, K) with the same values stored feature-major, as a contiguous (K, B) array (``x.t()`` of it is
    contiguous). Sparse layers read such inputs in place and return outputs in the same layout, so converting a
    model's input once keeps every activation between its sparse layers feature-major (see
    :func:`sparse_linear`). Differentiable; returns x itself when it already is feature-major."""
    if x.dim() != 2:
        raise ValueError(f"feature_major takes a 2-D (batch, features) tensor, got shape {tuple(x.shape)}")
    if _is_fm(x):
        return x
    return x.t().contiguous().t()
