"""Training checkpoints: atomic writes, digests, loading with clear errors, and the RNG states a run resumes from.

``DIR/checkpoint.pt`` is written atomically (a temporary file in the same folder, flushed and fsync'ed, then
``os.replace``, then the folder fsync'ed), so a crash at any moment leaves the previous good checkpoint; temporary
files left by a killed writer are removed by the next run (:func:`remove_stale_temporaries`).

Format (version 2): ``{"format", "version", "sha256", "tensor_sha256", "payload"}``, where ``payload`` holds the
``torch.save`` bytes of the checkpoint itself (a uint8 tensor), ``sha256`` their digest and ``tensor_sha256`` the digest of every
tensor in it by path (``model.0.values``). :func:`load_checkpoint` checks the digest before it unpickles anything,
so one flipped bit anywhere, in a weight or a counter, is a one-line error naming the damaged tensor, never a
silently different resumed run. Version 1 files (no digest) still load. The payload is a pickle: load only
checkpoints you wrote.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Tuple, Union

import numpy as np
import torch

from .config import TrainError

__all__ = ["restore_training_state", "CHECKPOINT_NAME", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "save_checkpoint_atomic",
           "write_text_atomic", "load_checkpoint", "rng_state", "set_rng_state", "check_writable",
           "remove_stale_temporaries", "tensor_digests"]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "sparsecore-train-checkpoint"
CHECKPOINT_VERSION = 2
_READABLE_VERSIONS = (1, 2)


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


def _tensors(obj: Any, path: str = "") -> Iterator[Tuple[str, torch.Tensor]]:
    """(path, tensor) of every tensor inside nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}.{i}" if path else str(i))


def _tensor_sha256(t: torch.Tensor) -> str:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


def tensor_digests(obj: Any) -> Dict[str, str]:
    """sha256 of the bytes of every tensor in ``obj`` (nested dicts/lists/tuples), by path."""
    return {p: _tensor_sha256(t) for p, t in _tensors(obj)}


def save_checkpoint_atomic(obj: Any, path: Union[str, Path]) -> Path:
    """``obj`` to ``path`` atomically (see :func:`_write_atomic`), with its digests (see the module docstring)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    record = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
              "sha256": hashlib.sha256(payload).hexdigest(), "tensor_sha256": tensor_digests(obj),
              # a uint8 tensor, stored raw in torch.save's zip (a pickled bytes object would be re-encoded)
              "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
    return _write_atomic(path, "wb", lambda f: torch.save(record, f))


def write_text_atomic(text: str, path: Union[str, Path]) -> Path:
    """``text`` to ``path`` atomically (see :func:`_write_atomic`)."""
    return _write_atomic(path, "w", lambda f: f.write(text))


def _payload_bytes(record: Dict[str, Any]):
    t = record.get("payload")
    if isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1:
        return t.numpy().tobytes()
    return None


def _damage(record: Dict[str, Any]) -> str:
    """Which tensors of a checkpoint whose digest failed differ from their own digests (for the error)."""
    try:
        inner = torch.load(io.BytesIO(_payload_bytes(record)), map_location="cpu", weights_only=False)
    except Exception:
        return "its contents cannot be read"
    want = record.get("tensor_sha256") or {}
    bad = [p for p, d in tensor_digests(inner).items() if want.get(p) != d]
    if not bad:
        return "a non-tensor part (counters, settings or history) was altered"
    return "damaged tensor(s): " + ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")


def load_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """Read and verify a checkpoint written by :func:`train` (a pickle: only load files you trust)."""
    path = Path(path)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise TrainError(f"cannot read checkpoint {str(path)!r}: {type(e).__name__}: {e}") from e
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{str(path)!r} is not a sparsecore training checkpoint")
    if ck.get("version") not in _READABLE_VERSIONS:
        raise TrainError(f"checkpoint {str(path)!r} has version {ck.get('version')}, expected one of "
                         f"{_READABLE_VERSIONS}")
    if ck["version"] == 1:
        return ck
    payload = _payload_bytes(ck)
    if payload is None or hashlib.sha256(payload).hexdigest() != ck.get("sha256"):
        detail = _damage(ck) if payload is not None else "no payload"
        raise TrainError(f"checkpoint {str(path)!r} is damaged (its sha256 digest does not match): {detail}; "
                         f"resume from another copy or start a new run without --resume")
    try:
        inner = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
    except Exception as e:  # pragma: no cover - the digest matched, so only a writer's bug gets here
        raise TrainError(f"cannot read checkpoint {str(path)!r}: {type(e).__name__}: {e}") from e
    if not isinstance(inner, dict):
        raise TrainError(f"{str(path)!r} is not a sparsecore training checkpoint")
    return dict(inner, format=CHECKPOINT_FORMAT, version=ck["version"])


def check_writable(path: Union[str, Path], folder: bool) -> None:
    """TrainError, before any training, when ``path`` (a file, or a folder with ``folder``) cannot be written: the
    folder is created if needed and a probe file is written into it and removed."""
    path = Path(path)
    target = path if folder else path.parent
    what = "checkpoint folder" if folder else "report file"
    if not folder and path.is_dir():
        raise TrainError(f"cannot write the {what} {str(path)!r}: it is a folder")
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = target / f".sparsecore-probe-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"probe")
        probe.unlink()
    except OSError as e:
        raise TrainError(f"cannot write the {what} {str(path)!r}: {e.strerror or e}") from e


def remove_stale_temporaries(path: Union[str, Path]) -> int:
    """Remove the temporary files a killed writer of ``path`` left (``.NAME.tmp-PID`` of a PID that no longer
    runs, or this process's own); returns how many were removed."""
    path = Path(path)
    n = 0
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and _pid_alive(pid):
            continue  # another process is writing it right now
        try:
            tmp.unlink()
            n += 1
        except OSError:
            pass
    return n


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


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


def restore_training_state(ck: Dict[str, Any], path: Union[str, Path], model: torch.nn.Module, optimizer,
                           updater, data_gen: torch.Generator) -> None:
    """Load a checkpoint's model, optimizer, updater (None: none) and random states; :class:`TrainError` naming
    ``path`` when they do not fit the model that was built (another shape, nnz or method)."""
    try:
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        if updater is not None:
            updater.load_state_dict(ck["updater"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise TrainError(f"checkpoint {str(path)!r} does not fit this model: {e}") from e
    set_rng_state(ck["rng"], data_gen)
