"""One rank of the data-parallel tests (tests/test_distributed.py): run as a subprocess with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set, or imported by the test for the single-process reference (same model, same data).

    python tests/dist_worker.py SCENARIO[,SCENARIO...] OUT_DIR

Scenarios: ``methods`` (every DST method trained a few updates under DDP; each rank saves its final state to
OUT_DIR/methods-rank{R}.pt), ``errors`` (what must raise DivergenceError, OUT_DIR/errors-rank{R}.json).
Every collective is bounded by the process group's timeout.
"""
import datetime
import json
import os
import sys

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from sparsecore import SparseLinear  # noqa: E402
from sparsecore.dst import Updater  # noqa: E402

WIDTHS = (12, 16, 4)
BATCH = 8          # global batch
STEPS = 12
_PER_EPOCH = dict(steps_per_epoch=3, total_epochs=5)
# case -> (method, Updater options): the scores' statistics exchanged both ways (all-reduced chunks, gathered rows),
# CTRE/G2G with both kinds of statistics (the reservoir holds every sample here, so it is exact, as the window)
CASES = {
    "static": ("static", dict(every=3)),
    "set": ("set", dict(_PER_EPOCH)),
    "rigl": ("rigl", dict(every=3, total_steps=40, dist_scores="reduce")),
    "rigl-gather": ("rigl", dict(every=3, total_steps=40, dist_scores="gather")),
    "ctre": ("ctre", dict(_PER_EPOCH, max_samples=24, dist_scores="reduce")),
    "ctre-gather": ("ctre", dict(_PER_EPOCH, max_samples=24, dist_scores="gather")),
    "ctre-reservoir": ("ctre", dict(_PER_EPOCH, max_samples=24, stats="reservoir", dist_scores="reduce")),
    "g2g": ("g2g", dict(_PER_EPOCH, max_samples=24, dist_scores="reduce")),
    "g2g-reservoir-gather": ("g2g", dict(_PER_EPOCH, max_samples=24, stats="reservoir", dist_scores="gather")),
    "gmp": ("gmp", dict(every=3, target_density=0.2, start=0, end=10)),
    "etsm": ("etsm", dict(every=3, target_density=0.2, start=0, end=10)),
}
METHODS = tuple(CASES)
METHOD_OPTS = {"rigl": CASES["rigl"][1]}


def build(method, seed=0):
    """The tiny float64 model of a method, and its SGD optimizer (the same on every rank from the seed)."""
    torch.manual_seed(seed)
    dens = 1.0 if method in ("gmp", "etsm") else 0.4
    model = nn.Sequential(SparseLinear(WIDTHS[0], WIDTHS[1], density=dens, dtype=torch.float64), nn.ReLU(),
                          SparseLinear(WIDTHS[1], WIDTHS[2], density=dens, dtype=torch.float64))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, opt


def global_batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, WIDTHS[0], generator=g, dtype=torch.float64)
    y = torch.randint(0, WIDTHS[2], (BATCH,), generator=g)
    return x, y


def train(method, model, opt, updater, rank=0, world=1, wrapped=None):
    """STEPS steps; rank ``rank`` of ``world`` takes its contiguous shard of each global batch. The loss is the
    shard's summed cross-entropy times world / batch, so DDP's average of the gradients is that of the mean over
    the global batch (the single-process loss)."""
    net = wrapped if wrapped is not None else model
    for step in range(STEPS):
        x, y = global_batch(step)
        xs, ys = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
        loss = nn.functional.cross_entropy(net(xs), ys, reduction="sum") * (world / BATCH)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        updater.step()


def state(model, opt, updater):
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    return {"patterns": [(l.rowptr.clone(), l.col.clone()) for l in layers],
            "values": [l.values.detach().clone() for l in layers],
            "momenta": [opt.state[l.values]["momentum_buffer"].clone() if l.values in opt.state else None
                        for l in layers],
            "updates": updater.n_updates, "costs": updater.costs}


def reference(case):
    """The single-process run on the same global batches."""
    method, opts = CASES[case]
    model, opt = build(method)
    u = Updater(model, opt, method, seed=3, **opts)
    train(method, model, opt, u)
    return state(model, opt, u)


def run_methods(rank, world, out):
    from torch.nn.parallel import DistributedDataParallel as DDP

    results = {}
    for i, case in enumerate(METHODS):
        method, opts = CASES[case]
        model, opt = build(method)
        ddp = DDP(model)
        # alternate what the Updater is given: the DDP wrapper, or its .module
        u = Updater(ddp if i % 2 == 0 else ddp.module, opt, method, seed=3, **opts)
        train(method, model, opt, u, rank, world, ddp)
        results[case] = state(model, opt, u)
        results[case]["ddp_found"] = u.ddp is ddp
        results[case]["ignored"] = sorted(ddp.parameters_to_ignore)
    torch.save(results, os.path.join(out, f"methods-rank{rank}.pt"))


def run_errors(rank, world, out):
    from torch.nn.parallel import DistributedDataParallel as DDP
    from sparsecore.dst.distributed import DivergenceError

    got = {}

    def expect(name, fn):
        try:
            fn()
            got[name] = "no error"
        except DivergenceError as e:
            got[name] = "DivergenceError: " + str(e)
        except Exception as e:  # noqa: BLE001 - recorded for the test to show
            got[name] = f"{type(e).__name__}: {e}"

    # a rank-dependent seed: refused when the Updater is built, on every rank
    model, opt = build("set")
    expect("seed", lambda: Updater(DDP(model), opt, "set", seed=rank, steps_per_epoch=3))
    # models built from different seeds and not (yet) wrapped: their patterns differ
    model, opt = build("set", seed=rank)
    expect("pattern_at_build", lambda: Updater(model, opt, "set", seed=1, steps_per_epoch=3))
    # one rank changes a value behind DDP's back: found at the next update
    model, opt = build("rigl")
    ddp = DDP(model)
    u = Updater(ddp, opt, "rigl", seed=1, every=3, total_steps=40)

    def tamper_then_train():
        for step in range(3):
            if step == 2 and rank == 1:
                with torch.no_grad():
                    model[2].values[0] += 1.0
            x, y = global_batch(step)
            loss = nn.functional.cross_entropy(ddp(x.tensor_split(world)[rank]), y.tensor_split(world)[rank])
            opt.zero_grad()
            loss.backward()
            opt.step()
            u.step()
    expect("values_after_update", tamper_then_train)
    # rank-dependent validation accuracies change ctre_seq's phase on one rank only
    model, opt = build("ctre")
    ddp = DDP(model)
    u = Updater(ddp, opt, "ctre", seed=1, variant="ctre_seq", patience=1, steps_per_epoch=3, max_samples=24)

    def bad_validation():
        u.report_validation(0.5)
        u.report_validation(0.5 if rank == 0 else 0.9)
        for step in range(3):
            x, y = global_batch(step)
            loss = nn.functional.cross_entropy(ddp(x.tensor_split(world)[rank]), y.tensor_split(world)[rank])
            opt.zero_grad()
            loss.backward()
            opt.step()
            u.step()
    expect("validation", bad_validation)
    with open(os.path.join(out, f"errors-rank{rank}.json"), "w") as f:
        json.dump(got, f)


def main():
    scenario, out = sys.argv[1], sys.argv[2]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    for name in scenario.split(","):  # several scenarios in one pair of processes: each start costs seconds
        {"methods": run_methods, "errors": run_errors}[name](rank, world, out)
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
