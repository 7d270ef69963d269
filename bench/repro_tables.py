"""Markdown tables of docs/REPRODUCTION.md from the JSONs under bench/results/repro/.

    PYTHONPATH=. python bench/repro_tables.py [--dir bench/results/repro] [--plots]

* every ``NAME/`` made by ``sparsecore bench e2e --protocol P --seeds N --out .../NAME``: one table per run, mean +-
  sample std over the seeds of the test accuracy at the best validation epoch, and of the last epoch's; from
  ``NAME/summary.json``, or, when the run was cut short before writing it, aggregated here from the
  ``NAME/seed_S/results.json`` (or ``.json.gz``, as committed) that exist (said in the table's title);
* ``ablation-*/LABEL-seedS.json`` (``sparsecore train`` reports): one row per LABEL;
* ``audit-stats-*.json`` (bench/repro_audit.py): the overlap of the cosine picks per layer.

``--plots`` (re)draws ``NAME/curves.png`` (mean validation/test accuracy per epoch) for every run (needs matplotlib).
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
from pathlib import Path

from sparsecore.apps.e2e import aggregate, plot_curves


def _pm(d) -> str:
    return "-" if d["mean"] is None else f"{100 * d['mean']:.2f} ± {100 * d['std']:.2f}"


def _read_json(p: Path):
    if p.suffix == ".gz":
        with gzip.open(p, "rt") as f:
            return json.load(f)
    return json.loads(p.read_text())


def load_run(d: Path):
    """(rows, title note, summary or None) of one e2e run folder."""
    s = d / "summary.json"
    if s.is_file():
        summ = json.loads(s.read_text())
        return summ["table"], "", summ
    seeds = sorted(d.glob("seed_*/results.json")) or sorted(d.glob("seed_*/results.json.gz"))
    if not seeds:
        return None, "", None
    per = [_read_json(p) for p in seeds]
    return aggregate(per), f" (cut short: {len(per)} finished seed(s), aggregated from seed_*/results.json)", None


def run_table(name: str, rows, note: str, summ) -> str:
    dense = next((r for r in rows if r["method"] == "dense"), None)
    ep = rows[0]["epochs"]
    head = f"**{name}**{note}: {ep} epochs, n = {rows[0]['n']} seed(s)"
    if summ is not None and summ.get("command"):
        head += f"; `{summ['command']}`"
    out = [head, "", "| method | density | test acc % (best val) | final test acc % | vs dense (pts) | s/epoch |",
           "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        vs = "-"
        if dense is not None and r is not dense and r["test_accuracy"]["mean"] is not None:
            vs = f"{100 * (r['test_accuracy']['mean'] - dense['test_accuracy']['mean']):+.2f}"
        out.append(f"| {r['method']} | {r['density']:.4f} | {_pm(r['test_accuracy'])} | "
                   f"{_pm(r['final_test_accuracy'])} | {vs} | {r['median_epoch_seconds']:.3f} |")
    return "\n".join(out)


def ablation_table(d: Path) -> str:
    groups = {}
    for p in sorted(list(d.glob("*-seed*.json")) + list(d.glob("*-seed*.json.gz"))):
        label = p.name.rsplit("-seed", 1)[0]
        groups.setdefault(label, []).append(_read_json(p))
    out = [f"**{d.name}** (sparsecore train reports, CTRE protocol settings)", "",
           "| variant | n | test acc % (best val) | final test acc % |", "|---|---:|---:|---:|"]
    for label, reps in groups.items():
        acc = [r["test_accuracy"] for r in reps]
        fin = [r["final_test_accuracy"] for r in reps]
        ms = lambda xs: {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}
        out.append(f"| {label} | {len(reps)} | {_pm(ms(acc))} | {_pm(ms(fin))} |")
    return "\n".join(out)


def audit_table(p: Path) -> str:
    a = json.loads(p.read_text())
    out = [f"**{p.stem}**: {a['dataset']}, {a['n_train']} training rows, after {a['epochs_trained']} epochs, "
           f"window/reservoir of {a['max_samples']} rows", "",
           "| layer | shape (out x in) | k regrown | full vs full (other tie-break) | full vs window | "
           "full vs reservoir | window vs reservoir |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in a["layers"]:
        out.append(f"| {r['layer']} | {r['shape'][0]} x {r['shape'][1]} | {r['k']} | "
                   f"{r['overlap_full_full_other_tiebreak']:.3f} | {r['overlap_full_window']:.3f} | "
                   f"{r['overlap_full_reservoir']:.3f} | {r['overlap_window_reservoir']:.3f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="markdown tables from bench/results/repro")
    ap.add_argument("--dir", default="bench/results/repro")
    ap.add_argument("--plots", action="store_true", help="(re)draw NAME/curves.png for every run")
    a = ap.parse_args(argv)
    root = Path(a.dir)
    if not root.is_dir():
        print(f"repro_tables: no folder {root}", file=sys.stderr)
        return 2
    parts = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if d.name.startswith("ablation-"):
            parts.append(ablation_table(d))
            continue
        rows, note, summ = load_run(d)
        if rows is None:
            continue
        parts.append(run_table(d.name, rows, note, summ))
        if a.plots:
            plot_curves(rows, d / "curves.png", f"{d.name}: {rows[0]['n']} seed(s)")
    for p in sorted(root.glob("audit-*.json")):
        parts.append(audit_table(p))
    print("\n\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
