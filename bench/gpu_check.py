"""The GPU check: build, test and benchmark sparsecore's Triton kernels on a CUDA machine, in one command.

    python3 bench/gpu_check.py                     # or: bash bench/gpu_check.sh
    python3 bench/gpu_check.py --budget-s 300 --out /tmp/gc

Each stage runs in its own process with a timeout (a CUDA fault poisons the process it happens in, and a hang
must not eat the budget); the whole run keeps to ``--budget-s`` (default 480 s: 8 minutes), the stages before the benchmark leaving it at
least 150 s. Stages, in order:

==========  ===================================================================================================
env         versions, the GPU; no CUDA device: the check stops here (exit status 2), nothing else runs
build       sparsecore._C for this machine's Python (``setup.py build_ext --inplace``), unless it imports already
smoke-csr   tests/test_cuda.py -k smoke_csr: bench-sized CSR kernels, autotuned, vs float64   } run side by side
smoke-bsr   tests/test_cuda.py -k smoke_bsr: the same for BSR 16/32/64                        } (two processes)
kernels     the rest of the kernel tests: every kernel, dtype and autotune config, edge cases, graphs, streams
layers      SparseLinear training steps against a dense masked float64 model (needs build)
autocast    the autocast-bf16 contract of SparseLinear (needs build)
bench       bench/gpu_bench.py: one training step, 8192x8192 and 4096x4096, five densities, CSR and BSR
            16/32/64 against cuBLAS bf16/tf32 and torch.sparse; gets what is left of the budget
==========  ===================================================================================================

Writes into ``$OUT`` (else ``--out``, else ./gpu_check_out): ``gpu_check.log`` (every stage's output),
``summary.json`` (each stage's status, seconds and test counts), and the benchmark's
``gpu-<device>-<date>.json`` / ``.png``: four files, in one folder, as the device tool brings back (at most 8).
Prints one line per stage, the benchmark's table and a summary last. Exit status: 0 when every stage passed,
1 when one failed or timed out, 2 without a CUDA device.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_CUDA = 3  # exit status of the env stage without a CUDA device
OUT_LIMITS = {"files": 8, "depth": 2, "name": re.compile(r"^[A-Za-z0-9._-]+$")}


@dataclass
class Stage:
    name: str
    argv: List[str]
    timeout_s: float
    needs: List[str] = field(default_factory=list)  # stages that must have passed first, else this one skips
    env: Dict[str, str] = field(default_factory=dict)
    min_s: float = 20.0  # not started with less budget left than this
    reserve_s: float = 0.0  # budget the stages before this one leave for it


@dataclass
class Result:
    name: str
    status: str  # passed | failed | timeout | skipped
    rc: Optional[int] = None
    seconds: float = 0.0
    detail: str = ""
    tests: Optional[Dict[str, int]] = None  # pytest's counts: passed, failed, skipped, error
    failed_tests: List[str] = field(default_factory=list)
    tail: str = ""  # last lines of the output (failures only)


# ============================================================================================= running stages
def stage_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The stages' environment: the repository importable, the kernels compiled (never the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _kill(proc: subprocess.Popen) -> None:
    """End a stage and everything it started (its own process group): TERM, then KILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_group(stages: Sequence[Stage], timeouts: Sequence[float], log) -> List[Result]:
    """Run stages side by side, each in its own process group with its own timeout; their output (stdout and
    stderr together) goes to ``log(name, text)`` when each ends. Returns one Result per stage, in order."""
    running = []
    for st, limit in zip(stages, timeouts):
        out = tempfile.TemporaryFile(mode="w+b")
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(st.argv, cwd=ROOT, env=stage_env(st.env), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            out.close()
            running.append((st, None, None, t0, limit, Result(st.name, "failed", detail=f"could not start: {e}")))
            continue
        running.append((st, proc, out, t0, limit, None))
    results: List[Optional[Result]] = [r[5] for r in running]
    pending = {i for i, r in enumerate(running) if r[1] is not None}
    while pending:
        for i in sorted(pending):
            st, proc, out, t0, limit, _ = running[i]
            elapsed = time.monotonic() - t0
            rc = proc.poll()
            if rc is None and elapsed <= limit:
                continue
            timed_out = rc is None
            if timed_out:
                _kill(proc)
            pending.discard(i)
            out.seek(0)
            text = out.read().decode("utf-8", "replace")
            out.close()
            log(st.name, text)
            if timed_out:
                r = Result(st.name, "timeout", rc=None, seconds=round(elapsed, 1),
                           detail=f"killed after {limit:.0f} s")
            else:
                r = Result(st.name, "passed" if rc == 0 else "failed", rc=rc, seconds=round(elapsed, 1))
            r.tests, r.failed_tests = pytest_counts(text)
            if r.status != "passed":
                r.tail = "\n".join(text.rstrip().splitlines()[-15:])
            results[i] = r
        if pending:
            time.sleep(0.2)
    return results  # type: ignore[return-value]


_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def pytest_counts(text: str):
    """pytest's final counts ({"passed": n, ...}) and the names of its failed tests, from its output."""
    final = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?)\b", line)
             and (" in " in line or line.startswith("="))]
    counts = None
    if final:
        counts = {}
        for n, what in _COUNT.findall(final[-1]):
            counts["error" if what.startswith("error") else what] = int(n)
    failed = [m.group(1) for m in re.finditer(r"^(?:FAILED|ERROR) (\S+)", text, re.M)]
    return counts, failed


