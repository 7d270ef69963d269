"""The settings of one training run (:class:`TrainConfig`), their checks, and :class:`TrainError`."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from ..models import METHODS

__all__ = ["TrainConfig", "TrainError", "check_config", "jsonable"]


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
    normalize: str = "auto"
    shuffle: bool = True                      # reshuffle the training set every epoch (False: one fixed order)
    drop_last: bool = False                   # drop the last, smaller training batch of an epoch
    decay_biases: bool = True                 # False: weight decay on the weights only (CTRE's reference L2)
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
    time_budget: Optional[float] = None      # stop once this many training seconds (steps + updates) are spent
    stop_after_epoch: Optional[int] = None   # testing: SIGKILL itself right after this epoch's checkpoint
    dist_timeout: float = 300.0              # data parallelism: seconds any collective may wait for the other ranks

    # the settings that shape the result: a checkpoint must match them to be resumed
    _RESULT_FIELDS = ("method", "dataset", "epochs", "hidden", "batch_size", "lr", "momentum", "nesterov",
                      "weight_decay", "seed", "val_fraction", "normalize", "shuffle", "drop_last", "decay_biases", "epsilon", "density", "model_options", "dst_options",
                      "time_budget")

    # fields added later: left out of the fingerprint at their defaults, so older checkpoints still resume
    _LATER_DEFAULTS = {"shuffle": True, "drop_last": False, "decay_biases": True}

    def fingerprint(self) -> Dict[str, Any]:
        return json.loads(json.dumps({k: jsonable(getattr(self, k)) for k in self._RESULT_FIELDS
                                      if not (k in self._LATER_DEFAULTS and getattr(self, k) == self._LATER_DEFAULTS[k])}))

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


def jsonable(v):
    if isinstance(v, tuple):
        return [jsonable(x) for x in v]
    if isinstance(v, list):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, Path):
        return str(v)
    return repr(v)


def check_config(c: TrainConfig) -> TrainConfig:
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
    if isinstance(c.dist_timeout, bool) or not isinstance(c.dist_timeout, (int, float)) or \
            not math.isfinite(c.dist_timeout) or c.dist_timeout <= 0:
        raise TrainError(f"dist_timeout must be a positive number of seconds, got {c.dist_timeout!r}")
    if c.time_budget is not None and (isinstance(c.time_budget, bool) or not isinstance(c.time_budget, (int, float))
                                      or not math.isfinite(c.time_budget) or c.time_budget <= 0):
        raise TrainError(f"time_budget must be a positive number of seconds, got {c.time_budget!r}")
    return c
