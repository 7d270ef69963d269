"""bench/gpu_check.py without a GPU: the stage runner (timeouts that end whole process groups, prerequisites,
the budget), pytest output parsing, the $OUT limits, the summary, and the dry run on a machine without CUDA."""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import load_bench_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gc():
    return load_bench_script("gpu_check")


def py(code):
    return [sys.executable, "-c", code]


def test_run_group_statuses_and_timeout(gc, tmp_path):
    """Passing, failing and hanging stages side by side; the hanging one and the child it started are killed at
    its timeout, and the others are not held up."""
    pidfile = tmp_path / "child.pid"
    hang = ("import subprocess, sys, time\n"
            f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            f"open({str(pidfile)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)")
    stages = [gc.Stage("ok", py("print('hello')"), 30), gc.Stage("bad", py("import sys; print('oops'); sys.exit(3)"), 30),
              gc.Stage("hang", py(hang), 2)]
    logged = {}
    t0 = time.monotonic()
    res = gc.run_group(stages, [30, 30, 2], lambda name, text: logged.__setitem__(name, text))
    assert time.monotonic() - t0 < 20
    assert [r.status for r in res] == ["passed", "failed", "timeout"]
    assert res[1].rc == 3 and "oops" in res[1].tail
    assert "hello" in logged["ok"] and "started" in logged["hang"]
    child = int(pidfile.read_text())
    time.sleep(0.5)
    assert not _alive(child)  # the stage's child went with it (same process group)


