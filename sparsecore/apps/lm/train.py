"""The training loop of ``sparsecore lm``: :func:`train_lm` takes an :class:`LMConfig` and returns the report.

Training: AdamW (weight decay on the projection and head weights only, not on biases, LayerNorms or embeddings),
constant learning rate, gradient norm clipped at ``grad_clip``, cross-entropy of the next character. The DST methods
rewire through :class:`sparsecore.dst.Updater`, which remaps the AdamW state of every kept weight and gives new ones
zero state; ``Updater.step()`` runs after every ``optimizer.step()``. Every ``update_every`` steps while
``step < 0.75 * total_steps``: RigL (its own schedule: cosine-annealed prune fraction 0.3, regrowth by dense-gradient
magnitude, new weights 0) and SET (prune 0.3 by magnitude, random regrowth, new weights **0** rather than SET's
N(0, 0.1): noise injected into a transformer's residual stream at every rewiring hurts it). SET's Updater has no stop
fraction, so it runs its per-epoch schedule with an "epoch" of ``update_every`` steps and ``ceil(0.75 * total_steps /
update_every)`` epochs, whose last one it skips: the same rewiring steps as RigL's rule.

``total_steps`` is ``--steps``; with ``--time-budget`` it is estimated before training, from the median time of 5
steps (after 1 warm-up step) of a throw-away copy of the model and optimizer (not counted as training time; the
estimate is kept in the checkpoint, so a resumed run keeps its schedule, and reported as ``total_steps_estimate``).

Time: ``train_seconds`` counts the training steps (batch, forward, backward, clipping, optimizer, rewiring); never
evaluation, sampling or checkpoints. ``--time-budget`` stops at the first step that brings it to the budget.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from ...dst import Updater
from ...nn import SparseLinear
from ..train.checkpoint import (CHECKPOINT_NAME, check_writable, load_checkpoint, remove_stale_temporaries,
                                restore_training_state, rng_state, save_checkpoint_atomic, write_text_atomic)
from ..train.config import TrainError, jsonable
from ..train.report import machine_info, peak_rss_mb, release_free_memory, reset_peak_rss
from .data import CharData, load_text
from .model import GPT, layer_densities

__all__ = ["LMConfig", "train_lm", "METHODS", "STOP_FRACTION"]

METHODS = ("dense", "static", "set", "rigl")
STOP_FRACTION = 0.75  # rewiring stops at this fraction of the steps (RigL's default, applied to SET as well)
_CALIBRATION_STEPS = 5


@dataclass
class LMConfig:
    """Everything :func:`train_lm` needs; field names match the command-line options."""

    data: str
    method: str
    density: Optional[float] = None        # sparse methods: overall density of the projections (default 0.1)
    distribution: str = "uniform"          # "uniform" | "erk"
    block_size: int = 1                    # sparse methods: 1 = CSR connections, > 1 = BSR blocks of this size
    steps: Optional[int] = None            # exactly one of steps and time_budget
    time_budget: Optional[float] = None
    batch_size: int = 32
    context: int = 128
    layers: int = 4
    d_model: int = 256
    heads: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    threads: Optional[int] = None
    update_every: int = 100
    eval_every: int = 100
    eval_batches: int = 10
    sample: int = 0
    json: Optional[str] = None
    checkpoint: Optional[str] = None
    resume: bool = False
    quiet: bool = False
    stop_after: Optional[int] = None       # testing: stop (with a checkpoint) after this many steps

    # the settings that shape the result: a checkpoint must match them to be resumed
    _RESULT_FIELDS = ("data", "method", "density", "distribution", "steps", "time_budget", "batch_size", "context",
                      "layers", "d_model", "heads", "lr", "weight_decay", "grad_clip", "seed", "update_every",
                      "eval_every", "eval_batches")

    def fingerprint(self) -> Dict[str, Any]:
        fp = {k: jsonable(getattr(self, k)) for k in self._RESULT_FIELDS}
        if self.block_size != 1:  # only then: checkpoints written before the option existed still match
            fp["block_size"] = self.block_size
        return fp

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


def check_config(c: LMConfig) -> LMConfig:
    """Every setting checked before anything runs (:class:`TrainError` naming the bad one)."""
    def posint(name, v, minimum=1):
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise TrainError(f"{name} must be an int >= {minimum}, got {v!r}")

    def number(name, v, lo, lo_open=False):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo or \
                (lo_open and v == lo):
            raise TrainError(f"{name} must be a finite number {'>' if lo_open else '>='} {lo}, got {v!r}")

    if c.method not in METHODS:
        raise TrainError(f"unknown method {c.method!r}: expected one of {', '.join(METHODS)}")
    if c.method == "dense":
        if c.density is not None:
            raise TrainError("--density is for the sparse methods (static, set, rigl), not --method dense")
    else:
        if c.density is None:
            c.density = 0.1
        number("density", c.density, 0.0, lo_open=True)
        if c.density > 1:
            raise TrainError(f"density must be in (0, 1], got {c.density!r}")
    posint("block_size", c.block_size)
    if c.method == "dense" and c.block_size != 1:
        raise TrainError("--block-size is for the sparse methods (static, set, rigl), not --method dense")
    if c.d_model % c.block_size:
        raise TrainError(f"--d-model {c.d_model} must be a multiple of --block-size {c.block_size}")
    if c.distribution not in ("uniform", "erk"):
        raise TrainError(f"distribution must be 'uniform' or 'erk', got {c.distribution!r}")
    if (c.steps is None) == (c.time_budget is None):
        raise TrainError("give exactly one of --steps N and --time-budget SECONDS")
    if c.steps is not None:
        posint("steps", c.steps)
    else:
        number("time_budget", c.time_budget, 0.0, lo_open=True)
    for name in ("batch_size", "context", "layers", "d_model", "heads", "update_every", "eval_every",
                 "eval_batches"):
        posint(name, getattr(c, name))
    posint("sample", c.sample, 0)
    if c.threads is not None:
        posint("threads", c.threads)
    if c.stop_after is not None:
        posint("stop_after", c.stop_after)
    if c.d_model % c.heads:
        raise TrainError(f"--d-model {c.d_model} must be divisible by --heads {c.heads}")
    number("lr", c.lr, 0.0, lo_open=True)
    number("weight_decay", c.weight_decay, 0.0)
    number("grad_clip", c.grad_clip, 0.0)
    if isinstance(c.seed, bool) or not isinstance(c.seed, int):
        raise TrainError(f"seed must be an int, got {c.seed!r}")
    if c.resume and not c.checkpoint:
        raise TrainError("--resume needs --checkpoint DIR")
    return c


def make_optimizer(model: GPT, c: LMConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the weights of the projections and the head only."""
    decay = [m.values if isinstance(m, SparseLinear) else m.weight for m in model.projections()] + [model.head.weight]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=c.lr, betas=(0.9, 0.99))


