"""``sparsecore bench e2e``: train every method's MLP and the dense MLP of the same widths on the same data, and
compare accuracy, training speed and memory, at equal epochs or at equal training time.

    sparsecore bench e2e                                   # builtin data, all methods, a few minutes on 2 cores
    sparsecore bench e2e --dataset fashion-mnist --data-dir shared/data --epochs 10 --out results/e2e
    sparsecore bench e2e ... --equal-time                  # every method gets the dense MLP's training time

Every method is trained in this process, one after the other, through :func:`sparsecore.apps.train.train` with the
same split, seed, batch size and optimizer (its report is kept whole in ``results.json``). A short warm-up run
first pays the one-time costs (lazy initialisation of torch and the kernels) so they do not land on the first
method. Per method the table shows:

* ``density`` / ``nnz``: live weights after training over the weights of the dense MLP (biases not counted);
* ``test acc``: test accuracy at the epoch of best validation accuracy;
* ``s/epoch``: the *median* over whole epochs of the training time of an epoch (steps plus topology updates,
  without evaluation), and ``speed-up``: the dense MLP's s/epoch over the method's (higher is faster; the one
  convention of every sparsecore table, JSON and plot);
* ``peak MB``: peak resident memory while the method trained minus the resident memory when it started (Linux
  ``VmHWM``, reset before each run; see :mod:`sparsecore.apps.train`), and ``state MB``: exact tensor bytes of
  parameters, gradients, optimizer state and topology buffers.

Equal time (``--time-budget SECONDS``, or ``--equal-time`` for the dense run's own training time): dense trains its
``--epochs``; every other method first times one epoch (a probe run, not counted), gets as many epochs as fit the
budget (so its schedules, e.g. RigL's and ETSM's, are planned for the run it gets, at most ``--max-epochs``), and
stops when the budget is spent. The table then shows each method's epochs and accuracy within that time.

Protocols (``--protocol ctre|g2g|tsm``, :mod:`sparsecore.apps.protocols`): the rows and shared settings of a seed
paper's comparison (CTRE's: per-epoch updates for every method, zeta 0.2, lr 0.01, batch 100, L2 on weights only,
epsilon 1, MinMax scaling, no shuffling, ...). An option given explicitly on the command line overrides the
protocol's value; ``--methods`` picks rows by label. ``--seeds N`` repeats the whole comparison for seeds
``--seed .. --seed + N - 1`` (split, model and data order) into ``--out/seed_S/`` and writes ``--out/summary.json``
(per row: mean, std and values of the test accuracy at the best validation epoch, of the final one, and the mean
per-epoch validation/test curves) and ``--out/curves.png``, and prints the mean +- std table.

Defaults: builtin data, widths 1000-1000-1000, 10 epochs, lr 0.05 (``sparsecore train`` keeps CTRE's 0.01, meant for
hundreds of epochs), one thread. One thread because on a shared 2-core machine multi-threaded (OpenMP) timings of
these small steps swung by 5 to 60 times whenever another process was running, while single-thread timings
stayed within a few percent; ``--threads N`` uses more. Timings of one run on a shared machine are noisy; the
ratios are taken in one run, in one process, with the machine and thread count recorded. ``results.json`` and
``e2e.png`` (accuracy and speed-up against density, and test accuracy against training time; needs matplotlib,
skipped with a note otherwise) go to ``--out`` (default ``e2e-results``).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .models import METHODS
from .protocols import protocol_names, resolve as resolve_protocol
from .train import TrainConfig, TrainError, machine_info, train, write_text_atomic
from .train.cli import add_common_arguments, check_common_arguments, common_config, key_value

__all__ = ["main", "run", "format_table", "plot"]

DEFAULT_METHODS = ("tsm", "etsm", "g2g", "ctre", "set", "rigl", "static", "dense")
DEFAULT_EPOCHS = 10
DEFAULT_LR = 0.05      # a short run; `sparsecore train` keeps CTRE's 0.01 (meant for hundreds of epochs)
DEFAULT_THREADS = 1    # steady timings on a shared machine (see the module docstring); --threads N for more


def _parse_methods(s: str) -> List[str]:
    names = [m.strip() for m in s.split(",") if m.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of methods")
    bad = [m for m in names if m not in METHODS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(bad)}: expected some of {', '.join(METHODS)}")
    seen: List[str] = []
    for m in names:
        if m not in seen:
            seen.append(m)
    return seen


def _parse_run(s: str) -> Dict[str, Any]:
    """``LABEL:METHOD[:K=V;K=V...]`` -> {"label", "method", "epsilon", "density", "model_options", "dst_options"}."""
    parts = s.split(":", 2)
    if len(parts) < 2 or not parts[0].strip() or not parts[1].strip():
        raise argparse.ArgumentTypeError(f"expected LABEL:METHOD[:K=V;K=V...], got {s!r}")
    label, method = parts[0].strip(), parts[1].strip()
    if method not in METHODS:
        raise argparse.ArgumentTypeError(f"unknown method {method!r} in {s!r}: expected one of {', '.join(METHODS)}")
    spec: Dict[str, Any] = {"label": label, "method": method, "epsilon": None, "density": None,
                            "model_options": {}, "dst_options": {}}
    for item in (parts[2].split(";") if len(parts) == 3 and parts[2].strip() else []):
        key, value = key_value(item.replace("dst.", "dst__", 1))
        if key in ("epsilon", "density"):
            spec[key] = value
        elif key.startswith("dst__"):
            spec["dst_options"][key[5:]] = value
        else:
            spec["model_options"][key] = value
    return spec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sparsecore bench e2e",
        description="Train each method and the dense MLP on the same data; print a table, write results.json "
                    "and a plot.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", type=_parse_methods, default=list(DEFAULT_METHODS),
                   help="comma-separated methods; dense is always added as the reference")
    p.add_argument("--run", type=_parse_run, action="append", default=[], metavar="LABEL:METHOD[:K=V;K=V...]",
                   help="an extra row: METHOD trained with options, shown as LABEL (repeatable). epsilon= and "
                        "density= set the densities, dst.KEY= an updater option, any other KEY= a model option; "
                        "e.g. ctre-eps1:ctre:epsilon=1 or g2g-90:g2g:groups=8;inner_density=0.8")
    p.add_argument("--epochs", type=lambda s: _positive(s, "epochs"), default=DEFAULT_EPOCHS,
                   help="epochs per method (equal time: the dense MLP's epochs)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="equal time: every method trains for this many seconds")
    g.add_argument("--equal-time", action="store_true", help="equal time: every method gets the dense run's time")
    p.add_argument("--max-epochs", type=lambda s: _positive(s, "max-epochs"), default=1000,
                   help="equal time: the most epochs a method is planned for")
    p.add_argument("--out", default="e2e-results", help="folder for results.json and e2e.png")
    add_common_arguments(p)
    p.add_argument("--no-plot", action="store_true", help="do not draw e2e.png")
    p.add_argument("--protocol", choices=protocol_names(), default=None,
                   help="a seed paper's comparison protocol (sparsecore/apps/protocols.py); explicit options win")
    p.add_argument("--seeds", type=lambda s: _positive(s, "seeds"), default=1,
                   help="repeat for seeds --seed .. --seed+N-1 and report mean +- std per method")
    p.set_defaults(lr=DEFAULT_LR, threads=DEFAULT_THREADS)
    return p


# command-line dests -> TrainConfig fields (for the protocol's overrides)
_DEST_TO_FIELD = {"no_nesterov": "nesterov", "no_bias_decay": "decay_biases", "no_shuffle": "shuffle"}


def explicit_fields(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Dict[str, Any]:
    """TrainConfig fields set by options given explicitly in ``argv`` (not by defaults), with their values."""
    q = copy.deepcopy(parser)
    for act in q._actions:
        act.default = argparse.SUPPRESS
    q._defaults = {}  # set_defaults(lr=..., threads=...) of the parser: not explicit
    given = vars(q.parse_args(list(argv)))
    full = vars(parser.parse_args(list(argv)))
    out: Dict[str, Any] = {}
    for dest in given:
        if dest in _DEST_TO_FIELD:
            out[_DEST_TO_FIELD[dest]] = not full[dest]
        elif dest in ("hidden",):
            out[dest] = tuple(full[dest])
        else:
            out[dest] = full[dest]
    return out


def _positive(s: str, name: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
    return v


def _summary(rep: Dict[str, Any], dense: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    secs = rep["epoch_seconds"]
    med = statistics.median(secs) if secs else float("nan")
    row = {
        "method": rep["method"], "density": rep["density"], "nnz": rep["nnz"], "nnz_initial": rep["nnz_initial"],
        "dense_params": rep["dense_params"], "test_accuracy": rep["test_accuracy"], "best_epoch": rep["best_epoch"],
        "final_test_accuracy": rep["final_test_accuracy"], "median_epoch_seconds": med,
        "mean_epoch_seconds": rep["mean_epoch_seconds"], "epochs_run": rep["epochs_run"],
        "train_seconds_total": rep["train_seconds_total"], "peak_memory_mb": rep["peak_memory_mb"],
        "peak_memory_delta_mb": rep["peak_memory_delta_mb"], "state_memory_mb": rep["state_memory_mb"],
        "time_to_accuracy": [(h["cumulative_train_seconds"], h["test_accuracy"]) for h in rep["history"]],
    }
    if dense is not None:
        dmed = statistics.median(dense["epoch_seconds"]) if dense["epoch_seconds"] else float("nan")
        row["speedup_vs_dense"] = dmed / med if med > 0 else None
        row["accuracy_minus_dense"] = (rep["test_accuracy"] - dense["test_accuracy"]
                                       if rep["test_accuracy"] is not None and dense["test_accuracy"] is not None
                                       else None)
    return row


def _table(head: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(x) for x in lines])


def _num(v, f: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, f)


def format_table(rows: Sequence[Dict[str, Any]], equal_time: bool = False) -> str:
    """The comparison table as fixed-width text (speed-up = dense s/epoch / the method's, higher is faster).
    With ``equal_time``: the epochs each method ran and its accuracy within the budget."""
    if equal_time:
        head = ("method", "density", "epochs", "train s", "test acc", "vs dense", "speed-up")
        lines = [(r["method"], f"{r['density']:.4f}", str(r["epochs_run"]), f"{r['train_seconds_total']:.1f}",
                  _num(r["test_accuracy"], ".4f"), _num(r.get("accuracy_minus_dense"), "+.4f"),
                  _num(r.get("speedup_vs_dense"), ".2f") + ("x" if r.get("speedup_vs_dense") else ""))
                 for r in rows]
        return _table(head, lines)
    head = ("method", "density", "nnz", "test acc", "s/epoch", "speed-up", "peak MB", "state MB")
    lines = [(r["method"], f"{r['density']:.4f}", f"{r['nnz']:,}", _num(r["test_accuracy"], ".4f"),
              f"{r['median_epoch_seconds']:.3f}",
              _num(r.get("speedup_vs_dense"), ".2f") + ("x" if r.get("speedup_vs_dense") else ""),
              _num(r.get("peak_memory_delta_mb"), ".1f"), f"{r['state_memory_mb']:.2f}") for r in rows]
    return _table(head, lines)


NO_MATPLOTLIB = "matplotlib is not installed: no plot (pip install matplotlib)"


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed (plots are optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(rows: Sequence[Dict[str, Any]], path: Path, title: str = "") -> Optional[str]:
    """Accuracy and speed-up against density (one point per method), and test accuracy against cumulative
    training time (one curve per method), to ``path`` (PNG). Returns a note instead of drawing when matplotlib
    is missing."""
    plt = _pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for k, r in enumerate(rows):
        d = max(r["density"], 1e-6)
        off = (4, 4 if k % 2 == 0 else -11)     # alternate label sides: methods of equal density overlap less
        color = f"C{k % 10}"
        if r["test_accuracy"] is not None:
            axes[0].scatter(d, r["test_accuracy"], color=color)
            axes[0].annotate(r["method"], (d, r["test_accuracy"]), textcoords="offset points", xytext=off)
        sp = r.get("speedup_vs_dense")
        if sp is not None:
            axes[1].scatter(d, sp, color=color)
            axes[1].annotate(r["method"], (d, sp), textcoords="offset points", xytext=off)
        pts = [(t, a) for t, a in r.get("time_to_accuracy", ()) if a is not None]
        if pts:
            axes[2].plot([0.0] + [t for t, _ in pts], [None] + [a for _, a in pts], marker=".", color=color,
                         label=r["method"], ls="--" if r["method"] == "dense" else "-")
    axes[0].set(xscale="log", xlabel="density (live weights / dense)", ylabel="test accuracy",
                title="accuracy vs density")
    axes[1].set(xscale="log", xlabel="density (live weights / dense)",
                ylabel="speed-up vs dense (dense s/epoch / method's)", title="training speed-up vs density")
    axes[1].axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[2].set(xlabel="training seconds (steps + topology updates)", ylabel="test accuracy",
                title="test accuracy vs training time")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _warm_up(base: Dict[str, Any]) -> None:
    """Pay one-time costs (lazy torch / kernel initialisation) before anything is measured."""
    cfg = dict(base, method="tsm", epochs=1, hidden=(32,), json=None, checkpoint=None, resume=False, quiet=True,
               model_options={}, dst_options={}, time_budget=None)
    train(TrainConfig(**cfg))


HOW_TO_READ = """How to read the table: every method trains the same MLP widths on the same data, seed and optimizer as the
dense MLP. density = live weights / the dense MLP's; speed-up = dense s/epoch / the method's (higher is faster);
test acc is taken at the epoch of best validation accuracy. What to expect on 10 epochs of the built-in set (16x16
drawings of 10 shapes, chance 0.10): dense about 0.80; set, static, rigl, g2g, tsm and etsm 0.6-0.8; ctre about
0.2-0.3, because it runs at its paper's density, epsilon 1 (0.3% of the weights, 2 inputs per neuron), which needs
hundreds of epochs (its paper trains 500), while at SET's density (--run ctre20:ctre:epsilon=20) it reaches about
0.7. The sparse methods train 2-8x faster per epoch than dense here; on two shared cores timings move by 10-20%
from run to run: read ratios, not seconds. Larger data: --dataset fashion-mnist --data-dir DIR."""


def run(methods: Sequence[str], *, out: Optional[str] = "e2e-results", plot_png: bool = True, quiet: bool = False,
        runs: Sequence[Dict[str, Any]] = (), time_budget: Optional[float] = None, equal_time: bool = False,
        max_epochs: int = 1000, **train_kw) -> Dict[str, Any]:
    """Train ``methods`` (dense added and run first) and the labelled variants ``runs`` (see ``--run``) with the same
    settings (:class:`TrainConfig` fields in ``train_kw``); returns the results dict written to
    ``out/results.json``. ``time_budget`` (seconds) or ``equal_time`` (the dense run's training time) gives every
    method the same training time instead of the same epochs (see the module docstring)."""
    if time_budget is not None and equal_time:
        raise TrainError("give either time_budget or equal_time, not both")
    if time_budget is not None and not (math.isfinite(time_budget) and time_budget > 0):
        raise TrainError(f"time budget must be a positive number of seconds, got {time_budget}")
    methods = list(methods)
    if "dense" not in methods:
        methods.append("dense")
    variants = {m: {} for m in methods}
    for spec in runs:
        if spec["label"] in variants:
            raise TrainError(f"--run label {spec['label']!r} is already used by another row")
        methods.append(spec["label"])
        variants[spec["label"]] = {k: v for k, v in spec.items() if k != "label"}
    order = ["dense"] + [m for m in methods if m != "dense"]
    base = dict(train_kw, quiet=True, json=None, checkpoint=None, resume=False)
    say = (lambda s: None) if quiet else (lambda s: print(s, flush=True))
    timed = time_budget is not None or equal_time
    t_start = time.perf_counter()
    if equal_time:
        length = "each for the dense run's training time"
    elif timed:
        length = f"each for {time_budget:g} s of training"
    else:
        length = f"{base.get('epochs', DEFAULT_EPOCHS)} epochs each"
    say(f"training {len(order)} models one after the other ({', '.join(order)}), {length}; a line per model as it "
        f"finishes")
    _warm_up(base)
    reports: Dict[str, Dict[str, Any]] = {}
    budget = time_budget
    for m in order:
        t0 = time.perf_counter()
        cfg = dict(base, method=m)
        cfg.update({k: v for k, v in variants[m].items() if v is not None})
        if timed and m != "dense":
            probe = train(TrainConfig(**dict(cfg, epochs=1, time_budget=None)))
            per_epoch = probe["epoch_seconds"][0] if probe["epoch_seconds"] else probe["train_seconds_total"]
            cfg["epochs"] = max(1, min(max_epochs, int(budget // per_epoch) if per_epoch > 0 else max_epochs))
            cfg["time_budget"] = budget
        elif timed and time_budget is not None:
            cfg["time_budget"] = budget
        rep = train(TrainConfig(**cfg))
        if m == "dense" and equal_time:
            budget = rep["train_seconds_total"]
        rep["method"] = m  # the row's label
        reports[m] = rep
        acc = rep["test_accuracy"]
        secs = rep["epoch_seconds"]
        say(f"  {m:<7} test acc {'-' if acc is None else f'{acc:.4f}'}  density {rep['density']:.4f}  "
            f"{rep['epochs_run']} epochs, {statistics.median(secs) if secs else float('nan'):.3f} s/epoch  "
            f"({time.perf_counter() - t0:.1f} s in all)")
    rows = [_summary(reports[m], reports["dense"]) for m in methods]
    first = reports[order[0]]
    results = {
        "benchmark": "sparsecore bench e2e",
        "settings": {k: v for k, v in first["args"].items()
                     if k not in ("method", "json", "checkpoint", "resume", "quiet", "stop_after_epoch")},
        "equal_time": {"budget_seconds": budget, "from": "dense run" if equal_time else "--time-budget",
                       "max_epochs": max_epochs} if timed else None,
        "methods": methods,
        "split": first["split"],
        "machine": machine_info(),
        "table": rows,
        "columns": {
            "density": "live weights after training / weights of the dense MLP (biases not counted)",
            "test_accuracy": "at the epoch of best validation accuracy",
            "median_epoch_seconds": "median over whole epochs of (training steps + topology update) time",
            "speedup_vs_dense": "dense median_epoch_seconds / the method's (higher is faster)",
            "time_to_accuracy": "(cumulative training seconds, test accuracy) after every epoch",
            "peak_memory_delta_mb": "peak RSS during the method's run minus RSS at its start (VmHWM reset per run)",
            "state_memory_mb": "tensor bytes of parameters, gradients, optimizer state and buffers",
        },
        "total_seconds": time.perf_counter() - t_start,
        "runs": reports,
    }
    table = format_table(rows, equal_time=timed)
    mi = results["machine"]
    say(f"\n{first['dataset']}: {first['split']['n_train']}/{first['split']['n_val']}/{first['split']['n_test']} "
        f"train/val/test, widths {first['layers'][0]['in']}-{'-'.join(str(l['out']) for l in first['layers'])}, "
        + (f"{budget:.1f} s of training each" if timed else f"{first['epochs']} epochs")
        + f", batch {first['args']['batch_size']}; {mi['cpu']}, {mi['torch_threads']} threads, torch {mi['torch']}")
    say(table)
    if first["dataset"] == "builtin" and not quiet:
        say("\n" + HOW_TO_READ)
    if out is not None:
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        note = None
        if plot_png:
            title = f"{first['dataset']}, widths {'-'.join(str(l['out']) for l in first['layers'][:-1])}, " + \
                    (f"{budget:.0f} s each" if timed else f"{first['epochs']} epochs")
            note = plot(rows, out_dir / "e2e.png", title)
            results["plot"] = None if note else str(out_dir / "e2e.png")
            if note:
                results["plot_note"] = note
        write_text_atomic(json.dumps(results, indent=2) + "\n", out_dir / "results.json")
        say(f"\nwrote {out_dir / 'results.json'}" + (f" and {out_dir / 'e2e.png'}" if plot_png and not note else ""))
        if note:
            say(f"note: {note}")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    a = p.parse_args(argv)
    check_common_arguments(p, a)
    try:
        command = "sparsecore bench e2e " + " ".join(argv)
        kw = dict(out=a.out, plot_png=not a.no_plot, quiet=a.quiet, time_budget=a.time_budget,
                  equal_time=a.equal_time, max_epochs=a.max_epochs)
        if a.protocol is not None:
            given = explicit_fields(p, argv)
            methods = given.pop("methods", None)
            cfg = common_config(a)
            explicit = {k: v for k, v in given.items() if k in cfg}
            try:
                res = resolve_protocol(a.protocol, a.dataset, explicit, methods)
            except ValueError as e:
                raise TrainError(str(e)) from None
            settings = dict(cfg, **res["settings"])
            if not a.quiet:
                print(f"protocol {a.protocol}: {res['protocol']['paper']}" +
                      (f"; overridden by the command line: {', '.join(res['overridden'])}" if res["overridden"]
                       else ""), flush=True)
            run_seeds([], seeds=a.seeds, runs=res["rows"] + list(a.run), protocol=res, command=command, **kw,
                      **settings)
        elif a.seeds > 1:
            run_seeds(a.methods, seeds=a.seeds, runs=a.run, command=command, **kw, **common_config(a))
        else:
            run(a.methods, runs=a.run, **kw, **common_config(a))
    except TrainError as e:
        print(f"sparsecore bench e2e: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparsecore bench e2e: interrupted", file=sys.stderr)
        return 130
    return 0


# ------------------------------------------------------------------------------------------ seeds and summaries


def _mean_std(xs: Sequence[float]):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(per_seed: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per row label over the seeds' results dicts (as :func:`run` returns): ``n``, mean / std / values of the test
    accuracy at the best validation epoch and of the final test accuracy, density, median s/epoch, and the mean
    per-epoch validation and test accuracy (over the seeds that ran that epoch)."""
    if not per_seed:
        raise ValueError("no results to aggregate")
    labels = list(per_seed[0]["methods"])
    rows = []
    for m in labels:
        reps = [r["runs"][m] for r in per_seed if m in r["runs"]]
        tab = [next(t for t in r["table"] if t["method"] == m) for r in per_seed if m in r["runs"]]
        acc = [x["test_accuracy"] for x in reps]
        fin = [x["final_test_accuracy"] for x in reps]
        n_ep = max(len(x["history"]) for x in reps)
        curve = {}
        for key in ("val_accuracy", "test_accuracy"):
            pts = []
            for e in range(n_ep):
                vals = [x["history"][e][key] for x in reps if len(x["history"]) > e and
                        x["history"][e][key] is not None]
                pts.append(_mean_std(vals))
            curve[key] = {"mean": [p[0] for p in pts], "std": [p[1] for p in pts]}
        ma, sa = _mean_std(acc)
        mf, sf = _mean_std(fin)
        rows.append({"method": m, "base_method": reps[0]["args"]["method"], "n": len(reps), "seeds":
                     [x["args"]["seed"] for x in reps],
                     "test_accuracy": {"mean": ma, "std": sa, "values": acc},
                     "final_test_accuracy": {"mean": mf, "std": sf, "values": fin},
                     "best_epoch": [x["best_epoch"] for x in reps],
                     "density": statistics.fmean(x["density"] for x in reps),
                     "nnz": statistics.fmean(x["nnz"] for x in reps),
                     "median_epoch_seconds": statistics.median(t["median_epoch_seconds"] for t in tab),
                     "epochs": n_ep, "curves": curve})
    return rows


def format_summary(rows: Sequence[Dict[str, Any]]) -> str:
    """mean +- std (n seeds) table of :func:`aggregate`'s rows."""
    head = ("method", "density", "test acc (best val)", "final test acc", "n", "s/epoch")
    pm = lambda d: "-" if d["mean"] is None else f"{d['mean']:.4f} +- {d['std']:.4f}"
    lines = [(r["method"], f"{r['density']:.4f}", pm(r["test_accuracy"]), pm(r["final_test_accuracy"]), str(r["n"]),
              f"{r['median_epoch_seconds']:.3f}") for r in rows]
    return _table(head, lines)


def plot_curves(rows: Sequence[Dict[str, Any]], path: Path, title: str = "") -> Optional[str]:
    """Mean validation and test accuracy per epoch (band: +- one std over the seeds), one curve per row."""
    plt = _pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for k, r in enumerate(rows):
        for ax, key in zip(axes, ("val_accuracy", "test_accuracy")):
            c = r["curves"][key]
            ep = [e + 1 for e, v in enumerate(c["mean"]) if v is not None]
            mu = [v for v in c["mean"] if v is not None]
            sd = [s for v, s in zip(c["mean"], c["std"]) if v is not None]
            ax.plot(ep, mu, color=f"C{k % 10}", label=r["method"], ls="--" if r["method"] == "dense" else "-")
            ax.fill_between(ep, [m - s for m, s in zip(mu, sd)], [m + s for m, s in zip(mu, sd)],
                            color=f"C{k % 10}", alpha=0.15)
    for ax, name in zip(axes, ("validation", "test")):
        ax.set(xlabel="epoch", ylabel=f"{name} accuracy", title=f"{name} accuracy (mean +- std over seeds)")
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def run_seeds(methods: Sequence[str], *, seeds: int, out: Optional[str] = "e2e-results", plot_png: bool = True,
              quiet: bool = False, protocol: Optional[Dict[str, Any]] = None, command: Optional[str] = None,
              **kw) -> Dict[str, Any]:
    """:func:`run` for seeds ``seed .. seed + seeds - 1`` (each into ``out/seed_S``), then the mean +- std summary
    (returned, and written to ``out/summary.json`` with ``out/curves.png``)."""
    seed0 = int(kw.pop("seed", 0))
    per_seed = []
    say = (lambda s: None) if quiet else (lambda s: print(s, flush=True))
    for s in range(seed0, seed0 + int(seeds)):
        say(f"=== seed {s} ({s - seed0 + 1} of {seeds})")
        sub = None if out is None else str(Path(out) / f"seed_{s}")
        per_seed.append(run(methods, out=sub, plot_png=plot_png, quiet=quiet, seed=s, **kw))
    rows = aggregate(per_seed)
    first = per_seed[0]
    summary = {"benchmark": "sparsecore bench e2e (seeds)", "protocol": None if protocol is None else
               {"name": protocol["protocol"]["name"], "overridden": protocol["overridden"],
                "paper": protocol["protocol"]["paper"], "claim": protocol["protocol"]["claim"],
                "notes": protocol["protocol"]["notes"],
                "rows": jsonable_rows(protocol["rows"])},
               "dataset": first["runs"][first["methods"][0]]["dataset"], "seeds": list(range(seed0, seed0 + seeds)),
               "settings": {k: v for k, v in first["settings"].items() if k != "seed"}, "split": first["split"],
               "machine": first["machine"], "table": rows,
               "command": command}
    say(f"\n{summary['dataset']}: mean +- std over {seeds} seed(s), {first['settings']['epochs']} epochs")
    say(format_summary(rows))
    if out is not None:
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        if plot_png:
            note = plot_curves(rows, d / "curves.png", f"{summary['dataset']}: {seeds} seed(s)" +
                               (f", protocol {protocol['protocol']['name']}" if protocol else ""))
            summary["plot"] = None if note else str(d / "curves.png")
        write_text_atomic(json.dumps(summary, indent=2) + "\n", d / "summary.json")
        say(f"wrote {d / 'summary.json'}")
    return summary


def jsonable_rows(rows):
    return json.loads(json.dumps(rows, default=lambda v: list(v) if isinstance(v, tuple) else repr(v)))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
