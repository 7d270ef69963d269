"""The training loop of ``sparsecore train``: :func:`train` takes a :class:`TrainConfig` and returns the report.

See :mod:`sparsecore.apps.train` for what the loop does, what the report holds and how checkpoints resume.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..models import build_model, make_updater, model_stats
from .checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_NAME, CHECKPOINT_VERSION, check_writable, load_checkpoint,
                         remove_stale_temporaries, restore_training_state, rng_state, save_checkpoint_atomic,
                         write_text_atomic)
from .config import TrainConfig, TrainError, check_config, jsonable
from .dist import DistEnv, DistributedError, setup as setup_distributed
from .report import machine_info, peak_rss_mb, release_free_memory, reset_peak_rss, rss_mb, state_bytes

__all__ = ["train"]


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




def _load_data(c: TrainConfig):
    from .. import data as data_mod

    try:
        ds = data_mod.load_dataset(c.dataset, c.data_dir, val_fraction=c.val_fraction, seed=c.seed,
                                    normalize=c.normalize)
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
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int,
              de: Optional[DistEnv] = None) -> Optional[float]:
    """Accuracy on (x, y); with several ranks each counts its contiguous share and the counts are summed, so every
    rank gets the same number (the ctre_seq phase and the best-epoch choice depend on it)."""
    if y.numel() == 0:
        return None
    if de is not None:
        lo, hi = _share(y.numel(), de)
        x, y_part = x[lo:hi], y[lo:hi]
    else:
        y_part = y
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], bs):
        correct += int((model(x[i:i + bs]).argmax(1) == y_part[i:i + bs]).sum())
    model.train(was)
    if de is not None:
        correct = int(de.comm.all_reduce_(torch.tensor([correct], dtype=torch.int64)).item())
    return correct / y.numel()


def make_sgd(params, c: TrainConfig) -> torch.optim.SGD:
    """The run's SGD, fused (one kernel per parameter; a step over a 4.5%-sparse MLP's parameters took 55 us
    against 220 us for the foreach implementation, 1 thread) where this torch and device offer it."""
    kw = dict(lr=c.lr, momentum=c.momentum, nesterov=c.nesterov, weight_decay=c.weight_decay)
    if isinstance(params, torch.nn.Module):
        named = list(params.named_parameters())
        params = [p for _, p in named]
        if not getattr(c, "decay_biases", True) and c.weight_decay:
            # L2 on the weights only (CTRE's reference: TF weights_regularizer, none on the biases)
            is_bias = [n.rsplit(".", 1)[-1] == "bias" for n, _ in named]
            params = [{"params": [p for p, b in zip(params, is_bias) if not b]},
                      {"params": [p for p, b in zip(params, is_bias) if b], "weight_decay": 0.0}]
    else:
        params = list(params)
        if not getattr(c, "decay_biases", True):
            raise TrainError("decay_biases=False needs make_sgd(model, ...) to tell the biases apart")
    try:
        return torch.optim.SGD(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):  # an older torch, or a device without the fused kernel
        return torch.optim.SGD(params, **kw)


def _share(n: int, de: DistEnv):
    """[lo, hi) of this rank's contiguous share of n items (sizes differ by at most one)."""
    base, extra = divmod(n, de.world)
    lo = de.rank * base + min(de.rank, extra)
    return lo, lo + base + (1 if de.rank < extra else 0)


_COMM_ERRORS = ("connection closed", "connection reset", "connection refused", "timed out", "timeout",
                "broken pipe", "gloo", "nccl", "socket", "peer")


def _is_comm_error(e: BaseException) -> bool:
    """Whether an exception raised under torch.distributed comes from a collective (a lost peer, a timeout)."""
    import torch.distributed as dist

    dist_error = getattr(dist, "DistError", None)  # DistBackendError, DistNetworkError, ... (torch >= 2.1)
    if dist_error is not None and isinstance(e, dist_error):
        return True
    msg = str(e).lower()
    return any(k in msg for k in _COMM_ERRORS)


