"""``sparsecore bench`` (the kernel benchmark command) on a tiny layer: protocol, output, memory figures, errors."""
import json

import pytest
import torch

from sparsecore.apps import bench_kernels
from sparsecore.apps.bench_kernels import main


def test_bench_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "k.json"
    rc = main(["--out-features", "24", "--in-features", "40", "--batch", "8", "--densities", "0.5,0.1",
               "--repeat", "3", "--block", "2", "--warmup", "1", "--impls", "dense,torch.sparse,sparsecore",
               "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "blocks of 2 consecutive steps" in text and "zero_grad(set_to_none)" in text
    d = json.loads(out.read_text())
    assert d["shape"] == [24, 40] and d["batch"] == 8 and d["repeat"] == 3 and d["block"] == 2
    assert [r["density"] for r in d["results"]] == [0.5, 0.1]
    for r in d["results"]:
        assert set(r["impls"]) == {"dense", "torch.sparse", "sparsecore"}
        assert all(v["median_ms"] > 0 for v in r["impls"].values())
    # params + grads + structure: dense is 2 * (24*40 + 24) floats; the 10%-dense layer keeps far less
    dense_mb = d["results"][1]["impls"]["dense"]["memory_mb"]
    assert dense_mb == pytest.approx(2 * (24 * 40 + 24) * 4 / 2**20)
    assert d["results"][1]["impls"]["sparsecore"]["memory_mb"] < 0.5 * dense_mb


def test_bench_protocol_counts_steps(monkeypatch):
    """warmup, then per block one untimed step and `block` timed ones, round-robin; medians of `repeat` steps."""
    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def step(self):
            calls.append(self.name)

        def memory(self):
            return 0

    monkeypatch.setattr(bench_kernels, "make_impls", lambda *a, **k: [Fake("a"), Fake("b")])
    times = iter(range(1000))
    monkeypatch.setattr(bench_kernels.time, "perf_counter", lambda: float(next(times)))
    r = bench_kernels.bench_density(8, 8, 2, 0.5, torch.float32, repeat=5, warmup=1, seed=0,
                                    include=["a", "b"], block=2)
    # warmup a, b; then blocks of (1 untimed + 2), (1 + 2), (1 + 1) for a, then for b, in turn
    assert calls == ["a", "b"] + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3 + ["a"] * 2 + ["b"] * 2
    assert set(r) == {"a", "b"} and all(v["median_ms"] == 1e3 for v in r.values())


@pytest.mark.parametrize("argv", [["--repeat", "0"], ["--block", "0"], ["--densities", "0"],
                                  ["--densities", "x"], ["--impls", "dense,nope"]])
def test_bench_rejects_bad_arguments(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


def test_bench_sweep_and_bsr_rows(tmp_path, capsys):
    out, png = tmp_path / "s.json", tmp_path / "s.png"
    rc = main(["--sizes", "32,64", "--batches", "8,16", "--densities", "0.25", "--repeat", "2", "--block", "1",
               "--warmup", "1", "--impls", "sparsecore,sparsecore-bsr", "--block-size", "16", "--json", str(out),
               "--plot", str(png)])
    assert rc == 0
    d = json.loads(out.read_text())
    assert [(r["width"], r["batch"]) for r in d["sweep"]] == [(32, 8), (32, 16), (64, 8), (64, 16)]
    for r in d["sweep"]:
        assert set(r["speedup"]) == {"sparsecore", "sparsecore-bsr"} and all(v > 0 for v in r["speedup"].values())
    pytest.importorskip("matplotlib")
    assert png.stat().st_size > 0
    with pytest.raises(SystemExit):
        main(["--sizes", "32"])  # a sweep needs both lists
