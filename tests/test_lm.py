"""sparsecore lm: the GPT (shapes, causality, sparse == dense at density 1), ERK, the CLI's report, rewiring, the
time budget, exact resume, damaged checkpoints, bad inputs, and bench/lm_compare.py at a tiny size."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sparsecore import SparseLinear
from sparsecore.apps.lm import GPT, layer_densities, main, projection_shapes
from sparsecore.apps.lm.train import LMConfig, train_lm
from sparsecore.apps.train import CHECKPOINT_NAME, TrainError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--d-model", "32", "--layers", "2", "--heads", "4", "--context", "16", "--batch-size", "4",
        "--threads", "1", "--eval-batches", "2", "--quiet"]
KEYS = ("val_loss", "history", "step_seconds", "tokens_per_second", "steps", "nnz", "dense_params", "params",
        "vocab_size", "peak_rss_mb", "config", "sample", "machine", "topology_updates", "rewired_fraction")


@pytest.fixture
def threads1():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog and then runs far away".split()
    text = "\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(120))
    p = tmp_path_factory.mktemp("lm") / "text.txt"
    p.write_text(text, encoding="utf-8")
    return p


def run(text_file, *args):
    return main(["--data", str(text_file), *TINY, *args])


# ------------------------------------------------------------------------------------------------ model


def test_forward_shapes_and_causal_masking():
    torch.manual_seed(0)
    for dens in (None, [0.3] * 12):
        m = GPT(11, 16, 2, 32, 4, densities=dens, generator=torch.Generator().manual_seed(1)).double()
        x = torch.randint(0, 11, (3, 16))
        y = m(x)
        assert y.shape == (3, 16, 11)
        x2 = x.clone()
        x2[:, 9:] = (x2[:, 9:] + 1) % 11  # change every token after t = 8
        y2 = m(x2)
        torch.testing.assert_close(y[:, :9], y2[:, :9], rtol=0, atol=1e-12)  # outputs at t <= 8 ignore tokens > 8
        assert not torch.allclose(y[:, 9:], y2[:, 9:])
        assert m(x[:, :5]).shape == (3, 5, 11)


def test_every_projection_is_sparse_and_only_the_head_is_dense_linear():
    m = GPT(11, 16, 2, 32, 4, densities=[0.5] * 12)
    linears = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)]
    assert linears == ["head"]
    assert len([mod for mod in m.modules() if isinstance(mod, SparseLinear)]) == 12
    assert all(isinstance(p, SparseLinear) and not p.feature_major for p in m.projections())
    assert not any(isinstance(mod, nn.MultiheadAttention) for mod in m.modules())


def copy_into_dense(sparse: GPT, dense: GPT) -> None:
    """Give the dense model the sparse one's weights (projections through ``to_dense``, the rest as they are)."""
    with torch.no_grad():
        for s, d in zip(sparse.projections(), dense.projections()):
            lin = s.to_dense()
            d.weight.copy_(lin.weight)
            d.bias.copy_(lin.bias)
        for name in ("tok", "pos", "ln_f", "head"):
            getattr(dense, name).load_state_dict(getattr(sparse, name).state_dict())
        for bs, bd in zip(sparse.blocks, dense.blocks):
            bd.ln1.load_state_dict(bs.ln1.state_dict())
            bd.ln2.load_state_dict(bs.ln2.state_dict())