def _load_rank_local(updater, ck: Dict[str, Any], de: Optional[DistEnv], progress: _Progress) -> None:
    """The rank-local part of the updater's state (CTRE/G2G activation statistics) from a checkpoint written by
    ``world_size`` ranks: each rank takes its own; across another number of ranks only empty statistics can be."""
    saved = ck.get("updater_rank_local")
    world, rank = (1, 0) if de is None else (de.world, de.rank)
    was = ck.get("world_size", 1)
    if was != world:
        progress.line(f"note: checkpoint written by {was} rank(s), now {world}: the result may differ in the last "
                      f"bits")
    if updater is None or saved is None:
        return
    if was == world:
        updater.load_rank_local_state(saved[rank])
        return
    if any(any(s is not None and s["n"] > 0 for s in st["stats"]) for st in saved):
        raise TrainError(f"the checkpoint holds activation statistics gathered on each of {was} ranks (it was written "
                         f"between an update's recording steps): resume it on {was} ranks")
    updater.load_rank_local_state(saved[0])


def train(config: Union[TrainConfig, Dict[str, Any]]) -> Dict[str, Any]:
    """Train ``config.method`` on ``config.dataset``; returns the report (also written to ``config.json``).

    Raises :class:`TrainError` (a ``ValueError``) for bad settings, bad data or an unusable checkpoint. Under
    torch.distributed (a process group already initialised, or ``WORLD_SIZE`` > 1 in the environment: see
    :mod:`.dist`) every rank trains its share of each global batch; rank 0 writes the report and the checkpoints.
    A failed collective (another rank died or stopped) raises :class:`~.dist.DistributedError`.
    """
    c = TrainConfig(**config) if isinstance(config, dict) else dataclasses.replace(config)
    c = check_config(c)
    de = setup_distributed(c.dist_timeout)
    broken = False  # a collective failed: the group is not torn down (below)
    try:
        return _train(c, de)
    except TrainError:
        raise
    except RuntimeError as e:
        if de is not None and _is_comm_error(e):
            broken = True
            err = DistributedError(f"rank {de.rank} of {de.world}: a collective failed (another rank died or "
                                   f"stopped, or the connection was lost): {type(e).__name__}: "
                                   f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}")
            # True when train() made the group and left it open: cli.main then leaves without the interpreter's
            # teardown. A group the caller made is the caller's.
            err.group_left_open = de.owns_group
            raise err from e
        raise
    finally:
        # Destroying a group whose peer died can abort this process in gloo's threads ("terminate called without
        # an active exception", seen here after a killed rank): the command then exits without tearing it down
        # (cli.main). A healthy group is torn down, after success or an error of this rank's own.
        if de is not None and not broken:
            de.close()


