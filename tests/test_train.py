"""sparsecore.apps.train: the JSON report, kill-and-resume to the same result, atomic checkpoints, clear errors."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sparsecore.apps.train import (CHECKPOINT_NAME, TrainConfig, TrainError, load_checkpoint, main,
                              save_checkpoint_atomic, train)

ROOT = Path(__file__).resolve().parents[1]
HAS_DST = importlib.util.find_spec("sparsecore.dst") is not None
TINY = ["--dataset", "builtin", "--hidden", "24,24", "--batch-size", "200", "--threads", "1", "--lr", "0.05"]
REQUIRED = ("test_accuracy", "epoch_seconds", "nnz", "dense_params", "peak_memory_mb", "method", "args", "split",
            "machine")


@pytest.fixture
def threads1():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def cli(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "sparsecore", "train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def config(method, tmp_path=None, **kw):
    base = dict(method=method, dataset="builtin", hidden=(24, 24), batch_size=200, threads=1, lr=0.05, epochs=2,
                quiet=True)
    base.update(kw)
    return TrainConfig(**base)


def same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------ report


def test_train_writes_report_with_required_keys(tmp_path, threads1, capsys):
    out = tmp_path / "r.json"
    assert main(["--method", "static", "--epochs", "2", *TINY, "--epsilon", "3", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "epoch 2/2" in captured.err and "test accuracy" in captured.out
    r = json.loads(out.read_text())
    for k in REQUIRED:
        assert k in r, k
    assert 0.0 <= r["test_accuracy"] <= 1.0
    assert len(r["epoch_seconds"]) == 2 and all(s > 0 for s in r["epoch_seconds"])
    assert r["dense_params"] == 256 * 24 + 24 * 24 + 24 * 10
    assert 0 < r["nnz"] < r["dense_params"] and r["density"] == pytest.approx(r["nnz"] / r["dense_params"])
    assert r["peak_memory_mb"] > 0 and r["state_memory_mb"] > 0 and "peak_memory_how" in r
    assert r["args"]["epsilon"] == 3.0 and r["args"]["hidden"] == [24, 24]
    assert r["split"]["n_train"] == 3600 and r["split"]["n_val"] == 400 and r["split"]["n_test"] == 1000
    assert r["machine"]["torch_threads"] == 1 and r["machine"]["torch"] == torch.__version__
    best = r["best_epoch"]
    assert r["test_accuracy"] == r["history"][best - 1]["test_accuracy"]
    assert r["best_val_accuracy"] == max(h["val_accuracy"] for h in r["history"])


def test_quiet_prints_nothing(threads1, capsys):
    assert main(["--method", "dense", "--epochs", "1", *TINY, "--quiet"]) == 0
    c = capsys.readouterr()
    assert c.out == "" and c.err == ""


def test_zero_epochs_and_no_validation(threads1):
    r = train(config("dense", epochs=0))
    assert r["test_accuracy"] is None and r["epoch_seconds"] == []
    r = train(config("dense", epochs=1, val_fraction=0.0))
    assert r["split"]["n_val"] == 0 and r["best_epoch"] == 1 and r["test_accuracy"] is not None


@pytest.mark.skipif(not HAS_DST, reason="sparsecore.dst not available")
@pytest.mark.parametrize("method", ["set", "rigl", "ctre", "g2g", "etsm", "tsm"])
def test_every_method_trains(method, threads1):
    r = train(config(method, epochs=2, dst_options={"every": 5} if method == "rigl" else {}))
    assert 0 <= r["test_accuracy"] <= 1
    if method == "tsm":
        assert r["topology_updates"] is None
    else:
        assert r["topology_updates"] >= 1
    if method == "etsm":
        assert r["nnz"] < r["nnz_initial"]
        assert r["density"] == pytest.approx(0.1, abs=0.01)     # the default overall target
    else:
        assert r["nnz"] == r["nnz_initial"]


# ------------------------------------------------------------------------------------------------ resume


def run_killed(method, ckpt, epochs, stop, extra=()):
    p = cli("--method", method, "--epochs", str(epochs), *TINY, "--checkpoint", str(ckpt), "--quiet",
            "--stop-after-epoch", str(stop), *extra)
    assert p.returncode == -signal.SIGKILL, p.stderr
    ck = load_checkpoint(ckpt / CHECKPOINT_NAME)
    assert ck["state"]["epoch"] == stop


RESUME_METHODS = ["static"] + (["set", "rigl", "ctre", "g2g", "etsm"] if HAS_DST else [])


@pytest.mark.parametrize("method", RESUME_METHODS)
def test_kill_and_resume_equals_uninterrupted(method, tmp_path, threads1):
    """A run SIGKILLed right after the checkpoint of epoch 1, resumed, ends with the same weights (bit for bit),
    topology, optimizer state and accuracies as an uninterrupted run."""
    epochs = 3
    extra = ("--dst", "every=7") if method == "rigl" else ()
    dst_options = {"every": 7} if method == "rigl" else {}
    full = train(config(method, epochs=epochs, checkpoint=str(tmp_path / "full"), dst_options=dst_options))
    run_killed(method, tmp_path / "cut", epochs, 1, extra)
    resumed = train(config(method, epochs=epochs, checkpoint=str(tmp_path / "cut"), resume=True,
                           dst_options=dst_options))
    a = load_checkpoint(tmp_path / "full" / CHECKPOINT_NAME)
    b = load_checkpoint(tmp_path / "cut" / CHECKPOINT_NAME)
    same_state(a["model"], b["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        same_state(sa, sb)
    assert resumed["resumed_from_epochs"] == [1]
    for k in ("test_accuracy", "best_epoch", "best_val_accuracy", "nnz", "final_test_accuracy"):
        assert resumed[k] == full[k], k
    strip = lambda h: [{k: v for k, v in e.items() if "seconds" not in k} for e in h]
    assert strip(resumed["history"]) == strip(full["history"])


def test_resume_via_cli_after_kill(tmp_path):
    """Both halves on the command line (separate processes): killed at epoch 2 of 3, resumed, compared with the
    JSON of a full run."""
    ck = tmp_path / "ck"
    run_killed("tsm", ck, 3, 2)
    p = cli("--method", "tsm", "--epochs", "3", *TINY, "--checkpoint", str(ck), "--resume",
            "--json", str(tmp_path / "b.json"))
    assert p.returncode == 0, p.stderr
    assert "resumed from" in p.stderr and "epoch 3/3" in p.stderr and "epoch 1/3" not in p.stderr
    old = torch.get_num_threads()
    try:
        assert main(["--method", "tsm", "--epochs", "3", *TINY, "--json", str(tmp_path / "a.json"), "--quiet"]) == 0
    finally:
        torch.set_num_threads(old)
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["test_accuracy"] == b["test_accuracy"] and a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]


def test_resume_without_checkpoint_starts_fresh_and_finished_run_is_a_no_op(tmp_path, threads1):
    r1 = train(config("dense", epochs=1, checkpoint=str(tmp_path), resume=True))
    assert r1["resumed_from_epochs"] == []
    r2 = train(config("dense", epochs=1, checkpoint=str(tmp_path), resume=True))
    assert r2["resumed_from_epochs"] == [1] and r2["test_accuracy"] == r1["test_accuracy"]


def test_resume_with_other_settings_is_refused(tmp_path, threads1, capsys):
    train(config("dense", epochs=1, checkpoint=str(tmp_path)))
    rc = main(["--method", "dense", "--epochs", "1", *TINY, "--lr", "0.5", "--checkpoint", str(tmp_path),
               "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "different settings (lr)" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ atomicity


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint_atomic({"epoch": 1, "w": torch.arange(10.0)}, path)
    good = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint_atomic({"epoch": 2, "w": torch.zeros(10)}, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]   # the temporary file is gone


def test_kill_during_write_never_replaces_good_checkpoint(tmp_path, threads1):
    """SIGKILL a process in the middle of writing a checkpoint: the good one stays, and resume uses it."""
    train(config("static", epochs=1, checkpoint=str(tmp_path)))
    path = tmp_path / CHECKPOINT_NAME
    good = path.read_bytes()
    script = textwrap.dedent(f"""
        import os, sys, time, torch
        from sparsecore.apps.train import save_checkpoint_atomic
        def slow_fsync(fd):  # the temporary file is written, not yet renamed over the checkpoint
            print("writing", flush=True)
            time.sleep(60)
        os.fsync = slow_fsync
        save_checkpoint_atomic({{"big": torch.zeros(1 << 20)}}, {str(path)!r})
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert p.stdout.readline().strip() == "writing"
        tmps = [f for f in tmp_path.iterdir() if f.name != CHECKPOINT_NAME]
        assert len(tmps) == 1 and tmps[0].name.startswith(".")        # the partial temp file
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    assert path.read_bytes() == good
    assert load_checkpoint(path)["state"]["epoch"] == 1
    r = train(config("static", epochs=2, checkpoint=str(tmp_path), resume=False))  # other epochs: fresh run
    assert r["resumed_from_epochs"] == []


