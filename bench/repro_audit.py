"""CTRE audit item (a): how far do the regrowth picks of CTRE's cosine score move when the activation statistic is
our bounded ``window`` (the last ``max_samples`` rows of the epoch's training steps) or ``reservoir`` instead of the
reference's whole-training-set pass (``stats="full"``)?

    PYTHONPATH=. python bench/repro_audit.py --dataset fashion-mnist --data-dir /work/shared/data --epochs 3 \
        --out bench/results/repro/audit-stats.json

Trains the CTRE protocol's model (epsilon 1, 3 x 1000, glorot init, lr 0.01, Nesterov 0.9, L2 on weights, MinMax,
no shuffling) with ``stats="full"`` updates for ``--epochs - 1`` epochs; during the last epoch forward hooks also fill
a window and a reservoir of ``--max-samples`` rows per layer; after it, for every layer, the same magnitude prune
(``zeta`` 0.2) is followed by the cosine top-k among the absent positions under each statistic. Reported per layer:
``k`` and the overlap ``|picks(a) & picks(b)| / k`` of each pair, and the overlap of two ``full`` picks with different
tie-break seeds (the floor of what "the same picks" can mean when scores tie).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sparsecore.apps.data import batches, load_dataset
from sparsecore.apps.models import build_model, make_updater
from sparsecore.dst import edit as E
from sparsecore.dst.scores import ActivationStats, similarity_chunks
from sparsecore.nn import SparseLinear


def picks(stats, layer, keep, k, seed, chunk=1 << 20):
    topk = E.TopKAbsent(layer.pattern, k, seed, keep)
    for r0, c in similarity_chunks(stats, "cosine", chunk):
        topk.push(r0, c)
    r, c = topk.result()
    return set((r.astype(np.int64) * layer.in_features + c).tolist())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-samples", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    ds = load_dataset(a.dataset, a.data_dir, seed=a.seed, normalize="feature" if a.dataset == "mat:madelon"
                      else "minmax")
    model = build_model("ctre", ds.n_features, ds.n_classes, (1000, 1000, 1000), epsilon=1.0, seed=a.seed,
                        init="glorot")
    named = list(model.named_parameters())
    opt = torch.optim.SGD([{"params": [q for n, q in named if not n.endswith("bias")]},
                           {"params": [q for n, q in named if n.endswith("bias")], "weight_decay": 0.0}],
                          lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    loader = batches(ds.x_train, ds.y_train, 100, shuffle=False, drop_last=True)
    upd = make_updater("ctre", model, opt, epochs=a.epochs + 1, steps_per_epoch=len(loader), seed=a.seed,
                       zeta=0.2, stats="full", regrow_pruned="keep")
    n_use = (ds.n_train // 100) * 100
    upd.stats_source = lambda: (ds.x_train[i:i + 1000] for i in range(0, n_use, 1000))
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    acts = ["relu"] * (len(layers) - 1) + ["softmax"]
    t0 = time.perf_counter()
    extra = {}
    for ep in range(a.epochs):
        last = ep == a.epochs - 1
        handles = []
        if last:
            gen = torch.Generator().manual_seed(a.seed + 1)
            for i, l in enumerate(layers):
                extra[i] = {"window": ActivationStats(l.in_features, l.out_features, a.max_samples, mode="window"),
                            "reservoir": ActivationStats(l.in_features, l.out_features, a.max_samples, gen,
                                                         mode="reservoir")}

                def hook(m, inp, out, i=i):
                    y = torch.softmax(out, -1) if acts[i] == "softmax" else torch.relu(out)
                    for s in extra[i].values():
                        s.add(inp[0], y)
                handles.append(l.register_forward_hook(hook))
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            upd.step()
        for h in handles:
            h.remove()
        if not last:
            upd.epoch_end()
    # the statistics of the update after the last epoch, under each mode
    upd._collect_full()
    rows = []
    for i, l in enumerate(layers):
        k = int(round(0.2 * l.nnz))
        keep = E.prune_keep(l.pattern, E.magnitude_scores(l.values), k, 123 + i)
        full = upd._stats[i]
        p_full = picks(full, l, keep, k, 7)
        p_full2 = picks(full, l, keep, k, 8)
        p_win = picks(extra[i]["window"], l, keep, k, 7)
        p_res = picks(extra[i]["reservoir"], l, keep, k, 7)
        ov = lambda x, y: len(x & y) / max(k, 1)
        rows.append({"layer": i, "shape": [l.out_features, l.in_features], "nnz": l.nnz, "k": k,
                     "rows_full": full.m, "rows_window": extra[i]["window"].m,
                     "rows_reservoir_sums": extra[i]["reservoir"].n,
                     "overlap_full_full_other_tiebreak": ov(p_full, p_full2),
                     "overlap_full_window": ov(p_full, p_win), "overlap_full_reservoir": ov(p_full, p_res),
                     "overlap_window_reservoir": ov(p_win, p_res)})
        print(json.dumps(rows[-1]), flush=True)
    res = {"what": "CTRE audit (a): overlap of cosine regrowth picks, full training set vs window vs reservoir",
           "dataset": ds.name, "n_train": ds.n_train, "epochs_trained": a.epochs, "max_samples": a.max_samples,
           "seed": a.seed, "seconds": time.perf_counter() - t0, "layers": rows,
           "command": "PYTHONPATH=. python bench/repro_audit.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
