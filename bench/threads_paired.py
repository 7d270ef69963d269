"""Is a method's epoch slower at 2 threads than at 1? Both thread counts in one process, rounds interleaved.

    python bench/threads_paired.py --data-dir ../shared/data --methods set,ctre --run ctre-eps20:ctre:epsilon=20

`sparsecore bench e2e --threads T` runs each thread count in its own process, minutes apart, and this shared VM's
speed drifts by more than the difference being judged. Here every round trains each method for ``--epochs``
epochs at every thread count of ``--threads`` (1,2 by default) through :func:`sparsecore.apps.train.train`, one
after the other, and the table gives the median over rounds and epochs of the training seconds per epoch (steps and
topology updates, as ``bench e2e``'s ``s/epoch``) and their ratio to the first thread count's (> 1: slower).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

from sparsecore.apps.e2e import _parse_run
from sparsecore.apps.train import train


def parse_run(spec: str):
    """``LABEL:METHOD[:K=V;K=V...]``, parsed as ``sparsecore bench e2e --run`` parses it -> (label, train settings)."""
    parsed = _parse_run(spec)
    return parsed["label"], {k: v for k, v in parsed.items() if k != "label" and v not in (None, {})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=None, help="where the dataset's files are (not for the builtin set)")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--methods", default="set,ctre")
    ap.add_argument("--run", action="append", default=[], help="LABEL:METHOD[:K=V;K=V...], as bench e2e --run")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hidden", default=None, help="hidden widths, e.g. 1000,1000,1000 (default: train's)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    runs = [(m, dict(method=m)) for m in a.methods.split(",") if m] + [parse_run(s) for s in a.run]
    threads = [int(t) for t in a.threads.split(",")]
    common = dict(dataset=a.dataset, data_dir=a.data_dir, epochs=a.epochs, quiet=True)
    if a.hidden:
        common["hidden"] = tuple(int(h) for h in a.hidden.split(","))
    secs = {(name, t): [] for name, _ in runs for t in threads}
    for r in range(a.rounds):
        for name, settings in runs:
            for t in threads:
                out = train(dict(settings, threads=t, **common))
                secs[(name, t)] += out["epoch_seconds"]
                print(f"round {r + 1}/{a.rounds} {name} {t} thread(s): "
                      f"{' '.join(f'{s:.3f}' for s in out['epoch_seconds'])} s/epoch", file=sys.stderr)
    head = ["method"] + [f"s/epoch, {t} thr" for t in threads] + [f"{t} thr / {threads[0]} thr" for t in threads[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table = {}
    for name, _ in runs:
        med = {t: statistics.median(secs[(name, t)]) for t in threads}
        table[name] = {"median_epoch_seconds": med, "epoch_seconds": {t: secs[(name, t)] for t in threads}}
        lines.append("| " + " | ".join([name] + [f"{med[t]:.3f}" for t in threads]
                                       + [f"{med[t] / med[threads[0]]:.2f}" for t in threads[1:]]) + " |")
    print("\n".join(lines))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"settings": vars(a), "methods": table}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