def test_truncated_checkpoint_is_a_clear_error(tmp_path, capsys):
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"PK\x03\x04 not really")
    rc = main(["--method", "dense", "--epochs", "1", *TINY, "--checkpoint", str(tmp_path), "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot read checkpoint" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("args,match", [
    (["--method", "nope"], "invalid choice"),
    (["--method", "set", "--epochs", "-1"], "--epochs: must be >= 0"),
    (["--method", "set", "--hidden", "10,x"], "--hidden: expected comma-separated"),
    (["--method", "set", "--hidden", "10,-3"], "--hidden: hidden widths must be positive"),
    (["--method", "set", "--hidden", ""], "--hidden"),
    (["--method", "set", "--data-dir", "/nonexistent/dir"], "does not exist"),
    (["--method", "set", "--resume"], "--resume needs --checkpoint"),
    (["--method", "set", "--epsilon", "1", "--density", "0.1"], "not allowed with"),
    (["--method", "set", "--density", "2"], "--density: must be in"),
    (["--method", "set", "--batch-size", "0"], "--batch-size: must be >= 1"),
    (["--method", "set", "--lr", "nan"], "--lr"),
    (["--method", "set", "--opt", "fan_out"], "expected KEY=VALUE"),
    (["--epochs", "1"], "--method"),
])
def test_bad_arguments_exit_2(args, match, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and match in err and "Traceback" not in err


@pytest.mark.parametrize("args,match", [
    (["--method", "set", "--dataset", "imagenet"], "unknown dataset"),
    (["--method", "set", "--opt", "fan_out=2"], "does not take option"),
    (["--method", "dense", "--epsilon", "2"], "neither epsilon nor density"),
    (["--method", "tsm", "--dst", "zeta=0.5"], "no topology updates"),
])
def test_bad_settings_exit_2(args, match, capsys):
    rc = main([*args, "--epochs", "1", "--hidden", "8", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and "Traceback" not in err and err.startswith("sparsecore train: error:")


def test_bad_data_exit_2(tmp_path, capsys):
    d = tmp_path / "fashion-mnist"
    d.mkdir()
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte"):
        (d / f).write_bytes(b"\x00\x00\x08\x03garbage")
    rc = main(["--method", "dense", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--epochs", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "fashion-mnist" in err and "Traceback" not in err
    csv = tmp_path / "bad.csv"
    csv.write_text("1,2,0\n3,nan,1\n4,5,0\n6,7,1\n" * 5)
    rc = main(["--method", "dense", "--dataset", f"csv:{csv}", "--epochs", "1", "--hidden", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "error:" in err
    empty = tmp_path / "missing"
    empty.mkdir()
    rc = main(["--method", "dense", "--dataset", "fashion-mnist", "--data-dir", str(empty), "--epochs", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err


def test_cli_exit_code_2_in_a_subprocess():
    p = cli("--method", "nope")
    assert p.returncode == 2 and "invalid choice" in p.stderr and "Traceback" not in p.stderr
    p = cli("--method", "set", "--dataset", "nope", "--epochs", "1", "--quiet")
    assert p.returncode == 2 and "unknown dataset" in p.stderr and "Traceback" not in p.stderr


def test_train_api_raises_value_errors():
    with pytest.raises(TrainError, match="epochs"):
        train(config("dense", epochs=-1))
    with pytest.raises(ValueError, match="unknown method"):
        train({"method": "nope"})
    with pytest.raises(ValueError, match="hidden"):
        train(config("dense", hidden=(3, 0)))


def test_machine_info_names_the_kernels_instruction_set():
    from sparsecore import _C
    from sparsecore.apps.train import machine_info

    info = machine_info()
    assert info["kernel_isa"] == _C.kernel_isa() and info["kernel_isa"] in ("generic", "avx2", "avx512", "avx512bf16")
    assert info["avx2"] == (info["kernel_isa"] != "generic")
    assert info["torch_threads"] == torch.get_num_threads()


def test_time_budget_stops_training_and_history_is_cumulative(threads1):
    r = train(config("set", epochs=500, time_budget=0.6, epsilon=3.0))
    assert r["stopped_by_time_budget"] and r["epochs_run"] < 500 and r["train_seconds_total"] >= 0.6
    cum = [h["cumulative_train_seconds"] for h in r["history"]]
    assert cum == sorted(cum) and cum[-1] == pytest.approx(r["train_seconds_total"])
    assert all(not h["partial"] for h in r["history"][:-1])
    assert len(r["epoch_seconds"]) == sum(not h["partial"] for h in r["history"])
    assert r["test_accuracy"] is not None
    with pytest.raises(TrainError, match="time_budget"):
        train(config("set", time_budget=-1))