# ============================================================================================= the check
def _pytest(k: str, parallel: int = 0) -> List[str]:
    argv = [sys.executable, "-m", "pytest", "-q", "-rfEs", "--noconftest", "-p", "no:cacheprovider",
            "tests/test_cuda.py", "-k", k]
    if parallel > 1 and importlib.util.find_spec("xdist") is not None:
        argv += ["-n", str(parallel)]
    return argv


ENV_SCRIPT = r"""
import os, platform, shutil, subprocess, sys
print("python", platform.python_version(), sys.executable)
try:
    import torch
except Exception as e:
    print("torch does not import:", e); sys.exit(1)
print("torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton does not import:", e)
if shutil.which("nvidia-smi"):
    print(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip())
if not torch.cuda.is_available():
    print("no CUDA device: torch.cuda.is_available() is False")
    if os.environ.get("SPARSECORE_CUDA_TESTS_ON") == "cpu":
        print("rehearsal on CPU: the stages run on CPU tensors under the Triton interpreter"); sys.exit(0)
    sys.exit(%d)
p = torch.cuda.get_device_properties(0)
print("device", p.name, "| sm", f"{p.major}.{p.minor}", "|", p.multi_processor_count, "SMs |",
      round(p.total_memory / 2**30, 1), "GiB |", torch.cuda.device_count(), "device(s)")
""" % NO_CUDA

BUILD_SCRIPT = r"""
import os, subprocess, sys
try:
    import sparsecore._C as c
    print("sparsecore._C imports (", c.__file__, "): no build needed")
    sys.exit(0)
except ImportError as e:
    print("sparsecore._C does not import (", e, "): building it for this Python")
jobs = str(min(16, os.cpu_count() or 1))
r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-j", jobs])
if r.returncode:
    sys.exit(r.returncode)
import sparsecore._C  # noqa: F401  (fails loudly if the build did not give an importable module)
print("built sparsecore._C")
"""


REHEARSAL_BENCH = ["--device", "cpu", "--shapes", "64x64", "--batch", "16", "--densities", "0.5",
                   "--block-sizes", "16", "--warmup", "0", "--iters", "1", "--rotate", "1"]


