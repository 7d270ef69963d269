"""Command line: ``sparsecore bench``, ``sparsecore bench e2e``, ``sparsecore train`` and ``sparsecore lm`` (also ``python -m sparsecore``).

Each subcommand lives in its own module; this file only routes to them.
"""
from __future__ import annotations

import sys
from typing import List, Optional

USAGE = """usage: sparsecore <command> [options]

commands:
  bench        kernel benchmark: one training step of a sparse linear layer vs dense, torch.sparse, ...
  bench e2e    end-to-end: train each method and the dense MLP, table + plot
  train        train one method on one dataset
  lm           character-level GPT with SparseLinear projections (dense|static|set|rigl) on a text file

Run 'sparsecore <command> --help' for the options of a command."""


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "bench" and rest[:1] == ["e2e"]:
        from .e2e import main as run
        return run(rest[1:]) or 0
    if cmd == "bench":
        from .bench_kernels import main as run
        return run(rest) or 0
    if cmd == "train":
        from .train import main as run
        return run(rest) or 0
    if cmd == "lm":
        from .lm import main as run
        return run(rest) or 0
    print(f"sparsecore: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
