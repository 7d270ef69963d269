"""The sparsity structure of a weight matrix: CSR, or block-sparse (BSR), with its transpose index.

A :class:`Pattern` says *which* connections of a ``(out_features, in_features)`` weight exist; it holds no values
and knows nothing of autograd. Everything is stored at block granularity: ``block_size == 1`` is plain CSR, and
``block_size == bs > 1`` is BSR whose stored entries are dense ``bs x bs`` blocks.

Index tensors (on the pattern's device)::

    rowptr (n_block_rows + 1,)  int32  entries of block row r are rowptr[r]:rowptr[r+1]
    col    (nnz,)               int32  block column of each entry, strictly increasing inside a row
    colptr (n_block_cols + 1,)  int32  the transpose (column-ordered) index ...
    row    (nnz,)               int32  ... block row of each transposed entry, increasing inside a column
    perm   (nnz,)               int32  position in the CSR order of each transposed entry: W^T's values = values[perm]

**Compact patterns.** A CSR pattern whose dimensions are both at most 32768 (:data:`COMPACT_MAX_DIM`) stores
``col``, ``row`` and ``perm`` as ``torch.int16``, and ``perm[t]`` is then the offset of transposed entry ``t``
inside its row, so its CSR position is ``rowptr[row[t]] + perm[t]`` (:meth:`Pattern.csr_positions` gives it for
either form). That is 6 bytes of index per connection instead of 12: with fp32 values and gradients a live
connection costs 14 bytes instead of 20, 17.5% of a dense weight and its gradient at 10% density instead of 25%.
Every constructor picks the form; :attr:`Pattern.compact` says which one a pattern has. BSR patterns (few
entries, each a whole block) and wider layers keep int32.

Values that go with a pattern are in CSR order: shape ``(nnz,)`` for CSR, ``(nnz, bs, bs)`` for BSR with
``values[k, a, b] = W[row(k) * bs + a, col[k] * bs + b]``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from . import _C

INT32_MAX = 2**31 - 1
# The widest CSR pattern (rows and columns) whose col, row and perm are int16 (see the module docstring); the
# entries are below 32768 (offsets inside a row are below its length), so non-negative as int16: the C++ kernels
# read them zero-extended, the Triton ones sign-extended, to the same values.
COMPACT_MAX_DIM = 32768

__all__ = ["Pattern", "COMPACT_MAX_DIM"]


def _compact_for(shape, block_size: int) -> bool:
    """Whether a pattern of this shape and block size is stored compact (int16 col, row and perm offsets)."""
    # Read through the module so that tests can lower the limit to run the int32 form on small layers.
    limit = globals()["COMPACT_MAX_DIM"]
    return block_size == 1 and shape[0] <= limit and shape[1] <= limit


def _as_index(name: str, t) -> torch.Tensor:
    t = torch.as_tensor(t)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    return t


class Pattern:
    """Sparsity structure of a ``(out_features, in_features)`` weight (see the module docstring).

    Build one with :meth:`from_indices`, :meth:`from_mask`, :meth:`from_dense` or :meth:`from_csr`; they
    validate their input and raise ``ValueError``/``TypeError`` naming the problem.
    """

    __slots__ = ("shape", "block_size", "rowptr", "col", "colptr", "row", "perm")

    def __init__(self, shape, block_size, rowptr, col, colptr, row, perm):
        # Internal: the public constructors validate before they get here.
        self.shape: Tuple[int, int] = (int(shape[0]), int(shape[1]))
        self.block_size: int = int(block_size)
        self.rowptr, self.col = rowptr, col
        self.colptr, self.row, self.perm = colptr, row, perm

    # ------------------------------------------------------------------ constructors
    @staticmethod
    def _check_shape(shape, block_size: int) -> Tuple[int, int]:
        if len(shape) != 2:
            raise ValueError(f"shape must be (out_features, in_features), got {shape}")
        out_f, in_f = int(shape[0]), int(shape[1])
        if out_f < 0 or in_f < 0:
            raise ValueError(f"shape must be non-negative, got {shape}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if out_f % block_size or in_f % block_size:
            raise ValueError(f"block_size {block_size} must divide both dimensions of shape {(out_f, in_f)}")
        if max(out_f, in_f) > INT32_MAX:
            raise ValueError(f"dimensions above 2**31-1 are not supported (int32 indices), got {shape}")
        return out_f, in_f

    @classmethod
    def from_csr(cls, rowptr, col, shape, block_size: int = 1) -> "Pattern":
        """From a CSR structure (at block granularity for BSR). Checks sortedness, duplicates and ranges."""
        out_f, in_f = cls._check_shape(shape, block_size)
        rowptr = _as_index("rowptr", rowptr).detach().to("cpu", torch.int64)
        col = _as_index("col", col).detach().to("cpu", torch.int64)
        n_r, n_c = out_f // block_size, in_f // block_size
        if col.numel() > INT32_MAX:
            raise ValueError(f"nnz = {col.numel()} does not fit int32 indices")
        if rowptr.numel() != n_r + 1:
            raise ValueError(f"rowptr must have {n_r + 1} elements for {n_r} block rows, got {rowptr.numel()}")
        if rowptr.numel() and (rowptr.min() < 0 or rowptr.max() > INT32_MAX):
            raise ValueError("rowptr entries must be in [0, 2**31-1]")
        if col.numel() and (col.min() < 0 or col.max() >= n_c):
            raise ValueError(f"column index out of range [0, {n_c}): min {int(col.min())}, max {int(col.max())}")
        rowptr32, col32 = rowptr.to(torch.int32).contiguous(), col.to(torch.int32).contiguous()
        return cls._from_int32_csr(rowptr32, col32, (out_f, in_f), block_size)

    @classmethod
    def _from_int32_csr(cls, rowptr32: torch.Tensor, col32: torch.Tensor, shape, block_size: int = 1) -> "Pattern":
        """From contiguous int32 CPU ``rowptr``/``col``: checked by ``_C.check_csr`` (order, duplicates, ranges).
        :meth:`from_csr` ends here after its own checks; a builder of this package whose arrays are int32 already
        comes here directly, without the int64 copies from_csr makes for its messages (one pattern of a 4096x4096
        layer at 10%: 13 MB each)."""
        out_f, in_f = cls._check_shape(shape, block_size)
        _C.check_csr(rowptr32.numpy(), col32.numpy(), out_f // block_size, in_f // block_size)
        return cls._with_transpose((out_f, in_f), block_size, rowptr32, col32)

    @classmethod
    def from_indices(cls, rows, cols, shape, block_size: int = 1, return_order: bool = False):
        """From (row, col) coordinates in any order (block coordinates for BSR); duplicates are an error.

        With ``return_order``, also returns ``order`` (int64, (nnz,)): CSR entry k is input entry ``order[k]``,
        so values given alongside the coordinates are put in CSR order by ``values[order]``.
        """
        out_f, in_f = cls._check_shape(shape, block_size)
        rows = _as_index("rows", rows).detach().to("cpu", torch.int64).contiguous()
        cols = _as_index("cols", cols).detach().to("cpu", torch.int64).contiguous()
        if rows.numel() != cols.numel():
            raise ValueError(f"rows and cols must have the same length, got {rows.numel()} and {cols.numel()}")
        if rows.numel() > INT32_MAX:
            raise ValueError(f"nnz = {rows.numel()} does not fit int32 indices")
        n_r, n_c = out_f // block_size, in_f // block_size
        rowptr, col, order = _C.build_csr(rows.numpy(), cols.numpy(), n_r, n_c)
        p = cls._with_transpose((out_f, in_f), block_size, torch.from_numpy(rowptr), torch.from_numpy(col))
        return (p, torch.from_numpy(order)) if return_order else p

    @classmethod
    def from_mask(cls, mask: torch.Tensor, block_size: int = 1) -> "Pattern":
        """From a dense bool mask of shape (out, in). For BSR a block is live when any of its elements is."""
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        if mask.dim() != 2:
            raise ValueError(f"mask must be 2-D (out_features, in_features), got shape {tuple(mask.shape)}")
        out_f, in_f = cls._check_shape(mask.shape, block_size)
        m = mask.detach().cpu()
        if block_size > 1:
            bs = block_size
            m = m.reshape(out_f // bs, bs, in_f // bs, bs).any(dim=3).any(dim=1)
        rows, cols = m.nonzero(as_tuple=True)  # row-major order: already CSR-sorted
        return cls.from_indices(rows, cols, (out_f, in_f), block_size)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, block_size: int = 1) -> "Pattern":
        """The nonzero structure of a dense (out, in) tensor (NaN counts as nonzero)."""
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        return cls.from_mask(weight.detach() != 0, block_size)

    @classmethod
    def _with_transpose(cls, shape, block_size, rowptr32, col32, threads: Optional[int] = None) -> "Pattern":
        """The pattern of a checked int32 CPU CSR (rowptr32, col32), with its transpose index, in the form its
        shape asks for (compact or int32). ``threads``: build the transpose index in parallel (DST edits)."""
        n_c = shape[1] // block_size
        compact = _compact_for(shape, block_size)
        if threads is None:
            colptr, row, perm = _C.transpose_index(rowptr32.numpy(), col32.numpy(), n_c, compact)
        else:
            colptr, row, perm = _C.dst_transpose(rowptr32.numpy(), col32.numpy(), n_c, threads, compact)
        col = torch.from_numpy(col32.numpy().astype(np.int16)) if compact else col32
        return cls(shape, block_size, rowptr32, col, torch.from_numpy(colptr), torch.from_numpy(row),
                   torch.from_numpy(perm))

    # ------------------------------------------------------------------ properties
    @property
    def nnz(self) -> int:
        """Stored entries: connections for CSR, blocks for BSR."""
        return int(self.col.numel())

    @property
    def n_weights(self) -> int:
        """Live weights (connections): nnz * block_size**2."""
        return self.nnz * self.block_size**2

    @property
    def density(self) -> float:
        total = self.shape[0] * self.shape[1]
        return self.n_weights / total if total else 0.0

    @property
    def compact(self) -> bool:
        """Whether col, row and perm are int16, perm holding offsets inside rows (see the module docstring)."""
        return self.col.dtype == torch.int16

    def csr_positions(self) -> torch.Tensor:
        """The CSR position of each transposed entry, int64 (nnz,): ``perm`` itself for int32 patterns,
        ``rowptr[row] + perm`` for compact ones. W^T's values are ``values[csr_positions()]``."""
        if not self.compact:
            return self.perm.to(torch.int64)
        return self.rowptr.to(torch.int64)[self.row.to(torch.int64)] + self.perm.to(torch.int64)

    @property
    def device(self) -> torch.device:
        return self.col.device

    @property
    def values_shape(self) -> Tuple[int, ...]:
        bs = self.block_size
        return (self.nnz,) if bs == 1 else (self.nnz, bs, bs)

    def tensors(self) -> dict:
        return {"rowptr": self.rowptr, "col": self.col, "colptr": self.colptr, "row": self.row, "perm": self.perm}

    def to(self, device) -> "Pattern":
        t = {k: v.to(device) for k, v in self.tensors().items()}
        return Pattern(self.shape, self.block_size, **t)

    # ------------------------------------------------------------------ conversions
    def rows(self) -> torch.Tensor:
        """Row (block row) of each entry in CSR order, int64 (nnz,)."""
        if self.device.type == "cpu":  # numpy's repeat is much cheaper than torch's for this on CPU
            rp = self.rowptr.numpy()
            return torch.from_numpy(np.repeat(np.arange(rp.size - 1, dtype=np.int64), np.diff(rp)))
        counts = (self.rowptr[1:] - self.rowptr[:-1]).to(torch.int64)
        return torch.repeat_interleave(torch.arange(counts.numel(), device=self.device), counts)

    def coo(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) int64 of every entry in CSR order (block coordinates for BSR)."""
        return self.rows(), self.col.to(torch.int64)

    def block_mask(self) -> torch.Tensor:
        """Bool (out/bs, in/bs) map of live entries (equal to :meth:`mask` for CSR)."""
        bs = self.block_size
        m = torch.zeros(self.shape[0] // bs, self.shape[1] // bs, dtype=torch.bool, device=self.device)
        r, c = self.coo()
        m[r, c] = True
        return m

    def mask(self) -> torch.Tensor:
        """Dense bool (out, in) map of live weights. For inspection and tests, never the training step."""
        bs = self.block_size
        m = self.block_mask()
        if bs > 1:
            m = m.repeat_interleave(bs, 0).repeat_interleave(bs, 1)
        return m

    def to_dense(self, values: torch.Tensor) -> torch.Tensor:
        """Dense (out, in) weight with ``values`` (CSR order, shape :attr:`values_shape`) at the pattern."""
        if tuple(values.shape) != self.values_shape:
            raise ValueError(f"values must have shape {self.values_shape}, got {tuple(values.shape)}")
        bs = self.block_size
        r, c = self.coo()
        if bs == 1:
            w = torch.zeros(self.shape, dtype=values.dtype, device=values.device)
            w[r.to(values.device), c.to(values.device)] = values
            return w
        nbr, nbc = self.shape[0] // bs, self.shape[1] // bs
        w = torch.zeros(nbr, nbc, bs, bs, dtype=values.dtype, device=values.device)
        w[r.to(values.device), c.to(values.device)] = values
        return w.permute(0, 2, 1, 3).reshape(self.shape)

    def gather(self, dense: torch.Tensor) -> torch.Tensor:
        """Values of a dense (out, in) tensor at the pattern, in CSR order (shape :attr:`values_shape`)."""
        if tuple(dense.shape) != self.shape:
            raise ValueError(f"dense must have shape {self.shape}, got {tuple(dense.shape)}")
        bs = self.block_size
        r, c = (t.to(dense.device) for t in self.coo())
        if bs == 1:
            return dense[r, c].contiguous()
        blocks = dense.reshape(self.shape[0] // bs, bs, self.shape[1] // bs, bs).permute(0, 2, 1, 3)
        return blocks[r, c].contiguous()

    def __eq__(self, other) -> bool:
        if not isinstance(other, Pattern):
            return NotImplemented
        if self.shape != other.shape or self.block_size != other.block_size:
            return False
        a, b = self.col.cpu(), other.col.cpu()
        if a.dtype != b.dtype:  # a compact pattern and an int32 one of the same structure are equal
            a, b = a.to(torch.int64), b.to(torch.int64)
        return torch.equal(self.rowptr.cpu(), other.rowptr.cpu()) and torch.equal(a, b)

    __hash__ = None

    def __repr__(self) -> str:
        kind = "CSR" if self.block_size == 1 else f"BSR(block_size={self.block_size})"
        return f"Pattern({kind}, shape={self.shape}, nnz={self.nnz}, density={self.density:.4g}, device={self.device})"
