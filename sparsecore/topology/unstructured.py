"""Random unstructured and block patterns: uniform, Erdos-Renyi (ER), ERK densities, random blocks."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np
import torch

from ..pattern import INT32_MAX, Pattern
from ._common import check_fraction, check_real, check_size, make_generator, sorted_subset

__all__ = ["uniform", "erdos_renyi", "er_density", "er_count", "erk_densities", "erk", "random_blocks"]


def _random_pattern(n_r: int, n_c: int, k: int, block_size: int, g) -> Pattern:
    # The k flat indices (row * n_c + col) sorted are the entries in CSR order: the CSR comes straight from them,
    # with no (row, col) pairs and no sort permutation (each an int64 array of nnz), and the flat array is freed
    # before the transpose index is built. The same pattern as Pattern.from_indices of the pairs.
    Pattern._check_shape((n_r * block_size, n_c * block_size), block_size)
    if k > INT32_MAX:  # before drawing: the int32 indices could not hold it
        raise ValueError(f"nnz = {k} does not fit int32 indices")
    flat = sorted_subset(n_r * n_c, k, g)
    col = np.empty(k, dtype=np.int32)
    if n_c:
        np.remainder(flat, n_c, out=col, casting="unsafe")
    rowptr = np.searchsorted(flat, np.arange(n_r + 1, dtype=np.int64) * n_c).astype(np.int32)
    del flat
    return Pattern._from_int32_csr(torch.from_numpy(rowptr), torch.from_numpy(col),
                                   (n_r * block_size, n_c * block_size), block_size)


def uniform(out: int, in_: int, density: float, *, seed=None, generator: Optional[torch.Generator] = None) -> Pattern:
    """CSR pattern with exactly ``round(density * out * in_)`` connections, a uniformly random subset.

    Cost O(nnz log nnz) time and O(nnz) memory (see :mod:`sparsecore.topology._common`).
    """
    out, in_ = check_size("out", out), check_size("in_", in_)
    density = check_fraction("density", density)
    k = min(round(density * out * in_), out * in_)
    return _random_pattern(out, in_, k, 1, make_generator(seed, generator))


def er_count(out: int, in_: int, epsilon: float) -> int:
    """Connections of an ER layer: ``round(epsilon * (in_ + out))``, capped at ``out * in_``."""
    out, in_ = check_size("out", out), check_size("in_", in_)
    epsilon = check_real("epsilon", epsilon)
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    return min(round(epsilon * (in_ + out)), out * in_)


def er_density(out: int, in_: int, epsilon: float) -> float:
    """ER density ``epsilon * (in_ + out) / (in_ * out)``, capped at 1 (0.0 for an empty layer).

    This is the formula before rounding; the density of :func:`erdos_renyi`'s pattern is
    ``er_count(out, in_, epsilon) / (out * in_)``.
    """
    out, in_ = check_size("out", out), check_size("in_", in_)
    epsilon = check_real("epsilon", epsilon)
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if out * in_ == 0:
        return 0.0
    return min(1.0, epsilon * (in_ + out) / (in_ * out))


def erdos_renyi(out: int, in_: int, epsilon: float, *, seed=None,
                generator: Optional[torch.Generator] = None) -> Pattern:
    """Erdos-Renyi CSR pattern (SET, CTRE): exactly ``round(epsilon * (in_ + out))`` connections uniformly at
    random, no duplicates.

    An ``epsilon`` asking for more than ``out * in_`` connections is **capped** (the layer is then dense), not an
    error, so one ``epsilon`` can be used for all the layers of a model, small ones included.
    """
    k = er_count(out, in_, epsilon)
    return _random_pattern(int(out), int(in_), k, 1, make_generator(seed, generator))


def _shape_params(shape) -> tuple:
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"each shape must be a tuple (out, in[, *kernel]), got {shape!r}") from None
    if len(dims) < 2:
        raise ValueError(f"each shape must have at least 2 dimensions (out, in), got {dims}")
    dims = tuple(check_size("shape dimension", d, minimum=1) for d in dims)
    return dims


def erk_densities(shapes: Sequence[Sequence[int]], density: float, *, power_scale: float = 1.0) -> List[float]:
    """Erdos-Renyi-Kernel densities of the layers of a model (RigL's procedure) for an overall ``density``.

    ``shapes``: one ``(out, in)`` per layer (also ``(out, in, *kernel)``, for which the raw score is
    ``sum(shape) / prod(shape)``; for linear layers that is ``(in + out) / (in * out)``, ER up to a factor).
    Layer ``l`` gets ``eps * raw_l ** power_scale`` with the global ``eps`` chosen so that
    ``sum(density_l * n_l) == density * sum(n_l)``; a layer whose density would exceed 1 is made dense
    and ``eps`` is solved again for the others (repeatedly, the largest raw score first), as in RigL's
    ``sparse_utils.get_sparsities``. Returns floats in [0, 1]; the per-layer counts ``round(d_l * n_l)``
    then match the total up to rounding (at most one connection per layer).
    """
    density = check_fraction("density", density)
    power_scale = check_real("power_scale", power_scale)
    dims = [_shape_params(s) for s in shapes]
    if not dims:
        return []
    n = [math.prod(d) for d in dims]
    raw = [(sum(d) / math.prod(d)) ** power_scale for d in dims]
    dense: set = set()
    while True:
        rhs = 0.0
        divisor = 0.0
        for i, (ni, ri) in enumerate(zip(n, raw)):
            if i in dense:
                rhs -= ni * (1.0 - density)
            else:
                rhs += ni * density
                divisor += ri * ni
        if divisor == 0.0:  # every layer dense
            eps = 0.0
            break
        eps = rhs / divisor
        free = [i for i in range(len(n)) if i not in dense]
        max_raw = max(raw[i] for i in free)
        if max_raw * eps > 1.0:
            dense.update(i for i in free if raw[i] == max_raw)
        else:
            break
    return [1.0 if i in dense else min(1.0, max(0.0, eps * raw[i])) for i in range(len(n))]


def erk(shapes: Sequence[Sequence[int]], density: float, *, seed=None,
        generator: Optional[torch.Generator] = None) -> List[Pattern]:
    """Uniform CSR patterns with :func:`erk_densities` for ``(out, in)`` shapes (one generator, layers in order)."""
    g = make_generator(seed, generator)
    dims = [_shape_params(s) for s in shapes]
    for d in dims:
        if len(d) != 2:
            raise ValueError(f"erk() builds 2-D (out, in) patterns, got shape {d}")
    return [uniform(o, i, d, generator=g) for (o, i), d in zip(dims, erk_densities(dims, density))]


def random_blocks(out: int, in_: int, density: float, block_size: int, *, seed=None,
                  generator: Optional[torch.Generator] = None) -> Pattern:
    """BSR pattern of ``round(density * n_blocks)`` uniformly random ``block_size x block_size`` blocks, where
    ``n_blocks = (out // block_size) * (in_ // block_size)``; ``block_size`` must divide ``out`` and ``in_``."""
    out, in_ = check_size("out", out), check_size("in_", in_)
    density = check_fraction("density", density)
    bs = check_size("block_size", block_size, minimum=1)
    if out % bs or in_ % bs:
        raise ValueError(f"block_size {bs} must divide out={out} and in_={in_}")
    n_r, n_c = out // bs, in_ // bs
    k = min(round(density * n_r * n_c), n_r * n_c)
    return _random_pattern(n_r, n_c, k, bs, make_generator(seed, generator))
