"""``sparsecore train``: train one method's MLP on one dataset, with checkpoints, resume and a JSON report.

    sparsecore train --method set --dataset fashion-mnist --data-dir shared/data --epochs 100 \\
        --hidden 1000,1000,1000 --json set.json --checkpoint ckpt/set [--resume]

Python API: :func:`train` takes a :class:`TrainConfig` (or a dict of its fields) and returns the report dict.

Training: SGD (Nesterov momentum 0.9, lr 0.01, L2 ``weight_decay`` 1e-4, batch 100 by default: CTRE's reference
settings), cross-entropy, the data order drawn from a seeded generator. After every optimizer step the method's
:class:`sparsecore.dst.Updater` (if any, see :func:`sparsecore.models.make_updater`) gets ``step()``; after every
epoch, once validation and test accuracy are measured, it gets ``report_validation(val_accuracy)`` then
``epoch_end()`` (the per-epoch methods rewire there, except after the last epoch), so the model evaluated at an
epoch is the one trained in it, and the final model is the one evaluated last. Validation and test accuracy are
measured after every epoch; the reported ``test_accuracy`` is the one at the
epoch of best validation accuracy (the first such epoch; the last epoch when there is no validation set).

Report (``--json``): ``test_accuracy`` (fraction), ``best_epoch``, ``best_val_accuracy``, ``final_*``,
``epoch_seconds`` (per epoch: the training steps plus the topology update, without evaluation or checkpointing),
``history``, ``nnz``/``dense_params``/``density``/``n_params``/``layers`` (after training), ``nnz_initial``,
``peak_memory_mb`` and ``state_memory_mb`` (see below), the method, every argument, the dataset split, and the
machine (CPU, threads, versions).

Memory: ``peak_memory_mb`` is the peak resident set size (Linux ``VmHWM``) of the process while it trained this
model: the high-water mark is reset (``/proc/self/clear_refs``) after the data is loaded and before the model is
built (free allocator pages are first returned to the OS with glibc's ``malloc_trim``, so memory cached by earlier
work in the same process does not hide this run's), so it covers the model, the training and the data already in
memory, plus the interpreter and libraries.
``peak_memory_delta_mb`` is that peak minus the resident size at the reset: what the model and its training added.
Where the reset is not possible the peak is the process's since it started (``resource.getrusage`` max RSS).
``state_memory_mb`` is exact tensor bytes of the training state: parameters, gradients, optimizer state and
buffers (topology indices included), after training.

Checkpoints (``--checkpoint DIR``): ``DIR/checkpoint.pt`` after every epoch, written atomically (a temporary file in
the same folder, flushed and fsync'ed, then ``os.replace``, then the folder fsync'ed), so a crash at any moment
leaves the previous good checkpoint. It holds the model (values *and* topology buffers), the optimizer, the
updater, the epoch, the best-validation bookkeeping, the history and every RNG state (torch, numpy, python, the
data-order generator). ``--resume`` continues from it to the same result as an uninterrupted run (bit for bit on
CPU with the same thread count); the settings that shape the result must match the checkpoint's. The file is a
pickle: load only checkpoints you wrote.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .models import METHODS, build_model, make_updater, model_stats

__all__ = ["TrainConfig", "TrainError", "train", "main", "save_checkpoint_atomic", "load_checkpoint",
           "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "checkpoint.pt"
_CKPT_FORMAT = "sparsecore-train-checkpoint"
_CKPT_VERSION = 1


class TrainError(ValueError):
    """A bad argument, bad data or an unusable checkpoint: reported as a one-line error (exit code 2)."""


@dataclass
class TrainConfig:
    """Everything :func:`train` needs; field names match the command-line options."""

    method: str
    dataset: str = "builtin"
    data_dir: Optional[str] = None
    epochs: int = 10
    hidden: Tuple[int, ...] = (1000, 1000, 1000)
    batch_size: int = 100
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    seed: int = 0
    val_fraction: float = 0.1
    epsilon: Optional[float] = None
    density: Optional[float] = None
    model_options: Dict[str, Any] = field(default_factory=dict)
    dst_options: Dict[str, Any] = field(default_factory=dict)
    threads: Optional[int] = None
    json: Optional[str] = None
    checkpoint: Optional[str] = None
    resume: bool = False
    quiet: bool = False
    eval_batch_size: int = 1000
    stop_after_epoch: Optional[int] = None   # testing: SIGKILL itself right after this epoch's checkpoint

    # the settings that shape the result: a checkpoint must match them to be resumed
    _RESULT_FIELDS = ("method", "dataset", "epochs", "hidden", "batch_size", "lr", "momentum", "nesterov",
                      "weight_decay", "seed", "val_fraction", "epsilon", "density", "model_options", "dst_options")

    def fingerprint(self) -> Dict[str, Any]:
        return json.loads(json.dumps({k: _jsonable(getattr(self, k)) for k in self._RESULT_FIELDS}))

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, Path):
        return str(v)
    return repr(v)


def _check_config(c: TrainConfig) -> TrainConfig:
    def posint(name, v, minimum=1):
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise TrainError(f"{name} must be an int >= {minimum}, got {v!r}")

    if c.method not in METHODS:
        raise TrainError(f"unknown method {c.method!r}: expected one of {', '.join(METHODS)}")
    posint("epochs", c.epochs, 0)
    posint("batch_size", c.batch_size)
    posint("eval_batch_size", c.eval_batch_size)
    if c.threads is not None:
        posint("threads", c.threads)
    if isinstance(c.hidden, int):
        c.hidden = (c.hidden,)
    c.hidden = tuple(c.hidden)
    if not c.hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in c.hidden):
        raise TrainError(f"hidden must be a non-empty list of positive ints, got {c.hidden!r}")
    for name in ("lr", "momentum", "weight_decay"):
        v = getattr(c, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise TrainError(f"{name} must be a finite number >= 0, got {v!r}")
    if c.lr <= 0:
        raise TrainError(f"lr must be > 0, got {c.lr!r}")
    if c.nesterov and c.momentum == 0:
        raise TrainError("Nesterov momentum needs momentum > 0 (use nesterov=False / --no-nesterov)")
    if not (0 <= c.val_fraction < 1):
        raise TrainError(f"val_fraction must be in [0, 1), got {c.val_fraction!r}")
    if c.epsilon is not None and c.density is not None:
        raise TrainError("give at most one of epsilon and density")
    if c.resume and not c.checkpoint:
        raise TrainError("resume needs a checkpoint folder (--checkpoint DIR)")
    if c.data_dir is not None and not Path(c.data_dir).is_dir():
        raise TrainError(f"data folder {c.data_dir!r} does not exist or is not a folder")
    if c.stop_after_epoch is not None:
        posint("stop_after_epoch", c.stop_after_epoch)
    return c


# ----------------------------------------------------------------------------------------------- memory


def _proc_status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _release_free_memory() -> None:
    """Collect garbage and hand the allocator's free pages back to the OS (glibc ``malloc_trim``), so that the
    resident size, and its peak, reflect live memory rather than what earlier work left cached."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    kb = _proc_status_kb("VmHWM")
    if kb is None:
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kb = r / 1024 if sys.platform == "darwin" else r
    return kb / 1024


