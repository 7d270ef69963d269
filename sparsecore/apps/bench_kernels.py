"""``sparsecore bench``: one training step of a sparse linear layer against the alternatives, in one run.

For each density it times a whole training step as a training loop runs it (``zero_grad`` with set_to_none,
torch's default, then forward, then backward to the input, the weights and the bias) of:

    dense        nn.Linear (MKL/oneDNN GEMMs): the baseline every ratio is taken against
    dense*mask   nn.Linear with its weight multiplied by a 0/1 mask (what most sparse-training code does)
    torch.sparse a CSR weight with autograd (torch.sparse.mm)
    sparseprop   sparseprop.modules.SparseLinear, when that package is installed
    sparselab    sparselab.SparseLinear (Padded-CSR, padding 0), when that package is installed
    sparsecore   sparsecore.SparseLinear (CSR, C++ kernels)
    sparsecore-bsr  sparsecore.SparseLinear with block_size x block_size blocks (``--block-size``, 32)

With ``--sizes`` and ``--batches`` it runs the scaling sweep instead: square layers of each width at each batch,
dense and sparsecore (CSR, and BSR with ``--impls``) at each density, a table of speed-ups and, with ``--plot``,
a PNG of speed-up against width and against batch.

Steps are timed as a training loop runs them: in blocks of ``--block`` consecutive steps of one implementation,
after one untimed step that pays for the caches the previous implementation evicted (dense's step writes a
64 MiB weight gradient and leaves nothing of a sparse layer's structure in the caches). The blocks go round-robin
over the implementations, so each gets the same share of whatever noise the machine has. The table reports
medians and the ratio ``dense time / time`` (higher is faster).
Memory is what the layer keeps between steps: parameters, their gradients, and the sparsity structure.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ..nn import SparseLinear
from ..pattern import Pattern
from .train import write_text_atomic
from .train import machine_info as _train_machine_info


def machine_info() -> Dict[str, object]:
    """:func:`sparsecore.apps.train.machine_info` plus the version of sparseprop when it is installed."""
    info = dict(_train_machine_info())
    from importlib.metadata import PackageNotFoundError, version

    for peer in ("sparseprop", "sparselab"):
        try:
            info[peer] = version(peer)
        except PackageNotFoundError:
            pass
    return info


def _tensor_bytes(*ts) -> int:
    total = 0
    for t in ts:
        if t is None:
            continue
        if t.layout == torch.sparse_csr:
            total += sum(x.numel() * x.element_size() for x in (t.values(), t.crow_indices(), t.col_indices()))
        else:
            total += t.numel() * t.element_size()
    return total


class Impl:
    """One implementation under test: step() runs forward + backward; memory() after a step."""

    def __init__(self, name: str, step: Callable[[], None], memory: Callable[[], int]):
        self.name, self.step, self.memory = name, step, memory


def make_impls(out_f: int, in_f: int, batch: int, density: float, dtype: torch.dtype, seed: int,
               include: List[str], block_size: int = 32) -> List[Impl]:
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, dtype=dtype)
    from ..topology import uniform

    pattern: Pattern = uniform(out_f, in_f, density, generator=gen)
    x = torch.randn(batch, in_f, dtype=dtype, generator=gen, requires_grad=True)
    dy = torch.randn(batch, out_f, dtype=dtype, generator=gen)
    impls: List[Impl] = []

    def run(fn, params):
        # One step of a training loop: optimizer.zero_grad() (set_to_none, torch's default), forward, backward.
        def step():
            for p in (x, *params):
                p.grad = None
            fn().backward(dy)
        return step

    if "dense" in include:
        d = nn.Linear(in_f, out_f, dtype=dtype)
        impls.append(Impl("dense", run(lambda: d(x), list(d.parameters())), lambda: _tensor_bytes(d.weight, d.weight.grad, d.bias, d.bias.grad)))
    mask = None
    if "dense*mask" in include or "torch.sparse" in include or "sparseprop" in include:
        mask = pattern.mask()
    if "dense*mask" in include:
        dm = nn.Linear(in_f, out_f, dtype=dtype)
        m = mask.to(dtype)
        impls.append(Impl("dense*mask", run(lambda: nn.functional.linear(x, dm.weight * m, dm.bias), list(dm.parameters())),
                          lambda: _tensor_bytes(dm.weight, dm.weight.grad, dm.bias, dm.bias.grad, m)))
    if "torch.sparse" in include:
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            w_csr = (lin.weight.detach() * mask).to_sparse_csr().requires_grad_()
        b = lin.bias.detach().clone().requires_grad_()
        impls.append(Impl("torch.sparse", run(lambda: torch.sparse.mm(w_csr, x.T).T + b, [w_csr, b]),
                          lambda: _tensor_bytes(w_csr, w_csr.grad, b, b.grad)))
    if "sparseprop" in include:
        try:
            from sparseprop.modules import SparseLinear as SPLinear
        except Exception:
            SPLinear = None
        if SPLinear is not None and dtype == torch.float32:
            ref = nn.Linear(in_f, out_f)
            with torch.no_grad():
                ref.weight.copy_(lin.weight * mask)
            sp = SPLinear.from_dense(ref)
            impls.append(Impl("sparseprop", run(lambda: sp(x), list(sp.parameters())), lambda: _tensor_bytes(
                sp.W_val, sp.W_val.grad, sp.bias, None if sp.bias is None else sp.bias.grad, *sp.W_idx)))
    if "sparselab" in include and dtype == torch.float32:
        try:
            import sparselab
        except Exception:
            sparselab = None
        if sparselab is not None:
            torch.manual_seed(seed)
            with warnings.catch_warnings():  # torch's "sparse CSR support is in beta", raised by its constructor
                warnings.simplefilter("ignore")
                lab = sparselab.SparseLinear(in_f, out_f, sparsity=1.0 - density, padding_ratio=0.0)
            params = list(lab.parameters())
            impls.append(Impl("sparselab", run(lambda: lab(x), params), lambda: _tensor_bytes(
                *params, *(p.grad for p in params), *lab.buffers())))
    if "sparsecore" in include:
        sl = SparseLinear(in_f, out_f, pattern=pattern, dtype=dtype)
        impls.append(Impl("sparsecore", run(lambda: sl(x), list(sl.parameters())), lambda: _tensor_bytes(
            sl.values, sl.values.grad, sl.bias, sl.bias.grad, *sl.pattern.tensors().values())))
    if "sparsecore-bsr" in include and out_f % block_size == 0 and in_f % block_size == 0:
        from ..topology import random_blocks

        bl = SparseLinear(in_f, out_f, dtype=dtype, pattern=random_blocks(out_f, in_f, density, block_size,
                                                                           generator=gen))
        impls.append(Impl("sparsecore-bsr", run(lambda: bl(x), list(bl.parameters())), lambda: _tensor_bytes(
            bl.values, bl.values.grad, bl.bias, bl.bias.grad, *bl.pattern.tensors().values())))
    return impls


def bench_density(out_f, in_f, batch, density, dtype, repeat, warmup, seed, include,
                  block: int = 1, block_size: int = 32) -> Dict[str, Dict[str, float]]:
    impls = make_impls(out_f, in_f, batch, density, dtype, seed, include, block_size)
    for impl in impls:
        for _ in range(warmup):
            impl.step()
    times: Dict[str, List[float]] = {i.name: [] for i in impls}
    for r in range(0, repeat, block):
        for impl in impls:  # round-robin over blocks: the same noise for everyone
            impl.step()  # untimed: refills the caches after the previous implementation
            for _ in range(min(block, repeat - r)):
                t0 = time.perf_counter()
                impl.step()
                times[impl.name].append(time.perf_counter() - t0)
    return {i.name: {"median_ms": 1e3 * statistics.median(times[i.name]), "memory_mb": i.memory() / 2**20}
            for i in impls}


def format_table(results: List[dict], names: List[str]) -> str:
    head = f"{'density':>8} {'sparsity':>8} | " + " | ".join(f"{n:>24}" for n in names)
    sub = f"{'':>8} {'':>8} | " + " | ".join(f"{'ms':>8} {'x dense':>7} {'MB':>7}" for _ in names)
    lines = [head, sub, "-" * len(head)]
    for r in results:
        base = r["impls"].get("dense", {}).get("median_ms")
        cells = []
        for n in names:
            v = r["impls"].get(n)
            if v is None:
                cells.append(f"{'-':>8} {'-':>7} {'-':>7}")
                continue
            ratio = base / v["median_ms"] if base else float("nan")
            cells.append(f"{v['median_ms']:8.1f} {ratio:7.2f} {v['memory_mb']:7.1f}")
        lines.append(f"{r['density']:8.3f} {1 - r['density']:8.1%} | " + " | ".join(cells))
    return "\n".join(lines)


ALL = ["dense", "dense*mask", "torch.sparse", "sparseprop", "sparselab", "sparsecore", "sparsecore-bsr"]
DEFAULT_IMPLS = ["dense", "dense*mask", "torch.sparse", "sparseprop", "sparselab", "sparsecore"]


def _ints(s: str, name: str) -> List[int]:
    try:
        v = [int(t) for t in s.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be comma-separated integers, got {s!r}") from None
    if not v or min(v) < 1:
        raise argparse.ArgumentTypeError(f"{name} must be positive integers, got {s!r}")
    return v


def sweep(sizes: List[int], batches: List[int], densities: List[float], dtype, repeat, warmup, seed, include,
          block, block_size, say=print) -> List[dict]:
    """Speed-ups of square layers of each width at each batch and density (one run; each cell's ratio is taken
    against dense timed in the same round-robin)."""
    rows = []
    for n in sizes:
        for b in batches:
            for d in densities:
                r = bench_density(n, n, b, d, dtype, repeat, warmup, seed, include, block, block_size)
                base = r["dense"]["median_ms"]
                row = {"width": n, "batch": b, "density": d, "dense_ms": base,
                       "speedup": {k: base / v["median_ms"] for k, v in r.items() if k != "dense"},
                       "impls": r}
                rows.append(row)
                say(f"  {n}x{n} batch {b:5d} density {d:g}: dense {base:8.2f} ms, " +
                    ", ".join(f"{k} {v:.2f}x" for k, v in row["speedup"].items()))
    return rows


def plot_sweep(rows: List[dict], path: str) -> Optional[str]:
    """Speed-up of sparsecore (CSR) against width (one line per batch and density) and against batch."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    keys = sorted({(r["batch"], r["density"]) for r in rows})
    for k, (b, d) in enumerate(keys):
        pts = sorted((r["width"], r["speedup"].get("sparsecore")) for r in rows if (r["batch"], r["density"]) == (b, d))
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"batch {b}, density {d:g}",
                     color=f"C{k % 10}")
    keys = sorted({(r["width"], r["density"]) for r in rows})
    for k, (w, d) in enumerate(keys):
        pts = sorted((r["batch"], r["speedup"].get("sparsecore")) for r in rows if (r["width"], r["density"]) == (w, d))
        axes[1].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{w}x{w}, density {d:g}",
                     color=f"C{k % 10}")
    axes[0].set(xscale="log", yscale="log", xlabel="width (square layer)", ylabel="speed-up (dense time / ours)",
                title="training-step speed-up vs width")
    axes[1].set(xscale="log", yscale="log", xlabel="batch", ylabel="speed-up (dense time / ours)",
                title="training-step speed-up vs batch")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="sparsecore bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-features", type=int, default=4096)
    ap.add_argument("--in-features", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--densities", default="0.5,0.1,0.05,0.01", help="comma-separated live fractions")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--repeat", type=int, default=10, help="timed steps per implementation (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--block", type=int, default=5, help="consecutive timed steps of one implementation per turn")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--impls", default=",".join(DEFAULT_IMPLS), help=f"subset of {','.join(ALL)}")
    ap.add_argument("--block-size", type=int, default=32, help="block size of sparsecore-bsr")
    ap.add_argument("--sizes", default=None, help="scaling sweep: comma-separated widths of square layers")
    ap.add_argument("--batches", default=None, help="scaling sweep: comma-separated batch sizes")
    ap.add_argument("--plot", default=None, help="scaling sweep: write the speed-up plot (PNG) here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    try:
        densities = [float(d) for d in args.densities.split(",")]
    except ValueError:
        ap.error(f"--densities must be comma-separated numbers, got {args.densities!r}")
    if any(not 0 < d <= 1 for d in densities):
        ap.error("every density must be in (0, 1]")
    include = [s.strip() for s in args.impls.split(",") if s.strip()]
    unknown = set(include) - set(ALL)
    if unknown:
        ap.error(f"unknown implementations {sorted(unknown)}; choose from {ALL}")
    if min(args.out_features, args.in_features, args.batch, args.repeat, args.block, args.block_size) < 1:
        ap.error("sizes, batch, repeat, block and block size must be positive")
    if (args.sizes is None) != (args.batches is None):
        ap.error("the scaling sweep needs both --sizes and --batches")
    try:
        sizes = _ints(args.sizes, "--sizes") if args.sizes else None
        batches = _ints(args.batches, "--batches") if args.batches else None
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    info = machine_info()
    if sizes:
        if "dense" not in include:
            include = ["dense"] + include
        print(f"sparsecore bench: scaling sweep, widths {sizes}, batches {batches}, densities {densities}, "
              f"{args.dtype}, {torch.get_num_threads()} threads; speed-up = dense time / time", flush=True)
        rows = sweep(sizes, batches, densities, dtype, args.repeat, args.warmup, args.seed, include, args.block,
                     args.block_size, say=lambda t: print(t, flush=True))
        note = plot_sweep(rows, args.plot) if args.plot else None
        if args.plot:
            print(note or f"wrote {args.plot}")
        if args.json:
            write_text_atomic(json.dumps({"sweep": rows, "dtype": args.dtype, "repeat": args.repeat,
                                          "block": args.block, "machine": info}, indent=2) + "\n", args.json)
            print(f"wrote {args.json}")
        return 0
    print(f"sparsecore bench: one training step (forward + backward) of a {args.out_features}x{args.in_features} "
          f"linear layer, batch {args.batch}, {args.dtype}")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"steps: zero_grad(set_to_none) + forward + backward; {args.repeat} timed per implementation, in blocks of "
          f"{args.block} consecutive steps after an untimed one, blocks round-robin")
    print("ratio = dense median / median (higher is faster); MB = parameters + gradients + sparsity structure\n",
          flush=True)
    results = []
    for d in densities:
        t0 = time.perf_counter()
        print(f"  density {d:g}: timing {len(include)} implementations ...", end="", flush=True)
        r = bench_density(args.out_features, args.in_features, args.batch, d, dtype, args.repeat, args.warmup,
                          args.seed, include, args.block, args.block_size)
        results.append({"density": d, "impls": r})
        base, ours = r.get("dense", {}).get("median_ms"), r.get("sparsecore", {}).get("median_ms")
        print(f" {time.perf_counter() - t0:.0f} s" + (f", sparsecore {base / ours:.2f}x dense" if base and ours
                                                        else ""), flush=True)
    print()
    names = [n for n in ALL if any(n in r["impls"] for r in results)]
    print(format_table(results, names))
    for peer, how in (("sparseprop", "pip install --no-build-isolation sparseprop"),
                      ("sparselab", "pip install --no-deps sparselab")):
        if peer in include and peer not in names:
            print(f"\n({peer} is not installed: {how} to include it)")
    if args.json:
        payload = {"shape": [args.out_features, args.in_features], "batch": args.batch, "dtype": args.dtype,
                   "repeat": args.repeat, "block": args.block, "block_size": args.block_size, "machine": info,
                   "results": results}
        write_text_atomic(json.dumps(payload, indent=2) + "\n", args.json)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
