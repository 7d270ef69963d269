"""Data-parallel training (torch.distributed, gloo, 2 processes on 127.0.0.1): one topology on every rank.

Every process is started with a hard timeout and killed if it outlives it, so a bug can never hang the suite.
"""
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparsecore.dst.distributed as D

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


def _worker_module():
    spec = importlib.util.spec_from_file_location("dist_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


W = _worker_module()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(args, world=2, timeout=120):
    """Start ``world`` processes of ``python *args`` with the torch.distributed environment; wait at most
    ``timeout`` seconds for all of them (then kill them and fail). Returns their CompletedProcess-like results."""
    port = free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r), WORLD_SIZE=str(world),
                   LOCAL_RANK=str(r), OMP_NUM_THREADS="1",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    out = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=timeout)
            out.append((p.returncode, o, e))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


@pytest.fixture(scope="module")
def worker_out(tmp_path_factory):
    """Both worker scenarios in one pair of gloo processes; their output folder."""
    out = tmp_path_factory.mktemp("workers")
    res = run_ranks([WORKER, "methods,errors", out])
    for rc, _, err in res:
        assert rc == 0, err[-3000:]
    return out


@pytest.fixture(scope="module")
def methods_run(worker_out):
    return [torch.load(worker_out / f"methods-rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("case", W.METHODS)
def test_ranks_identical_and_equal_to_one_process(methods_run, case):
    """After 4 updates on 2 ranks, each training on its half of every global batch: the same patterns, values and
    momenta on both ranks, and the same patterns (values to rounding) as one process on the whole batches."""
    method = W.CASES[case][0]
    a, b = methods_run[0][case], methods_run[1][case]
    ref = W.reference(case)
    assert a["updates"] == b["updates"] == ref["updates"] == (0 if method == "static" else 4)
    for (ra, ca), (rb, cb), (rr, cr) in zip(a["patterns"], b["patterns"], ref["patterns"]):
        assert torch.equal(ra, rb) and torch.equal(ca, cb)
        assert torch.equal(ra, rr) and torch.equal(ca, cr)
    for va, vb, vr in zip(a["values"], b["values"], ref["values"]):
        assert torch.equal(va, vb)
        torch.testing.assert_close(va, vr, rtol=1e-9, atol=1e-12)
    for ma, mb in zip(a["momenta"], b["momenta"]):
        assert (ma is None) == (mb is None) and (ma is None or torch.equal(ma, mb))
    # the topology really changed (else the comparison above proves nothing about the updates)
    init = W.build(method)[0]
    init_cols = [init[0].col, init[2].col]
    changed = any(c.numel() != c0.numel() or not torch.equal(c, c0) for (_, c), c0 in zip(a["patterns"], init_cols))
    assert changed == (method != "static")
    if method in ("gmp", "etsm"):
        assert a["values"][-1].numel() < init[2].values.numel()  # nnz shrank and DDP kept reducing the new values
    # the wrapper was found also when the Updater got ddp.module, and the pattern buffers left DDP's broadcast
    assert a["ddp_found"]
    assert set(D.pattern_buffer_names(init)) <= set(a["ignored"])
    if method != "static":
        assert all(c["comm_bytes"] > 0 and c["comm_calls"] >= 2 for c in a["costs"])


def test_divergence_is_a_clear_error_on_every_rank(worker_out):
    for r in range(2):
        got = json.loads((worker_out / f"errors-rank{r}.json").read_text())
        assert got["seed"].startswith("DivergenceError") and "seed differs" in got["seed"]
        assert got["pattern_at_build"].startswith("DivergenceError") and "pattern differs" in got["pattern_at_build"]
        assert "wrap the model in DDP" in got["pattern_at_build"]
        assert got["values_after_update"].startswith("DivergenceError") and "values differ" in \
            got["values_after_update"]
        assert got["validation"].startswith("DivergenceError") and "report_validation" in got["validation"]


def test_no_process_group_is_the_single_process_path():
    assert D.active_comm() is None
    model, opt = W.build("rigl")
    u = W.Updater(model, opt, "rigl", seed=3, **W.METHOD_OPTS["rigl"])
    assert u.world_size == 1 and u.ddp is None
    W.train("rigl", model, opt, u)
    assert all(c["comm_bytes"] == 0 for c in u.costs) and len(u.costs) == u.n_updates == 4


def test_checksums_see_every_part():
    model, _ = W.build("set")
    layer = model[0]
    p0, v0 = D.layer_checksums(layer)
    assert 0 <= p0 < 2 ** 62 and 0 <= v0 < 2 ** 62
    with torch.no_grad():
        layer.values[3] += 1e-12
    p1, v1 = D.layer_checksums(layer)
    assert p1 == p0 and v1 != v0
    layer.perm = layer.perm.flip(0)
    assert D.layer_checksums(layer)[0] != p0
    assert D.tensor_checksum(torch.zeros(4, dtype=torch.int32)) != D.tensor_checksum(torch.zeros(4, dtype=torch.int64))


# ------------------------------------------------------------------------------------------------ sparsecore train
TINY = ["--dataset", "builtin", "--hidden", "24,24", "--batch-size", "200", "--threads", "1", "--lr", "0.05"]


def train_cli(*args, timeout=150):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "sparsecore", "train", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_static_two_ranks_equal_one_process_on_the_global_batch(tmp_path):
    """Two ranks started as torchrun starts them (RANK/WORLD_SIZE/LOCAL_RANK in the environment), each on half of
    every global batch of 200: the same model as one process on the whole batches, to float32 rounding; one
    report, from rank 0, over every rank's samples."""
    from sparsecore.apps.train import load_checkpoint, train
    from sparsecore.apps.train.config import TrainConfig

    res = run_ranks(["-m", "sparsecore", "train", "--method", "static", "--epochs", "2", *TINY, "--epsilon", "3",
                     "--json", tmp_path / "two.json", "--checkpoint", tmp_path / "two"])
    for rc, _, err in res:
        assert rc == 0, err[-3000:]
    assert "epoch 2/2" in res[0][2] and res[1][2] == "" and res[1][1] == ""  # rank 1 prints nothing
    old = torch.get_num_threads()
    try:
        one = train(TrainConfig(method="static", dataset="builtin", hidden=(24, 24), batch_size=200, threads=1,
                                lr=0.05, epochs=2, epsilon=3.0, quiet=True, checkpoint=str(tmp_path / "one")))
    finally:
        torch.set_num_threads(old)
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["distributed"]["world_size"] == 2 and two["distributed"]["batch_size_per_rank"] == [100, 100]
    assert two["split"] == one["split"] and two["steps_per_epoch"] == one["steps_per_epoch"] == 18
    a = load_checkpoint(tmp_path / "two" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "one" / "checkpoint.pt")
    assert a["world_size"] == 2 and "world_size" not in b
    for k in b["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6)
    for ha, hb in zip(two["history"], one["history"]):
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-5)
        assert ha["test_accuracy"] == pytest.approx(hb["test_accuracy"], abs=2e-3)  # (an argmax may flip)


def test_killed_rank_stops_all_then_resume_on_two_ranks(tmp_path):
    """ETSM (gradual pruning: nnz shrinks, the DDP reducer is rebuilt, and a resumed run loads smaller values) on
    2 ranks: rank 1 is SIGKILLed right after the checkpoint of epoch 1; rank 0 stops with a clear error within
    the timeout and the launcher names both; --resume on 2 ranks then ends bit for bit where an uninterrupted
    2-rank run does."""
    import time

    from sparsecore.apps.train import load_checkpoint

    t0 = time.monotonic()
    p = train_cli("--method", "etsm", "--epochs", "3", *TINY, "--nproc", "2", "--checkpoint", tmp_path / "cut",
                  "--quiet", "--stop-after-epoch", "1", "--dist-timeout", "60")
    assert time.monotonic() - t0 < 60
    assert p.returncode == 128 + 9, p.stderr  # the first failure: rank 1, SIGKILL
    assert "rank 1 was killed by SIGKILL" in p.stderr and "rank 0 exited with code 3" in p.stderr
    assert "rank 0 of 2: a collective failed" in p.stderr
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["state"]["epoch"] == 1
    p = train_cli("--method", "etsm", "--epochs", "3", *TINY, "--nproc", "2", "--checkpoint", tmp_path / "cut",
                  "--resume", "--json", tmp_path / "res.json")
    assert p.returncode == 0, p.stderr
    assert "resumed from" in p.stderr and "epoch 1/3" not in p.stderr and "epoch 3/3" in p.stderr
    p = train_cli("--method", "etsm", "--epochs", "3", *TINY, "--nproc", "2", "--checkpoint", tmp_path / "full",
                  "--json", tmp_path / "full.json", "--quiet")
    assert p.returncode == 0, p.stderr
    a = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    res, full = (json.loads((tmp_path / f).read_text()) for f in ("res.json", "full.json"))
    assert res["resumed_from_epochs"] == [1] and res["nnz"] == full["nnz"] < res["nnz_initial"]
    assert res["test_accuracy"] == full["test_accuracy"]
    assert full["distributed"]["updater_costs"] and all(c["comm_bytes"] > 0 for c in full["distributed"]["updater_costs"])


def test_bad_distributed_settings_exit_2(capsys, monkeypatch):
    from sparsecore.apps.train import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as e:  # refused by the launcher, before any process starts
        main(["--method", "static", "--epochs", "1", *TINY[:4], "--batch-size", "1", "--nproc", "2"])
    assert e.value.code == 2 and "must be at least --nproc 2" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit) as e:  # --nproc under a launcher that says otherwise
        main(["--method", "static", "--epochs", "1", *TINY, "--nproc", "2"])
    assert e.value.code == 2 and "contradicts WORLD_SIZE=3" in capsys.readouterr().err
