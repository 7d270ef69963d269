"""`sparsecore bench e2e --run LABEL:METHOD[:K=V;...]`: labelled variants of a method in one comparison."""
import argparse
import json

import pytest

from sparsecore.apps.e2e import _parse_run, main


def test_parse_run_routes_options():
    spec = _parse_run("g2g-90:g2g:groups=8;inner_density=0.8;dst.zeta=0.2;epsilon=3")
    assert spec["label"] == "g2g-90" and spec["method"] == "g2g" and spec["epsilon"] == 3
    assert spec["model_options"] == {"groups": 8, "inner_density": 0.8}
    assert spec["dst_options"] == {"zeta": 0.2}
    assert _parse_run("c:ctre")["model_options"] == {}
    for bad in ("ctre", ":ctre", "x:nomethod", "x:set:novalue"):
        with pytest.raises(argparse.ArgumentTypeError):
            _parse_run(bad)


def test_e2e_with_runs(tmp_path):
    rc = main(["--methods", "static", "--epochs", "1", "--hidden", "32", "--run", "static-e2:static:epsilon=2",
               "--out", str(tmp_path), "--no-plot", "--quiet"])
    assert rc in (0, None)
    rows = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())["table"]}
    assert set(rows) == {"static", "dense", "static-e2"}
    assert rows["static-e2"]["nnz"] < rows["static"]["nnz"]  # epsilon 2 < the default 20
