"""``sparsecore lm``'s command line."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..train.cli import _float_range, _int_at_least
from ..train.config import TrainError
from .train import METHODS, LMConfig, train_lm

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line (argparse would print the whole usage first), exit code 2
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sparsecore lm", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                description="Train a character-level GPT whose projections are SparseLinear (static, SET or RigL) "
                            "or nn.Linear (dense) on a text file (see docs/LM.md).")
    p.add_argument("--data", required=True, metavar="FILE", help="UTF-8 text: the first 90%% train, the last 10%% "
                                                                  "validate")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--density", type=_float_range(0.0, 1.0, lo_open=True), default=None,
                   help="overall density of the block projections (sparse methods; default 0.1)")
    p.add_argument("--distribution", choices=("uniform", "erk"), default="uniform",
                   help="per-projection densities: the same everywhere, or ERK")
    p.add_argument("--block-size", type=_int_at_least(1), default=1,
                   help="sparse methods: 1 for single connections (CSR); B > 1 for B x B blocks (BSR; d_model a "
                        "multiple of B), pruned and regrown as whole blocks")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--steps", type=_int_at_least(1), default=None, help="training steps")
    g.add_argument("--time-budget", type=_float_range(0.0, lo_open=True), default=None, metavar="SECONDS",
                   help="train until this many training seconds (evaluation excluded) are spent")
    p.add_argument("--batch-size", type=_int_at_least(1), default=32)
    p.add_argument("--context", type=_int_at_least(1), default=128, help="characters per window")
    p.add_argument("--layers", type=_int_at_least(1), default=4)
    p.add_argument("--d-model", type=_int_at_least(1), default=256)
    p.add_argument("--heads", type=_int_at_least(1), default=4)
    p.add_argument("--lr", type=_float_range(0.0, lo_open=True), default=1e-3, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=_float_range(0.0), default=0.1, help="AdamW decay (weights only)")
    p.add_argument("--grad-clip", type=_float_range(0.0), default=1.0, help="gradient norm clip (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_int_at_least(1), default=None, help="torch / kernel threads")
    p.add_argument("--update-every", type=_int_at_least(1), default=100, help="SET/RigL: steps between rewirings")
    p.add_argument("--eval-every", type=_int_at_least(1), default=100, help="steps between validations")
    p.add_argument("--eval-batches", type=_int_at_least(1), default=10, help="fixed validation batches")
    p.add_argument("--sample", type=_int_at_least(0), default=0, metavar="N",
                   help="print N characters sampled (seeded) from the trained model")
    p.add_argument("--json", default=None, metavar="OUT", help="write the report here")
    p.add_argument("--checkpoint", default=None, metavar="DIR", help="write DIR/checkpoint.pt at every validation")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--stop-after", type=_int_at_least(1), default=None, help=argparse.SUPPRESS)  # tests of resume
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        a = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # --help (0) or a bad option (2, message printed): an exit code, as for every error
        return int(e.code or 0)
    try:
        train_lm(LMConfig(**vars(a)))
    except TrainError as e:
        print(f"sparsecore lm: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"sparsecore lm: diverged: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sparsecore lm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
