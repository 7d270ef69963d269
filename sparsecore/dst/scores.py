"""Growth scores computed in chunks of output rows: RigL's dense gradient, CTRE's cosine, G2G's Pearson correlation.

A score matrix has the weight's shape ``(out, in)`` (block grid ``(out/bs, in/bs)`` for BSR). It is never held whole:
:func:`score_chunks` yields ``(row0, chunk)`` with ``chunk`` of ``rows x in`` elements, ``rows`` chosen so that a
chunk has at most ``chunk_elems`` elements, and the caller streams the chunks into a top-k
(:class:`sparsecore.dst.edit.TopKAbsent`). For BSR, the entry score of a block is the squared L2 norm of the block
of element scores (the same order as the L2 norm).

Activation statistics (CTRE, G2G) are gathered by forward hooks in bounded memory (:class:`ActivationStats`), in
one of two modes:

* ``"window"`` (the Updater's default): the last ``max_samples`` rows of the layer's input and output activations
  before the update, paired row by row, and every score is exact over them. The Updater records only in the last
  steps before an update (when it knows the schedule), so the other steps pay nothing; the activations come from
  nearly the weights being rewired, as the reference's end-of-epoch pass over the training set does.
* ``"full"``: every row recorded while the Updater runs its own pass over the whole training set at the update
  (``Updater(..., stats="full")`` with ``updater.stats_source`` set: CTRE's reference computes its cosine over the
  whole training set with the weights being rewired). Exact; memory ``n_train * (in + out)`` floats per layer
  during the update, released after it. Not available under data parallelism.
* ``"reservoir"``: running sums over *every* training sample seen since the last topology update (count, sum, sum
  of squares per neuron), and a uniform reservoir sample (Vitter's algorithm R) of at most ``max_samples`` rows
  for the cross term ``sum_b a_i(b) a_j(b)``, rescaled to the number of samples seen. Every step pays for it.

When no more than ``max_samples`` samples were seen, both are exact over those samples. Memory: ``max_samples *
(in + out)`` floats per layer.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["dense_grad_chunks", "ActivationStats", "similarity_chunks", "block_reduce", "chunk_rows"]


def chunk_rows(n_rows: int, n_cols: int, chunk_elems: int, block_size: int = 1) -> int:
    """Rows per chunk: the most that keep ``rows * n_cols <= chunk_elems``, a multiple of ``block_size``, >= bs."""
    rows = max(1, int(chunk_elems) // max(1, n_cols))
    rows = max(block_size, rows - rows % block_size)
    return min(rows, max(n_rows, block_size))


def block_reduce(chunk: Tensor, block_size: int) -> Tensor:
    """(rows, in) element scores -> (rows/bs, in/bs) block scores: the squared L2 norm of each block."""
    if block_size == 1:
        return chunk
    r, c = chunk.shape
    bs = block_size
    return chunk.reshape(r // bs, bs, c // bs, bs).pow(2).sum(dim=(1, 3))


def dense_grad_chunks(x: Tensor, dy: Tensor, chunk_elems: int = 1 << 20, block_size: int = 1,
                      absolute: bool = True, reduce: Optional[Callable[[Tensor], Tensor]] = None,
                      ) -> Iterator[Tuple[int, Tensor]]:
    """The dense weight gradient ``dL/dW = dy^T x`` (out, in) in chunks of output rows: yields ``(row0, G)`` with
    ``G = dy[:, row0:row0+r]^T x``, ``|G|`` when ``absolute``; for BSR the block scores (squared block norms of G,
    ``row0`` in block rows). x: (batch, in), dy: (batch, out). Peak extra memory: one chunk.

    ``reduce`` (data-parallel training: an in-place sum over the ranks, see :mod:`sparsecore.dst.distributed`) is
    applied to each raw chunk ``G`` before the absolute value and the block norms, so the scores are those of the
    gradient of the global batch (the sum of the ranks' ``dy_r^T x_r``; its scale does not change the top-k)."""
    x2 = x.detach().reshape(-1, x.shape[-1])
    dy2 = dy.detach().reshape(-1, dy.shape[-1]).to(x2.dtype)
    n_out, n_in = dy2.shape[1], x2.shape[1]
    step = chunk_rows(n_out, n_in, chunk_elems, block_size)
    dyt = dy2.t()
    for r0 in range(0, n_out, step):
        g = dyt[r0:r0 + step] @ x2
        if reduce is not None:
            reduce(g)
        if absolute and block_size == 1:
            g = g.abs_()
        yield r0 // block_size, block_reduce(g, block_size)


class ActivationStats:
    """Bounded-memory activation statistics of one layer (see the module docstring).

    ``add(x, y)`` takes a batch of inputs ``(B, in)`` and output activations ``(B, out)``. ``mode`` is
    ``"window"`` (the last ``max_samples`` rows) or ``"reservoir"``; ``generator`` drives the reservoir's
    replacement choices (reproducible, saved in :meth:`state_dict`).
    """

    MODES = ("window", "reservoir", "full")

    def __init__(self, n_in: int, n_out: int, max_samples: int = 2048, generator: Optional[torch.Generator] = None,
                 mode: str = "reservoir"):
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.n_in, self.n_out, self.max_samples = int(n_in), int(n_out), int(max_samples)
        self.generator, self.mode = generator, mode
        self.reset()

    def reset(self) -> None:
        self.n = 0  # samples seen
        self.pos = 0  # window: the ring buffer's next row
        self.x: Optional[Tensor] = None  # rows (m, in) and (m, out): the reservoir, or the window's ring buffer
        self.y: Optional[Tensor] = None
        self.sx = self.sxx = self.sy = self.syy = None  # reservoir: float64 running sums (in,), (out,)
        self._rows = []  # full: the batches recorded since the last consolidation

    @property
    def m(self) -> int:
        """Rows held."""
        return self.n if self.mode == "full" else min(self.n, self.max_samples)

    def _consolidate(self) -> None:
        """full mode: concatenate the recorded batches into ``x`` / ``y``."""
        if self.mode == "full" and self._rows:
            xs = ([self.x] if self.x is not None else []) + [r[0] for r in self._rows]
            ys = ([self.y] if self.y is not None else []) + [r[1] for r in self._rows]
            self.x, self.y = torch.cat(xs), torch.cat(ys)
            self._rows = []

    def _allocate(self, x: Tensor, y: Tensor) -> None:
        M = self.max_samples
        self.x = torch.zeros(M, self.n_in, dtype=x.dtype, device=x.device)
        self.y = torch.zeros(M, self.n_out, dtype=y.dtype, device=y.device)
        if self.mode == "reservoir":
            f64 = dict(dtype=torch.float64, device=x.device)
            self.sx, self.sxx = torch.zeros(self.n_in, **f64), torch.zeros(self.n_in, **f64)
            self.sy, self.syy = torch.zeros(self.n_out, **f64), torch.zeros(self.n_out, **f64)

    @torch.no_grad()
    def add(self, x: Tensor, y: Tensor) -> None:
        x = x.detach().reshape(-1, self.n_in)
        y = y.detach().reshape(-1, self.n_out)
        b = x.shape[0]
        if b == 0:
            return
        if self.mode == "full":
            self._rows.append((x.clone(), y.clone()))
            self.n += b
            return
        if self.x is None:
            self._allocate(x, y)
        if self.mode == "window":
            self._add_window(x, y)
        else:
            self._add_reservoir(x, y)
        self.n += b

    def _add_window(self, x: Tensor, y: Tensor) -> None:
        M = self.max_samples
        if x.shape[0] > M:  # only the last M rows can stay
            x, y = x[-M:], y[-M:]
        b, p = x.shape[0], self.pos
        first = min(b, M - p)  # rows up to the end of the ring, then the rest from its start
        self.x[p:p + first] = x[:first]
        self.y[p:p + first] = y[:first]
        if first < b:
            self.x[:b - first] = x[first:]
            self.y[:b - first] = y[first:]
        self.pos = (p + b) % M

    def _add_reservoir(self, x: Tensor, y: Tensor) -> None:
        b = x.shape[0]
        self.sx += x.sum(0, dtype=torch.float64)
        self.sxx += (x * x).sum(0, dtype=torch.float64)
        self.sy += y.sum(0, dtype=torch.float64)
        self.syy += (y * y).sum(0, dtype=torch.float64)
        M = self.max_samples
        idx = torch.arange(self.n, self.n + b, dtype=torch.int64)  # global sample numbers
        u = torch.rand(b, generator=self.generator, dtype=torch.float64)
        j = torch.floor(u * (idx + 1).to(torch.float64)).to(torch.int64)  # algorithm R: slot in [0, n]
        slot = torch.where(idx < M, idx, j)
        acc = slot < M
        rows = torch.nonzero(acc).flatten()
        if rows.numel():
            s = slot[rows]
            # several rows of one batch may land on one slot: the last one wins, as in the sequential algorithm
            last = torch.full((M,), -1, dtype=torch.int64).scatter_reduce_(0, s, rows, reduce="amax")
            win = rows[last[s] == rows]
            ws = slot[win].to(x.device)
            wr = win.to(x.device)
            self.x[ws] = x[wr].to(self.x.dtype)
            self.y[ws] = y[wr].to(self.y.dtype)

    def moments(self):
        """``(n, sx, sxx, sy, syy, X, Y, scale)``: the number of samples the sums cover, the float64 sums and sums
        of squares per input and output neuron, the rows ``X (m, in)``, ``Y (m, out)`` of the cross term, and
        ``scale`` such that ``scale * Y^T X`` estimates the cross term over the ``n`` samples."""
        self._consolidate()
        m = self.m
        X, Y = self.x[:m], self.y[:m]
        if self.mode in ("window", "full"):
            f64 = torch.float64
            return (m, X.sum(0, dtype=f64), (X * X).sum(0, dtype=f64), Y.sum(0, dtype=f64), (Y * Y).sum(0, dtype=f64),
                    X, Y, 1.0)
        return self.n, self.sx, self.sxx, self.sy, self.syy, X, Y, self.n / m

    def state_dict(self) -> dict:
        self._consolidate()
        return {"mode": self.mode, "n": self.n, "pos": self.pos, "x": self.x, "y": self.y, "sx": self.sx,
                "sxx": self.sxx, "sy": self.sy, "syy": self.syy}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("mode", "reservoir") != self.mode:
            raise ValueError(f"statistics were gathered in mode {sd.get('mode')!r}, this layer's are {self.mode!r}")
        self.n, self.pos = int(sd["n"]), int(sd.get("pos", 0))
        self._rows = []
        for k in ("x", "y", "sx", "sxx", "sy", "syy"):
            v = sd[k]
            setattr(self, k, None if v is None else v.clone())


def similarity_chunks(stats: ActivationStats, kind: str = "cosine", chunk_elems: int = 1 << 20,
                      block_size: int = 1, dtype=None, reduce: Optional[Callable[[Tensor], Tensor]] = None,
                      gather_rows: Optional[Callable[[Tensor], Tensor]] = None) -> Iterator[Tuple[int, Tensor]]:
    """|similarity| between every output neuron j (rows) and input neuron i (columns), in chunks of output rows.

    kind ``"cosine"`` (CTRE): ``S_ij = sum_b a_j a_i / sqrt(sum_b a_j^2 sum_b a_i^2)``;
    kind ``"pearson"`` (G2G): the cosine of the mean-centred activations. The sums and the cross term come from
    :meth:`ActivationStats.moments` (exact over a window; running sums and a rescaled reservoir cross term in the
    reservoir mode). A neuron with zero norm (variance) has
    similarity 0. Yields ``(row0, |S| chunk)`` (block scores and block rows for BSR), in ``dtype`` (default: the
    activations' dtype).

    ``reduce`` (data-parallel training: an in-place sum over the ranks, see :mod:`sparsecore.dst.distributed`)
    makes the scores those of the union of the ranks' samples: the counts, sums and sums of squares are reduced
    once, and the cross term of each chunk, ``sum_r scale_r * Y_r^T X_r`` (``scale_r`` each rank's reservoir
    factor, 1 for a window), is reduced chunk by chunk, so the extra memory stays one chunk; or, with
    ``gather_rows`` too, the rows are gathered once and the cross term of their union computed locally.
    """
    if kind not in ("cosine", "pearson"):
        raise ValueError(f"kind must be 'cosine' or 'pearson', got {kind!r}")
    if reduce is not None:
        yield from _similarity_chunks_reduced(stats, kind, chunk_elems, block_size, dtype, reduce, gather_rows)
        return
    if stats.n == 0:
        raise RuntimeError("no activation statistics yet: run training steps (in train mode) before an update")
    n, sx, sxx, sy, syy, X, Y, scale = stats.moments()
    dtype = X.dtype if dtype is None else dtype
    X, Y = X.to(dtype), Y.to(dtype)
    if kind == "cosine":
        nx, ny = sxx.sqrt(), syy.sqrt()
        mx = my = None
    else:
        mx, my = sx / n, sy / n
        nx = (sxx / n - mx * mx).clamp_min(0).sqrt()
        ny = (syy / n - my * my).clamp_min(0).sqrt()
        scale = scale / n  # the mean of the cross products
    inv_x = torch.where(nx > 0, 1.0 / nx, torch.zeros_like(nx)).to(dtype)
    inv_y = torch.where(ny > 0, 1.0 / ny, torch.zeros_like(ny)).to(dtype)
    n_out, n_in = stats.n_out, stats.n_in
    step = chunk_rows(n_out, n_in, chunk_elems, block_size)
    Yt = Y.t()
    for r0 in range(0, n_out, step):
        c = Yt[r0:r0 + step] @ X
        c.mul_(scale)
        if mx is not None:
            c.sub_(my[r0:r0 + step, None].to(dtype) * mx[None, :].to(dtype))
        c.mul_(inv_y[r0:r0 + step, None]).mul_(inv_x[None, :]).abs_()
        yield r0 // block_size, block_reduce(c, block_size)


def _similarity_chunks_reduced(stats: ActivationStats, kind: str, chunk_elems: int, block_size: int, dtype,
                               reduce: Callable[[Tensor], Tensor], gather_rows=None) -> Iterator[Tuple[int, Tensor]]:
    """:func:`similarity_chunks` over the samples of every rank (``reduce`` sums a tensor over the ranks in place).
    Every rank runs the same collectives in the same order (one for the sums, then one per chunk), also a rank that
    holds no sample. ``gather_rows(t)`` (optional) returns the rows of every rank's ``t`` concatenated: then the
    rows ``X`` and ``Y`` (scaled by each rank's reservoir factor) are gathered once instead, and every rank computes
    the cross term of the union locally (no collective per chunk; cheaper for wide layers, see
    :func:`sparsecore.dst.distributed.gather_is_cheaper`)."""
    n_in, n_out = stats.n_in, stats.n_out
    if stats.x is None:  # this rank saw no sample: it contributes zeros
        dt = dtype or torch.get_default_dtype()
        z64 = dict(dtype=torch.float64)
        n, sx, sxx, sy, syy = 0, torch.zeros(n_in, **z64), torch.zeros(n_in, **z64), torch.zeros(n_out, **z64), \
            torch.zeros(n_out, **z64)
        X, Y, scale = torch.zeros(0, n_in, dtype=dt), torch.zeros(0, n_out, dtype=dt), 0.0
    else:
        n, sx, sxx, sy, syy, X, Y, scale = stats.moments()
    dtype = X.dtype if dtype is None else dtype
    X, Y = X.to(dtype), Y.to(dtype)
    dev = X.device
    packed = torch.cat([torch.tensor([float(n)], dtype=torch.float64, device=dev), sx.to(dev), sxx.to(dev),
                        sy.to(dev), syy.to(dev)])
    reduce(packed)
    n = float(packed[0])
    sx, sxx = packed[1:1 + n_in], packed[1 + n_in:1 + 2 * n_in]
    sy, syy = packed[1 + 2 * n_in:1 + 2 * n_in + n_out], packed[1 + 2 * n_in + n_out:]
    if n == 0:
        raise RuntimeError("no activation statistics on any rank yet: run training steps (in train mode) before an "
                           "update")
    if kind == "cosine":
        nx, ny = sxx.sqrt(), syy.sqrt()
        mx = my = None
    else:
        mx, my = sx / n, sy / n
        nx = (sxx / n - mx * mx).clamp_min(0).sqrt()
        ny = (syy / n - my * my).clamp_min(0).sqrt()
    inv_x = torch.where(nx > 0, 1.0 / nx, torch.zeros_like(nx)).to(dtype)
    inv_y = torch.where(ny > 0, 1.0 / ny, torch.zeros_like(ny)).to(dtype)
    step = chunk_rows(n_out, n_in, chunk_elems, block_size)
    if gather_rows is not None:
        X, Y = gather_rows(X), gather_rows(Y if scale == 1.0 else Y * scale)
        scale = 1.0
    Yt = Y.t()
    for r0 in range(0, n_out, step):
        c = Yt[r0:r0 + step] @ X
        if scale != 1.0:
            c.mul_(scale)
        if gather_rows is None:
            reduce(c)  # sum over ranks of scale_r * Y_r^T X_r: the cross term over every rank's samples
        if mx is not None:
            c.mul_(1.0 / n)
            c.sub_(my[r0:r0 + step, None].to(dtype) * mx[None, :].to(dtype))
        c.mul_(inv_y[r0:r0 + step, None]).mul_(inv_x[None, :]).abs_()
        yield r0 // block_size, block_reduce(c, block_size)