def default_stages(out_dir: str, bench_args: Sequence[str] = (), rehearse: bool = False) -> List[List[Stage]]:
    """The check's stages, as groups run one after another (the stages of a group side by side).

    ``rehearse``: the same stages on CPU (tests/test_cuda.py's rehearsal, a tiny CPU benchmark under the
    interpreter), to check the check itself on a machine without a GPU.
    """
    py = sys.executable
    bench = [py, "bench/gpu_bench.py", "--out", out_dir, "--shapes", "8192x8192", "4096x4096",
             # densities in the order the bars need them, so a run cut short has those first
             "--densities", "10%", "1%", "5%", "25%", "50%", *bench_args]
    if rehearse:
        bench = [py, "bench/gpu_bench.py", "--out", out_dir, *REHEARSAL_BENCH, *bench_args]
    groups = [
        [Stage("env", [py, "-c", ENV_SCRIPT], 120, min_s=5)],
        [Stage("build", [py, "-c", BUILD_SCRIPT], 300, needs=["env"])],
        [Stage("smoke-csr", _pytest("smoke_csr"), 240, needs=["env"]),
         Stage("smoke-bsr", _pytest("smoke_bsr"), 300, needs=["env"])],
        [Stage("kernels", _pytest("not smoke and not autocast and not training", parallel=8), 300,
               needs=["smoke-csr", "smoke-bsr"])],
        # the layer stages check SparseLinear, not the configurations (the kernels stage ran every one): one
        # heuristic configuration per launch keeps their compiles few
        [Stage("layers", _pytest("training and not autocast"), 180, needs=["build", "smoke-csr", "smoke-bsr"],
               env={"SPARSECORE_TRITON_AUTOTUNE": "0"}),
         Stage("autocast", _pytest("autocast"), 180, needs=["build", "smoke-csr", "smoke-bsr"],
               env={"SPARSECORE_TRITON_AUTOTUNE": "0"})],
        [Stage("bench", bench, 10 ** 6, needs=["build", "smoke-csr", "smoke-bsr"], min_s=60, reserve_s=150)],
    ]
    if rehearse:
        for g in groups:
            for st in g:
                st.env["SPARSECORE_CUDA_TESTS_ON"] = "cpu"
                if st.name == "bench":
                    st.env["TRITON_INTERPRET"] = "1"
    return groups


def check_out_dir(out_dir: str) -> List[str]:
    """Problems with what $OUT holds, against the device tool's limits (files, depth, names)."""
    problems, n = [], 0
    for dirpath, dirnames, filenames in os.walk(out_dir):
        rel = os.path.relpath(dirpath, out_dir)
        depth = 0 if rel == "." else rel.count(os.sep) + 1
        for name in dirnames + filenames:
            if not OUT_LIMITS["name"].match(name):
                problems.append(f"{os.path.join(rel, name)}: the name has characters besides letters, digits, ._-")
        for name in filenames:
            n += 1
            if depth > OUT_LIMITS["depth"]:
                problems.append(f"{os.path.join(rel, name)}: more than {OUT_LIMITS['depth']} folders down")
            if os.path.getsize(os.path.join(dirpath, name)) > 16 * 2 ** 20:
                problems.append(f"{os.path.join(rel, name)}: over 16 MiB")
    if n > OUT_LIMITS["files"]:
        problems.append(f"{n} files: more than the {OUT_LIMITS['files']} that come back")
    return problems


def run_check(groups: List[List[Stage]], out_dir: str, budget_s: float, echo=print) -> dict:
    """Run the groups within the budget; write gpu_check.log and summary.json into out_dir; return the summary."""
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, "gpu_check.log")
    t_start = time.monotonic()
    deadline = t_start + budget_s
    results: Dict[str, Result] = {}

    with open(log_path, "w") as logf:
        def log(name, text):
            logf.write(f"\n{'=' * 30} {name} {'=' * 30}\n{text}")
            logf.flush()

        for gi, group in enumerate(groups):
            todo, limits = [], []
            reserve = sum(st.reserve_s for g in groups[gi + 1:] for st in g)
            for st in group:
                missing = [n for n in st.needs if results.get(n) is None or results[n].status != "passed"]
                left = deadline - time.monotonic() - reserve
                if missing:
                    results[st.name] = Result(st.name, "skipped", detail=f"needs {', '.join(missing)}")
                elif left < st.min_s:
                    results[st.name] = Result(st.name, "skipped", detail=f"budget spent ({left:.0f} s left)")
                else:
                    todo.append(st)
                    limits.append(min(st.timeout_s, left - 5))
            for st in group:
                if st.name in results:
                    log(st.name, f"skipped: {results[st.name].detail}\n")
                    echo(f"[gpu_check] {st.name}: skipped ({results[st.name].detail})")
            if not todo:
                continue
            for st, limit in zip(todo, limits):
                if st.name == "bench":  # the benchmark stops itself in time and keeps what it measured
                    st.argv = st.argv + ["--max-seconds", f"{max(30.0, limit - 40):.0f}"]
            echo(f"[gpu_check] {' + '.join(s.name for s in todo)}: running "
                 f"(timeout {', '.join(f'{x:.0f}' for x in limits)} s)")
            for r in run_group(todo, limits, log):
                if r.name == "env" and r.rc == NO_CUDA:
                    r.status, r.detail, r.tail = "no-cuda", "no CUDA device", ""
                results[r.name] = r
                counts = f" {r.tests}" if r.tests else ""
                echo(f"[gpu_check] {r.name}: {r.status} in {r.seconds:.0f} s{counts} {r.detail}".rstrip())
                if r.status != "passed" and r.tail:
                    echo("\n".join("    " + line for line in r.tail.splitlines()))
            if results.get("env") and results["env"].rc == NO_CUDA:
                break

    order = [st.name for g in groups for st in g]
    no_cuda = results.get("env") is not None and results["env"].rc == NO_CUDA
    summary = {
        "status": "no-cuda" if no_cuda else
        ("passed" if all(results[n].status == "passed" for n in order if n in results) else "failed"),
        "seconds": round(time.monotonic() - t_start, 1), "budget_s": budget_s, "out": out_dir,
        "stages": [asdict(results[n]) if n in results else asdict(Result(n, "skipped", detail="not reached"))
                   for n in order],
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    summary["out_problems"] = check_out_dir(out_dir)
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"gpu_check: {summary['status']} in {summary['seconds']:.0f} s (budget {summary['budget_s']:.0f} s)"]
    for s in summary["stages"]:
        counts = ""
        if s.get("tests"):
            counts = " (" + ", ".join(f"{v} {k}" for k, v in s["tests"].items()) + ")"
        lines.append(f"  {s['status']:<8} {s['name']:<10} {s['seconds']:>6.0f} s{counts} {s.get('detail') or ''}"
                     .rstrip())
        for t in s.get("failed_tests") or []:
            lines.append(f"           FAILED {t}")
    files = sorted(os.listdir(summary["out"])) if os.path.isdir(summary["out"]) else []
    lines.append(f"  files in {summary['out']}: {', '.join(files) or '-'}")
    for p in summary.get("out_problems") or []:
        lines.append(f"  WARNING: {p}")
    return "\n".join(lines)


