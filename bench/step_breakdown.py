"""Where one training step of a method's MLP goes: data, kernels (with their transposes), the rest of the forward
and backward (autograd, Python, ReLU, loss), the optimizer, and the topology updater's per-step work.

    python bench/step_breakdown.py --method set --threads 1          # Fashion-MNIST shapes, batch 100
    python bench/step_breakdown.py --method ctre --epsilon 1 --threads 2 --json out.json

Every part is timed in the same process, as medians over ``--steps`` repetitions, on the shapes of the real model
(784-1000-1000-1000-10 by default) with random data of the same size (no dataset needed):

* ``step``: what ``sparsecore train`` does per step (zero_grad, forward, loss, backward, optimizer.step(),
  updater.step(), the loss and accuracy read-outs), on a batch indexed from a 60,000-row training set.
* ``data``: indexing the batch (``x[idx]``, ``y[idx]``).
* ``kernels``: every layer's three kernels (forward SpMM, dX SpMM over the transpose index, dW SDDMM) called
  directly; ``kernels at nnz 0``: the same calls on patterns with no entries, i.e. what a call costs beyond its
  arithmetic (the batch-tile transposes, scratch, thread start-up). Dense layers' GEMMs are timed as
  ``torch.mm`` of the same shapes.
* ``optimizer``: ``optimizer.step()`` alone; ``updater``: ``updater.step()`` alone, between updates (the hooks'
  cost is in ``step``).
* ``autograd + Python + rest``: ``step`` minus the parts above (autograd bookkeeping, module calls, ReLU,
  cross-entropy, bias gradients, zero_grad).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sparsecore import SparseLinear  # noqa: E402
from sparsecore.apps.models import build_model, make_updater  # noqa: E402
from sparsecore.apps.train.report import machine_info  # noqa: E402
from sparsecore.ops import _sddmm_impl, _spmm_impl, _spmm_t_impl  # noqa: E402
from sparsecore.pattern import Pattern  # noqa: E402


def median_us(fn, steps: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(ts)


def layer_io(model, batch: int):
    """(layer, x (batch, in), dy (batch, out)) for every linear layer, with activations of the right sizes and in
    the layouts the model's step gives them (between sparse layers: feature-major)."""
    from sparsecore import feature_major

    out = []
    for k, m in enumerate(m for m in model.modules() if isinstance(m, (SparseLinear, torch.nn.Linear))):
        x, dy = torch.randn(batch, m.in_features).relu(), torch.randn(batch, m.out_features)
        if isinstance(m, SparseLinear) and getattr(m, "feature_major", False):
            x, dy = (x if k == 0 else feature_major(x)), feature_major(dy)
        out.append((m, x, dy))
    return out


def kernel_calls(io, empty: bool = False):
    calls = []
    for m, x, dy in io:
        if isinstance(m, SparseLinear):
            p = m.pattern
            if empty:
                p = Pattern.from_indices(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                                         p.shape, p.block_size)
            v = torch.randn(p.values_shape)
            calls += [lambda x=x, v=v, p=p: _spmm_impl(x, v, None, p.rowptr, p.col, p.shape[0], p.block_size),
                      lambda dy=dy, v=v, p=p: _spmm_t_impl(dy, v, p.rowptr, p.colptr, p.row, p.perm, p.shape[1],
                                                                       p.block_size),
                      lambda dy=dy, x=x, p=p: _sddmm_impl(dy, x, p.rowptr, p.col, p.block_size)]
        elif not empty:
            w = m.weight.detach()
            calls += [lambda x=x, w=w: x @ w.t(), lambda dy=dy, w=w: dy @ w, lambda dy=dy, x=x: dy.t() @ x]
    return calls


def breakdown(method: str, epsilon, density, hidden, batch: int, threads: int, steps: int, seed: int = 0) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = build_model(method, 784, 10, hidden, epsilon=epsilon, density=density, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4, fused=True)
    spe = 60000 // batch
    updater = make_updater(method, model, opt, epochs=100, steps_per_epoch=spe, seed=seed)
    x_all, y_all = torch.randn(60000, 784), torch.randint(0, 10, (60000,))
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(60000, generator=gen)
    pos = [0]

    def batch_idx():
        i = pos[0]
        pos[0] = (i + batch) % (60000 - batch)
        return perm[i:i + batch]

    def data():
        idx = batch_idx()
        return x_all[idx], y_all[idx]

    def step():
        xb, yb = data()
        opt.zero_grad(set_to_none=True)
        out = model(xb)
        loss = F.cross_entropy(out, yb)
        loss.backward()
        opt.step()
        if updater is not None:
            updater.step()
        float(loss.detach())
        int((out.detach().argmax(1) == yb).sum())

    # keep the updater between updates: the breakdown is of an ordinary step
    if updater is not None:
        updater.total_epochs = 10**9
    t = {"step": median_us(step, steps)}
    t["data"] = median_us(data, steps)
    io = layer_io(model, batch)
    calls = kernel_calls(io)
    t["kernels"] = median_us(lambda: [c() for c in calls], steps)
    empty = kernel_calls(io, empty=True)
    t["kernels at nnz 0"] = median_us(lambda: [c() for c in empty], steps) if empty else 0.0
    t["optimizer"] = median_us(opt.step, steps)
    if updater is not None:
        t_saved, n_saved = updater.t, updater.n_updates
        updater.per_epoch, updater.every = True, None  # never due inside this timing
        updater.steps_per_epoch = 10**9
        t["updater"] = median_us(updater.step, steps)
        updater.t, updater.n_updates = t_saved, n_saved
    else:
        t["updater"] = 0.0
    t["autograd + Python + rest"] = t["step"] - t["data"] - t["kernels"] - t["optimizer"] - t["updater"]
    nnz = sum(m.nnz if isinstance(m, SparseLinear) else m.in_features * m.out_features for m, _, _ in io)
    return {"method": method, "epsilon": epsilon, "density": density, "hidden": list(hidden), "batch": batch,
            "threads": threads, "steps": steps, "nnz": nnz, "us_per_step": t, "machine": machine_info()}


def format_breakdown(r: dict) -> str:
    t = r["us_per_step"]
    lines = [f"{r['method']} (epsilon {r['epsilon']}, density {r['density']}), 784-{'-'.join(map(str, r['hidden']))}-10, "
             f"batch {r['batch']}, {r['threads']} thread(s), nnz {r['nnz']:,}; medians of {r['steps']} repetitions",
             f"{'part':<26} {'us/step':>9} {'share':>6}"]
    for k in ("step", "data", "kernels", "kernels at nnz 0", "optimizer", "updater", "autograd + Python + rest"):
        share = "" if k == "step" else f"{100 * t[k] / t['step']:5.1f}%"
        lines.append(f"{k:<26} {t[k]:9.1f} {share:>6}")
    lines.append("(kernels at nnz 0 is part of kernels: the cost of the calls beyond their arithmetic)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="set")
    ap.add_argument("--epsilon", type=float, default=None)
    ap.add_argument("--density", type=float, default=None)
    ap.add_argument("--hidden", default="1000,1000,1000")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    r = breakdown(a.method, a.epsilon, a.density, tuple(int(h) for h in a.hidden.split(",")), a.batch, a.threads,
                  a.steps)
    print(format_breakdown(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