def _rss_mb() -> Optional[float]:
    kb = _proc_status_kb("VmRSS")
    return None if kb is None else kb / 1024


def _state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    seen = set()
    total = 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for p in model.parameters():
        add(p)
        add(p.grad)
    for b in model.buffers():
        add(b)
    for st in optimizer.state.values():
        for v in st.values():
            add(v)
    return total


# ----------------------------------------------------------------------------------------------- machine


def _flag(mod, name: str) -> Optional[bool]:
    v = getattr(mod, name, None)
    try:
        return bool(v()) if callable(v) else (None if v is None else bool(v))
    except Exception:  # pragma: no cover
        return None


def _kernel_isa(mod) -> Optional[str]:
    fn = getattr(mod, "kernel_isa", None)
    return fn() if callable(fn) else None


def machine_info() -> Dict[str, Any]:
    """CPU, threads and versions, for reports."""
    from . import __version__, _C

    cpu = platform.processor() or ""
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip():  # the first processor's block is enough
                    break
    except OSError:
        pass
    if "model name" in fields:
        # "AMD EPYC" alone does not tell a Zen 3 from a Zen 4 (both are family 25; the model number differs)
        cpu = fields["model name"]
        if "cpu family" in fields and "model" in fields:
            cpu += f" (family {fields['cpu family']}, model {fields['model']})"
    try:
        avail = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        avail = os.cpu_count()
    return {
        "platform": platform.platform(), "machine": platform.machine(), "cpu": cpu,
        "cpu_count": os.cpu_count(), "cpus_available": avail, "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
        "sparsecore": __version__, "avx2": _flag(_C, "has_avx2"), "kernel_isa": _kernel_isa(_C),
        "openmp": _flag(_C, "has_openmp"),
    }


