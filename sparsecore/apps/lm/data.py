"""Character-level text data for ``sparsecore lm``: a vocabulary from the file, a 90/10 split, random windows.

The first 90% of the characters are the training split and the last 10% the validation split (contiguous, so no
window of one overlaps the other). Batches are random contiguous windows drawn from a seeded ``torch.Generator``;
the validation windows are drawn once from their own generator, so every evaluation sees the same ones.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import torch

from ..train.config import TrainError

__all__ = ["CharData", "load_text", "TRAIN_FRACTION"]

TRAIN_FRACTION = 0.9


def load_text(path) -> str:
    """The text of ``path``; :class:`TrainError` for a missing, unreadable, empty or binary file."""
    p = Path(path)
    if not p.exists():
        raise TrainError(f"--data {str(p)!r} does not exist")
    if not p.is_file():
        raise TrainError(f"--data {str(p)!r} is not a file")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise TrainError(f"cannot read --data {str(p)!r}: {e.strerror or e}") from e
    if not raw:
        raise TrainError(f"--data {str(p)!r} is empty")
    if b"\x00" in raw:  # valid UTF-8 but a binary file all the same
        raise TrainError(f"--data {str(p)!r} is not a text file (it contains NUL bytes)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TrainError(f"--data {str(p)!r} is not UTF-8 text (invalid byte at offset {e.start})") from e


class CharData:
    """Characters of a text as token ids.

    Attributes: ``chars`` (the sorted vocabulary), ``train`` and ``val`` (int64 ``(n,)`` token ids of the splits).
    """

    def __init__(self, text: str, context: int):
        self.chars: List[str] = sorted(set(text))
        if len(self.chars) < 2:
            raise TrainError(f"the text has {len(self.chars)} distinct character(s): a language model needs at least 2")
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        ids = torch.tensor([self.stoi[c] for c in text], dtype=torch.int64)
        n_train = int(TRAIN_FRACTION * len(ids))
        self.train, self.val = ids[:n_train], ids[n_train:]
        self.context = int(context)
        for name, part in (("training", self.train), ("validation", self.val)):
            if len(part) < self.context + 1:  # a window is context inputs plus the next character of the last one
                raise TrainError(f"the {name} split has {len(part)} characters, fewer than --context + 1 = "
                                 f"{self.context + 1} (the text has {len(ids)}: the first 90% train, the last 10% "
                                 f"validate); use a longer file or a shorter --context")

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, s: str) -> torch.Tensor:
        return torch.tensor([self.stoi[c] for c in s], dtype=torch.int64)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``, each int64 ``(batch_size, context)``: random windows of ``split`` and the same shifted by one
        (``y[:, t]`` is the character after ``x[:, t]``)."""
        data = self.train if split == "train" else self.val
        t = self.context
        starts = torch.randint(0, len(data) - t, (batch_size,), generator=generator)
        idx = starts[:, None] + torch.arange(t + 1)
        w = data[idx]
        return w[:, :-1], w[:, 1:]

    def val_batches(self, n: int, batch_size: int, seed: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """``n`` fixed validation batches drawn from their own generator (the same every evaluation and run)."""
        g = torch.Generator().manual_seed(seed + 0x7A1)
        return [self.batch("val", batch_size, g) for _ in range(n)]
