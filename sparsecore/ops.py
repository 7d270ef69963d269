"""The sparse linear op: ``y = x W^T + b`` with W stored as a :class:`~sparsecore.pattern.Pattern` and values.

Three ``torch.library`` custom ops do the work, each with a fake (meta) implementation so ``torch.compile`` can
trace them, and autograd is registered on the forward op:

    sparsecore::spmm    y  (B, out) = x (B, in) W^T + b         forward
    sparsecore::spmm_t  dx (B, in)  = dy (B, out) W             through the transpose index: no atomics
    sparsecore::sddmm   dW          = (dy^T x) at the live entries only  (values-shaped, never (out, in))

and db = sum over the batch of dy. Kernels: C++ (``sparsecore._C``) for CPU tensors, Triton for CUDA tensors,
see :mod:`sparsecore.backend`.

Dtypes. On the CPU: float32, float64 and bfloat16, the same for x, values and bias; outputs (y, dx, dW) have x's
dtype. The bfloat16 kernels read bf16, accumulate in fp32 and round each output once to nearest even, as
``tensor.to(torch.bfloat16)`` rounds (``sparsecore._C.kernel_isa() == "avx512bf16"``: the SDDMM's dot products
use AVX512-BF16). float16 is not supported on the CPU (a TypeError says so); it runs on the Triton backend. Users call :func:`sparse_linear`, which checks its inputs and raises clear
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

__all__ = ["sparse_linear", "spmm", "spmm_t", "sddmm"]

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


# ----------------------------------------------------------------------------------------------- forward
def _spmm_impl(x: Tensor, values: Tensor, bias: Optional[Tensor], rowptr: Tensor, col: Tensor, n_out: int,
               block_size: int) -> Tensor:
    if resolve(x.device) == "triton":
        tk = _triton()
        if block_size == 1:
            return tk.csr_spmm(x, values, rowptr, col, n_out, bias)
        return tk.bsr_spmm(x, values, rowptr, col, n_out, bias)
    y = torch.empty(x.shape[0], n_out, dtype=x.dtype)
    b = None if bias is None else _np(bias)
    if block_size == 1:
        _cpu_kernel("spmm", x.dtype)(_np(x), _np(rowptr), _np(col), _np(values), None, b, _np(y),
                                     torch.get_num_threads())
    else:
        _cpu_kernel("bsr_spmm", x.dtype)(_np(x), _np(rowptr), _np(col), _np(values), b, _np(y),
                                         torch.get_num_threads())
    return y


@torch.library.custom_op("sparsecore::spmm", mutates_args=())
def spmm(x: Tensor, values: Tensor, bias: Optional[Tensor], rowptr: Tensor, col: Tensor, colptr: Tensor,
         row: Tensor, perm: Tensor, n_out: int, block_size: int) -> Tensor:
    """y (B, n_out) = x (B, in) W^T + bias. colptr/row/perm are carried for the backward pass.

    x, values (nnz,) or (nnz, bs, bs), bias (n_out,) or None: one dtype (CPU: float32, float64, bfloat16);
    y has it too. Inputs are assumed checked (see :func:`sparse_linear`) and contiguous."""
    return _spmm_impl(x, values, bias, rowptr, col, n_out, block_size)


@spmm.register_fake
def _(x, values, bias, rowptr, col, colptr, row, perm, n_out, block_size):
    return x.new_empty(x.shape[0], n_out)


# ----------------------------------------------------------------------------------------------- dX
def _spmm_t_impl(dy: Tensor, values: Tensor, colptr: Tensor, row: Tensor, perm: Tensor, n_in: int,
                 block_size: int) -> Tensor:
    if resolve(dy.device) == "triton":
        tk = _triton()
        if block_size == 1:
            return tk.csr_spmm_t(dy, values, colptr, row, perm, n_in)
        return tk.bsr_spmm_t(dy, values, colptr, row, perm, n_in)
    dx = torch.empty(dy.shape[0], n_in, dtype=dy.dtype)
    if block_size == 1:
        _cpu_kernel("spmm", dy.dtype)(_np(dy), _np(colptr), _np(row), _np(values), _np(perm), None, _np(dx),
                                      torch.get_num_threads())
    else:
        _cpu_kernel("bsr_spmm_t", dy.dtype)(_np(dy), _np(colptr), _np(row), _np(perm), _np(values), _np(dx),
                                            torch.get_num_threads())
    return dx


@torch.library.custom_op("sparsecore::spmm_t", mutates_args=())
def spmm_t(dy: Tensor, values: Tensor, colptr: Tensor, row: Tensor, perm: Tensor, n_in: int,
           block_size: int) -> Tensor:
    """dx (B, n_in) = dy (B, out) W, over the column-ordered index (W^T's values are values[perm]).

    dy and values of one dtype (CPU: float32, float64, bfloat16); dx has it too."""
    return _spmm_t_impl(dy, values, colptr, row, perm, n_in, block_size)


@spmm_t.register_fake
def _(dy, values, colptr, row, perm, n_in, block_size):
    return dy.new_empty(dy.shape[0], n_in)


# ----------------------------------------------------------------------------------------------- dW
def _sddmm_impl(dy: Tensor, x: Tensor, rowptr: Tensor, col: Tensor, block_size: int) -> Tensor:
    if resolve(dy.device) == "triton":
        tk = _triton()
        if block_size == 1:
            return tk.csr_sddmm(dy, x, rowptr, col)
        return tk.bsr_sddmm(dy, x, rowptr, col, block_size)
    nnz = col.shape[0]
    shape = (nnz,) if block_size == 1 else (nnz, block_size, block_size)
    out = torch.empty(shape, dtype=dy.dtype)
    if block_size == 1:
        _cpu_kernel("sddmm", dy.dtype)(_np(dy), _np(x), _np(rowptr), _np(col), _np(out), torch.get_num_threads())
    else:
        _cpu_kernel("bsr_sddmm", dy.dtype)(_np(dy), _np(x), _np(rowptr), _np(col), _np(out),
                                           torch.get_num_threads())
    return out


@torch.library.custom_op("sparsecore::sddmm", mutates_args=())
def sddmm(dy: Tensor, x: Tensor, rowptr: Tensor, col: Tensor, block_size: int) -> Tensor:
    """dW at the live entries: (nnz,) or (nnz, bs, bs), entry k = sum_b dy[b, rows of k] x[b, cols of k].

    dy (B, out) and x (B, in) of one dtype (CPU: float32, float64, bfloat16); dW has it too (bf16: the sum over
    the whole batch is taken in fp32 and rounded once)."""
    return _sddmm_impl(dy, x, rowptr, col, block_size)


@sddmm.register_fake
def _(dy, x, rowptr, col, block_size):
    nnz = col.shape[0]
    shape = (nnz,) if block_size == 1 else (nnz, block_size, block_size)
    return dy.new_empty(shape)


# ----------------------------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    x, values, bias, rowptr, col, colptr, row, perm, n_out, block_size = inputs
    ctx.save_for_backward(x, values, rowptr, col, colptr, row, perm)
    ctx.has_bias = bias is not None
    ctx.block_size = block_size


def _grads(ctx, dy, x, values, rowptr, col, colptr, row, perm, spmm_t_fn, sddmm_fn):
    """(dx, dvalues, dbias) for the inputs that need them (None for the others)."""
    dy = dy.contiguous()
    need_x, need_v, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    dx = spmm_t_fn(dy, values, colptr, row, perm, x.shape[1], ctx.block_size) if need_x else None
    dv = sddmm_fn(dy, x, rowptr, col, ctx.block_size) if need_v else None
    db = dy.sum(0) if (ctx.has_bias and need_b) else None
    return dx, dv, db


def _backward(ctx, dy):
    x, values, rowptr, col, colptr, row, perm = ctx.saved_tensors
    return _grads(ctx, dy, x, values, rowptr, col, colptr, row, perm, spmm_t, sddmm) + (None,) * 7


spmm.register_autograd(_backward, setup_context=_setup_context)


class _EagerSparseLinear(torch.autograd.Function):
    """The same forward and backward as the custom ops, without the dispatcher: in eager mode torch.library's
    Python custom ops cost ~0.3 ms per layer and step, which at high sparsity is more than the kernels. Under
    torch.compile :func:`sparse_linear` uses the custom ops, which the compiler can trace.

    The pattern goes in as one Python object, not five tensors: apply() costs per argument, and the index
    tensors need no version checks (a pattern is never modified in place; edits install new tensors)."""

    @staticmethod
    def forward(ctx, x, values, bias, pattern):
        ctx.save_for_backward(x, values)
        ctx.pattern = pattern
        ctx.has_bias = bias is not None
        ctx.block_size = pattern.block_size
        return _spmm_impl(x, values, bias, pattern.rowptr, pattern.col, pattern.shape[0], pattern.block_size)

    @staticmethod
    def backward(ctx, dy):
        x, values = ctx.saved_tensors
        p = ctx.pattern
        return _grads(ctx, dy, x, values, p.rowptr, p.col, p.colptr, p.row, p.perm, _spmm_t_impl,
                      _sddmm_impl) + (None,)


# ----------------------------------------------------------------------------------------------- user entry
def sparse_linear(x: Tensor, values: Tensor, pattern: Pattern, bias: Optional[Tensor] = None) -> Tensor:
    """``y = x W^T + bias`` with W given by ``pattern`` and ``values`` (CSR order, shape ``pattern.values_shape``).

    x: (..., in_features); values: ``pattern.values_shape``; bias: (out_features,) or None. All three of one
    dtype: float32, float64 or bfloat16 on CPU (bf16: fp32 accumulation, outputs rounded once to nearest even);
    float32, float16 or bfloat16 on the Triton backend.
    Returns (..., out_features) of x's dtype. Differentiable in x, values and bias (gradients of their dtypes).
    """
    if not isinstance(x, Tensor) or not isinstance(values, Tensor):
        raise TypeError("x and values must be torch.Tensor")
    out_f, in_f = pattern.shape
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(f"input has shape {tuple(x.shape)}: its last dimension must be in_features = {in_f}")
    if tuple(values.shape) != pattern.values_shape:
        raise ValueError(f"values must have shape {pattern.values_shape}, got {tuple(values.shape)}")
    if x.dtype != values.dtype:
        raise TypeError(f"input dtype {x.dtype} does not match the weights' dtype {values.dtype}")
    if bias is not None and (bias.dtype != x.dtype or tuple(bias.shape) != (out_f,)):
        raise ValueError(f"bias must be ({out_f},) of dtype {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    for name, t in (("values", values), ("bias", bias), ("pattern", pattern.col)):
        if t is not None and t.device != x.device:
            raise ValueError(f"input is on {x.device} but {name} is on {t.device}")
    backend = resolve(x.device)
    if backend == "cpu":
        _check_cpu_dtype(x)
    elif x.dtype not in _TRITON_DTYPES:
        raise TypeError(f"the Triton kernels support {_TRITON_DTYPES}, got {x.dtype}")
    # A 2-D input goes in as it is: a reshape would add two view nodes to the autograd graph (~20 us a step).
    x2 = x if x.dim() == 2 else x.reshape(-1, in_f)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    values = values if values.is_contiguous() else values.contiguous()
    if torch.compiler.is_compiling():
        y = spmm(x2, values, bias, pattern.rowptr, pattern.col, pattern.colptr, pattern.row, pattern.perm, out_f,
                 pattern.block_size)
    elif torch.is_grad_enabled() and (x2.requires_grad or values.requires_grad
                                      or (bias is not None and bias.requires_grad)):
        y = _EagerSparseLinear.apply(x2, values, bias, pattern)
    else:  # inference: no graph to record, so no autograd.Function (~15 us a call)
        y = _spmm_impl(x2, values, bias, pattern.rowptr, pattern.col, out_f, pattern.block_size)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_f)
