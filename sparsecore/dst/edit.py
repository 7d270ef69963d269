"""Structure edits of one :class:`~sparsecore.nn.SparseLinear`: prune, regrow, merge, and the optimizer-state remap.

Everything here works at *entry* granularity: connections for CSR, ``bs x bs`` blocks for BSR (positions are
block coordinates). The C++ side (``sparsecore._C.dst_*``, ``csrc/dst.cpp``) does the O(nnz) work; nothing here
builds a dense ``(out, in)`` tensor.

Determinism. Every random choice is a function of a 64-bit seed, so a plain dense-mask reference reproduces it
(the tests do):

* ``tie_key(pos, seed)``: a seeded bijection of the linear position ``pos = row * n_cols + col``. Prune takes the
  ``k`` entries smallest by ``(score, tie_key)``; grow the ``k`` candidates largest by score, ties by smallest
  ``tie_key``.
* ``random stream``: ``_C.dst_random_stream(seed, 0, m, n_rows, n_cols)`` gives draw positions; random regrowth
  keeps the first ``k`` distinct empty positions of the stream (sequential rejection sampling: uniform over
  ``k``-subsets of the empty positions), computed in parallel over rows. When the empty positions are few (more than
  ``N/4`` expected draws, ``N`` = all positions) it takes the ``k`` empty positions with the smallest ``tie_key``
  instead (also uniform), in O(N) = O(nnz) time.
* seeds of one update are derived by :func:`derive_seed` from the Updater's seed, the update counter, the layer
  index and a purpose tag (:data:`PRUNE`, :data:`GROW`, ...).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .. import _C
from ..pattern import Pattern

__all__ = [
    "derive_seed", "PRUNE", "PRUNE_NEG", "GROW", "RANDOM", "INIT", "RESERVOIR",
    "magnitude_scores", "prune_keep", "random_absent", "regrow_random", "TopKAbsent", "merge", "apply_edit",
    "remap_state",
    "replace_values", "entry_positions",
]

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15

# Purpose tags of derived seeds.
PRUNE, PRUNE_NEG, GROW, RANDOM, INIT, RESERVOIR = 1, 2, 3, 4, 5, 6


def _splitmix64(z: int) -> int:
    z = (z + _GOLDEN) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def derive_seed(seed: int, *words: int) -> int:
    """A 63-bit seed from ``seed`` and integer ``words`` (update counter, layer index, purpose tag): a splitmix64
    chain, ``h = splitmix64(h ^ w)`` for each word, starting from ``h = splitmix64(seed)``."""
    h = _splitmix64(int(seed) & _M64)
    for w in words:
        h = _splitmix64(h ^ (int(w) & _M64))
    return h >> 1


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _np32(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.int32).contiguous().numpy()


# ----------------------------------------------------------------------------------------------- selection
def magnitude_scores(values: Tensor) -> Tensor:
    """Per-entry magnitude on the CPU: ``|w|`` for CSR values ``(nnz,)``; for BSR ``(nnz, bs, bs)`` the block's
    squared L2 norm (same order as the L2 norm, without the square root). Float32 or float64, contiguous."""
    v = values.detach()
    s = v.abs() if v.dim() == 1 else v.pow(2).sum(dim=(1, 2))
    if s.dtype not in (torch.float32, torch.float64):
        s = s.float()
    return s.to("cpu").contiguous()


def prune_keep(pattern: Pattern, scores: Tensor, k: int, seed: int) -> np.ndarray:
    """uint8 keep mask over the entries (CSR order): 0 for the ``k`` entries with the smallest ``(score, tie_key)``.
    O(nnz): a histogram pass finds the boundary, only the boundary bin is ordered exactly."""
    s = scores.detach().to("cpu").contiguous()
    if s.dtype not in (torch.float32, torch.float64):
        s = s.float()
    return _C.dst_prune_keep(s.numpy(), _np32(pattern.rowptr), _np32(pattern.col), _n_cols(pattern), int(k),
                             int(seed), _threads())


def _n_cols(pattern: Pattern) -> int:
    return pattern.shape[1] // pattern.block_size


def _n_rows(pattern: Pattern) -> int:
    return pattern.shape[0] // pattern.block_size


def random_absent(pattern: Pattern, k: int, seed: int,
                  occupied: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """``k`` distinct uniformly random positions not occupied by the pattern's entries (only those with
    ``occupied[i] != 0`` when a uint8 mask is given): ``(rows, cols)`` int32 in row-major order."""
    return _C.dst_random_absent(_np32(pattern.rowptr), _np32(pattern.col), occupied, _n_cols(pattern), int(k),
                                int(seed), _threads())


class TopKAbsent:
    """The ``k`` best empty positions by score, fed chunks of rows of the dense ``(rows, n_cols)`` score matrix.

    ``occupied`` (uint8 over the pattern's entries, or None for all) says which stored entries count as present;
    those positions are never candidates. Scores that are NaN or ``-inf`` are never candidates either. Ties are
    broken by the seeded ``tie_key``. Memory: O(k) per thread, never the whole matrix.
    """

    def __init__(self, pattern: Pattern, k: int, seed: int, occupied: Optional[np.ndarray] = None):
        self.pattern, self.k, self.occupied = pattern, int(k), occupied
        self._rowptr, self._col = _np32(pattern.rowptr), _np32(pattern.col)
        self._impl = _C.DstTopK(self.k, _n_rows(pattern), _n_cols(pattern), int(seed))

    def push(self, row0: int, scores: Tensor) -> None:
        s = scores.detach()
        if s.dtype not in (torch.float32, torch.float64):
            s = s.float()
        s = s.to("cpu").contiguous()
        self._impl.push(s.numpy(), int(row0), self._rowptr, self._col, self.occupied, _threads())

    def result(self) -> Tuple[np.ndarray, np.ndarray]:
        """(rows, cols) int32 of the chosen positions in row-major order (fewer than k if there were fewer)."""
        return self._impl.result()


def entry_positions(pattern: Pattern, which: Optional[np.ndarray] = None) -> Tensor:
    """Linear positions ``row * n_cols + col`` (int64, CSR order) of the entries, or of those with ``which != 0``."""
    r, c = pattern.coo()
    pos = r.cpu() * _n_cols(pattern) + c.cpu()
    if which is not None:
        pos = pos[torch.from_numpy(which).bool()]
    return pos


# ----------------------------------------------------------------------------------------------- merge & apply
def merge(pattern: Pattern, keep: Optional[np.ndarray], new_rows: np.ndarray, new_cols: np.ndarray,
          ) -> Tuple[Pattern, Tensor, Tensor]:
    """The pattern of the kept entries plus the new ones (row-major, distinct, not on kept entries).

    Returns ``(pattern, gather, newpos)``: ``gather`` int32 ``(nnz_new,)`` holds each new entry's old position, -1
    for the new ones, so one gather permutes values and optimizer states; ``newpos`` int64 ``(k,)`` says where the
    new entries landed (in their given order). The transpose index is rebuilt once, in parallel.
    """
    rows = np.ascontiguousarray(new_rows, dtype=np.int32)
    cols = np.ascontiguousarray(new_cols, dtype=np.int32)
    out = _C.dst_merge(_np32(pattern.rowptr), _np32(pattern.col), keep, rows, cols, _n_cols(pattern), _threads())
    return _finish(pattern, *out)


def regrow_random(pattern: Pattern, keep: Optional[np.ndarray], k: int, seed: int,
                  occupied: Optional[np.ndarray] = None) -> Tuple[Pattern, Tensor, Tensor]:
    """``merge(pattern, keep, *random_absent(pattern, k, seed, occupied))`` (same result), in one C++ call when
    the stream sampler applies (SET's case)."""
    out = _C.dst_regrow_random(_np32(pattern.rowptr), _np32(pattern.col), keep, occupied, _n_cols(pattern), int(k),
                               int(seed), _threads())
    if out is None:
        return merge(pattern, keep, *random_absent(pattern, k, seed, occupied))
    return _finish(pattern, *out)


def _finish(pattern: Pattern, rowptr, col, gather, newpos) -> Tuple[Pattern, Tensor, Tensor]:
    t = torch.from_numpy
    new = Pattern._with_transpose(pattern.shape, pattern.block_size, t(rowptr), t(col), threads=_threads())
    if pattern.device.type != "cpu":
        new = new.to(pattern.device)
    return new, t(gather), t(newpos)


def _gather_into(src: Tensor, gather: Tensor, out: Tensor, newpos: Optional[Tensor] = None,
                 new_values: Optional[Tensor] = None) -> None:
    """out[j] = src[gather[j]] along dim 0, zero where gather[j] < 0; then out[newpos] = new_values if given
    (``newpos``, when given, must list exactly the entries with gather < 0)."""
    if new_values is not None:
        new_values = new_values.to(out.device, out.dtype).reshape((newpos.numel(),) + tuple(out.shape[1:]))
    if src.device.type == "cpu" and src.dtype in (torch.float32, torch.float64) and src.is_contiguous() \
            and out.is_contiguous():
        _C.dst_gather(src.detach().numpy(), gather.numpy(), out.detach().numpy(),
                      None if newpos is None else newpos.numpy(),
                      None if new_values is None else new_values.contiguous().numpy(), _threads())
        return
    g = gather.to(src.device, torch.int64)
    torch.index_select(src.detach(), 0, g.clamp(min=0), out=out)
    out[g < 0] = 0
    if newpos is not None and new_values is not None:
        out[newpos.to(out.device)] = new_values


def _state_tensors(optimizer, param: Tensor):
    """(key, tensor) of the optimizer's state for ``param`` that have the parameter's shape (momenta, moments)."""
    if optimizer is None:
        return []
    st = optimizer.state.get(param)
    if not st:
        return []
    return [(k, v) for k, v in st.items() if isinstance(v, Tensor) and v.dim() > 0 and v.shape == param.shape]


def remap_state(optimizer, param: Tensor, gather: Tensor, scratch: Optional[Tensor] = None,
                newpos: Optional[Tensor] = None) -> None:
    """Permute, in place, every optimizer state tensor of ``param`` shaped like it (SGD ``momentum_buffer``, Adam
    ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``, ...) by ``gather``; new entries (gather < 0) get zero state.
    Same nnz only (see :func:`replace_values` when nnz changes)."""
    for _, v in _state_tensors(optimizer, param):
        buf = scratch if scratch is not None and scratch.dtype == v.dtype and scratch.device == v.device \
            else torch.empty_like(v)
        _gather_into(v, gather, buf, newpos)
        v.copy_(buf)


def _install_pattern(layer: nn.Module, pattern: Pattern) -> None:
    dev = layer.values.device
    for name, t in pattern.tensors().items():
        setattr(layer, name, t.to(dev))


def apply_edit(layer: nn.Module, optimizer, pattern: Pattern, gather: Tensor, newpos: Tensor,
               new_values: Optional[Tensor]) -> None:
    """Install ``pattern`` on ``layer``: survivors keep their weight and optimizer state bit for bit (permuted by
    ``gather``), new entries get ``new_values`` (zeros if None) and zero state. The gradient, stale once the
    topology changed, is set to None (the next backward pass makes a fresh one).

    Same nnz: the ``values`` Parameter object and every state tensor are updated in place. Different nnz: the
    Parameter is replaced in the module and in the optimizer (:func:`replace_values`).
    """
    old = layer.values
    new_shape = pattern.values_shape
    if tuple(old.shape) != tuple(new_shape):
        replace_values(layer, optimizer, pattern, gather, newpos, new_values)
        return
    scratch = torch.empty_like(old.detach())
    _gather_into(old.detach(), gather, scratch, newpos, new_values)
    _install_pattern(layer, pattern)
    with torch.no_grad():
        old.copy_(scratch)
    old.grad = None  # the gradient of the old topology: stale once the topology changed
    remap_state(optimizer, old, gather, scratch, newpos)


def replace_values(layer: nn.Module, optimizer, pattern: Pattern, gather: Tensor, newpos: Tensor,
                   new_values: Optional[Tensor] = None) -> nn.Parameter:
    """Install ``pattern`` when nnz changes (e.g. gradual pruning): a new ``values`` Parameter of the new shape
    replaces the old one in the module *and* in ``optimizer.param_groups``, and its optimizer state (tensors
    shaped like the parameter gathered by ``gather``, the rest such as Adam's ``step`` carried over) moves to it.
    Anything else holding the old Parameter (another optimizer, an EMA) must be updated by its owner."""
    old = layer.values
    shape = pattern.values_shape
    data = torch.empty(shape, dtype=old.dtype, device=old.device)
    _gather_into(old.detach(), gather, data, newpos, new_values)
    new = nn.Parameter(data, requires_grad=old.requires_grad)
    _install_pattern(layer, pattern)
    layer.values = new
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        if old in optimizer.state:
            st = optimizer.state.pop(old)
            for k, v in list(st.items()):
                if isinstance(v, Tensor) and v.dim() > 0 and v.shape == old.shape:
                    nv = torch.empty(shape, dtype=v.dtype, device=v.device)
                    _gather_into(v, gather, nv, newpos)
                    st[k] = nv
            optimizer.state[new] = st
    return new
