"""Data-parallel training on one machine: the same total CPU threads as 1 process or as N processes.

    python bench/bench_ddp.py train [--method set] [--epochs 3] [--rounds 2] [--data-dir shared/data] [--out DIR]
    python bench/bench_ddp.py updates [--world 2] [--hidden 1000,1000,1000] [--batch 100]

``train``: ``sparsecore train`` on Fashion-MNIST, the method's default MLP, ``1 process x N threads`` against
``N processes x 1 thread`` (``--nproc N``, gloo), ``--rounds`` interleaved rounds (A, B, A, B, ...) so that load
from other users of the machine falls on both; prints a markdown table of the epoch times (training steps +
topology update; evaluation excluded) and the accuracies after the same number of epochs, with the load average
before each run.

``updates``: the cost of one topology update of each DST method on the method MLP's layer sizes, on 1 rank and on
``--world`` ranks (gloo, spawned here): seconds, and the bytes and calls of its collectives
(``Updater.costs``), plus the per-step gradient all-reduce of DDP (the values and biases: O(nnz)); then the SET
MLP's training step under DDP with its pattern buffers broadcast at every forward (DDP's default) and without. The machine is
shared and noisy: compare ratios taken in the same run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def _run(args, out_json):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    load = os.getloadavg()[0]
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "sparsecore", "train", *args, "--json", out_json, "--quiet"], env=env,
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"sparsecore train {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    r = json.load(open(out_json))
    r["_load"], r["_wall"] = load, time.monotonic() - t0
    return r


def bench_train(a) -> None:
    n = a.threads
    base = ["--method", a.method, "--dataset", a.dataset, "--epochs", str(a.epochs), "--seed", str(a.seed)]
    if a.data_dir:
        base += ["--data-dir", a.data_dir]
    configs = {f"1 process x {n} threads": base + ["--threads", str(n)],
               f"{n} processes x 1 thread": base + ["--threads", "1", "--nproc", str(n)]}
    out = a.out or tempfile.mkdtemp(prefix="bench_ddp_")
    os.makedirs(out, exist_ok=True)
    runs = {k: [] for k in configs}
    for rnd in range(a.rounds):
        for name, args in configs.items():
            r = _run(args, os.path.join(out, f"{name.replace(' ', '_')}-{rnd}.json"))
            runs[name].append(r)
            print(f"round {rnd + 1} {name}: epochs {['%.1f' % s for s in r['epoch_seconds']]} s, test "
                  f"{r['history'][-1]['test_accuracy']:.4f}, load {r['_load']:.2f}", file=sys.stderr, flush=True)
    m = runs[next(iter(runs))][0]["machine"]
    print(f"\n{a.method} MLP on {a.dataset}, {a.epochs} epochs, batch 100 (global), {a.rounds} interleaved rounds; "
          f"{m['cpu']}, {m['cpus_available']} CPUs, torch {m['torch']}\n")
    print("| configuration | round | epoch seconds (each) | mean epoch s | train loss (last) | val acc | test acc "
          "(last epoch) | test acc (best val) | load avg before |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, rs in runs.items():
        for i, r in enumerate(rs):
            h = r["history"][-1]
            print(f"| {name} | {i + 1} | {', '.join('%.1f' % s for s in r['epoch_seconds'])} | "
                  f"{r['mean_epoch_seconds']:.1f} | {h['train_loss']:.4f} | {h['val_accuracy']:.4f} | "
                  f"{h['test_accuracy']:.4f} | {r['test_accuracy']:.4f} | {r['_load']:.2f} |")
    a_name, b_name = list(runs)
    ea = statistics.median(s for r in runs[a_name] for s in r["epoch_seconds"])
    eb = statistics.median(s for r in runs[b_name] for s in r["epoch_seconds"])
    print(f"\nmedian epoch: {a_name} {ea:.1f} s, {b_name} {eb:.1f} s (ratio {eb / ea:.2f}); reports in {out}")


# ------------------------------------------------------------------------------------------------ updates
def _update_worker(rank, world, port, hidden, batch, methods, out):
    """One rank: for each method, build its MLP (sparsecore.apps.models), wrap it in DDP when world > 1, train a
    few steps on random data and time the updates."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sparsecore.apps.models import build_model, make_updater
    from sparsecore.dst.distributed import active_comm

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    results = {}
    g = torch.Generator().manual_seed(rank)
    for method in methods:
        model = build_model(method, 784, 10, hidden, input_shape=(28, 28, 1), seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        every = 4
        dst = {"every": every} if method in ("rigl", "etsm") else {}
        u = make_updater(method, model, opt, epochs=3, steps_per_epoch=every, seed=0, **dst)
        net = DDP(model) if world > 1 else model
        comm = active_comm()
        for step in range(3 * every - 1):
            x = torch.randn(batch // world, 784, generator=g)
            y = torch.randint(0, 10, (batch // world,), generator=g)
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            u.step()
            if (step + 1) % every == 0:
                u.epoch_end()  # the per-epoch methods (set, ctre, g2g) rewire here
        grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        results[method] = {"costs": u.costs, "grad_bytes_per_step": grad_bytes,
                           "nnz": sum(l.values.numel() for l in u.layers),
                           "world": 1 if comm is None else comm.world}
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)


def _step_worker(rank, world, port, hidden, batch, steps, out):
    """One rank: time training steps of the SET MLP under DDP, its pattern buffers broadcast at every forward
    (DDP's default) and not (what sparsecore does)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sparsecore.apps.models import build_model
    from sparsecore.dst.distributed import exclude_pattern_buffers, pattern_buffer_names

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    res = {}
    g = torch.Generator().manual_seed(rank)
    for mode in ("broadcast", "excluded", "broadcast", "excluded"):
        model = build_model("set", 784, 10, hidden, seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        net = DDP(model)
        if mode == "excluded":
            exclude_pattern_buffers(net)
        times = []
        for step in range(steps):
            x = torch.randn(batch // world, 784, generator=g)
            y = torch.randint(0, 10, (batch // world,), generator=g)
            dist.barrier()
            t0 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        res.setdefault(mode, []).extend(times[5:])
        bufs = dict(model.named_buffers())
        res[mode + "_bytes"] = sum(bufs[n].numel() * bufs[n].element_size() for n in pattern_buffer_names(model))
        res["grad_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(res, f)


def bench_updates(a) -> None:
    import torch.multiprocessing as mp

    from sparsecore.apps.train.dist import free_port

    hidden = tuple(int(h) for h in a.hidden.split(","))
    methods = a.methods.split(",")
    tables = {}
    for world in (1, a.world):
        out = tempfile.mktemp(suffix=".json")
        if world == 1:
            _update_worker(0, 1, 0, hidden, a.batch, methods, out)
        else:
            mp.start_processes(_update_worker, args=(world, free_port(), hidden, a.batch, methods, out),
                               nprocs=world, join=True, start_method="spawn")
        tables[world] = json.load(open(out))
    print(f"\nupdate costs, MLP 784-{'-'.join(map(str, hidden))}-10 per method, global batch {a.batch}, 1 thread per "
          f"rank (medians over the run's updates; bytes = payload of the Updater's collectives per update)\n")
    print("| method | nnz (at the end) | update s, 1 rank | update s, %d ranks | of which comm s | comm calls | comm MB per update "
          "| DDP gradient MB per step (at the end) |" % a.world)
    print("|---|---|---|---|---|---|---|---|")
    out = tempfile.mktemp(suffix=".json")
    mp.start_processes(_step_worker, args=(a.world, free_port(), hidden, a.batch, 60, out), nprocs=a.world,
                       join=True, start_method="spawn")
    st = json.load(open(out))
    for m in methods:
        one, many = tables[1][m], tables[a.world][m]
        med = lambda rs, k: statistics.median(c[k] for c in rs["costs"]) if rs["costs"] else float("nan")  # noqa
        print(f"| {m} | {one['nnz']} | {med(one, 'seconds'):.3f} | {med(many, 'seconds'):.3f} | "
              f"{med(many, 'comm_seconds'):.3f} | {med(many, 'comm_calls'):.0f} | {med(many, 'comm_bytes') / 2**20:.2f}"
              f" | {many['grad_bytes_per_step'] / 2**20:.2f} |")
    print(f"\nSET MLP training step on {a.world} ranks (median of 2 x 55 steps, per-rank batch {a.batch // a.world}): "
          f"DDP's default buffer broadcast {statistics.median(st['broadcast']) * 1e3:.1f} ms/step "
          f"(+{st['broadcast_bytes'] / 2**20:.2f} MB of pattern buffers from rank 0 per step), pattern buffers "
          f"excluded {statistics.median(st['excluded']) * 1e3:.1f} ms/step; gradient all-reduce payload "
          f"{st['grad_bytes'] / 2**20:.2f} MB/step")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train")
    t.add_argument("--method", default="set")
    t.add_argument("--dataset", default="fashion-mnist")
    t.add_argument("--data-dir", default=None)
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--threads", type=int, default=2, help="N: 1 process x N threads vs N processes x 1 thread")
    t.add_argument("--rounds", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default=None)
    u = sub.add_parser("updates")
    u.add_argument("--world", type=int, default=2)
    u.add_argument("--hidden", default="1000,1000,1000")
    u.add_argument("--batch", type=int, default=100)
    u.add_argument("--methods", default="set,rigl,ctre,g2g,etsm")
    a = p.parse_args()
    bench_train(a) if a.what == "train" else bench_updates(a)


if __name__ == "__main__":
    main()