def _train(c: TrainConfig, de: Optional[DistEnv]) -> Dict[str, Any]:
    main = de is None or de.is_main  # writes the report and the checkpoints, prints the progress
    if de is not None and c.batch_size < de.world:
        raise TrainError(f"batch_size {c.batch_size} is the global batch: it must be at least the number of ranks "
                         f"({de.world})")
    # Fail now, not after hours of training, when the outputs cannot be written.
    if c.checkpoint and main:
        check_writable(c.checkpoint, folder=True)
        remove_stale_temporaries(Path(c.checkpoint) / CHECKPOINT_NAME)
    if c.json and main:
        check_writable(c.json, folder=False)
        remove_stale_temporaries(c.json)
    progress = _Progress(not c.quiet and main)
    if c.threads is not None:
        torch.set_num_threads(c.threads)

    random.seed(c.seed)
    np.random.seed(c.seed % 2**32)
    torch.manual_seed(c.seed)
    ds = _load_data(c)

    release_free_memory()
    peak_reset = reset_peak_rss()
    rss_start = rss_mb()
    try:
        model = build_model(c.method, ds.n_features, ds.n_classes, c.hidden, input_shape=ds.input_shape,
                            epsilon=c.epsilon, density=c.density, seed=c.seed, **c.model_options)
    except (ValueError, TypeError) as e:
        raise TrainError(f"method {c.method!r}: {e}") from e
    nnz_initial = model_stats(model)["nnz"]
    optimizer = make_sgd(model, c)
    data_gen = torch.Generator().manual_seed(c.seed + 0x5EED)
    from ..data import batches

    loader = batches(ds.x_train, ds.y_train, c.batch_size, shuffle=c.shuffle, generator=data_gen,
                     drop_last=c.drop_last, shard=None if de is None else (de.rank, de.world))
    if len(loader) == 0:
        raise TrainError(f"no training batch: {ds.n_train} training samples with batch_size {c.batch_size} and "
                         f"drop_last")
    steps_per_epoch = len(loader)
    try:
        updater = make_updater(c.method, model, optimizer, epochs=c.epochs, steps_per_epoch=steps_per_epoch,
                               seed=c.seed, **c.dst_options)
    except (ValueError, TypeError) as e:
        raise TrainError(f"method {c.method!r}: {e}") from e
    if updater is not None and updater.opts.get("stats") == "full":
        # CTRE's reference: the scores of an update come from a pass over the whole training set (the batches of an
        # epoch, without their labels), with the weights being rewired
        n_use = (ds.n_train // c.batch_size) * c.batch_size if c.drop_last else ds.n_train  # the reference's rows
        updater.stats_source = lambda: (ds.x_train[i:min(i + c.eval_batch_size, n_use)]
                                        for i in range(0, n_use, c.eval_batch_size))

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
            restore_training_state(ck, ckpt_path, model, optimizer, updater, data_gen)
            if de is not None or ck.get("world_size", 1) > 1:
                _load_rank_local(updater, ck, de, progress)
            state = ck["state"]
            state["resumed_from"] = state.get("resumed_from", []) + [state["epoch"]]
            if ck.get("threads") != torch.get_num_threads():
                progress.line(f"note: checkpoint written with {ck.get('threads')} threads, now "
                              f"{torch.get_num_threads()}: the result may differ in the last bits")
            progress.line(f"resumed from {ckpt_path} after epoch {state['epoch']}")
        else:
            progress.line(f"no checkpoint at {ckpt_path}: starting from scratch")

    net = model  # what the training step calls: the model, or its DDP wrapper
    if de is not None:
        from torch.nn.parallel import DistributedDataParallel

        from ...dst.distributed import exclude_pattern_buffers

        # Wrapped after the resume: DDP's reducer is built for the parameters as loaded (gradual pruning changes
        # their sizes). The updater, built on the module, finds the wrapper at its first forward.
        net = DistributedDataParallel(model)
        exclude_pattern_buffers(net)  # the updater keeps the patterns equal (and checks it); see docs/DISTRIBUTED.md
    stats0 = model_stats(model)
    progress.line(f"{c.method}: {ds.name} train/val/test {ds.n_train}/{ds.n_val}/{ds.n_test}, widths "
                  f"{model.widths}, nnz {stats0['nnz']} of {stats0['dense_params']} (density "
                  f"{stats0['density']:.4g}), {torch.get_num_threads()} threads" +
                  ("" if de is None else f" x {de.world} ranks ({de.backend}), global batch {c.batch_size}"))

    model.train()
    state.setdefault("train_seconds_total", sum(state["epoch_seconds"]))
    budget = c.time_budget
    stopped = False
    for epoch in range(state["epoch"], c.epochs):
        if stopped:
            break
        t0 = time.perf_counter()
        loss_sum, correct, seen, steps = 0.0, 0, 0, 0
        for i, (xb, yb) in enumerate(loader):
            optimizer.zero_grad(set_to_none=True)
            out = net(xb)
            if de is None:
                loss = F.cross_entropy(out, yb)
            else:  # DDP averages the ranks' gradients: this makes it the gradient of the global batch's mean loss
                global_b = min(c.batch_size, ds.n_train - i * c.batch_size)
                loss = F.cross_entropy(out, yb, reduction="sum") * (de.world / global_b)
            loss.backward()
            optimizer.step()
            if updater is not None:
                updater.step()
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise FloatingPointError(f"the loss became {lv} at epoch {epoch + 1}, step {i + 1}: lower the lr")
            loss_sum += lv * yb.shape[0] if de is None else lv * global_b / de.world  # (the shard's summed loss)
            correct += int((out.detach().argmax(1) == yb).sum())
            seen += yb.shape[0]
            steps = i + 1
            progress.update(epoch + 1, c.epochs, i + 1, steps_per_epoch, loss_sum / seen)
            if budget is not None:
                spent = state["train_seconds_total"] + time.perf_counter() - t0 >= budget
                if de is not None:  # every rank stops at the same step (rank clocks differ)
                    spent = de.comm.any(spent)
                if spent:
                    stopped = True  # the time is spent: evaluate the model as it is now, and stop
                    break
        if de is not None:  # the epoch's loss and accuracy over every rank's samples
            tot = de.comm.all_reduce_(torch.tensor([loss_sum, float(correct), float(seen)], dtype=torch.float64))
            loss_sum, correct, seen = float(tot[0]), int(tot[1]), int(tot[2])
        train_s = time.perf_counter() - t0

        t1 = time.perf_counter()
        val_acc = _accuracy(model, ds.x_val, ds.y_val, c.eval_batch_size, de)
        test_acc = _accuracy(model, ds.x_test, ds.y_test, c.eval_batch_size, de)
        eval_s = time.perf_counter() - t1
        nnz_now = model_stats(model)["nnz"]

        improved = (val_acc is not None and (state["best_val"] is None or val_acc > state["best_val"])) or \
            (val_acc is None)
        if improved:
            state["best_val"], state["best_epoch"], state["test_at_best"] = val_acc, epoch + 1, test_acc

        t2 = time.perf_counter()
        if updater is not None and not stopped:  # the updater skips the rewiring after the last epoch itself
            if val_acc is not None:
                updater.report_validation(val_acc)
            updater.epoch_end()
        dst_s = time.perf_counter() - t2

        state["epoch"] = epoch + 1
        if steps == steps_per_epoch:  # per-epoch times are of whole epochs; a budget's last partial one is not
            state["epoch_seconds"].append(train_s + dst_s)
        state["eval_seconds"].append(eval_s)
        state["train_seconds_total"] += train_s + dst_s
        state["history"].append({"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
                                 "train_accuracy": correct / max(seen, 1), "val_accuracy": val_acc,
                                 "test_accuracy": test_acc, "nnz": nnz_now, "train_seconds": train_s,
                                 "topology_seconds": dst_s, "eval_seconds": eval_s,
                                 "cumulative_train_seconds": state["train_seconds_total"], "steps": steps,
                                 "partial": steps < steps_per_epoch})
        vtxt = "-" if val_acc is None else f"{val_acc:.4f}"
        progress.line(f"epoch {epoch + 1}/{c.epochs}  loss {loss_sum / max(seen, 1):.4f}  train "
                      f"{correct / max(seen, 1):.4f}  val {vtxt}  test {test_acc:.4f}  nnz {nnz_now}  "
                      f"{train_s + dst_s:.2f} s")
        if ckpt_path is not None:
            record = {
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "fingerprint": c.fingerprint(),
                "config": c.to_dict(), "threads": torch.get_num_threads(),
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "updater": updater.state_dict() if updater is not None else None,
                "state": state, "rng": rng_state(data_gen),
            }
            if de is not None:
                record["world_size"] = de.world
                if updater is not None and updater.method in ("ctre", "g2g"):
                    # activation statistics are each rank's own (usually empty at an epoch's end: just after an update)
                    record["updater_rank_local"] = de.comm.gather_object(updater.rank_local_state())
            if main:
                save_checkpoint_atomic(record, ckpt_path)
            if de is not None:
                de.comm.barrier()  # the checkpoint of this epoch exists before any rank goes on
        if c.stop_after_epoch is not None and epoch + 1 == c.stop_after_epoch and epoch + 1 < c.epochs \
                and (de is None or de.rank == de.world - 1):
            # testing hook: die like a killed job, right after the checkpoint (no cleanup, no atexit); with several
            # ranks only the last one dies, and the others must stop with a clear error
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
        "epochs_run": len(hist),
        "time_budget": c.time_budget,
        "stopped_by_time_budget": bool(hist and hist[-1]["partial"]) or (c.time_budget is not None and
                                                                        len(hist) < c.epochs),
        "train_seconds_total": state["train_seconds_total"],
        "epoch_seconds": state["epoch_seconds"],
        "mean_epoch_seconds": (sum(state["epoch_seconds"]) / len(state["epoch_seconds"])
                               if state["epoch_seconds"] else None),
        "eval_seconds": state["eval_seconds"],
        "epoch_seconds_note": "training steps + topology update per whole epoch; evaluation and checkpoints excluded; "
                              "history[].cumulative_train_seconds is the running total of the same time",
        "nnz": stats["nnz"],
        "nnz_initial": nnz_initial,
        "dense_params": stats["dense_params"],
        "density": stats["density"],
        "n_params": stats["n_params"],
        "layers": stats["layers"],
        "model_info": jsonable(getattr(model, "info", {})),
        "peak_memory_mb": peak_rss_mb(),
        "peak_memory_delta_mb": (peak_rss_mb() - rss_start) if (peak_reset and rss_start is not None) else None,
        "peak_memory_how": ("peak RSS (VmHWM) since a reset after data loading, before the model was built"
                            if peak_reset else "peak RSS of the whole process (getrusage ru_maxrss)"),
        "state_memory_mb": state_bytes(model, optimizer) / 2**20,
        "state_memory_how": "bytes of parameters, gradients, optimizer state and buffers after training",
        "topology_updates": None if updater is None else int(updater.n_updates),
        "updater": None if updater is None else repr(updater),
        "history": hist,
        "resumed_from_epochs": state.get("resumed_from", []),
        "steps_per_epoch": steps_per_epoch,
        "args": c.to_dict(),
        "split": {"n_train": ds.n_train, "n_val": ds.n_val, "n_test": ds.n_test, "n_features": ds.n_features,
                  "n_classes": ds.n_classes, "input_shape": list(ds.input_shape),
                  **jsonable(dict(ds.split_info))},
        "machine": machine_info(),
        "checkpoint": str(ckpt_path) if ckpt_path is not None else None,
        "distributed": None if de is None else {
            "world_size": de.world, "backend": de.backend, "global_batch_size": c.batch_size,
            "batch_size_per_rank": [c.batch_size // de.world + (1 if r < c.batch_size % de.world else 0)
                                    for r in range(de.world)],
            "how": "--batch-size is the global batch; each rank takes its contiguous share of every batch of the "
                   "seeded order; gradients are averaged by DDP; accuracies and losses are over every rank's "
                   "samples; peak memory and machine are rank 0's",
            "updater_costs": None if updater is None else updater.costs,
        },
    }
    if c.json and main:
        write_text_atomic(json.dumps(report, indent=2) + "\n", c.json)
    if not c.quiet and main:
        acc = report["test_accuracy"]
        acc_txt = "n/a (0 epochs)" if acc is None else f"{acc:.4f}"
        print(f"{c.method}: test accuracy {acc_txt} at epoch {report['best_epoch']} (best validation), "
              f"nnz {stats['nnz']} / {stats['dense_params']} (density {stats['density']:.4g}), "
              f"{report['mean_epoch_seconds'] or 0:.3f} s/epoch" + (f"; report: {c.json}" if c.json else ""))
    return report