def test_sparse_at_density_one_equals_dense_with_copied_weights():
    torch.manual_seed(0)
    sparse = GPT(13, 16, 2, 32, 4, densities=[1.0] * 12).double()
    dense = GPT(13, 16, 2, 32, 4).double()
    sd = {k: v for k, v in sparse.state_dict().items()}
    copy_into_dense(sparse, dense)
    assert sd.keys() == sparse.state_dict().keys()
    x = torch.randint(0, 13, (2, 16))
    torch.testing.assert_close(sparse(x), dense(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("density", [0.05, 0.1, 0.5])
def test_erk_densities_sum_to_the_target(density):
    shapes = projection_shapes(2, 32)
    d = layer_densities(2, 32, density, "erk")
    n = [o * i for o, i in shapes]
    assert abs(sum(di * ni for di, ni in zip(d, n)) - density * sum(n)) < 1e-6 * sum(n)
    assert all(0 < di <= 1 for di in d)
    assert d[0] > d[4]  # ERK: the (32, 32) projections are denser than the (128, 32) fc
    m = GPT(11, 16, 2, 32, 4, densities=d)
    nnz = sum(p.nnz for p in m.projections())
    assert abs(nnz - density * sum(n)) <= len(n)  # rounding: at most one connection per layer


# ------------------------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize("method", ["dense", "static", "set", "rigl"])
def test_cli_trains_and_writes_every_key(method, text_file, tmp_path, threads1):
    out = tmp_path / "r.json"
    extra = [] if method == "dense" else ["--density", "0.2"]
    assert run(text_file, "--method", method, "--steps", "6", "--eval-every", "3", "--update-every", "2",
               "--sample", "20", "--json", str(out), *extra) == 0
    r = json.loads(out.read_text())
    for k in KEYS:
        assert k in r, k
    assert r["steps"] == 6 and len(r["sample"]) == 20
    assert [h["step"] for h in r["history"]] == [0, 3, 6]
    assert all(set(h) == {"step", "train_seconds", "train_loss", "val_loss"} for h in r["history"])
    assert r["val_loss"] == r["history"][-1]["val_loss"]
    secs = [h["train_seconds"] for h in r["history"]]
    assert secs == sorted(secs) and secs[0] == 0.0
    if method == "dense":
        assert r["nnz"] == r["dense_params"] == 2 * 12 * 32 * 32
        assert r["rewired_fraction"] is None
    else:
        assert abs(r["nnz"] - 0.2 * r["dense_params"]) <= 12
    if method in ("set", "rigl"):
        # updates at steps 2 and 4 (< 0.75 * 6), none after
        assert r["topology_updates"] == 2 and r["rewired_fraction"] > 0
    if method == "static":
        assert r["topology_updates"] == 0 and r["rewired_fraction"] == 0


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_rewiring_changes_the_saved_pattern(method, text_file, tmp_path, threads1):
    ck = tmp_path / "ck"
    assert run(text_file, "--method", method, "--steps", "4", "--update-every", "2", "--checkpoint", str(ck)) == 0
    from sparsecore.apps.train import load_checkpoint

    saved = load_checkpoint(ck / CHECKPOINT_NAME)["model"]
    fresh = GPT(saved["tok.weight"].shape[0], 16, 2, 32, 4, densities=layer_densities(2, 32, 0.1, "uniform"),
                generator=torch.Generator().manual_seed(0 + 0x9A7)).state_dict()
    cols = [k for k in saved if k.endswith(".col")]
    assert len(cols) == 12
    assert any(not torch.equal(saved[k], fresh[k]) for k in cols)
    assert all(saved[k].numel() == fresh[k].numel() for k in cols)  # same nnz: prune k, regrow k


def test_erk_distribution_via_cli(text_file, tmp_path, threads1):
    out = tmp_path / "r.json"
    assert run(text_file, "--method", "static", "--density", "0.1", "--distribution", "erk", "--steps", "1",
               "--json", str(out)) == 0
    r = json.loads(out.read_text())
    assert len(set(r["layer_densities"])) > 1
    assert abs(r["nnz"] - 0.1 * r["dense_params"]) <= 12


def test_time_budget_stops(text_file, tmp_path, threads1):
    out = tmp_path / "r.json"
    assert run(text_file, "--method", "rigl", "--time-budget", "0.3", "--eval-every", "5", "--json", str(out)) == 0
    r = json.loads(out.read_text())
    assert r["train_seconds"] >= 0.3 and r["steps"] >= 1
    assert r["train_seconds"] < 0.3 + 0.5  # stopped at the first step past the budget (a tiny step: ~10 ms)
    assert r["total_steps_estimate"] >= 1 and r["history"][-1]["step"] == r["steps"]


@pytest.mark.parametrize("method", ["dense", "set", "rigl"])
def test_resume_is_exact(method, text_file, tmp_path, threads1):
    common = ["--method", method, "--steps", "8", "--eval-every", "3", "--update-every", "2"]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert run(text_file, *common, "--json", str(a)) == 0
    ck = tmp_path / "ck"
    assert run(text_file, *common, "--checkpoint", str(ck), "--stop-after", "4") == 0
    assert run(text_file, *common, "--checkpoint", str(ck), "--resume", "--json", str(b)) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert rb["resumed_at_steps"] == [4]
    assert ra["val_loss"] == rb["val_loss"] and ra["train_loss"] == rb["train_loss"]
    assert [(h["step"], h["train_loss"], h["val_loss"]) for h in ra["history"]] == \
           [(h["step"], h["train_loss"], h["val_loss"]) for h in rb["history"]]
    assert ra["rewired_fraction"] == rb["rewired_fraction"]


def test_resume_with_other_settings_is_refused(text_file, tmp_path, threads1, capsys):
    ck = tmp_path / "ck"
    assert run(text_file, "--method", "dense", "--steps", "2", "--checkpoint", str(ck)) == 0
    rc = run(text_file, "--method", "dense", "--steps", "2", "--lr", "0.01", "--checkpoint", str(ck), "--resume")
    err = capsys.readouterr().err
    assert rc == 2 and "different settings (lr)" in err


def test_damaged_checkpoint_is_detected(text_file, tmp_path, threads1, capsys):
    ck = tmp_path / "ck"
    assert run(text_file, "--method", "static", "--steps", "2", "--checkpoint", str(ck)) == 0
    f = ck / CHECKPOINT_NAME
    raw = bytearray(f.read_bytes())
    i = raw.find(b"step_seconds")
    assert i > 0
    raw[i] ^= 0x01  # one bit inside the payload
    f.write_bytes(bytes(raw))
    rc = run(text_file, "--method", "static", "--steps", "2", "--checkpoint", str(ck), "--resume")
    err = capsys.readouterr().err
    assert rc == 2 and "is damaged" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ bad input


def _bad_files(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "nul.txt").write_bytes(b"abc\x00def" * 50)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    (tmp_path / "short.txt").write_text("abcdefghij" * 10)  # 100 chars: 10 validate, fewer than context + 1
    (tmp_path / "one.txt").write_text("a" * 500)
    return {"missing": (tmp_path / "nope.txt", "does not exist"), "folder": (tmp_path, "is not a file"),
            "empty": (tmp_path / "empty.txt", "is empty"), "nul": (tmp_path / "nul.txt", "NUL bytes"),
            "latin1": (tmp_path / "latin1.txt", "not UTF-8"),
            "short": (tmp_path / "short.txt", "validation split has 10 characters"),
            "one": (tmp_path / "one.txt", "1 distinct character")}


@pytest.mark.parametrize("case", ["missing", "folder", "empty", "nul", "latin1", "short", "one"])
def test_bad_files_exit_2_with_one_line(case, tmp_path, capsys):
    path, match = _bad_files(tmp_path)[case]
    rc = main(["--data", str(path), "--method", "dense", "--steps", "1", *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args,match", [
    (["--heads", "5"], "divisible"),
    (["--method", "static", "--density", "0"], "must be in (0.0, 1.0]"),
    (["--method", "static", "--density", "1.5"], "must be in (0.0, 1.0]"),
    (["--method", "dense", "--density", "0.5"], "--density is for the sparse methods"),
    (["--method", "nope"], "invalid choice"),
    (["--resume"], "--resume needs --checkpoint"),
    (["--json", "/proc/forbidden/r.json"], "cannot write the report file"),
])
def test_bad_settings_exit_2(args, match, text_file, capsys):
    base = {"--method": "dense"}
    argv = ["--data", str(text_file), *TINY, "--steps", "1"]
    if "--method" not in args:
        argv += ["--method", base["--method"]]
    rc = main(argv + args)
    err = capsys.readouterr().err
    assert rc == 2 and match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_steps_or_time_budget_required(text_file, capsys):
    assert main(["--data", str(text_file), "--method", "dense", *TINY]) == 2
    assert "--steps" in capsys.readouterr().err
    with pytest.raises(TrainError, match="exactly one"):
        train_lm(LMConfig(data=str(text_file), method="dense", steps=1, time_budget=1.0))


def test_cli_routes_lm_and_exit_code_2_in_a_subprocess(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "sparsecore", "lm", "--data", str(tmp_path / "no.txt"), "--method",
                        "dense", "--steps", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "does not exist" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "sparsecore", "--help"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert " lm " in p.stdout


def test_bench_lm_compare_tiny(text_file, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "cmp"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "lm_compare.py"), "--data", str(text_file), "--steps", "4",
                        "--eval-every", "2", "--d-model", "32", "--layers", "1", "--context", "16", "--batch-size", "4",
                        "--densities", "0.5", "--methods", "static,set", "--threads", "1", "--eval-batches", "1",
                        "--update-every", "2", "--sample", "10", "--block-sizes", "1,8", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    md = (out / "lm_compare.md").read_text()
    assert "bench/lm_compare.py --data" in md and "| set | 0.5 | - |" in md and "| dense | 1 | - |" in md
    assert "| set | 0.5 | 8x8 |" in md
    r = json.loads((out / "lm_compare.json").read_text())
    assert {"dense", "static@0.5", "set@0.5", "set@0.5/bsr8"} <= set(r["reports"])
    assert r["reports"]["set@0.5/bsr8"]["block_size"] == 8
    assert all(row["val_equal_steps"] is not None for row in r["rows"])
    assert all(len(rep["sample"]) == 10 for rep in r["reports"].values())


# ------------------------------------------------------------------------------------------------ BSR projections
@pytest.mark.parametrize("method", ["static", "set", "rigl"])
def test_block_sparse_projections_train_rewire_and_resume(method, text_file, tmp_path, threads1):
    """--block-size 8: every projection is BSR with blocks of 8 x 8 (density counted in blocks), SET/RigL prune and
    regrow whole blocks, and a resumed run repeats the uninterrupted one exactly."""
    common = ["--method", method, "--density", "0.25", "--block-size", "8", "--steps", "6", "--eval-every", "3",
              "--update-every", "2"]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert run(text_file, *common, "--json", str(a)) == 0
    ra = json.loads(a.read_text())
    assert ra["block_size"] == 8 and ra["config"]["block_size"] == 8
    assert abs(ra["nnz"] - 0.25 * ra["dense_params"]) <= 12 * 64  # rounding: one block per projection
    assert ra["nnz"] % 64 == 0
    if method == "static":
        assert ra["topology_updates"] == 0 and ra["rewired_fraction"] == 0
    else:
        assert ra["topology_updates"] == 2 and 0 < ra["rewired_fraction"] < 1
    ck = tmp_path / "ck"
    assert run(text_file, *common, "--checkpoint", str(ck), "--stop-after", "3") == 0
    assert run(text_file, *common, "--checkpoint", str(ck), "--resume", "--json", str(b)) == 0
    rb = json.loads(b.read_text())
    assert [(h["step"], h["train_loss"], h["val_loss"]) for h in ra["history"]] == \
           [(h["step"], h["train_loss"], h["val_loss"]) for h in rb["history"]]
    assert ra["rewired_fraction"] == rb["rewired_fraction"]


def test_block_sparse_model_has_bsr_layers_and_matches_dense_at_density_one():
    torch.manual_seed(0)
    sparse = GPT(13, 16, 2, 32, 4, densities=[1.0] * 12, block_size=16).double()
    assert all(p.block_size == 16 and p.nnz == p.in_features * p.out_features for p in sparse.projections())
    dense = GPT(13, 16, 2, 32, 4).double()
    copy_into_dense(sparse, dense)
    x = torch.randint(0, 13, (2, 16))
    torch.testing.assert_close(sparse(x), dense(x), rtol=1e-12, atol=1e-12)
    half = GPT(13, 16, 2, 32, 4, densities=[0.5] * 12, block_size=16)
    assert all(p.nnz == 2 * 256 for p in half.projections() if p.out_features == p.in_features)  # 2 of 4 blocks


def test_block_size_errors(text_file, tmp_path, capsys):
    for args, match in ((["--method", "dense", "--block-size", "4"], "--block-size is for the sparse methods"),
                        (["--method", "set", "--block-size", "5"], "must be a multiple of --block-size 5"),
                        (["--method", "set", "--block-size", "0"], "--block-size")):
        rc = main(["--data", str(text_file), *TINY, "--steps", "1", *args])
        err = capsys.readouterr().err
        assert rc == 2 and match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (args, err)


def test_resume_with_another_block_size_is_refused(text_file, tmp_path, threads1, capsys):
    ck = tmp_path / "ck"
    assert run(text_file, "--method", "static", "--block-size", "8", "--steps", "2", "--checkpoint", str(ck)) == 0
    rc = run(text_file, "--method", "static", "--steps", "2", "--checkpoint", str(ck), "--resume")
    err = capsys.readouterr().err
    assert rc == 2 and "different settings (block_size)" in err
