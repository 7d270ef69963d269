"""``sparsecore train``'s command line, and the option parsers ``sparsecore bench e2e`` shares with it."""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

from ..models import METHODS
from ...dst.distributed import DivergenceError
from .config import TrainConfig, TrainError
from .dist import DistributedError, launch_local
from .loop import train

__all__ = ["main", "build_parser", "add_common_arguments", "check_common_arguments", "common_config",
           "config_from_args", "parse_hidden", "key_value"]


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


def key_value(s: str) -> Tuple[str, Any]:
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
    p.add_argument("--no-bias-decay", action="store_true",
                   help="weight decay on the weights only, not the biases (CTRE's reference L2)")
    p.add_argument("--no-shuffle", action="store_true",
                   help="one fixed training order (the seeded split's) every epoch, as CTRE's reference")
    p.add_argument("--drop-last", action="store_true", help="drop the last, smaller training batch of each epoch")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, model and data order")
    p.add_argument("--val-fraction", type=_float_range(0.0, 0.99), default=0.1,
                   help="fraction of the training set held out for validation")
    p.add_argument("--normalize", choices=("auto", "global", "feature", "minmax", "none"), default="auto",
                   help="input scaling fitted on the training part (auto: global for images, feature for tables)")
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
    p.add_argument("--opt", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="model option, e.g. fan_out=2, deep=er, groups=8, links=2, init=he (repeatable)")
    p.add_argument("--dst", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="topology-updater option, e.g. zeta=0.5, every=50 (repeatable)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the report here")
    p.add_argument("--checkpoint", default=None, metavar="DIR", help="write DIR/checkpoint.pt after every epoch")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt (needs --checkpoint)")
    p.add_argument("--time-budget", type=_float_range(0.0, lo_open=True), default=None, metavar="SECONDS",
                   help="stop once this many training seconds (steps + topology updates) are spent, at most --epochs")
    p.add_argument("--nproc", type=_int_at_least(1), default=None, metavar="N",
                   help="data-parallel training on N local processes (gloo on the CPU); under torchrun the ranks "
                        "come from RANK/WORLD_SIZE/LOCAL_RANK. --batch-size is the global batch, split over the ranks; "
                        "--threads is per rank (default: the CPUs divided among the ranks)")
    p.add_argument("--dist-timeout", type=_float_range(0.0, lo_open=True), default=300.0, metavar="SECONDS",
                   help="with several ranks: how long any rank waits for the others before it stops with an error")
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
                weight_decay=a.weight_decay, decay_biases=not a.no_bias_decay, shuffle=not a.no_shuffle,
                drop_last=a.drop_last, seed=a.seed, val_fraction=a.val_fraction, threads=a.threads,
                normalize=a.normalize)


def config_from_args(a: argparse.Namespace, **overrides) -> TrainConfig:
    kw = dict(common_config(a), method=a.method, quiet=a.quiet)
    for k in ("epsilon", "density", "json", "checkpoint", "resume", "eval_batch_size", "stop_after_epoch",
              "time_budget", "dist_timeout"):
        if hasattr(a, k):
            kw[k] = getattr(a, k)
    if hasattr(a, "opt"):
        kw["model_options"] = dict(a.opt)
    if hasattr(a, "dst"):
        kw["dst_options"] = dict(a.dst)
    kw.update(overrides)
    return TrainConfig(**kw)


def _rank_prefix() -> str:
    """``"rank R: "`` in a process of a data-parallel run (so the lines of several ranks can be told apart)."""
    world, rank = os.environ.get("WORLD_SIZE"), os.environ.get("RANK")
    return f"rank {rank}: " if world not in (None, "", "1") and rank is not None else ""


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = build_parser()
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if a.resume and not a.checkpoint:
        p.error("--resume needs --checkpoint DIR")
    check_common_arguments(p, a)
    env_world = os.environ.get("WORLD_SIZE")
    if a.nproc is not None and env_world is None:
        if a.nproc > 1:  # the launcher: start N ranks of this same command, each of which joins the group below
            if a.batch_size < a.nproc:
                p.error(f"--batch-size {a.batch_size} is the global batch: it must be at least --nproc {a.nproc}")
            return launch_local(list(sys.argv[1:] if argv is None else argv), a.nproc, threads=a.threads)
    elif a.nproc is not None and str(a.nproc) != env_world:
        p.error(f"--nproc {a.nproc} contradicts WORLD_SIZE={env_world} set by the launcher")
    who = _rank_prefix()
    try:
        train(config_from_args(a))
    except TrainError as e:
        print(f"sparsecore train: {who}error: {e}", file=sys.stderr)
        return 2
    except DistributedError as e:
        print(f"sparsecore train: stopped: {e}", file=sys.stderr)  # (the message names the rank)
        if e.group_left_open:
            # This command's group failed and was not torn down (train()): leave without the interpreter's
            # teardown, whose destruction of gloo's objects can abort the process (exit code 3 became SIGABRT).
            # A group the caller made is the caller's: then main() returns as usual.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(3)
        return 3
    except DivergenceError as e:
        print(f"sparsecore train: {who}ranks diverged: {e}", file=sys.stderr)
        return 3
    except FloatingPointError as e:
        print(f"sparsecore train: {who}diverged: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sparsecore train: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
