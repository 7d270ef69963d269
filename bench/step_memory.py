"""Peak memory of building a layer and training it, against dense ``nn.Linear``: each implementation in a fresh process.

    python bench/step_memory.py                       # 4096x4096, batch 256, 10%, 2 threads: dense, CSR, BSR-32
    python bench/step_memory.py --size 8192 --density 0.01 --json out.json

Each child process warms torch and its thread pools on a small layer (so that their one-time allocations are not
counted), makes the input ``x`` (batch, in) and the output gradient ``dy``, reads its resident memory (the base),
then builds the layer, and runs ``--steps`` training steps (zero_grad with set_to_none, forward, backward to x, the
weights and the bias). Linux's peak-RSS counter (VmHWM) is read after the build, reset (``/proc/self/clear_refs``),
and read again after the steps, so the table gives three figures above the base, in MiB: ``build`` (the peak while
the layer was built: its parameters and structure, and whatever temporaries building took), ``after build`` (what
the layer holds once built), ``step`` (the peak during the steps: the layer, its gradients, the activations and
the kernels' scratch) and ``peak`` (the larger of build and step), each also as a share of dense's ``peak``.

The allocator. Resident memory counts what glibc's malloc keeps after a free, not only what is in use: its mmap
threshold rises to the size of the last large block freed (here the 4-7 MB tensors of a step), after which such
blocks come from the heap, whose freed holes stay resident. A 4096x4096 layer at 10% then grew by 4 MiB per step
for seven steps (40.6 -> 64.6 MiB) with no tensor alive longer. So each child runs with glibc's mmap threshold
fixed (``--mmap-threshold``, default 1 MiB: blocks from 1 MiB up are mapped, and unmapped when freed), where the
figures are the memory in use; ``--mmap-threshold 0`` keeps glibc's default for comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

IMPLS = ("dense", "sparsecore", "sparsecore-bsr")


def _status_kib(field: str) -> int:
    from sparsecore.apps.train.report import proc_status_kb

    kib = proc_status_kb(field)
    if kib is None:
        raise RuntimeError(f"{field} not in /proc/self/status: this benchmark needs Linux")
    return int(kib)


def child(impl: str, size: int, batch: int, density: float, threads: int, steps: int, block_size: int) -> dict:
    import torch
    from torch import nn

    import sparsecore
    from sparsecore.apps.train.report import reset_peak_rss
    from sparsecore.topology import random_blocks, uniform

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)

    def make(n):
        if impl == "dense":
            return nn.Linear(n, n)
        if impl == "sparsecore":
            return sparsecore.SparseLinear(n, n, pattern=uniform(n, n, density, generator=gen))
        bs = block_size if n % block_size == 0 else 1
        p = random_blocks(n, n, density, bs, generator=gen) if bs > 1 else uniform(n, n, density, generator=gen)
        return sparsecore.SparseLinear(n, n, pattern=p)

    def train(layer, x, dy, n):
        for _ in range(n):
            for p in (x, *layer.parameters()):
                p.grad = None
            layer(x).backward(dy)

    warm = make(128)  # thread pools, allocator, kernels' first call
    xw = torch.randn(batch, 128, requires_grad=True)
    train(warm, xw, torch.randn(batch, 128), 3)
    del warm, xw
    x = torch.randn(batch, size, generator=gen, requires_grad=True)
    dy = torch.randn(batch, size, generator=gen)
    base = _status_kib("VmRSS")
    reset_peak_rss()
    layer = make(size)
    build_peak = _status_kib("VmHWM")
    after_build = _status_kib("VmRSS")
    reset = reset_peak_rss()
    train(layer, x, dy, steps)
    step_peak = _status_kib("VmHWM") if reset else None
    mib = lambda kib: None if kib is None else (kib - base) / 1024.0  # noqa: E731
    return {"impl": impl, "build": mib(build_peak), "after_build": mib(after_build), "step": mib(step_peak),
            "peak": max(v for v in (mib(build_peak), mib(step_peak)) if v is not None)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=4096, help="in = out features")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--mmap-threshold", type=int, default=1 << 20,
                    help="glibc's M_MMAP_THRESHOLD in bytes for the children (0: glibc's default, a dynamic one)")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.size, a.batch, a.density, a.threads, a.steps, a.block_size)))
        return 0
    impls = [i for i in a.impls.split(",") if i]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        ap.error(f"unknown implementation(s) {unknown}; choose from {', '.join(IMPLS)}")
    rows = []
    for impl in impls:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--size", str(a.size), "--batch",
               str(a.batch), "--density", str(a.density), "--threads", str(a.threads), "--steps", str(a.steps),
               "--block-size", str(a.block_size)]
        env = dict(os.environ)
        if a.mmap_threshold > 0:
            env["MALLOC_MMAP_THRESHOLD_"] = str(a.mmap_threshold)
        else:
            env.pop("MALLOC_MMAP_THRESHOLD_", None)
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        if p.returncode != 0:
            print(p.stderr, file=sys.stderr)
            return 1
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    dense = next((r["peak"] for r in rows if r["impl"] == "dense"), None)
    malloc = f"glibc mmap threshold {a.mmap_threshold} B" if a.mmap_threshold > 0 else "glibc's default malloc"
    print(f"{a.size}x{a.size}, batch {a.batch}, density {a.density}, {a.threads} threads, {a.steps} steps, {malloc}; "
          f"MiB above the process's base (torch warmed, x and dy made)")
    print(f"{'impl':<16} {'build':>8} {'after build':>12} {'step':>8} {'peak':>8} {'peak / dense':>13}")
    for r in rows:
        share = f"{r['peak'] / dense:.0%}" if dense else "-"
        step = "-" if r["step"] is None else f"{r['step']:.1f}"
        print(f"{r['impl']:<16} {r['build']:8.1f} {r['after_build']:12.1f} {step:>8} {r['peak']:8.1f} {share:>13}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"size": a.size, "batch": a.batch, "density": a.density, "threads": a.threads,
                       "steps": a.steps, "mmap_threshold": a.mmap_threshold, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
