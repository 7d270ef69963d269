"""Sparse transformers against dense: ``sparsecore lm`` for dense, then static/SET/RigL at each density, one text.

    python bench/lm_compare.py --data input.txt [--steps 300] [--densities 0.1,0.05] [--methods static,set,rigl]
                               [--block-sizes 1,32]
        [--threads 2] [--eval-every 50] [--out bench/results/lm] [--sample 200] [model/optimizer options of lm]

1. Dense trains ``--steps N``; its training seconds are ``T`` (evaluation excluded).
2. Each sparse method and density trains **once**, with ``--time-budget T`` (equal time), validated every
   ``--eval-every`` steps (which must divide N). Its "val loss at equal steps" is the history's entry at step N of
   that same run. Why one run: it halves the cost. Caveat: the rewiring schedule stops at 75% of the steps the run
   estimates for T (see ``sparsecore.apps.lm.train``), not of N, so this is the loss at step N of a run scheduled
   for T seconds. A sparse run that does not reach N steps in T (slower than dense) gets a second run with
   ``--steps N`` for that column, which the table marks with ``*``.

Every run is its own process (``python -m sparsecore lm``: its peak RSS is its own) with the same hyperparameters,
seed and ``--threads``. Writes, under ``--out``: ``lm_compare.json`` (every report, the rows, the command),
``lm_compare.md`` (the table, the command line, the samples), ``lm_compare.png`` (val loss vs training seconds;
skipped with a message without matplotlib). The machine may be shared and noisy: compare numbers of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
# options handed unchanged to every `sparsecore lm` run: (flag, type, default)
PASS = [("--batch-size", int, 32), ("--context", int, 128), ("--layers", int, 4), ("--d-model", int, 256),
        ("--heads", int, 4), ("--lr", float, 1e-3), ("--weight-decay", float, 0.1), ("--seed", int, 0),
        ("--distribution", str, "uniform"), ("--eval-batches", int, 10), ("--update-every", int, 100)]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, metavar="FILE")
    p.add_argument("--steps", type=int, default=300, help="dense steps N (equal-steps column)")
    p.add_argument("--densities", default="0.1,0.05")
    p.add_argument("--methods", default="static,set,rigl")
    p.add_argument("--block-sizes", default="1", help="comma-separated: 1 = single connections, B > 1 = BSR blocks")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=50, help="must divide --steps")
    p.add_argument("--sample", type=int, default=200, help="characters sampled from each trained model")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "lm"))
    for flag, typ, default in PASS:
        p.add_argument(flag, type=typ, default=default)
    a = p.parse_args(argv)
    if a.steps < 1 or a.eval_every < 1 or a.steps % a.eval_every:
        p.error(f"--eval-every {a.eval_every} must be >= 1 and divide --steps {a.steps}")
    try:
        a.density_list = [float(d) for d in a.densities.split(",")]
    except ValueError:
        p.error(f"--densities must be comma-separated numbers, got {a.densities!r}")
    if any(not 0 < d <= 1 for d in a.density_list):
        p.error(f"densities must be in (0, 1], got {a.densities}")
    try:
        a.block_list = [int(b) for b in a.block_sizes.split(",")]
    except ValueError:
        p.error(f"--block-sizes must be comma-separated integers, got {a.block_sizes!r}")
    if any(b < 1 for b in a.block_list):
        p.error(f"block sizes must be >= 1, got {a.block_sizes}")
    a.method_list = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in a.method_list if m not in ("static", "set", "rigl")]
    if bad:
        p.error(f"--methods: unknown {bad} (static, set, rigl)")
    return a


def lm(a: argparse.Namespace, tmp: Path, name: str, extra: List[str]) -> Dict[str, Any]:
    """One ``sparsecore lm`` run in its own process; its report."""
    out = tmp / f"{name}.json"
    cmd = [sys.executable, "-m", "sparsecore", "lm", "--data", a.data, "--threads", str(a.threads),
           "--eval-every", str(a.eval_every), "--sample", str(a.sample), "--json", str(out), "--quiet"]
    for flag, _, _ in PASS:
        cmd += [flag, str(getattr(a, flag[2:].replace("-", "_")))]
    cmd += extra
    print(f"[lm_compare] {name}: {' '.join(shlex.quote(c) for c in cmd[1:])}", file=sys.stderr, flush=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"lm_compare: run {name} failed (exit {p.returncode}): {p.stderr.strip()[-2000:]}")
    return json.loads(out.read_text())


def at_step(report: Dict[str, Any], step: int) -> Optional[float]:
    for h in report["history"]:
        if h["step"] == step:
            return h["val_loss"]
    return None


def plot(runs: Dict[str, Dict[str, Any]], path: Path) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[lm_compare] matplotlib is not importable: no plot", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in runs.items():
        h = r["history"]
        ax.plot([x["train_seconds"] for x in h], [x["val_loss"] for x in h], marker=".",
                label=name, linewidth=2 if name == "dense" else 1)
    ax.set_xlabel("training seconds (evaluation excluded)")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title("character-level GPT: sparse projections vs dense")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def main(argv=None) -> int:
    a = parse(argv)
    command = "python " + " ".join(shlex.quote(x) for x in ["bench/lm_compare.py", *(sys.argv[1:] if argv is None
                                                                                        else argv)])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs: Dict[str, Dict[str, Any]] = {}
    rows = []
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        dense = runs["dense"] = lm(a, tmp, "dense", ["--method", "dense", "--steps", str(a.steps)])
        t_budget = dense["train_seconds"]
        dense_ms = dense["step_seconds"] * 1e3
        rows.append(dict(method="dense", density=1.0, block_size=1, step_ms=dense_ms, speedup=1.0,
                         tokens_per_second=dense["tokens_per_second"], val_equal_steps=dense["val_loss"],
                         equal_steps_rerun=False, val_equal_time=dense["val_loss"], steps_in_time=dense["steps"],
                         peak_rss_mb=dense["peak_rss_mb"], nnz=dense["nnz"]))
        for d in a.density_list:
            for bs in a.block_list:
                for m in a.method_list:
                    name = f"{m}@{d:g}" + (f"/bsr{bs}" if bs > 1 else "")
                    common = ["--method", m, "--density", str(d), "--block-size", str(bs)]
                    r = runs[name] = lm(a, tmp, name.replace("/", "-"), common + ["--time-budget", repr(t_budget)])
                    v_steps, rerun = at_step(r, a.steps), False
                    if v_steps is None:  # fewer than N steps in T: equal steps needs its own run
                        r2 = runs[name + " (steps)"] = lm(a, tmp, name.replace("/", "-") + "-steps",
                                                          common + ["--steps", str(a.steps)])
                        v_steps, rerun = r2["val_loss"], True
                    ms = r["step_seconds"] * 1e3
                    rows.append(dict(method=m, density=d, block_size=bs, step_ms=ms, speedup=dense_ms / ms,
                                     tokens_per_second=r["tokens_per_second"], val_equal_steps=v_steps,
                                     equal_steps_rerun=rerun, val_equal_time=r["val_loss"], steps_in_time=r["steps"],
                                     peak_rss_mb=r["peak_rss_mb"], nnz=r["nnz"]))

    png = plot(runs, out / "lm_compare.png")
    md = [f"# sparsecore lm: sparse vs dense character-level GPT", "",
          f"Command: `{command}`", "",
          f"Text: `{a.data}` (vocab {dense['vocab_size']}); model {a.layers} layers x d_model {a.d_model}, "
          f"{a.heads} heads, context {a.context}, batch {a.batch_size}, lr {a.lr}, seed {a.seed}, "
          f"{a.threads} threads, {a.distribution} densities; dense: {a.steps} steps in T = {t_budget:.4g} s. "
          f"Projections: {dense['dense_params']:,} dense weights.", "",
          f"Equal steps: val loss at step {a.steps}, read from the equal-time run's history (`*`: that run did "
          f"not reach {a.steps} steps, so a separate `--steps {a.steps}` run). Equal time: val loss after T seconds "
          f"of training. Speed-up: dense median step time / this one.", "",
          "| method | density | blocks | nnz | step ms (median) | speed-up | tokens/s | val loss @ equal steps | "
          "val loss @ equal time (steps) | peak RSS MB |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        blocks = "-" if r["block_size"] == 1 else f"{r['block_size']}x{r['block_size']}"
        md.append(f"| {r['method']} | {r['density']:g} | {blocks} | {r['nnz']:,} | {r['step_ms']:.1f} | {r['speedup']:.2f}x | "
                  f"{r['tokens_per_second']:,.0f} | {r['val_equal_steps']:.4f}{'*' if r['equal_steps_rerun'] else ''}"
                  f" | {r['val_equal_time']:.4f} ({r['steps_in_time']}) | {r['peak_rss_mb']:.0f} |")
    md += ["", f"Plot: `{png}`" if png else "Plot: skipped (no matplotlib).", "", "## Samples", ""]
    for name, r in runs.items():
        if "sample" in r:
            md += [f"**{name}**", "", "```", r["sample"], "```", ""]
    md += [f"Machine: {dense['machine'].get('cpu')}, torch {dense['machine'].get('torch')}, "
           f"kernels {dense['machine'].get('kernel_isa')}."]
    (out / "lm_compare.md").write_text("\n".join(md) + "\n")
    (out / "lm_compare.json").write_text(json.dumps({"command": command, "dense_train_seconds": t_budget,
                                                     "rows": rows, "reports": runs}, indent=2) + "\n")
    print("\n".join(md))
    print(f"[lm_compare] wrote {out / 'lm_compare.md'}, {out / 'lm_compare.json'}" +
          (f", {png}" if png else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
