"""``sparsecore train`` on several processes: the process group, the rank's share of the data, and ``--nproc``.

Two ways to start N ranks:

* ``torchrun --nproc-per-node N -m sparsecore train ...`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): each process joins the group the environment describes.
* ``sparsecore train --nproc N ...``: :func:`launch_local` starts N such processes on this machine
  (``127.0.0.1``, a free port), each with ``cpus / N`` threads unless ``--threads`` says otherwise, and watches them.

Backend: NCCL when the model trains on CUDA, gloo on the CPU (``sparsecore train`` trains on the CPU).

Semantics: ``--batch-size`` is the *global* batch. Every rank draws the same seeded order and takes its contiguous
share of each global batch (``torch.tensor_split`` of the batch's indices: sizes differ by at most one), and its
loss is its summed cross-entropy times ``world / global batch``, so DDP's average of the gradients is exactly the
gradient of the mean over the global batch: N ranks train the model one process would (to rounding), with the same
learning rate and the same number of steps per epoch.

Failures: every collective is bounded by ``--dist-timeout`` seconds (the process group's timeout). A rank that dies
makes the others fail at their next collective (gloo sees the closed connection at once); they stop with
:class:`DistributedError`'s one-line message (exit code 3). :func:`launch_local` returns once every rank has ended:
after the first failure it gives the others ``grace`` seconds to stop by themselves, then terminates them, and names
every rank that failed and how.
"""
from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch

__all__ = ["DistEnv", "DistributedError", "setup", "launch_local", "free_port", "ENV_KEYS"]

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A collective failed: another rank died or stopped, or the connection was lost (exit code 3)."""

    # True when train() made the process group and left it open after the failure (destroying a group whose peer
    # died can abort the process): `sparsecore train` then exits without the interpreter's teardown.
    group_left_open = False


@dataclass
class DistEnv:
    """This process's place in a data-parallel run."""

    rank: int
    world: int
    local_rank: int
    backend: str
    comm: object        # sparsecore.dst.distributed.Comm over the default group
    owns_group: bool    # this module initialised the group (and tears it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        import torch.distributed as dist

        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _env_int(name: str) -> Optional[int]:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise DistributedError(f"environment variable {name}={v!r} is not an integer") from None


def setup(timeout_s: float, device: torch.device = torch.device("cpu")) -> Optional[DistEnv]:
    """Join the data-parallel run this process belongs to: the group already initialised (a caller's), or the one
    the environment describes (``WORLD_SIZE`` > 1); None for a single process."""
    import torch.distributed as dist

    from ...dst.distributed import Comm

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() <= 1:
            return None
        return DistEnv(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK") or 0,
                       str(dist.get_backend()), Comm(), owns_group=False)
    world = _env_int("WORLD_SIZE")
    if world is None or world <= 1:
        return None
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch is built without torch.distributed")
    rank = _env_int("RANK")
    missing = [k for k in ENV_KEYS if k != "LOCAL_RANK" and not os.environ.get(k)]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the ranks with torchrun "
                               f"or sparsecore train --nproc N")
    if not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} is outside 0..{world - 1}")
    local_rank = _env_int("LOCAL_RANK") or 0
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=float(timeout_s)))
    except Exception as e:  # the rendezvous timed out or the address is wrong
        raise DistributedError(f"rank {rank} could not join the {world} ranks at "
                               f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}: {type(e).__name__}: {e}"
                               ) from e
    return DistEnv(rank, world, local_rank, backend, Comm(), owns_group=True)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (bound to port 0 and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _failure_rank(code: int) -> int:
    """Which of several failures seen at once most likely came first: killed from outside, then other signals,
    then error exits."""
    if code < 0:
        return 0 if -code in (signal.SIGKILL, signal.SIGTERM) else 1
    return 2


def launch_local(argv: Sequence[str], nproc: int, threads: Optional[int] = None, grace: float = 15.0,
                 stream=None) -> int:
    """Run ``sparsecore train ARGV`` as ``nproc`` ranks on this machine; returns the exit code (0 when every rank
    succeeded, else the first failed rank's code, 128 + signal for a killed one)."""
    stream = stream or sys.stderr
    port = free_port()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_rank = threads if threads is not None else max(1, cpus // nproc)
    pkg_parent = str(Path(__file__).resolve().parents[3])  # the children import this very sparsecore
    procs: List[subprocess.Popen] = []
    for r in range(nproc):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r), WORLD_SIZE=str(nproc),
                   LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(nproc), OMP_NUM_THREADS=str(per_rank),
                   PYTHONPATH=pkg_parent + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, "-m", "sparsecore", "train", *argv], env=env))
    # ranks in the order their failure was seen; in one poll, those killed from outside (SIGKILL, SIGTERM) first,
    # then other signals (a rank that aborts on its peer's death), then error exits
    failed: List[int] = []
    deadline = None
    try:
        while True:
            running = [p.poll() is None for p in procs]
            new = [r for r, p in enumerate(procs) if p.returncode not in (None, 0) and r not in failed]
            failed += sorted(new, key=lambda r: (_failure_rank(procs[r].returncode), r))
            if failed and deadline is None:
                deadline = time.monotonic() + grace  # the others should stop by themselves at their next collective
            if not any(running) or (deadline is not None and time.monotonic() > deadline):
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
    stopped = []
    for r, p in enumerate(procs):
        if p.poll() is None:
            p.terminate()
            p.send_signal(signal.SIGCONT)  # a stopped (hung) process gets the SIGTERM now
            stopped.append(r)
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    if all(c == 0 for c in codes):
        return 0
    failed += [r for r, c in enumerate(codes) if c != 0 and r not in failed]
    parts = [f"rank {r} {_describe(codes[r])}" + (" (stopped by the launcher)" if r in stopped else "")
             for r in failed]
    stream.write(f"sparsecore train: {nproc} ranks, {len(failed)} failed: " + "; ".join(parts) + "\n")
    stream.flush()
    c = codes[failed[0]]
    return 128 - c if c < 0 else c
