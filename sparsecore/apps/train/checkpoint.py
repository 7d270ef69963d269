"""Training checkpoints: atomic writes, loading with clear errors, and the RNG states a run resumes from.

``DIR/checkpoint.pt`` is written atomically (a temporary file in the same folder, flushed and fsync'ed, then
``os.replace``, then the folder fsync'ed), so a crash at any moment leaves the previous good checkpoint. The file is
a pickle: load only checkpoints you wrote.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Callable, Dict, Union

import numpy as np
import torch

from .config import TrainError

__all__ = ["CHECKPOINT_NAME", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "save_checkpoint_atomic",
           "write_text_atomic", "load_checkpoint", "rng_state", "set_rng_state"]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "sparsecore-train-checkpoint"
CHECKPOINT_VERSION = 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Union[str, Path], mode: str, write: Callable[[Any], None]) -> Path:
    """Write ``path`` atomically: ``write(f)`` into a temporary file in the same folder, flushed and fsync'ed,
    then ``os.replace``'d over ``path`` and the folder fsync'ed. On any error the temporary file is removed and
    ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def save_checkpoint_atomic(obj: Any, path: Union[str, Path]) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`_write_atomic`)."""
    return _write_atomic(path, "wb", lambda f: torch.save(obj, f))


def write_text_atomic(text: str, path: Union[str, Path]) -> Path:
    """``text`` to ``path`` atomically (see :func:`_write_atomic`)."""
    return _write_atomic(path, "w", lambda f: f.write(text))


def load_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a checkpoint written by :func:`train` (a pickle: only load files you trust)."""
    path = Path(path)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise TrainError(f"cannot read checkpoint {str(path)!r}: {type(e).__name__}: {e}") from e
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{str(path)!r} is not a sparsecore training checkpoint")
    if ck.get("version") != CHECKPOINT_VERSION:
        raise TrainError(f"checkpoint {str(path)!r} has version {ck.get('version')}, expected {CHECKPOINT_VERSION}")
    return ck


def rng_state(data_gen: torch.Generator) -> Dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
            "python": random.getstate(), "data": data_gen.get_state()}


def set_rng_state(st: Dict[str, Any], data_gen: torch.Generator) -> None:
    torch.set_rng_state(st["torch"])
    kind, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    random.setstate(st["python"])
    data_gen.set_state(st["data"])