def _alive(pid: int) -> bool:
    """Running (a zombie, killed but not yet reaped by whoever adopted it, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_stage_env_never_interprets(gc, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    env = gc.stage_env({"X": "1"})
    assert "TRITON_INTERPRET" not in env and env["X"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == gc.ROOT


def test_pytest_counts(gc):
    text = ("....F.s\nFAILED tests/test_cuda.py::test_a[x] - AssertionError: no\n"
            "ERROR tests/test_cuda.py::test_b\n== 5 passed, 1 failed, 1 skipped, 1 error, 3 deselected in 2.0s ==\n")
    counts, failed = gc.pytest_counts(text)
    assert counts == {"passed": 5, "failed": 1, "skipped": 1, "error": 1, "deselected": 3}
    assert failed == ["tests/test_cuda.py::test_a[x]", "tests/test_cuda.py::test_b"]
    assert gc.pytest_counts("no tests here\n") == (None, [])
    assert gc.pytest_counts("12 passed in 3.1s")[0] == {"passed": 12}


def test_run_check_prerequisites_budget_and_summary(gc, tmp_path):
    groups = [[gc.Stage("env", py("print('env ok')"), 30, min_s=0)],
              [gc.Stage("a", py("import sys; sys.exit(1)"), 30, needs=["env"], min_s=0),
               gc.Stage("b", py("print('1 passed in 0.1s')"), 30, needs=["env"], min_s=0)],
              [gc.Stage("needs-a", py("print('never')"), 30, needs=["a"], min_s=0)],
              [gc.Stage("slow", py("print('never')"), 30, needs=["b"], min_s=10 ** 6)]]
    lines = []
    s = gc.run_check(groups, str(tmp_path), budget_s=60, echo=lines.append)
    by = {st["name"]: st for st in s["stages"]}
    assert s["status"] == "failed"
    assert by["env"]["status"] == "passed" and by["a"]["status"] == "failed" and by["b"]["status"] == "passed"
    assert by["b"]["tests"] == {"passed": 1}
    assert by["needs-a"]["status"] == "skipped" and "needs a" in by["needs-a"]["detail"]
    assert by["slow"]["status"] == "skipped" and "budget" in by["slow"]["detail"]
    with open(tmp_path / "summary.json") as f:
        assert json.load(f)["stages"][1]["name"] == "a"
    log = (tmp_path / "gpu_check.log").read_text()
    assert "env ok" in log and "= needs-a =" in log.replace("=" * 30, "=")
    text = gc.format_summary(s)
    assert "failed" in text and "needs-a" in text and "summary.json" in text
    assert any("a: failed" in line for line in lines)


def test_stage_timeout_is_trimmed_to_the_budget(gc, tmp_path):
    groups = [[gc.Stage("env", py("import time; time.sleep(30)"), 300, min_s=0)]]
    t0 = time.monotonic()
    s = gc.run_check(groups, str(tmp_path), budget_s=8, echo=lambda _: None)
    assert time.monotonic() - t0 < 25
    assert s["stages"][0]["status"] == "timeout"


def test_later_stages_reserve_budget(gc, tmp_path):
    """A stage before one that reserves budget is cut short to leave it that much."""
    groups = [[gc.Stage("env", py("import time; time.sleep(60)"), 300, min_s=0)],
              [gc.Stage("last", py("print('ran')"), 300, min_s=0, reserve_s=10)]]
    t0 = time.monotonic()
    s = gc.run_check(groups, str(tmp_path), budget_s=20, echo=lambda _: None)
    assert time.monotonic() - t0 < 30
    assert [st["status"] for st in s["stages"]] == ["timeout", "passed"]


def test_bench_stage_gets_the_budget_left(gc, tmp_path):
    groups = gc.default_stages(str(tmp_path))
    bench = groups[-1][0]
    assert bench.name == "bench" and "8192x8192" in bench.argv
    bench.argv = py("import sys; print(sys.argv[1:])")
    bench.needs = []
    s = gc.run_check([[bench]], str(tmp_path), budget_s=200, echo=lambda _: None)
    assert s["stages"][0]["status"] == "passed"
    log = (tmp_path / "gpu_check.log").read_text()
    assert "'--max-seconds'" in log and "'155'" in log  # 200 - 5 s margin - 40 s to write its files


def test_default_stages_are_wired(gc, tmp_path):
    groups = gc.default_stages(str(tmp_path))
    names = [st.name for g in groups for st in g]
    assert names == ["env", "build", "smoke-csr", "smoke-bsr", "kernels", "layers", "autocast", "bench"]
    for g in groups:
        for st in g:
            assert all(n in names[:names.index(st.name)] for n in st.needs), st.name
            if "pytest" in st.argv:
                assert "tests/test_cuda.py" in st.argv and "--noconftest" in st.argv
    # the -k selections cover tests/test_cuda.py's tests exactly once
    k = {st.name: st.argv[st.argv.index("-k") + 1] for g in groups for st in g if "-k" in st.argv}
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "--noconftest", "-p",
                        "no:cacheprovider", "tests/test_cuda.py"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    all_tests = {line for line in r.stdout.splitlines() if "::" in line}
    seen = []
    for name, sel in k.items():
        r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "--noconftest", "-p",
                            "no:cacheprovider", "tests/test_cuda.py", "-k", sel], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
        got = [line for line in r.stdout.splitlines() if "::" in line]
        assert got, f"stage {name}: -k {sel!r} selects no test"
        seen += got
    assert sorted(seen) == sorted(all_tests - {"tests/test_cuda.py::test_in_a_clean_process"}) or \
        sorted(seen) == sorted(all_tests)


def test_out_dir_limits(gc, tmp_path):
    assert gc.check_out_dir(str(tmp_path)) == []
    for i in range(9):
        (tmp_path / f"f{i}.txt").write_text("x")
    (tmp_path / "bad name.txt").write_text("x")
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "x.json").write_text("{}")
    problems = gc.check_out_dir(str(tmp_path))
    assert any("more than the 8" in p for p in problems)
    assert any("bad name.txt" in p for p in problems)
    assert any("folders down" in p for p in problems)


def test_check_writes_what_the_device_tool_brings_back(gc, tmp_path):
    """The files the real check writes (log, summary, the bench's JSON and PNG) fit the limits."""
    for name in ("gpu_check.log", "summary.json", "gpu-nvidia-h200-2026-11-20.json", "gpu-nvidia-h200-2026-11-20.png"):
        (tmp_path / name).write_text("x")
    assert gc.check_out_dir(str(tmp_path)) == []


def test_dry_run_without_cuda(tmp_path):
    """On this machine (no CUDA): a clear message, exit status 2, a summary saying so; nothing else ran."""
    pytest.importorskip("torch")
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["OUT"] = str(tmp_path / "out")
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no CUDA device" in r.stderr and "nothing was built, tested or timed" in r.stderr
    with open(tmp_path / "out" / "summary.json") as f:
        s = json.load(f)
    assert s["status"] == "no-cuda"
    assert [st["status"] for st in s["stages"]] == ["no-cuda"] + ["skipped"] * 7
    assert sorted(os.listdir(tmp_path / "out")) == ["gpu_check.log", "summary.json"]


def test_unknown_stage(gc, capsys):
    assert gc.main(["--only", "nope", "--out", "/tmp/unused-gpu-check"]) == 2
    assert "unknown stage" in capsys.readouterr().err