def make_updater(c: LMConfig, model: GPT, optimizer, total_steps: int) -> Optional[Updater]:
    """The method's Updater (None for dense; static gets one too, which never rewires, for uniform bookkeeping)."""
    if c.method == "dense":
        return None
    if c.method == "static":
        return Updater(model, optimizer, method="static", seed=c.seed)
    if c.method == "rigl":
        return Updater(model, optimizer, method="rigl", every=c.update_every, total_steps=total_steps,
                       seed=c.seed, stop_fraction=STOP_FRACTION)
    # SET: see the module docstring (no stop fraction of its own: per-epoch schedule with epochs of update_every)
    epochs = max(1, math.ceil(STOP_FRACTION * total_steps / c.update_every))
    return Updater(model, optimizer, method="set", per_epoch=True, steps_per_epoch=c.update_every,
                   total_epochs=epochs, seed=c.seed, init="zero")


def _train_step(model: GPT, optimizer, data: CharData, c: LMConfig, gen: torch.Generator) -> torch.Tensor:
    x, y = data.batch("train", c.batch_size, gen)
    logits = model(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if c.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
    optimizer.step()
    return loss.detach()


def estimate_total_steps(model: GPT, optimizer, data: CharData, c: LMConfig) -> int:
    """Steps that fit the time budget: the budget over the median time of a few steps of a throw-away copy."""
    m, opt = copy.deepcopy((model, optimizer))  # one deepcopy keeps the optimizer pointing at the copy's parameters
    gen = torch.Generator().manual_seed(c.seed + 0xCA1)
    times = []
    for i in range(_CALIBRATION_STEPS + 1):
        t0 = time.perf_counter()
        _train_step(m, opt, data, c, gen)
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t0)
    return max(1, int(c.time_budget / statistics.median(times)))


@torch.no_grad()
def evaluate(model: GPT, batches) -> float:
    """Mean cross-entropy (nats per character) over the fixed validation batches."""
    was = model.training
    model.eval()
    total = 0.0
    for x, y in batches:
        logits = model(x)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))
    model.train(was)
    return total / len(batches)


def layer_counts(model: GPT) -> Dict[str, int]:
    nnz = dense = 0
    for m in model.projections():
        n = m.out_features * m.in_features
        dense += n
        nnz += m.nnz if isinstance(m, SparseLinear) else n
    return {"nnz": nnz, "dense_params": dense, "params": sum(p.numel() for p in model.parameters())}


