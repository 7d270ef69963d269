"""One training step of a SparseLinear in bfloat16 against float32, with dense nn.Linear in both as references.

    python bench/bench_bf16.py [--size 4096] [--batch 256] [--densities 0.1,0.01] [--threads 2]
                               [--repeat 20] [--block 5] [--json bench/results/bf16-step.json]

A step is what a training loop runs: zero_grad(set_to_none=True) on the parameters and the input, forward, then
backward to the input, the weights and the bias. Per density four layers are timed in the same process: dense
nn.Linear float32 and bfloat16 (torch's GEMMs) and SparseLinear float32 and bfloat16 (the same pattern), in blocks
of --block consecutive steps after one untimed step (which pays for the caches the previous layer evicted), the
blocks round-robin so that each layer gets the same share of the machine's noise; medians are reported.
Speed-up = dense time / sparse time, for the dense layer of the same dtype and for dense float32.

The run also reports how busy the CPUs were with other processes while it ran (from /proc/stat, less this
process's own CPU time): on a shared machine, figures taken while that is high are noise.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sparsecore import SparseLinear, _C  # noqa: E402
from sparsecore.topology import uniform  # noqa: E402

LAYERS = ("dense fp32", "dense bf16", "sparse fp32", "sparse bf16")


def cpu_busy_jiffies():
    """(busy, total) jiffies of all CPUs since boot (None where /proc/stat is missing)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


def others_busy(start, own_cpu_s):
    """Fraction of all CPUs' time that other processes used between start and now."""
    end = cpu_busy_jiffies()
    if start is None or end is None:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    busy = (end[0] - start[0]) / hz - own_cpu_s
    total = (end[1] - start[1]) / hz
    return max(0.0, busy / total) if total > 0 else None


def machine_info():
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "kernel_isa": _C.kernel_isa(), "python": platform.python_version()}


def make_steps(size, batch, density, seed):
    """{layer name: step()} for the four layers; the sparse ones share one random pattern."""
    gen = torch.Generator().manual_seed(seed)
    pattern = uniform(size, size, density, generator=gen)
    x32 = torch.randn(batch, size, generator=gen, requires_grad=True)
    dy32 = torch.randn(batch, size, generator=gen)
    x16 = x32.detach().to(torch.bfloat16).requires_grad_()
    dy16 = dy32.to(torch.bfloat16)
    sparse32 = SparseLinear(size, size, pattern=pattern, generator=gen)
    sparse16 = SparseLinear(size, size, pattern=pattern).to(torch.bfloat16)
    with torch.no_grad():
        sparse16.values.copy_(sparse32.values)
        sparse16.bias.copy_(sparse32.bias)
    dense32 = nn.Linear(size, size)
    dense16 = nn.Linear(size, size).to(torch.bfloat16)

    def step(layer, x, dy):
        params = list(layer.parameters())

        def run():
            for p in (x, *params):  # optimizer.zero_grad(set_to_none=True), and the input's gradient
                p.grad = None
            layer(x).backward(dy)
        return run

    return {"dense fp32": step(dense32, x32, dy32), "dense bf16": step(dense16, x16, dy16),
            "sparse fp32": step(sparse32, x32, dy32), "sparse bf16": step(sparse16, x16, dy16)}, pattern.nnz


def bench(size, batch, density, repeat, block, warmup, seed):
    steps, nnz = make_steps(size, batch, density, seed)
    for run in steps.values():
        for _ in range(warmup):
            run()
    times = {name: [] for name in steps}
    start, own0 = cpu_busy_jiffies(), time.process_time()
    for r in range(0, repeat, block):
        order = list(steps.items())
        if (r // block) % 2:
            order.reverse()
        for name, run in order:
            run()  # untimed: refills the caches after the previous layer
            for _ in range(min(block, repeat - r)):
                t = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t)
    busy = others_busy(start, time.process_time() - own0)
    ms = {name: 1e3 * statistics.median(v) for name, v in times.items()}
    return {"density": density, "nnz": nnz, "median_ms": ms,
            "spread_ms": {name: [1e3 * min(v), 1e3 * max(v)] for name, v in times.items()},
            "bf16_over_fp32_sparse": ms["sparse bf16"] / ms["sparse fp32"],
            "speedup_fp32": ms["dense fp32"] / ms["sparse fp32"],
            "speedup_bf16": ms["dense bf16"] / ms["sparse bf16"],
            "speedup_bf16_vs_dense_fp32": ms["dense fp32"] / ms["sparse bf16"],
            "others_cpu_busy": busy}


def format_table(results):
    head = (f"{'density':>7} | " + " | ".join(f"{n:>11}" for n in LAYERS) +
            f" | {'bf16/fp32':>9} | {'speed-up fp32':>13} | {'speed-up bf16':>13} | {'others busy':>11}")
    lines = [head, f"{'':>7} | " + " | ".join(f"{'ms':>11}" for _ in LAYERS) +
             f" | {'sparse':>9} | {'dense/sparse':>13} | {'dense/sparse':>13} | {'':>11}", "-" * len(head)]
    for r in results:
        ms = r["median_ms"]
        busy = "-" if r["others_cpu_busy"] is None else f"{r['others_cpu_busy']:.0%}"
        lines.append(f"{r['density']:7.3f} | " + " | ".join(f"{ms[n]:11.2f}" for n in LAYERS) +
                     f" | {r['bf16_over_fp32_sparse']:9.3f} | {r['speedup_fp32']:13.2f} | "
                     f"{r['speedup_bf16']:13.2f} | {busy:>11}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=4096, help="in_features = out_features")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--densities", default="0.1,0.01")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=20, help="timed steps per layer and density (median reported)")
    ap.add_argument("--block", type=int, default=5, help="consecutive timed steps of one layer per turn")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)
    densities = [float(d) for d in a.densities.split(",")]
    if any(not 0 < d <= 1 for d in densities) or min(a.size, a.batch, a.repeat, a.block, a.threads) < 1:
        ap.error("densities must be in (0, 1]; sizes, batch, repeat, block and threads positive")
    torch.set_num_threads(a.threads)
    info = machine_info()
    print(f"training step of a {a.size}x{a.size} layer, batch {a.batch}, {a.threads} threads; {a.repeat} timed "
          f"steps per layer in blocks of {a.block}, medians")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    results = [bench(a.size, a.batch, d, a.repeat, a.block, a.warmup, a.seed) for d in densities]
    print(format_table(results))
    if a.json:
        payload = {"size": a.size, "batch": a.batch, "threads": a.threads, "repeat": a.repeat, "block": a.block,
                   "machine": info, "results": results}
        with open(a.json, "w") as f:
            f.write(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
