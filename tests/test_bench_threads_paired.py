"""bench/threads_paired.py: both thread counts in one process, one row per method, ratios to the first count."""
import json

from conftest import load_bench_script


def test_parse_run():
    tp = load_bench_script("threads_paired")
    assert tp.parse_run("ctre-eps20:ctre:epsilon=20") == ("ctre-eps20", {"method": "ctre", "epsilon": 20.0})
    assert tp.parse_run("s:set") == ("s", {"method": "set"})
    assert tp.parse_run("g:g2g:groups=8;dst.zeta=0.2") == ("g", {"method": "g2g", "model_options": {"groups": 8},
                                                               "dst_options": {"zeta": 0.2}})


def test_table_and_json(tmp_path, capsys):
    tp = load_bench_script("threads_paired")
    out = tmp_path / "tp.json"
    rc = tp.main(["--dataset", "builtin", "--methods", "set", "--run", "c20:ctre:epsilon=20", "--hidden", "32,32",
                  "--epochs", "1", "--rounds", "2", "--threads", "1,2", "--json", str(out)])
    assert rc == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert table[0] == "| method | s/epoch, 1 thr | s/epoch, 2 thr | 2 thr / 1 thr |"
    assert [line.split("|")[1].strip() for line in table[2:]] == ["set", "c20"]
    rep = json.loads(out.read_text())
    for name in ("set", "c20"):
        secs = rep["methods"][name]["epoch_seconds"]
        assert len(secs["1"]) == 2 and len(secs["2"]) == 2 and all(s > 0 for s in secs["1"] + secs["2"])