def _connections(model: GPT) -> List[Optional[torch.Tensor]]:
    """Per projection, the sorted flat indices ``row * in + col`` of its live connections, of its live blocks'
    positions in the block grid for BSR (None if dense)."""
    out = []
    for m in model.projections():
        if not isinstance(m, SparseLinear):
            out.append(None)
            continue
        p = m.pattern  # for BSR the entries are blocks: rows and columns of the block grid
        rows = torch.repeat_interleave(torch.arange(p.rowptr.numel() - 1), (p.rowptr[1:] - p.rowptr[:-1]).long())
        out.append(torch.sort(rows * (p.shape[1] // p.block_size) + p.col.long()).values)
    return out


def _rewired_fraction(before, after) -> Optional[float]:
    """Fraction of the initial connections of the sparse projections that are no longer live (0 for static)."""
    pairs = [(b, a) for b, a in zip(before, after) if b is not None]
    total = sum(len(b) for b, _ in pairs)
    if not total:
        return None
    return sum(int((~torch.isin(b, a)).sum()) for b, a in pairs) / total


def _say(c: LMConfig, text: str) -> None:
    if not c.quiet:
        print(text, file=sys.stderr, flush=True)


def train_lm(config: Union[LMConfig, Dict[str, Any]]) -> Dict[str, Any]:
    """Train ``config.method``'s GPT on ``config.data``; returns the report (also written to ``config.json``).

    Raises :class:`~sparsecore.apps.train.TrainError` for bad settings, data or checkpoints, before any training.
    """
    c = LMConfig(**config) if isinstance(config, dict) else dataclasses.replace(config)
    c = check_config(c)
    # everything that can be checked is checked before the first step: outputs, data, model
    ckpt_path = Path(c.checkpoint) / CHECKPOINT_NAME if c.checkpoint else None
    if ckpt_path is not None:
        check_writable(c.checkpoint, folder=True)
        remove_stale_temporaries(ckpt_path)
    if c.json:
        check_writable(c.json, folder=False)
        remove_stale_temporaries(c.json)
    data = CharData(load_text(c.data), c.context)
    if c.threads is not None:
        torch.set_num_threads(c.threads)
    random.seed(c.seed)
    np.random.seed(c.seed % 2**32)
    torch.manual_seed(c.seed)

    release_free_memory()
    reset_peak_rss()
    densities = None if c.method == "dense" else layer_densities(c.layers, c.d_model, c.density, c.distribution)
    model = GPT(data.vocab_size, c.context, c.layers, c.d_model, c.heads, densities,
                generator=torch.Generator().manual_seed(c.seed + 0x9A7), block_size=c.block_size)
    initial = _connections(model)  # before any checkpoint is loaded: the run's initial patterns (seeded)
    optimizer = make_optimizer(model, c)
    data_gen = torch.Generator().manual_seed(c.seed + 0x5EED)
    val = data.val_batches(c.eval_batches, c.batch_size, c.seed)

    state: Dict[str, Any] = {"step": 0, "train_seconds": 0.0, "step_seconds": [], "history": [],
                             "loss_sum": 0.0, "loss_n": 0, "total_steps": None, "resumed_at": []}
    ck = None
    if c.resume and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        if ck.get("kind") != "lm":
            raise TrainError(f"{str(ckpt_path)!r} is not a 'sparsecore lm' checkpoint")
        if ck["fingerprint"] != c.fingerprint():
            diff = sorted(k for k in set(c.fingerprint()) | set(ck["fingerprint"])
                          if ck["fingerprint"].get(k) != c.fingerprint().get(k))
            raise TrainError(f"checkpoint {str(ckpt_path)!r} was written with different settings ({', '.join(diff)}): "
                             "resume with the same ones, or start a new run without --resume")
        state = ck["state"]
    elif c.resume:
        _say(c, f"no checkpoint at {ckpt_path}: starting from scratch")

    if state["total_steps"] is None:
        state["total_steps"] = c.steps if c.steps is not None else (
            estimate_total_steps(model, optimizer, data, c) if c.method in ("set", "rigl") else None)
    updater = make_updater(c, model, optimizer, state["total_steps"] or 1)
    if ck is not None:
        restore_training_state(ck, ckpt_path, model, optimizer, updater, data_gen)
        state["resumed_at"].append(state["step"])
        if ck.get("threads") != torch.get_num_threads():
            _say(c, f"note: checkpoint written with {ck.get('threads')} threads, now {torch.get_num_threads()}: "
                    "the result may differ in the last bits")
        _say(c, f"resumed from {ckpt_path} at step {state['step']}")

    counts = layer_counts(model)
    goal = f"{c.steps} steps" if c.steps is not None else f"{c.time_budget:g} s" + (
        f" (~{state['total_steps']} steps for the schedule)" if state["total_steps"] else "")
    _say(c, f"lm {c.method}: vocab {data.vocab_size}, {len(data.train)}/{len(data.val)} train/val chars, "
            f"{c.layers}x{c.d_model} ({c.heads} heads), context {c.context}, batch {c.batch_size}, projections nnz "
            f"{counts['nnz']} of {counts['dense_params']}, {torch.get_num_threads()} threads, {goal}")

    def save() -> None:
        if ckpt_path is None:
            return
        save_checkpoint_atomic({"kind": "lm", "fingerprint": c.fingerprint(), "config": c.to_dict(),
                                "threads": torch.get_num_threads(), "model": model.state_dict(),
                                "optimizer": optimizer.state_dict(),
                                "updater": updater.state_dict() if updater is not None else None,
                                "state": state, "rng": rng_state(data_gen)}, ckpt_path)

    def record() -> None:
        vl = evaluate(model, val)
        tl = state["loss_sum"] / state["loss_n"] if state["loss_n"] else None
        state["history"].append({"step": state["step"], "train_seconds": state["train_seconds"], "train_loss": tl,
                                 "val_loss": vl})
        state["loss_sum"], state["loss_n"] = 0.0, 0
        recent = state["step_seconds"][-c.eval_every:]
        ms = f"  {1e3 * statistics.median(recent):.1f} ms/step" if recent else ""
        _say(c, f"step {state['step']}" + (f"/{c.steps}" if c.steps else "") +
                f"  train {'-' if tl is None else f'{tl:.4f}'}  val {vl:.4f}  {state['train_seconds']:.1f} s{ms}")

    def done() -> bool:
        if c.steps is not None:
            return state["step"] >= c.steps
        return state["train_seconds"] >= c.time_budget

    if not state["history"]:
        record()  # the loss before training: the curves start at train_seconds 0
    model.train()
    stopped_early = False
    while not done():
        t0 = time.perf_counter()
        loss = _train_step(model, optimizer, data, c, data_gen)
        if updater is not None:
            updater.step()
        dt = time.perf_counter() - t0
        lv = float(loss)
        if not math.isfinite(lv):
            raise FloatingPointError(f"the loss became {lv} at step {state['step'] + 1}: lower --lr")
        state["step"] += 1
        state["train_seconds"] += dt
        state["step_seconds"].append(dt)
        state["loss_sum"] += lv
        state["loss_n"] += 1
        if state["step"] % c.eval_every == 0 or done():
            record()
            save()
        if c.stop_after is not None and state["step"] >= c.stop_after and not done():
            save()
            stopped_early = True
            break

    hist = state["history"]
    steps_s = state["step_seconds"]
    med = statistics.median(steps_s) if steps_s else None
    report: Dict[str, Any] = {
        "method": c.method, "density": c.density if c.method != "dense" else 1.0, "distribution": c.distribution,
        "block_size": c.block_size,
        "val_loss": hist[-1]["val_loss"], "val_loss_unit": "nats per character (mean over the fixed validation "
                                                           "windows)",
        "train_loss": hist[-1]["train_loss"],
        "history": hist, "steps": state["step"], "train_seconds": state["train_seconds"],
        "step_seconds": med, "step_seconds_mean": (sum(steps_s) / len(steps_s)) if steps_s else None,
        "tokens_per_second": (state["step"] * c.batch_size * c.context / state["train_seconds"]
                              if state["train_seconds"] > 0 else None),
        "total_steps_schedule": state["total_steps"],
        "total_steps_estimate": state["total_steps"] if c.steps is None else None,
        "topology_updates": None if updater is None else int(updater.n_updates),
        "rewired_fraction": _rewired_fraction(initial, _connections(model)),
        **counts, "vocab_size": data.vocab_size,
        "layer_densities": [round(m.nnz / (m.out_features * m.in_features), 6) if isinstance(m, SparseLinear)
                            else 1.0 for m in model.projections()],
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_how": "peak RSS (VmHWM) since a reset after the text was loaded, before the model was built",
        "stopped_early": stopped_early, "resumed_at_steps": state["resumed_at"],
        "config": c.to_dict(), "machine": machine_info(),
        "timing_note": "train_seconds and step_seconds: batch, forward, backward, clip, optimizer and rewiring; "
                       "never evaluation, sampling or checkpoints",
    }
    if c.sample and not stopped_early:
        start = data.stoi.get("\n", int(data.val[0]))
        out = model.generate(torch.tensor([[start]]), c.sample, generator=torch.Generator().manual_seed(c.seed))
        report["sample"] = data.decode(out[0, 1:])
        if not c.quiet:
            print(report["sample"])
    if c.json:
        write_text_atomic(json.dumps(report, indent=2) + "\n", c.json)
    _say(c, f"lm {c.method}: val loss {report['val_loss']:.4f} nats/char after {state['step']} steps, "
            f"{state['train_seconds']:.1f} s, {1e3 * (med or 0):.1f} ms/step" +
            (f"; report: {c.json}" if c.json else ""))
    return report
