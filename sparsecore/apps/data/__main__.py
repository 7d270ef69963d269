"""``python -m sparsecore.apps.data make-builtin | info NAME``: regenerate the bundled set, or load one and print its
split record."""
from __future__ import annotations

from typing import Optional, Sequence

from . import BUILTIN_PATH, load_dataset, write_builtin


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse
    import json
    import time

    p = argparse.ArgumentParser(prog="python -m sparsecore.apps.data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-builtin", help="regenerate the bundled shapes16.npz")
    mk.add_argument("--out", default=None, help=f"output path (default {BUILTIN_PATH})")
    info = sub.add_parser("info", help="load a dataset and print its split_info as JSON")
    info.add_argument("name")
    info.add_argument("--data-dir", default=None)
    info.add_argument("--val-fraction", type=float, default=0.1)
    info.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.cmd == "make-builtin":
        out = write_builtin(a.out)
        print(f"wrote {out} ({out.stat().st_size} bytes)")
    else:
        t = time.perf_counter()
        ds = load_dataset(a.name, a.data_dir, val_fraction=a.val_fraction, seed=a.seed)
        print(repr(ds))
        print(f"loaded in {time.perf_counter() - t:.2f} s")
        print(json.dumps(ds.split_info, indent=1, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
