"""bench/step_memory.py: build and step peaks of each implementation in a fresh process, against dense's."""
import json
import sys

import pytest

from conftest import load_bench_script

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def test_small_layer_table_and_json(tmp_path, capsys):
    sm = load_bench_script("step_memory")
    out = tmp_path / "mem.json"
    rc = sm.main(["--size", "1024", "--batch", "16", "--density", "0.01", "--threads", "1", "--steps", "1",
                  "--impls", "dense,sparsecore,sparsecore-bsr", "--block-size", "16", "--json", str(out)])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["impl", "build", "after", "build", "step", "peak", "peak", "/", "dense"]
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"dense", "sparsecore", "sparsecore-bsr"}
    # the dense layer's 4 MiB weight is resident once built, its gradient too during the step; the 1%-dense
    # layer's values and pattern (~10,500 connections, 14 bytes each) are not even a tenth of that
    assert rows["dense"]["after_build"] > 3.5 and rows["dense"]["step"] > 7.5
    assert rows["sparsecore"]["after_build"] < 0.4 * rows["dense"]["after_build"]
    assert rows["sparsecore"]["peak"] < 0.5 * rows["dense"]["peak"]
    assert json.loads(out.read_text())["mmap_threshold"] == 1 << 20 and "glibc mmap threshold" in lines[0]


def test_unknown_implementation_is_an_error():
    sm = load_bench_script("step_memory")
    with pytest.raises(SystemExit):
        sm.main(["--impls", "dense,nope"])