def _bench_table(out_dir: str) -> Optional[str]:
    """The benchmark's table, rebuilt from its JSON (also when the bench process was cut short)."""
    names = sorted(n for n in os.listdir(out_dir) if n.startswith("gpu-") and n.endswith(".json"))
    if not names:
        return None
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import gpu_bench
        with open(os.path.join(out_dir, names[-1])) as f:
            return gpu_bench.format_table(json.load(f))
    except Exception as e:  # noqa: BLE001 - the summary must still print
        return f"(no table: {type(e).__name__}: {e})"
    finally:
        sys.path.pop(0)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check", description="Build, test and benchmark the Triton kernels on a "
                                "CUDA GPU, each stage in its own process with a timeout.")
    p.add_argument("--out", default=None, help="output folder (default: $OUT, else ./gpu_check_out)")
    p.add_argument("--budget-s", type=float, default=480.0, help="seconds for the whole check (default 480)")
    p.add_argument("--only", nargs="+", default=None, metavar="STAGE", help="run only these stages (and env)")
    p.add_argument("--bench-args", default="", help="extra arguments for gpu_bench.py, as one string")
    p.add_argument("--rehearse", action="store_true",
                   help="no GPU needed: the same stages on CPU tensors under the Triton interpreter, small sizes "
                        "(checks the check; times mean nothing)")
    a = p.parse_args(argv)
    if a.budget_s <= 0:
        p.error("--budget-s must be positive")
    a.out = a.out or os.environ.get("OUT") or os.path.join(ROOT, "gpu_check_out")
    return a


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    out_dir = os.path.abspath(args.out)
    groups = default_stages(out_dir, args.bench_args.split(), rehearse=args.rehearse)
    if args.only:
        known = {st.name for g in groups for st in g}
        bad = sorted(set(args.only) - known)
        if bad:
            print(f"gpu_check: unknown stage(s) {bad}; the stages are {sorted(known)}", file=sys.stderr)
            return 2
        keep = set(args.only) | {"env"}
        groups = [[st for st in g if st.name in keep] for g in groups]
        groups = [g for g in groups if g]
        for g in groups:  # prerequisites not run are not required
            for st in g:
                st.needs = [n for n in st.needs if n in keep]
    summary = run_check(groups, out_dir, args.budget_s)
    if summary["status"] == "no-cuda":
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False): nothing was built, tested or "
              "timed. Run it on a GPU machine (docs/GPU.md).", file=sys.stderr)
        print(format_summary(summary))
        return 2
    table = _bench_table(out_dir)
    if table:
        print("\n" + table)
    print("\n" + format_summary(summary))
    return 0 if summary["status"] == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
