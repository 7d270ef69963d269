"""sparsecore.apps.e2e: on tiny settings it trains the methods and dense, prints the table, writes results.json (+png)."""
import importlib.util
import json

import pytest
import torch

from sparsecore.apps.e2e import format_table, main, run

HAS_DST = importlib.util.find_spec("sparsecore.dst") is not None
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture
def threads1():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def test_e2e_cli_tiny(tmp_path, capsys, threads1):
    methods = "tsm,static" + (",g2g,set,etsm" if HAS_DST else "")
    rc = main(["--methods", methods, "--epochs", "1", "--hidden", "24,24", "--batch-size", "200", "--threads", "1",
               "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    header = out.splitlines()
    assert any(l.split()[:4] == ["method", "density", "nnz", "test"] for l in header)
    for m in methods.split(",") + ["dense"]:
        assert any(l.startswith(m + " ") for l in header), m
    res = json.loads((tmp_path / "results.json").read_text())
    names = [r["method"] for r in res["table"]]
    assert names == methods.split(",") + ["dense"]
    dense = res["table"][-1]
    assert dense["density"] == 1.0 and dense["speedup_vs_dense"] == pytest.approx(1.0)
    for r in res["table"]:
        assert 0 <= r["test_accuracy"] <= 1 and r["median_epoch_seconds"] > 0 and r["state_memory_mb"] > 0
        assert r["nnz"] <= r["dense_params"]
    assert set(res["runs"]) == set(names)
    assert res["machine"]["torch_threads"] == 1 and res["settings"]["epochs"] == 1
    if HAS_MPL:
        assert (tmp_path / "e2e.png").stat().st_size > 0 and res["plot"]
    else:
        assert "matplotlib" in res["plot_note"] and "matplotlib" in out
        assert not (tmp_path / "e2e.png").exists()


def test_run_api_adds_dense_and_same_settings(tmp_path, threads1):
    res = run(["static"], out=None, quiet=True, epochs=1, hidden=(16,), batch_size=400, threads=1)
    assert [r["method"] for r in res["table"]] == ["static", "dense"]
    a, b = res["runs"]["static"], res["runs"]["dense"]
    for k in ("epochs", "hidden", "batch_size", "lr", "seed", "dataset"):
        assert a["args"][k] == b["args"][k]
    assert a["split"] == b["split"]


def test_format_table_columns():
    rows = [{"method": "set", "density": 0.05, "nnz": 1234, "test_accuracy": 0.8, "median_epoch_seconds": 0.5,
             "speedup_vs_dense": 4.0, "peak_memory_delta_mb": 3.0, "state_memory_mb": 0.1, "epochs_run": 12,
             "train_seconds_total": 6.0, "accuracy_minus_dense": 0.01},
            {"method": "dense", "density": 1.0, "nnz": 99999, "test_accuracy": None, "median_epoch_seconds": 2.0,
             "speedup_vs_dense": 1.0, "peak_memory_delta_mb": None, "state_memory_mb": 1.5, "epochs_run": 3,
             "train_seconds_total": 6.0, "accuracy_minus_dense": None}]
    t = format_table(rows).splitlines()
    assert t[0].split() == ["method", "density", "nnz", "test", "acc", "s/epoch", "speed-up", "peak", "MB",
                            "state", "MB"]
    assert t[2].split() == ["set", "0.0500", "1,234", "0.8000", "0.500", "4.00x", "3.0", "0.10"]
    assert t[3].split()[3] == "-" and t[3].split()[6] == "-"
    e = format_table(rows, equal_time=True).splitlines()
    assert e[0].split() == ["method", "density", "epochs", "train", "s", "test", "acc", "vs", "dense", "speed-up"]
    assert e[2].split() == ["set", "0.0500", "12", "6.0", "0.8000", "+0.0100", "4.00x"]


def test_equal_time_gives_every_method_the_dense_time(tmp_path, threads1):
    res = run(["static", "set"], out=str(tmp_path), plot_png=False, quiet=True, equal_time=True, epochs=2,
              hidden=(32,), batch_size=200, threads=1, epsilon=None)
    budget = res["equal_time"]["budget_seconds"]
    dense = res["runs"]["dense"]
    assert budget == pytest.approx(dense["train_seconds_total"]) and dense["epochs_run"] == 2
    for m in ("static", "set"):
        r = res["runs"][m]
        assert r["args"]["time_budget"] == pytest.approx(budget)
        assert r["epochs_run"] >= 1 and r["train_seconds_total"] >= min(budget, sum(r["epoch_seconds"]))
    row = {r["method"]: r for r in res["table"]}["set"]
    assert row["time_to_accuracy"] and row["time_to_accuracy"][-1][0] == pytest.approx(
        res["runs"]["set"]["train_seconds_total"])


@pytest.mark.parametrize("args,match", [
    (["--methods", "set,nope"], "unknown method"),
    (["--epochs", "0"], "epochs must be >= 1"),
    (["--hidden", "1,a"], "--hidden"),
    (["--data-dir", "/nonexistent"], "does not exist"),
])
def test_e2e_bad_arguments_exit_2(args, match, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and match in err and "Traceback" not in err


def test_e2e_bad_dataset_exit_2(tmp_path, capsys):
    rc = main(["--dataset", "nope", "--methods", "static", "--epochs", "1", "--out", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown dataset" in err and "Traceback" not in err
