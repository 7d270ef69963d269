"""Cost of a topology update (sparsecore.dst) against one training step of the same layer, in one run.

    python bench/bench_dst.py [--size 4096] [--density 0.1] [--batch 128,256] [--threads 1,2] [--reps 11]

Prints, for each thread count, a table: the layer's training step (forward + backward + SGD-momentum step), a SET
update (with its parts), a RigL update and a CTRE update, each the median of ``--reps`` runs (fewer for the slow
ones). Then the peak *extra* resident memory of one update of each method, each measured in a fresh process
(``VmHWM - VmRSS`` from /proc/self/status, the high-water mark reset with ``clear_refs`` just before the update): it
counts every allocation (torch, numpy, C++), not only Python's, and a fresh heap cannot hide temporaries in memory
freed earlier. The machine is shared and noisy: compare ratios taken in the same run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import sparsecore  # noqa: E402
from sparsecore import SparseLinear  # noqa: E402
from sparsecore.dst import Updater  # noqa: E402
from sparsecore.dst import edit as E  # noqa: E402
from sparsecore.apps.train.report import proc_status_kb, reset_peak_rss  # noqa: E402


def _status(field: str) -> int:
    """kB of a /proc/self/status field (0 where unavailable)."""
    return proc_status_kb(field) or 0


def measure(fn, reps: int):
    """(median ms, max extra peak MiB over the runs) of fn()."""
    times, peaks = [], []
    for _ in range(reps):
        ok = reset_peak_rss()
        base = _status("VmRSS")
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        peaks.append((_status("VmHWM") - base) / 1024 if ok else float("nan"))
    return statistics.median(times), max(peaks)


def child(method: str, a) -> None:
    """One update of ``method`` in this (fresh) process; prints the peak extra MiB."""
    torch.manual_seed(0)
    n, B = a.size, int(str(a.batch).split(",")[0])
    layer = SparseLinear(n, n, density=a.density)
    opt = torch.optim.SGD(layer.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(B, n)
    kw = {"set": {"every": 10**9}, "rigl": {"every": 1, "total_steps": 10**6},
          "ctre": {"max_samples": a.samples}}[method]
    u = Updater(layer, opt, method, **kw)
    steps = max(1, a.samples // B) if method == "ctre" else 2
    for _ in range(steps):
        if method == "rigl":
            u.arm()
        y = layer(x)
        opt.zero_grad()
        y.square().mean().backward()
        opt.step()
    _, peak = measure(u.update, 1)
    print(f"{peak:.1f}")


def fresh_peak(method: str, a, threads: int) -> float:
    import subprocess
    args = [sys.executable, os.path.abspath(__file__), "--child", method, "--size", str(a.size), "--density",
            str(a.density), "--batch", str(a.batch), "--samples", str(a.samples), "--threads", str(threads)]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout.split()
    return float(out[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="in = out features")
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--batch", default="128,256", help="comma-separated batch sizes of the training step (RigL uses "
                    "the first)")
    ap.add_argument("--threads", default=None,
                    help="comma-separated thread counts, one table each (default: 1 and torch's default)")
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--samples", type=int, default=2048, help="CTRE reservoir rows (max_samples)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    default = torch.get_num_threads()
    counts = [int(t) for t in a.threads.split(",")] if a.threads else sorted({1, default})
    if a.child:
        torch.set_num_threads(counts[0])
        child(a.child, a)
        return
    for th in counts:
        torch.set_num_threads(th)
        table(a)
        print()
    print(f"peak extra resident memory of one update, fresh process each (MiB; a dense {a.size} x {a.size} float32 "
          f"matrix is {a.size * a.size * 4 / 2**20:.0f} MiB):")
    for th in counts:
        peaks = {m: fresh_peak(m, a, th) for m in ("set", "rigl", "ctre")}
        print(f"  threads {th}: " + ", ".join(f"{m} {v:.1f}" for m, v in peaks.items()))


def table(a):
    torch.manual_seed(0)
    n, d = a.size, a.density
    batches = [int(b) for b in str(a.batch).split(",")]
    B = batches[0]
    th = torch.get_num_threads()

    def make(method, **kw):
        layer = SparseLinear(n, n, density=d)
        opt = torch.optim.SGD(layer.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(B, n)
        return layer, opt, x, Updater(layer, opt, method, **kw)

    def train_step(layer, opt, x):
        y = layer(x)
        opt.zero_grad()
        y.square().mean().backward()
        opt.step()

    rows = []
    # --- training steps and SET, interleaved in the same run (steps before and after the updates)
    layer, opt, x, u = make("set", every=10**9)
    xs = {b: torch.randn(b, n) for b in batches}
    for b in batches:
        train_step(layer, opt, xs[b])
    nnz = layer.nnz
    steps = {b: [measure(lambda: train_step(layer, opt, xs[b]), a.reps)[0]] for b in batches}
    set_ms, set_mem = measure(u.update, a.reps)
    for b in batches:
        steps[b].append(measure(lambda: train_step(layer, opt, xs[b]), a.reps)[0])
    step_ms = {b: statistics.median(v) for b, v in steps.items()}
    for b in batches:
        rows.append(("training step (fwd+bwd+SGD)", f"batch {b}", step_ms[b], 0.0))
    rows.append(("SET update (zeta 0.3)", f"k = {round(0.3 * nnz)}", set_ms, set_mem))

    # SET's parts, on the same layer
    p = layer.pattern
    k = round(0.3 * nnz)
    scores = E.magnitude_scores(layer.values)
    keep = E.prune_keep(p, scores, k, 1)
    parts = [
        ("  magnitude prune (C++ select)", lambda: E.prune_keep(p, E.magnitude_scores(layer.values), k, 1)),
        ("  random regrowth + merge", lambda: sparsecore._C.dst_regrow_random(
            E._np32(p.rowptr), E._np32(p.col), keep, keep, n, k, 2, th)),
        ("  transpose index", lambda: sparsecore._C.dst_transpose(E._np32(p.rowptr), E._np32(p.col), n, th)),
    ]
    newp, gather, newpos = E.regrow_random(p, keep, k, 2, keep)
    out = torch.empty(newp.nnz)
    parts.append(("  gather values (x2 with momentum)", lambda: E._gather_into(layer.values.detach(), gather, out)))
    for name, fn in parts:
        ms, mem = measure(fn, a.reps)
        rows.append((name, "", ms, mem))

    # --- RigL: gradient of one batch, chunked, streamed into a top-k
    layer, opt, x, u = make("rigl", every=1, total_steps=10**6)
    slow = max(3, a.reps // 3)

    def rigl_update():
        u.arm()
        train_step(layer, opt, x)  # captures x and dy of this batch
        u.update()

    def rigl_baseline():
        train_step(layer, opt, x)

    base_ms, _ = measure(rigl_baseline, slow)
    ms, mem = measure(rigl_update, slow)
    k_r = round(0.3 * nnz)  # alpha_t at t ~ 0
    rows.append(("RigL update (alpha_t ~ 0.3)", f"k ~ {k_r}, batch {B}", ms - base_ms, mem))

    # --- CTRE: cosine of a reservoir of activations, chunked, streamed into a top-k
    layer, opt, x, u = make("ctre", max_samples=a.samples)

    def fill():
        for _ in range(max(1, a.samples // B)):
            train_step(layer, opt, x)

    ctre_times, ctre_mem = [], 0.0
    for _ in range(slow):
        fill()
        ms, mem = measure(u.update, 1)
        ctre_times.append(ms)
        ctre_mem = max(ctre_mem, mem)
    rows.append(("CTRE update (cte, zeta 0.2)", f"k = {round(0.2 * nnz)}, {a.samples} samples",
                 statistics.median(ctre_times), ctre_mem))
    res_mib = a.samples * 2 * n * 4 / 2**20

    print(f"sparsecore.dst benchmark: {n} x {n} SparseLinear, density {d} (nnz {nnz}), float32, "
          f"torch threads {th}, os.cpu_count {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}")
    print(f"medians of {a.reps} runs ({slow} for RigL/CTRE)")
    print()
    print(f"{'operation':40s} {'detail':34s} {'ms':>9s}")
    print("-" * 85)
    for name, detail, ms, _ in rows:
        print(f"{name:40s} {detail:34s} {ms:9.1f}")
    print("-" * 85)
    for b in batches:
        print(f"SET update / training step at batch {b} = {set_ms / step_ms[b]:.2f}")
    print(f"CTRE's reservoir (persistent, not counted above): {res_mib:.0f} MiB "
          f"({a.samples} rows of in + out activations)")


if __name__ == "__main__":
    main()
