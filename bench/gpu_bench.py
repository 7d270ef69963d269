"""GPU benchmark: one training step of a linear layer (forward + dX + dW), sparse against dense.

For each shape (out x in) and density it times, on one CUDA device and in one run:

==============  ==========================================================================================
dense_bf16      cuBLAS: y = x W^T, dX = dY W, dW = dY^T X in bfloat16 (density-independent)
dense_fp32      the same in float32, TF32 allowed (``--no-tf32`` to forbid)
torch_csr       ``torch.sparse`` CSR (``to_sparse_csr``) with autograd: ``torch.sparse.mm`` forward,
                backward gives dX and the sparse dW (falls back to float32 where the dtype is unsupported)
torch_bsrN      torch's Triton BSR ops (``torch.sparse._triton_ops``) at block size N: ``bsr_dense_mm`` for y
                and dX (over a BSR copy of W^T), ``sampled_addmm`` for dW; skipped where absent
ours_csr        ``triton_kernels.csr_spmm`` / ``csr_spmm_t`` / ``csr_sddmm``, dy made feature-major once as
                ``sparsecore``'s backward does
ours_bsrN       ``triton_kernels.bsr_spmm`` / ``bsr_spmm_t`` / ``bsr_sddmm`` at block size N
==============  ==========================================================================================

Block sizes come from ``--block-sizes`` (16 32 64); ``torch_bsr`` / ``ours_bsr`` in ``--impls`` mean all of them.
CSR implementations share one unstructured random pattern, each BSR block size one random block pattern, at the
same density. Each step reads the next of ``--rotate`` input/gradient pairs (so activations are not L2-resident
from the previous step). Two timings per implementation:

* ``median_ms``: CUDA events around each step after warm-up (warm-up includes Triton compilation and
  autotuning); includes host work where the GPU waits for it (Python, launch overhead);
* ``graph_ms``: the steps captured in a CUDA graph (``--rotate`` steps per graph) and replayed: host work excluded
  (dense and ours only: torch.sparse's host-side checks do not all capture).

Ceilings are measured in the same run (``ceilings`` in the JSON): a dense bf16 GEMM's rate, a device-to-device
copy's DRAM bandwidth, and the L2's read and copy bandwidth on L2-resident buffers. Each result gets its
fraction of them: ``frac_matmul`` (useful flops 6·B·nnz_weights), ``frac_dram`` (compulsory bytes of the three
kernels) and ``frac_l2`` (the bytes the kernels gather from L2: every nonzero block of size bs reads a
(batch, bs) slice of x or dy, four times a step: ``4·B·nnz_weights·elem/bs``). ``bars`` in the JSON checks the
project's targets (docs/GPU.md). Before timing, each sparse implementation's y, dX and dW are compared with a
float32 dense reference computed from the same rounded operands (``max_rel_err``; ``--no-check`` skips it).

Run:   python bench/gpu_bench.py --out bench_out                 (defaults: batch 4096, 4096x4096 and
       python bench/gpu_bench.py --shapes 1024x1024 --batch 512   8192x8192, densities 50/25/10/5/1 %)
Writes DIR/gpu-<device>-<date>.json and .png (speedup vs sparsity; ``--name`` sets the stem), after each shape
(a run cut short keeps what it measured), and prints a table. ``--max-seconds`` bounds the whole run (what is
left is recorded as skipped), ``--max-impl-seconds`` the timed steps of one implementation. Without a CUDA
device it exits with status 2. The pure-Python parts (arguments, table, JSON, plot, bars) need no GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BASE_SPARSE = ("torch_csr", "torch_bsr", "ours_csr", "ours_bsr")
SPARSE_IMPLS = BASE_SPARSE  # names accepted by --impls besides dense_* and torch_bsrN / ours_bsrN
DEFAULT_IMPLS = ("dense_bf16", "dense_fp32") + BASE_SPARSE
DEFAULT_SHAPES = ("4096x4096", "8192x8192")
DEFAULT_DENSITIES = (0.5, 0.25, 0.1, 0.05, 0.01)
DEFAULT_BLOCK_SIZES = (16, 32, 64)
GRAPH_PREFIXES = ("dense_", "ours_")  # implementations also timed as CUDA graphs
# max relative error (max |out - ref| / max |ref|) accepted by the correctness check, by dtype
CHECK_TOL = {"bf16": 3e-2, "fp16": 5e-3, "fp32": 5e-3}
ELEM = {"bf16": 2, "fp16": 2, "fp32": 4}
_BSR = re.compile(r"^(torch|ours)_bsr(\d+)$")


# ============================================================================================= arguments
def parse_shape(s: str):
    """'OUTxIN' -> (out, in)."""
    try:
        a, b = s.lower().split("x")
        out_f, in_f = int(a), int(b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 4096x4096 (out x in), got {s!r}") from None
    if out_f <= 0 or in_f <= 0:
        raise argparse.ArgumentTypeError(f"shape dimensions must be positive, got {s!r}")
    return out_f, in_f


def parse_density(s: str) -> float:
    """'0.1', '10%' -> 0.1; must lie in (0, 1]."""
    try:
        d = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"density must be a fraction or a percentage, got {s!r}") from None
    if not 0 < d <= 1:
        raise argparse.ArgumentTypeError(f"density must be in (0, 1], got {s!r}")
    return d


def dense_impl(dtype_name: str) -> str:
    return f"dense_{dtype_name}"


def impl_block_size(impl: str) -> int:
    """1 for dense and CSR implementations, N for torch_bsrN / ours_bsrN."""
    m = _BSR.match(impl)
    return int(m.group(2)) if m else 1


def impl_layout(impl: str) -> str:
    """'dense', 'csr' or 'bsr'."""
    return "dense" if impl.startswith("dense_") else ("csr" if impl.endswith("_csr") else "bsr")


def expand_impls(impls: Sequence[str], block_sizes: Sequence[int]) -> List[str]:
    """torch_bsr / ours_bsr -> one entry per block size; others as given; order kept, duplicates dropped."""
    out: List[str] = []
    for i in impls:
        for e in ([f"{i}{bs}" for bs in block_sizes] if i in ("torch_bsr", "ours_bsr") else [i]):
            if e not in out:
                out.append(e)
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_bench", description="Time one training step (forward + dX + dW) of a "
                                "sparse linear layer on a CUDA GPU against dense cuBLAS and torch.sparse.")
    p.add_argument("--batch", type=int, default=4096, help="batch size (default 4096)")
    p.add_argument("--shapes", type=parse_shape, nargs="+", default=[parse_shape(s) for s in DEFAULT_SHAPES],
                   metavar="OUTxIN", help="weight shapes, run in this order (default 4096x4096 8192x8192)")
    p.add_argument("--densities", type=parse_density, nargs="+", default=list(DEFAULT_DENSITIES), metavar="D",
                   help="densities as fractions or percentages, run in this order (default 0.5 0.25 0.1 0.05 0.01)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the sparse runs (bf16)")
    p.add_argument("--block-sizes", "--block-size", dest="block_sizes", type=int, nargs="+",
                   default=list(DEFAULT_BLOCK_SIZES), metavar="BS", help="BSR block sizes (default 16 32 64)")
    p.add_argument("--impls", nargs="+", default=None, metavar="IMPL",
                   help=f"implementations to run (default: {' '.join(DEFAULT_IMPLS)}, plus dense in --dtype; "
                        "torch_bsr/ours_bsr expand to every block size, torch_bsrN/ours_bsrN name one)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--iters", type=int, default=20, help="timed steps (default 20)")
    p.add_argument("--rotate", type=int, default=3, help="input/gradient pairs cycled through (default 3)")
    p.add_argument("--graph-replays", type=int, default=10, help="timed CUDA-graph replays (default 10; 0: none)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="time budget of the whole run; what is left when it is spent is recorded as skipped")
    p.add_argument("--max-impl-seconds", type=float, default=10.0,
                   help="timed steps of one implementation take about this long at most (fewer --iters, >= 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-tf32", dest="tf32", action="store_false", help="forbid TF32 in dense_fp32")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the correctness check")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="do not write the PNG")
    p.add_argument("--no-ceilings", dest="ceilings", action="store_false", help="do not measure the ceilings")
    p.add_argument("--out", default="gpu_bench_out", help="directory for the JSON and PNG")
    p.add_argument("--name", default=None,
                   help="file stem of the JSON and PNG (default gpu-<device>-<date>, as bench/results wants)")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # "cpu": smoke test (TRITON_INTERPRET)
    a = p.parse_args(argv)
    if a.batch <= 0 or a.iters <= 0 or a.warmup < 0 or a.rotate <= 0 or a.graph_replays < 0:
        p.error("--batch, --iters and --rotate must be positive, --warmup and --graph-replays non-negative")
    if any(bs <= 0 for bs in a.block_sizes):
        p.error("--block-sizes must be positive")
    if a.name is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", a.name):
        p.error(f"--name may hold letters, digits, '.', '_' and '-' only, got {a.name!r}")
    if a.impls is None:
        a.impls = list(DEFAULT_IMPLS)
        if dense_impl(a.dtype) not in a.impls:
            a.impls.insert(0, dense_impl(a.dtype))
    known = set(BASE_SPARSE) | {dense_impl(d) for d in DTYPES}
    bad = [i for i in a.impls if i not in known and not _BSR.match(i)]
    if bad:
        p.error(f"unknown implementation(s) {bad}; choose from {sorted(known)} or torch_bsrN/ours_bsrN")
    a.impls = expand_impls(a.impls, a.block_sizes)
    for impl in a.impls:
        bs = impl_block_size(impl)
        for out_f, in_f in a.shapes:
            if out_f % bs or in_f % bs:
                p.error(f"block size {bs} ({impl}) must divide every shape, got {out_f}x{in_f}")
    return a


# ============================================================================================= results
def slug(text: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200' (letters, digits and '-' only)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def result_name(device: str, date: Optional[datetime.date] = None) -> str:
    """The file stem bench/results wants: gpu-<device>-<YYYY-MM-DD>."""
    return f"gpu-{slug(device)}-{(date or datetime.date.today()).isoformat()}"


def reference_impl(results: dict) -> Optional[str]:
    """The dense implementation ratios are taken against: dense in the benchmark dtype, else any dense."""
    impls = {r["impl"] for r in results["results"] if r.get("median_ms")}
    want = dense_impl(results["dtype"])
    if want in impls:
        return want
    dense = sorted(i for i in impls if i.startswith("dense_"))
    return dense[0] if dense else None


def _lookup(results: dict, shape, impl: str, density: Optional[float]) -> Optional[dict]:
    for r in results["results"]:
        if tuple(r["shape"]) == tuple(shape) and r["impl"] == impl and \
                (r["density"] is None or density is None or math.isclose(r["density"], density)):
            return r
    return None


def _densities(results: dict) -> List[float]:
    """The densities in display order: densest first (the run order may differ)."""
    return sorted(results["densities"], reverse=True)


def speedups(results: dict, key: str = "median_ms") -> Dict[tuple, Dict[str, List[Optional[float]]]]:
    """{(out, in): {impl: [dense_ref time / impl time per density (densest first), None where missing]}}.

    ``key`` is the timing compared: "median_ms" (events) or "graph_ms" (each against the reference's same kind).
    """
    ref = reference_impl(results)
    out = {}
    for shape in results["shapes"]:
        shape = tuple(shape)
        r0 = _lookup(results, shape, ref, None) if ref else None
        base = r0.get(key) if r0 else None
        per = {}
        for impl in results["impls"]:
            vals = []
            for d in _densities(results):
                r = _lookup(results, shape, impl, d)
                ms = r.get(key) if r else None
                vals.append(base / ms if (base and ms) else None)
            per[impl] = vals
        out[shape] = per
    return out


def traffic(impl: str, shape, batch: int, n_weights: Optional[int], dtype_name: str) -> dict:
    """Useful flops and modelled bytes of one step (forward + dX + dW) of ``impl``.

    flops: 6·B·n_weights (three products over the live weights; all out·in weights for dense).
    dram_bytes: compulsory traffic of the three kernels: x and dy read by the two kernels that use each, the
    weights read twice, y, dX and dW written once (indices: 4 bytes per entry, read three times).
    l2_bytes (sparse only): what the kernels gather through L2: each live block of size bs (1 for CSR) reads a
    (B, bs) slice of x or dy once per kernel that uses it, four in all: 4·B·n_weights·elem/bs.
    """
    out_f, in_f = shape
    es = ELEM[dtype_name]
    dense = impl.startswith("dense_")
    nw = out_f * in_f if dense or n_weights is None else int(n_weights)
    bs = impl_block_size(impl)
    act = 3 * batch * (in_f + out_f) * es  # x twice + dX once; dy twice + y once
    weights = 3 * nw * es  # read twice, dW written once
    index = 0 if dense else 3 * 4 * (nw // (bs * bs))
    return {"flops": 6 * batch * nw, "dram_bytes": act + weights + index,
            "l2_bytes": None if dense else 4 * batch * nw * es // bs}


def add_fractions(results: dict) -> None:
    """Each timed result's fractions of the measured ceilings, from its median (and graph) time."""
    c = results.get("ceilings") or {}
    for r in results["results"]:
        for key, tag in (("median_ms", ""), ("graph_ms", "_graph")):
            t = r.get(key)
            if not t:
                continue
            sec = t / 1e3
            if c.get("gemm_bf16_tflops") and r.get("flops"):
                r["frac_matmul" + tag] = r["flops"] / sec / (c["gemm_bf16_tflops"] * 1e12)
            if c.get("dram_copy_gbps") and r.get("dram_bytes"):
                r["frac_dram" + tag] = r["dram_bytes"] / sec / (c["dram_copy_gbps"] * 1e9)
            if c.get("l2_read_gbps") and r.get("l2_bytes"):
                r["frac_l2" + tag] = r["l2_bytes"] / sec / (c["l2_read_gbps"] * 1e9)


# The project's targets (docs/GPU.md), on the bf16 training step.
BAR_SHAPE = (8192, 8192)


def evaluate_bars(results: dict) -> List[dict]:
    """[{bar, timing, value, target, ok}]: ok is None where the numbers are missing. Each bar is evaluated on the
    event timings (both sides with host work) and on the graph timings (neither)."""
    out = []
    dense = dense_impl("bf16")

    def ratio(shape, impl, density, key, other=dense):
        a = _lookup(results, shape, other, None if other.startswith("dense_") else density)
        b = _lookup(results, shape, impl, density)
        ta, tb = (a or {}).get(key), (b or {}).get(key)
        return ta / tb if ta and tb else None

    for key in ("median_ms", "graph_ms"):
        for bs, target in ((64, 4.0), (32, 3.0)):
            v = ratio(BAR_SHAPE, f"ours_bsr{bs}", 0.1, key)
            out.append({"bar": f"BSR-{bs} at 90% sparsity, 8192x8192: >= {target:g}x faster than dense bf16", "timing": key,
                        "value": v, "target": target, "ok": None if v is None else v >= target})
        v = ratio(BAR_SHAPE, "ours_csr", 0.01, key)
        r = _lookup(results, BAR_SHAPE, "ours_csr", 0.01) or {}
        frac = r.get("frac_l2" if key == "median_ms" else "frac_l2_graph")
        ok = None if v is None and frac is None else bool((v or 0) >= 2.0 or (frac or 0) >= 0.6)
        out.append({"bar": "CSR at 99% sparsity, 8192x8192: >= 2x faster than dense bf16 or >= 60% of L2 bandwidth",
                    "timing": key, "value": v, "frac_l2": frac, "target": 2.0, "ok": ok})
    # against torch.sparse: event timings only (torch.sparse is not graph-timed)
    for shape in results["shapes"]:
        for d in _densities(results):
            for impl in results["impls"]:
                if not impl.startswith("ours_"):
                    continue
                other = "torch_" + impl[len("ours_"):]
                if other not in results["impls"]:
                    continue
                v = ratio(shape, impl, d, "median_ms", other=other)
                out.append({"bar": f"{impl} faster than {other}, {shape[0]}x{shape[1]} d={d:g}",
                            "timing": "median_ms", "value": v, "target": 1.0,
                            "ok": None if v is None else v > 1.0})
    return out


def format_bars(bars: List[dict]) -> str:
    """One line per speedup bar; the "faster than torch.sparse" bars folded into one line per pair."""
    lines, pairs = [], {}
    for b in bars:
        if b["bar"].startswith("ours_"):
            pair, where = b["bar"].split(", ", 1)
            pairs.setdefault(pair, []).append((where, b))
            continue
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[b["ok"]]
        v = "-" if b["value"] is None else f"{b['value']:.2f}x"
        extra = f", {100 * b['frac_l2']:.0f}% of L2" if b.get("frac_l2") is not None else ""
        lines.append(f"  {mark} {b['bar']} [{b['timing']}]: {v}{extra} (target {b['target']:g}x)")
    for pair, items in pairs.items():
        ok = [b["ok"] for _, b in items]
        mark = "n/a " if all(o is None for o in ok) else ("PASS" if all(o is not False for o in ok) else "FAIL")
        bad = [f"{w} ({b['value']:.2f}x)" for w, b in items if b["ok"] is False]
        missing = sum(o is None for o in ok)
        lines.append(f"  {mark} {pair} at every shape and density [median_ms]: {ok.count(True)}/{len(ok)}"
                     + (f"; slower at {', '.join(bad)}" if bad else "") + (f"; {missing} n/a" if missing else ""))
    return "\n".join(lines)


def format_table(results: dict) -> str:
    """Median ms per step and speedup vs the reference dense implementation, one block per shape."""
    ref = reference_impl(results)
    sp = speedups(results)
    dens = _densities(results)
    bss = results.get("block_sizes", results.get("block_size", "?"))
    lines = [f"device: {results.get('device', '?')} | torch {results.get('torch', '?')} | triton "
             f"{results.get('triton', '?')} | batch {results['batch']} | dtype {results['dtype']} | "
             f"BSR blocks {bss}",
             f"median ms of one step (forward + dX + dW); (Nx) = {ref or 'dense'} time / impl time, >1 is faster "
             "than dense; dense rows do not depend on density; [g] = CUDA-graph ms (no host work)"]
    c = results.get("ceilings")
    if c:
        lines.append("ceilings: " + ", ".join(f"{k} {v:.4g}" for k, v in c.items() if isinstance(v, (int, float))))
    width = 18
    notes = []
    for shape in results["shapes"]:
        shape = tuple(shape)
        lines.append("")
        lines.append(f"{shape[0]}x{shape[1]}")
        lines.append(f"{'impl':<12}" + "".join(f"{f'{100 * d:g}%':>{width}}" for d in dens))
        for impl in results["impls"]:
            cells, gcells = [], []
            for j, d in enumerate(dens):
                r = _lookup(results, shape, impl, d)
                gcells.append(f"{r['graph_ms']:.3f}" if r and r.get("graph_ms") else "-")
                if r is None:
                    cells.append("-")
                elif r.get("median_ms") is None:
                    notes.append(f"{impl} {shape[0]}x{shape[1]} d={d:g}: {r.get('error')}")
                    cells.append("n/a")
                else:
                    s = sp[shape][impl][j]
                    cell = f"{r['median_ms']:.3f}" + (f" ({s:.2f}x)" if s is not None else "")
                    if r.get("check_ok") is False:
                        cell += "!"
                        notes.append(f"{impl} {shape[0]}x{shape[1]} d={d:g}: max rel err {r.get('max_rel_err')}")
                    if r.get("note"):
                        cell += "*"
                        notes.append(f"{impl} {shape[0]}x{shape[1]} d={d:g}: {r['note']}")
                    cells.append(cell)
            lines.append(f"{impl:<12}" + "".join(f"{c:>{width}}" for c in cells))
            if any(g != "-" for g in gcells):
                lines.append(f"{'  [g]':<12}" + "".join(f"{g:>{width}}" for g in gcells))
    if notes:
        lines.append("")
        seen = set()
        for n in notes:
            if n not in seen:
                seen.add(n)
                lines.append("  " + n)
    if results.get("bars"):
        lines.append("")
        lines.append("bars (docs/GPU.md):")
        lines.append(format_bars(results["bars"]))
    return "\n".join(lines)


def write_json(results: dict, path: str) -> str:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path


def plot_speedup(results: dict, path: str) -> str:
    """PNG: speedup vs the reference dense implementation against sparsity, one panel per shape."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = reference_impl(results)
    sp = speedups(results)
    shapes = [tuple(s) for s in results["shapes"]]
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4.2), squeeze=False)
    sparsity = [100 * (1 - d) for d in _densities(results)]
    for ax, shape in zip(axes[0], shapes):
        for impl in results["impls"]:
            if impl == ref:
                continue
            pts = [(x, y) for x, y in zip(sparsity, sp[shape][impl]) if y is not None]
            if not pts:
                continue
            style = ":" if impl.startswith("dense_") else ("-o" if impl.startswith("ours_") else "--s")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=impl, markersize=4)
        ax.axhline(1.0, color="k", linewidth=0.8, linestyle="--", label=ref or "dense")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel(f"speedup vs {ref or 'dense'} (events)")
        ax.set_title(f"{shape[0]}x{shape[1]}, batch {results['batch']}, {results['dtype']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"one training step (forward + dX + dW) on {results.get('device', '?')}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ============================================================================================= timing
def _iters_for(step_ms: float, iters: int, max_s: Optional[float]) -> int:
    """Timed steps: ``iters``, fewer (at least 3) when they would take longer than ``max_s`` seconds."""
    if not max_s or step_ms <= 0:
        return iters
    return max(3, min(iters, int(max_s * 1e3 / step_ms)))


def cuda_timer(step: Callable[[int], object], warmup: int, iters: int, max_s: Optional[float] = None
               ) -> List[float]:
    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    step(warmup)
    t1.record()
    torch.cuda.synchronize()
    iters = _iters_for(t0.elapsed_time(t1), iters, max_s)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        starts[i].record()
        step(warmup + 1 + i)
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def cpu_timer(step: Callable[[int], object], warmup: int, iters: int, max_s: Optional[float] = None
              ) -> List[float]:
    for i in range(warmup):
        step(i)
    out = []
    for i in range(iters):
        t = time.perf_counter()
        step(warmup + i)
        out.append(1e3 * (time.perf_counter() - t))
    return out


def graph_timer(step: Callable[[int], object], rotate: int, replays: int) -> List[float]:
    """ms per step of ``rotate`` steps captured in one CUDA graph, per replay (host work excluded).

    The step must be warm (compiled, autotuned): capture cannot compile or time configurations.
    """
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # one eager run on the capture's side stream, as torch's docs ask
        step(0)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = [step(i) for i in range(rotate)]
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / rotate)
    del outs, g
    return ts


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 for float32 matmuls on or off inside the block, through torch's new API where it has one (mixing it
    with the legacy flag makes torch's getters raise), else the legacy flag."""
    m = torch.backends.cuda.matmul
    new = hasattr(torch.backends, "fp32_precision")
    if new:
        old = m.fp32_precision
        m.fp32_precision = "tf32" if enabled else "ieee"
    else:
        old = m.allow_tf32
        m.allow_tf32 = enabled
    try:
        yield
    finally:
        if new:
            m.fp32_precision = old
        else:
            m.allow_tf32 = old


def measure_ceilings(log=print) -> dict:
    """The ceilings of this GPU, measured now: dense bf16 GEMM rate, DRAM copy bandwidth (bytes read + written),
    L2 read and copy bandwidth on L2-resident buffers (CUDA graphs of many small kernels: no launch gaps)."""
    out = {}

    def events(fn, n):
        ts = []
        for _ in range(n):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        return statistics.median(ts) / 1e3

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    out["gemm_bf16_tflops"] = 2 * n ** 3 / events(lambda: a @ b, 10) / 1e12
    del a, b
    src = torch.empty(2 ** 28, device="cuda", dtype=torch.float32).uniform_()  # 1 GiB
    dst = torch.empty_like(src)
    dst.copy_(src)
    out["dram_copy_gbps"] = 2 * src.nbytes / events(lambda: dst.copy_(src), 10) / 1e9
    del src, dst
    small = torch.empty(2 ** 21, device="cuda", dtype=torch.float32).uniform_()  # 8 MiB: L2-resident
    small_dst = torch.empty_like(small)
    acc = torch.empty((), device="cuda")
    reps = 100
    for name, fn, nbytes in (("l2_copy_gbps", lambda: small_dst.copy_(small), 2 * small.nbytes),
                             ("l2_read_gbps", lambda: torch.sum(small, dim=0, out=acc), small.nbytes)):
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                fn()
        g.replay()
        out[name] = reps * nbytes / events(g.replay, 5) / 1e9
        del g
    log("ceilings: " + ", ".join(f"{k} {v:.4g}" for k, v in out.items()))
    return out


# ============================================================================================= steps
# Each builder returns step(i) -> (y, dx, dW) using the i-th rotating input; dW in the layout of the
# implementation (dense, torch sparse tensor, or values in pattern order); see _dw_dense for the check.
def _step_dense(w, xs, dys):
    def step(i):
        x, dy = xs[i % len(xs)], dys[i % len(dys)]
        return x @ w.t(), dy @ w, dy.t() @ x
    return step


def _step_torch_csr(w, xs, dys):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        wc = w.to_sparse_csr().requires_grad_()
    xs = [x.detach().requires_grad_() for x in xs]

    def step(i):
        x, dy = xs[i % len(xs)], dys[i % len(dys)]
        yt = torch.sparse.mm(wc, x.t())  # (out, batch)
        dx, dw = torch.autograd.grad(yt, (x, wc), dy.t())
        return yt.t(), dx, dw
    return step


def _step_torch_bsr(w, xs, dys, bs):
    from torch.sparse._triton_ops import bsr_dense_mm, sampled_addmm  # present with triton on CUDA
    if bsr_dense_mm is None or sampled_addmm is None:  # pragma: no cover
        raise RuntimeError("torch.sparse._triton_ops has no bsr_dense_mm/sampled_addmm here")
    wb = w.to_sparse_bsr((bs, bs))
    wtb = w.t().contiguous().to_sparse_bsr((bs, bs))

    def step(i):
        x, dy = xs[i % len(xs)], dys[i % len(dys)]
        y = bsr_dense_mm(wb, x.t()).t()
        dx = bsr_dense_mm(wtb, dy.t()).t()
        dw = sampled_addmm(wb, dy.t(), x, beta=0.0)
        return y, dx, dw
    return step


def _step_ours(p, values, xs, dys, layout):
    import triton_kernels as tk
    out_f, in_f = p.shape
    r, c, cp, rw, pm = p.rowptr, p.col, p.colptr, p.row, p.perm
    bs = p.block_size
    if layout == "csr":
        def step(i):
            x, dy = xs[i % len(xs)], dys[i % len(dys)]
            dy = dy.t().contiguous().t()  # one feature-major copy for dX and dW, as sparsecore's backward makes
            return (tk.csr_spmm(x, values, r, c, out_f), tk.csr_spmm_t(dy, values, cp, rw, pm, in_f, rowptr=r),
                    tk.csr_sddmm(dy, x, r, c))
    else:
        def step(i):
            x, dy = xs[i % len(xs)], dys[i % len(dys)]
            return (tk.bsr_spmm(x, values, r, c, out_f), tk.bsr_spmm_t(dy, values, cp, rw, pm, in_f),
                    tk.bsr_sddmm(dy, x, r, c, bs))
    return step


def _dw_dense(dw, pattern) -> torch.Tensor:
    """dW of any implementation as a dense float32 (out, in) tensor."""
    if isinstance(dw, torch.Tensor) and dw.layout != torch.strided:
        return dw.to_dense().float()
    if dw.shape == pattern.values_shape and tuple(dw.shape) != tuple(pattern.shape):
        return pattern.to_dense(dw.float())
    return dw.float()


def _rel_err(out, ref) -> float:
    return float((out.detach().float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# ============================================================================================= run
def _versions() -> dict:
    v = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": None,
         "python": platform.python_version()}
    try:
        import triton
        v["triton"] = triton.__version__
    except Exception:
        pass
    return v


def _device_info(device: str) -> dict:
    if not device.startswith("cuda"):
        return {"device": "cpu"}
    p = torch.cuda.get_device_properties(device)
    return {"device": p.name, "device_props": {
        "sm_count": p.multi_processor_count, "capability": f"{p.major}.{p.minor}",
        "memory_gib": round(p.total_memory / 2 ** 30, 1),
        "l2_mib": round(getattr(p, "L2_cache_size", 0) / 2 ** 20, 1) or None}}


def _random_patterns(out_f, in_f, density, block_sizes, gen, device):
    """{1: CSR pattern, bs: BSR pattern of block size bs} at ``density``, each with at least one entry."""
    from sparsecore.pattern import Pattern
    pats = {}
    for bs in [1] + [b for b in block_sizes if b > 1]:
        bmask = torch.rand(out_f // bs, in_f // bs, generator=gen, device=device) < density
        if not bool(bmask.any()):
            bmask[0, 0] = True
        m = bmask if bs == 1 else bmask.repeat_interleave(bs, 0).repeat_interleave(bs, 1)
        pats[bs] = Pattern.from_mask(m.cpu(), block_size=bs).to(device)
    return pats


def run(args: argparse.Namespace, device: str = "cuda", timer=None, log=print,
        checkpoint: Optional[Callable[[dict], None]] = None) -> dict:
    """Run every (shape, density, implementation); returns the results dict (see write_json).

    ``checkpoint(results)`` is called after each shape with the results so far (the caller writes them).
    """
    cuda = device.startswith("cuda")
    timer = timer or (cuda_timer if cuda else cpu_timer)
    deadline = time.monotonic() + args.max_seconds if args.max_seconds else None
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    results = {**_device_info(device), **_versions(), "date": datetime.date.today().isoformat(),
               "batch": args.batch, "dtype": args.dtype, "block_sizes": list(args.block_sizes),
               "warmup": args.warmup, "iters": args.iters, "rotate": args.rotate, "tf32_dense_fp32": args.tf32,
               "graph_replays": args.graph_replays if cuda else 0,
               "shapes": [list(s) for s in args.shapes], "densities": list(args.densities),
               "impls": list(args.impls), "ceilings": None, "results": [], "bars": None}
    if cuda and args.ceilings:
        try:
            results["ceilings"] = measure_ceilings(log)
        except Exception as e:  # the benchmark itself is still worth running
            results["ceilings_error"] = f"{type(e).__name__}: {e}"[:400]
            log(f"ceilings: {results['ceilings_error']}")

    def sync():
        if cuda:
            try:
                torch.cuda.synchronize()
            except Exception:  # a failed kernel's error resurfaces here; it is already recorded
                pass

    def record(shape, density, impl, **kw):
        rec = {"shape": list(shape), "density": density, "impl": impl, "block_size": impl_block_size(impl),
               "median_ms": None, "graph_ms": None, "error": None, "note": None, "max_rel_err": None,
               "check_ok": None, **kw}
        results["results"].append(rec)
        return rec

    def out_of_time(rec) -> bool:
        if deadline is not None and time.monotonic() > deadline:
            rec["error"] = "skipped: the run's time budget (--max-seconds) was spent"
            rec["skipped"] = True
            return True
        return False

    def time_it(rec, step):
        try:
            ts = timer(step, args.warmup, args.iters, args.max_impl_seconds)
            rec.update(median_ms=statistics.median(ts), min_ms=min(ts), iters=len(ts),
                       times_ms=[round(t, 4) for t in ts])
        except Exception as e:  # an implementation failing must not stop the others
            rec["error"] = f"{type(e).__name__}: {e}"[:400]
        sync()
        if cuda and rec["median_ms"] is not None and args.graph_replays and rec["impl"].startswith(GRAPH_PREFIXES):
            try:
                g = graph_timer(step, args.rotate, args.graph_replays)
                rec.update(graph_ms=statistics.median(g), graph_times_ms=[round(t, 4) for t in g])
            except Exception as e:
                rec["graph_error"] = f"{type(e).__name__}: {e}"[:300]
            sync()

    def shown(rec):
        if rec["median_ms"] is None:
            return str(rec["error"])
        s = f"{rec['median_ms']:.4f} ms"
        if rec.get("graph_ms"):
            s += f", graph {rec['graph_ms']:.4f} ms"
        if rec["max_rel_err"] is not None:
            s += f" (max rel err {rec['max_rel_err']:.2e})"
        return s

    for shape in args.shapes:
        out_f, in_f = shape
        base = {n: torch.randn(args.batch, in_f, generator=gen, device=device) for n in range(args.rotate)}
        grads = {n: torch.randn(args.batch, out_f, generator=gen, device=device) for n in range(args.rotate)}
        w_full = torch.randn(out_f, in_f, generator=gen, device=device) / math.sqrt(in_f)
        # ---- dense (density-independent)
        for impl in args.impls:
            if not impl.startswith("dense_"):
                continue
            dn = impl.split("_", 1)[1]
            dt = DTYPES[dn]
            rec = record(shape, None, impl, dtype=dn, **traffic(impl, shape, args.batch, None, dn))
            if out_of_time(rec):
                continue
            with tf32(bool(args.tf32 and dt == torch.float32)):
                xs, dys = [base[n].to(dt) for n in base], [grads[n].to(dt) for n in grads]
                time_it(rec, _step_dense(w_full.to(dt), xs, dys))
                del xs, dys
            log(f"{out_f}x{in_f} {impl}: {shown(rec)}")
        xs, dys = [base[n].to(dtype) for n in base], [grads[n].to(dtype) for n in grads]
        # ---- sparse
        for density in args.densities:
            block_sizes = sorted({impl_block_size(i) for i in args.impls if not i.startswith("dense_")} - {1})
            pats = _random_patterns(out_f, in_f, density, block_sizes, gen, device)
            # the masked weights, rounded to the benchmark dtype like every sparse implementation's operands
            ws = {bs: (w_full * p.mask()).to(dtype) for bs, p in pats.items()}
            for impl in args.impls:
                if impl.startswith("dense_"):
                    continue
                bs = impl_block_size(impl)
                pat, w = pats[bs], ws[bs]
                rec = record(shape, density, impl, dtype=args.dtype, nnz=pat.nnz, n_weights=pat.n_weights,
                             **traffic(impl, shape, args.batch, pat.n_weights, args.dtype))
                if out_of_time(rec):
                    continue
                try:
                    rxs, rdys, wi = xs, dys, w
                    if impl == "torch_csr":
                        try:  # cuSPARSE's SpMM/SDDMM may lack the dtype: fall back to float32
                            _step_torch_csr(w, xs[:1], dys[:1])(0)
                        except RuntimeError as e:
                            if dtype == torch.float32:
                                raise
                            rxs, rdys, wi = [x.float() for x in xs], [d.float() for d in dys], w.float()
                            rec["note"] = f"ran in float32 ({str(e).splitlines()[0][:120]})"
                            rec["dtype"] = "fp32"
                            rec.update(traffic(impl, shape, args.batch, pat.n_weights, "fp32"))
                        step = _step_torch_csr(wi, rxs, rdys)
                    elif impl.startswith("torch_bsr"):
                        step = _step_torch_bsr(w, xs, dys, bs)
                    else:
                        step = _step_ours(pat, pat.gather(w), xs, dys, impl_layout(impl))
                    if args.check:
                        y, dx, dw = step(0)
                        with tf32(False):
                            x0, dy0, w32 = rxs[0].float(), rdys[0].float(), wi.float()
                            m = pat.mask()
                            errs = [_rel_err(y, x0 @ w32.t()), _rel_err(dx, dy0 @ w32),
                                    _rel_err(_dw_dense(dw, pat) * m, (dy0.t() @ x0) * m)]
                        rec["max_rel_err"] = max(errs)
                        rec["check_ok"] = rec["max_rel_err"] <= CHECK_TOL[rec["dtype"]]
                        del y, dx, dw
                except Exception as e:
                    rec["error"] = f"{type(e).__name__}: {e}"[:400]
                    sync()
                    log(f"{out_f}x{in_f} d={density:g} {impl}: {rec['error']}")
                    continue
                time_it(rec, step)
                del step
                log(f"{out_f}x{in_f} d={density:g} {impl}: {shown(rec)}")
            del pats, ws
            if cuda:
                torch.cuda.empty_cache()
        del xs, dys, base, grads, w_full
        _finish(results)
        if checkpoint:
            checkpoint(results)
    _finish(results)
    return results


def _finish(results: dict) -> None:
    add_fractions(results)
    results["bars"] = evaluate_bars(results)
    try:
        from triton_kernels import _common as C
        from triton_kernels import bsr, csr
        results["autotuned"] = {**C.tuned_configs(csr._JIT), **C.tuned_configs(bsr._JIT)}
    except Exception:  # triton absent: nothing was tuned
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device available (torch.cuda.is_available() is False); this benchmark "
              "needs a GPU. Nothing was run.", file=sys.stderr)
        return 2
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    device_name = _device_info(args.device)["device"]
    stem = args.name or result_name(device_name)
    json_path = os.path.join(args.out, stem + ".json")

    def checkpoint(res):
        write_json(res, json_path)

    results = run(args, device=args.device, log=lambda s: print(s, file=sys.stderr, flush=True),
                  checkpoint=checkpoint)
    print(format_table(results))
    path = write_json(results, json_path)
    print(f"\nwrote {path}")
    if args.plot:
        try:
            print(f"wrote {plot_speedup(results, os.path.join(args.out, stem + '.png'))}")
        except ImportError:
            print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
