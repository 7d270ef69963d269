"""``sparsecore bench``: one training step of a sparse linear layer against the alternatives, in one run.

For each density it times a whole training step as a training loop runs it (``zero_grad`` with set_to_none,
torch's default, then forward, then backward to the input, the weights and the bias) of:

    dense        nn.Linear (MKL/oneDNN GEMMs): the baseline every ratio is taken against
    dense*mask   nn.Linear with its weight multiplied by a 0/1 mask (what most sparse-training code does)
    torch.sparse a CSR weight with autograd (torch.sparse.mm)
    sparseprop   sparseprop.modules.SparseLinear, when that package is installed
    sparsecore   sparsecore.SparseLinear (CSR, C++ kernels)

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
    try:
        from importlib.metadata import version

        import sparseprop  # noqa: F401

        info["sparseprop"] = version("sparseprop")
    except Exception:
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
               include: List[str]) -> List[Impl]:
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
    if "sparsecore" in include:
        sl = SparseLinear(in_f, out_f, pattern=pattern, dtype=dtype)
        impls.append(Impl("sparsecore", run(lambda: sl(x), list(sl.parameters())), lambda: _tensor_bytes(
            sl.values, sl.values.grad, sl.bias, sl.bias.grad, *sl.pattern.tensors().values())))
    return impls


def bench_density(out_f, in_f, batch, density, dtype, repeat, warmup, seed, include,
                  block: int = 1) -> Dict[str, Dict[str, float]]:
    impls = make_impls(out_f, in_f, batch, density, dtype, seed, include)
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


ALL = ["dense", "dense*mask", "torch.sparse", "sparseprop", "sparsecore"]


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
    ap.add_argument("--impls", default=",".join(ALL), help=f"subset of {','.join(ALL)}")
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
    if min(args.out_features, args.in_features, args.batch, args.repeat, args.block) < 1:
        ap.error("sizes, batch, repeat and block must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    info = machine_info()
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
                          args.seed, include, args.block)
        results.append({"density": d, "impls": r})
        base, ours = r.get("dense", {}).get("median_ms"), r.get("sparsecore", {}).get("median_ms")
        print(f" {time.perf_counter() - t0:.0f} s" + (f", sparsecore {base / ours:.2f}x dense" if base and ours
                                                        else ""), flush=True)
    print()
    names = [n for n in ALL if any(n in r["impls"] for r in results)]
    print(format_table(results, names))
    if "sparseprop" in include and "sparseprop" not in names:
        print("\n(sparseprop is not installed: pip install --no-build-isolation sparseprop to include it)")
    if args.json:
        payload = {"shape": [args.out_features, args.in_features], "batch": args.batch, "dtype": args.dtype,
                   "repeat": args.repeat, "block": args.block, "machine": info, "results": results}
        write_text_atomic(json.dumps(payload, indent=2) + "\n", args.json)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