# ----------------------------------------------------------------------------------------------- checkpoints


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


def _write_text_atomic(text: str, path: Union[str, Path]) -> Path:
    """``text`` to ``path`` atomically (see :func:`_write_atomic`)."""
    return _write_atomic(path, "w", lambda f: f.write(text))


def load_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a checkpoint written by :func:`train` (a pickle: only load files you trust)."""
    path = Path(path)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise TrainError(f"cannot read checkpoint {str(path)!r}: {type(e).__name__}: {e}") from e
    if not isinstance(ck, dict) or ck.get("format") != _CKPT_FORMAT:
        raise TrainError(f"{str(path)!r} is not a sparsecore training checkpoint")
    if ck.get("version") != _CKPT_VERSION:
        raise TrainError(f"checkpoint {str(path)!r} has version {ck.get('version')}, expected {_CKPT_VERSION}")
    return ck


def _rng_state(data_gen: torch.Generator) -> Dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
            "python": random.getstate(), "data": data_gen.get_state()}


def _set_rng_state(st: Dict[str, Any], data_gen: torch.Generator) -> None:
    torch.set_rng_state(st["torch"])
    kind, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    random.setstate(st["python"])
    data_gen.set_state(st["data"])


# ----------------------------------------------------------------------------------------------- progress


class _Progress:
    """A plain-text progress bar on stderr: redrawn in place on a terminal, one line per epoch otherwise."""

    def __init__(self, enabled: bool, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last = 0.0

    def update(self, epoch: int, epochs: int, i: int, n: int, loss: float) -> None:
        if not self.tty:
            return
        now = time.perf_counter()
        if i < n and now - self._last < 0.1:
            return
        self._last = now
        w = 30
        done = int(w * i / max(n, 1))
        self.stream.write(f"\repoch {epoch}/{epochs} [{'#' * done}{'.' * (w - done)}] {i}/{n} loss {loss:.4f}")
        self.stream.flush()

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()


# ----------------------------------------------------------------------------------------------- training


def _load_data(c: TrainConfig):
    from . import data as data_mod

    try:
        ds = data_mod.load_dataset(c.dataset, c.data_dir, val_fraction=c.val_fraction, seed=c.seed)
    except (ValueError, TypeError, OSError, EOFError, KeyError, IndexError, NotImplementedError) as e:
        raise TrainError(f"dataset {c.dataset!r}: {e}") from e
    except Exception as e:  # e.g. zlib.error or a reader's own error type on a corrupt file
        raise TrainError(f"dataset {c.dataset!r} could not be read: {type(e).__name__}: {e}") from e
    problems = []
    if ds.n_train == 0:
        problems.append("no training samples")
    if ds.n_test == 0:
        problems.append("no test samples")
    if ds.n_classes < 2:
        problems.append(f"{ds.n_classes} class(es)")
    for part in ("train", "val", "test"):
        x, y = getattr(ds, "x_" + part), getattr(ds, "y_" + part)
        if x.dim() != 2 or x.shape[1] != ds.n_features or x.shape[0] != y.shape[0]:
            problems.append(f"{part} features of shape {tuple(x.shape)} do not match {y.shape[0]} labels x "
                            f"{ds.n_features} features")
        elif x.numel() and not torch.isfinite(x).all():
            problems.append(f"non-finite {part} features")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= ds.n_classes):
            problems.append(f"{part} labels outside 0..{ds.n_classes - 1}")
    if problems:
        raise TrainError(f"dataset {c.dataset!r} is unusable: " + "; ".join(problems))
    return ds


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int) -> Optional[float]:
    if y.numel() == 0:
        return None
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], bs):
        correct += int((model(x[i:i + bs]).argmax(1) == y[i:i + bs]).sum())
    model.train(was)
    return correct / y.numel()


def train(config: Union[TrainConfig, Dict[str, Any]]) -> Dict[str, Any]:
    """Train ``config.method`` on ``config.dataset``; returns the report (also written to ``config.json``).

    Raises :class:`TrainError` (a ``ValueError``) for bad settings, bad data or an unusable checkpoint.
    """
    c = TrainConfig(**config) if isinstance(config, dict) else dataclasses.replace(config)
    c = _check_config(c)
    progress = _Progress(not c.quiet)
    if c.threads is not None:
        torch.set_num_threads(c.threads)

    random.seed(c.seed)
    np.random.seed(c.seed % 2**32)
    torch.manual_seed(c.seed)
    ds = _load_data(c)

    _release_free_memory()
    peak_reset = _reset_peak_rss()
    rss_start = _rss_mb()
    try:
        model = build_model(c.method, ds.n_features, ds.n_classes, c.hidden, input_shape=ds.input_shape,
                            epsilon=c.epsilon, density=c.density, seed=c.seed, **c.model_options)
    except (ValueError, TypeError) as e:
        raise TrainError(f"method {c.method!r}: {e}") from e
    nnz_initial = model_stats(model)["nnz"]
    optimizer = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum, nesterov=c.nesterov,
                                weight_decay=c.weight_decay)
    data_gen = torch.Generator().manual_seed(c.seed + 0x5EED)
    from .data import batches

    loader = batches(ds.x_train, ds.y_train, c.batch_size, shuffle=True, generator=data_gen)
    steps_per_epoch = len(loader)
    try:
        updater = make_updater(c.method, model, optimizer, epochs=c.epochs, steps_per_epoch=steps_per_epoch,
                               seed=c.seed, **c.dst_options)
    except (ValueError, TypeError) as e:
        raise TrainError(f"method {c.method!r}: {e}") from e

    state: Dict[str, Any] = {"epoch": 0, "best_val": None, "best_epoch": None, "test_at_best": None,
                             "history": [], "epoch_seconds": [], "eval_seconds": [], "resumed_from": []}
    ckpt_path = Path(c.checkpoint) / CHECKPOINT_NAME if c.checkpoint else None
    if c.resume and ckpt_path is not None:
        if ckpt_path.is_file():
            ck = load_checkpoint(ckpt_path)
            if ck["fingerprint"] != c.fingerprint():
                diff = sorted(k for k in set(ck["fingerprint"]) | set(c.fingerprint())
                              if ck["fingerprint"].get(k) != c.fingerprint().get(k))
                raise TrainError(f"checkpoint {str(ckpt_path)!r} was written with different settings "
                                 f"({', '.join(diff)}): resume with the same ones, or start a new run without --resume")
            try:
                model.load_state_dict(ck["model"])
                optimizer.load_state_dict(ck["optimizer"])
                if updater is not None:
                    updater.load_state_dict(ck["updater"])
            except (RuntimeError, KeyError, ValueError) as e:
                raise TrainError(f"checkpoint {str(ckpt_path)!r} does not fit this model: {e}") from e
            _set_rng_state(ck["rng"], data_gen)
            state = ck["state"]
            state["resumed_from"] = state.get("resumed_from", []) + [state["epoch"]]
            if ck.get("threads") != torch.get_num_threads():
                progress.line(f"note: checkpoint written with {ck.get('threads')} threads, now "
                              f"{torch.get_num_threads()}: the result may differ in the last bits")
            progress.line(f"resumed from {ckpt_path} after epoch {state['epoch']}")
        else:
            progress.line(f"no checkpoint at {ckpt_path}: starting from scratch")

    stats0 = model_stats(model)
    progress.line(f"{c.method}: {ds.name} train/val/test {ds.n_train}/{ds.n_val}/{ds.n_test}, widths "
                  f"{model.widths}, nnz {stats0['nnz']} of {stats0['dense_params']} (density "
                  f"{stats0['density']:.4g}), {torch.get_num_threads()} threads")

    model.train()
    for epoch in range(state["epoch"], c.epochs):
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        for i, (xb, yb) in enumerate(loader):
            optimizer.zero_grad(set_to_none=True)
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            loss.backward()
            optimizer.step()
            if updater is not None:
                updater.step()
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise FloatingPointError(f"the loss became {lv} at epoch {epoch + 1}, step {i + 1}: lower the lr")
            loss_sum += lv * yb.shape[0]
            correct += int((out.detach().argmax(1) == yb).sum())
            seen += yb.shape[0]
            progress.update(epoch + 1, c.epochs, i + 1, steps_per_epoch, loss_sum / seen)
        train_s = time.perf_counter() - t0

        t1 = time.perf_counter()
        val_acc = _accuracy(model, ds.x_val, ds.y_val, c.eval_batch_size)
        test_acc = _accuracy(model, ds.x_test, ds.y_test, c.eval_batch_size)
        eval_s = time.perf_counter() - t1
        nnz_now = model_stats(model)["nnz"]

        improved = (val_acc is not None and (state["best_val"] is None or val_acc > state["best_val"])) or \
            (val_acc is None)
        if improved:
            state["best_val"], state["best_epoch"], state["test_at_best"] = val_acc, epoch + 1, test_acc

        t2 = time.perf_counter()
        if updater is not None:        # the updater skips the rewiring after the last epoch itself
            if val_acc is not None:
                updater.report_validation(val_acc)
            updater.epoch_end()
        dst_s = time.perf_counter() - t2

        state["epoch"] = epoch + 1
        state["epoch_seconds"].append(train_s + dst_s)
        state["eval_seconds"].append(eval_s)
        state["history"].append({"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
                                 "train_accuracy": correct / max(seen, 1), "val_accuracy": val_acc,
                                 "test_accuracy": test_acc, "nnz": nnz_now, "train_seconds": train_s,
                                 "topology_seconds": dst_s, "eval_seconds": eval_s})
        vtxt = "-" if val_acc is None else f"{val_acc:.4f}"
        progress.line(f"epoch {epoch + 1}/{c.epochs}  loss {loss_sum / max(seen, 1):.4f}  train "
                      f"{correct / max(seen, 1):.4f}  val {vtxt}  test {test_acc:.4f}  nnz {nnz_now}  "
                      f"{train_s + dst_s:.2f} s")
        if ckpt_path is not None:
            save_checkpoint_atomic({
                "format": _CKPT_FORMAT, "version": _CKPT_VERSION, "fingerprint": c.fingerprint(),
                "config": c.to_dict(), "threads": torch.get_num_threads(),
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "updater": updater.state_dict() if updater is not None else None,
                "state": state, "rng": _rng_state(data_gen),
            }, ckpt_path)
        if c.stop_after_epoch is not None and epoch + 1 == c.stop_after_epoch and epoch + 1 < c.epochs:
            # testing hook: die like a killed job, right after the checkpoint (no cleanup, no atexit)
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    stats = model_stats(model)
    hist = state["history"]
    report: Dict[str, Any] = {
        "method": c.method,
        "dataset": ds.name,
        "test_accuracy": state["test_at_best"],
        "best_epoch": state["best_epoch"],
        "best_val_accuracy": state["best_val"],
        "selection": "best validation accuracy" if ds.n_val else "last epoch (no validation set)",
        "final_test_accuracy": hist[-1]["test_accuracy"] if hist else None,
        "final_val_accuracy": hist[-1]["val_accuracy"] if hist else None,
        "epochs": c.epochs,
        "epoch_seconds": state["epoch_seconds"],
        "mean_epoch_seconds": (sum(state["epoch_seconds"]) / len(state["epoch_seconds"])
                               if state["epoch_seconds"] else None),
        "eval_seconds": state["eval_seconds"],
        "epoch_seconds_note": "training steps + topology update per epoch; evaluation and checkpoints excluded",
        "nnz": stats["nnz"],
        "nnz_initial": nnz_initial,
        "dense_params": stats["dense_params"],
        "density": stats["density"],
        "n_params": stats["n_params"],
        "layers": stats["layers"],
        "model_info": _jsonable(getattr(model, "info", {})),
        "peak_memory_mb": _peak_rss_mb(),
        "peak_memory_delta_mb": (_peak_rss_mb() - rss_start) if (peak_reset and rss_start is not None) else None,
        "peak_memory_how": ("peak RSS (VmHWM) since a reset after data loading, before the model was built"
                            if peak_reset else "peak RSS of the whole process (getrusage ru_maxrss)"),
        "state_memory_mb": _state_bytes(model, optimizer) / 2**20,
        "state_memory_how": "bytes of parameters, gradients, optimizer state and buffers after training",
        "topology_updates": None if updater is None else int(updater.n_updates),
        "updater": None if updater is None else repr(updater),
        "history": hist,
        "resumed_from_epochs": state.get("resumed_from", []),
        "steps_per_epoch": steps_per_epoch,
        "args": c.to_dict(),
        "split": {"n_train": ds.n_train, "n_val": ds.n_val, "n_test": ds.n_test, "n_features": ds.n_features,
                  "n_classes": ds.n_classes, "input_shape": list(ds.input_shape),
                  **_jsonable(dict(ds.split_info))},
        "machine": machine_info(),
        "checkpoint": str(ckpt_path) if ckpt_path is not None else None,
    }
    if c.json:
        _write_text_atomic(json.dumps(report, indent=2) + "\n", c.json)
    if not c.quiet:
        acc = report["test_accuracy"]
        acc_txt = "n/a (0 epochs)" if acc is None else f"{acc:.4f}"
        print(f"{c.method}: test accuracy {acc_txt} at epoch {report['best_epoch']} (best validation), "
              f"nnz {stats['nnz']} / {stats['dense_params']} (density {stats['density']:.4g}), "
              f"{report['mean_epoch_seconds'] or 0:.3f} s/epoch" + (f"; report: {c.json}" if c.json else ""))
    return report


# ----------------------------------------------------------------------------------------------- command line


def _int_at_least(minimum: int):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        return v
    return parse


def _float_range(lo: float, hi: Optional[float] = None, lo_open: bool = False):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if not math.isfinite(v) or v < lo or (lo_open and v == lo) or (hi is not None and v > hi):
            rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}{']' if hi is not None else ')'}"
            raise argparse.ArgumentTypeError(f"must be in {rng}, got {s}")
        return v
    return parse


def parse_hidden(s: str) -> Tuple[int, ...]:
    """``"1000,1000,1000"`` -> ``(1000, 1000, 1000)`` (argparse type)."""
    parts = [p.strip() for p in str(s).split(",")]
    try:
        widths = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints like 1000,1000,1000, "
                                         f"got {s!r}") from None
    if not widths or any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"hidden widths must be positive, got {s!r}")
    return widths


def _option_value(s: str):
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    if "," in s:
        return tuple(_option_value(p) for p in s.split(","))
    return s


def _key_value(s: str) -> Tuple[str, Any]:
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    k, v = s.split("=", 1)
    k = k.strip().replace("-", "_")
    if not k.isidentifier():
        raise argparse.ArgumentTypeError(f"bad option name {k!r}")
    return k, _option_value(v.strip())


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``sparsecore train`` and ``sparsecore bench e2e``."""
    p.add_argument("--dataset", default="builtin",
                   help="builtin (bundled 16x16 shapes), fashion-mnist, mnist, mat:NAME, csv:PATH")
    p.add_argument("--data-dir", default=None, help="folder with the dataset files (None: $SPARSECORE_DATA, "
                                                     "./data, shared/data)")
    p.add_argument("--hidden", type=parse_hidden, default=(1000, 1000, 1000),
                   help="hidden widths, comma-separated, e.g. 1000,1000,1000")
    p.add_argument("--batch-size", type=_int_at_least(1), default=100, help="mini-batch size")
    p.add_argument("--lr", type=_float_range(0.0, lo_open=True), default=0.01, help="SGD learning rate")
    p.add_argument("--momentum", type=_float_range(0.0), default=0.9,
                   help="SGD momentum (Nesterov unless --no-nesterov)")
    p.add_argument("--no-nesterov", action="store_true", help="plain momentum instead of Nesterov")
    p.add_argument("--weight-decay", type=_float_range(0.0), default=1e-4, help="L2 weight decay")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, model and data order")
    p.add_argument("--val-fraction", type=_float_range(0.0, 0.99), default=0.1,
                   help="fraction of the training set held out for validation")
    p.add_argument("--threads", type=_int_at_least(1), default=None,
                   help="torch / kernel threads (None: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sparsecore train",
        description="Train one sparse-training method's MLP on one dataset (see docs/METHODS.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", required=True, choices=METHODS, help="the method")
    p.add_argument("--epochs", type=_int_at_least(0), default=10, help="training epochs")
    add_common_arguments(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epsilon", type=_float_range(0.0, lo_open=True), default=None,
                   help="ER parameter: epsilon*(in+out) connections per layer (set, static, ctre, rigl, tsm deep)")
    g.add_argument("--density", type=_float_range(0.0, 1.0, lo_open=True), default=None,
                   help="density: rigl ERK overall, etsm target overall, uniform layers otherwise")
    p.add_argument("--opt", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="model option, e.g. fan_out=2, deep=er, groups=8, links=2, init=he (repeatable)")
    p.add_argument("--dst", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="topology-updater option, e.g. zeta=0.5, every=50 (repeatable)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the report here")
    p.add_argument("--checkpoint", default=None, metavar="DIR", help="write DIR/checkpoint.pt after every epoch")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt (needs --checkpoint)")
    p.add_argument("--eval-batch-size", type=_int_at_least(1), default=1000, help=argparse.SUPPRESS)
    p.add_argument("--stop-after-epoch", type=_int_at_least(1), default=None, help=argparse.SUPPRESS)
    return p


