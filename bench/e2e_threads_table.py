"""One markdown table from ``sparsecore bench e2e`` runs of the same methods at different thread counts.

    python bench/e2e_threads_table.py bench/results/zen4/e2e-fmnist-1thread bench/results/zen4/e2e-fmnist-2thread

Each argument is an ``--out`` folder (its ``results.json``). Columns: density, and per run the test accuracy (the
sparse kernels give the same result at any thread count; dense GEMMs and the topology scores may round differently),
the median seconds per epoch and the speed-up against that run's own dense MLP (dense time / method time: each ratio
is taken within one run).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(folders) -> int:
    runs = [json.loads((Path(f) / "results.json").read_text()) for f in folders]
    head = ["method", "density"]
    for r in runs:
        t = r["settings"]["threads"]
        head += [f"test acc, {t} thr", f"s/epoch, {t} thr", f"speed-up, {t} thr"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_method = [{row["method"]: row for row in r["table"]} for r in runs]
    order = [row["method"] for row in runs[0]["table"]]
    for m in order:
        first = by_method[0][m]
        cells = [m, f"{first['density']:.4f}"]
        for rows in by_method:
            row = rows.get(m)
            cells += ["-"] * 3 if row is None else [f"{row['test_accuracy']:.4f}", f"{row['median_epoch_seconds']:.2f}",
                                                    f"{row['speedup_vs_dense']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