def check_common_arguments(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """The checks of the options of :func:`add_common_arguments` that argparse cannot make alone."""
    if a.data_dir is not None and not Path(a.data_dir).is_dir():
        p.error(f"--data-dir {a.data_dir!r} does not exist or is not a folder")
    if a.momentum == 0 and not a.no_nesterov:
        p.error("Nesterov momentum needs --momentum > 0 (or --no-nesterov)")


def common_config(a: argparse.Namespace) -> dict:
    """TrainConfig fields of the options of :func:`add_common_arguments` (plus epochs)."""
    return dict(dataset=a.dataset, data_dir=a.data_dir, epochs=a.epochs, hidden=tuple(a.hidden),
                batch_size=a.batch_size, lr=a.lr, momentum=a.momentum, nesterov=not a.no_nesterov,
                weight_decay=a.weight_decay, seed=a.seed, val_fraction=a.val_fraction, threads=a.threads)


def config_from_args(a: argparse.Namespace, **overrides) -> TrainConfig:
    kw = dict(common_config(a), method=a.method, quiet=a.quiet)
    for k in ("epsilon", "density", "json", "checkpoint", "resume", "eval_batch_size", "stop_after_epoch"):
        if hasattr(a, k):
            kw[k] = getattr(a, k)
    if hasattr(a, "opt"):
        kw["model_options"] = dict(a.opt)
    if hasattr(a, "dst"):
        kw["dst_options"] = dict(a.dst)
    kw.update(overrides)
    return TrainConfig(**kw)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = build_parser()
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if a.resume and not a.checkpoint:
        p.error("--resume needs --checkpoint DIR")
    check_common_arguments(p, a)
    try:
        train(config_from_args(a))
    except TrainError as e:
        print(f"sparsecore train: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"sparsecore train: diverged: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sparsecore train: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
