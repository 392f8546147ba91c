"""Start a process group for a test: N processes with torchrun's environment, or torchrun itself, bounded in time."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.tiny_models import tiny_flux_model

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_env() -> dict[str, str]:
    """One thread per process (2 cores shared by the group), no model files found, the repository importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_ROOT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return env | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


@dataclass
class Finished:
    returncodes: list[int]
    output: str  # every process's stdout and stderr
    seconds: float


def run_group(size: int, args: list[str], timeout: float) -> Finished:
    """`python ARGS` in `size` processes that find each other as torchrun's would; killed at `timeout`."""
    port, start = free_port(), time.perf_counter()
    procs = []
    for rank in range(size):
        env = quiet_env() | {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=max(1.0, timeout - (time.perf_counter() - start)))[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError(f"the group of {size} did not finish within {timeout} s") from None
    return Finished([p.returncode for p in procs], "".join(outputs), time.perf_counter() - start)


def torchrun(size: int, args: list[str], timeout: float) -> Finished:
    """`torchrun --nproc-per-node SIZE ARGS` on a free port."""
    start = time.perf_counter()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(size)]
    command += ["--master-port", str(free_port()), *args]
    done = subprocess.run(command, env=quiet_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return Finished([done.returncode], done.stdout + done.stderr, time.perf_counter() - start)


def tiny_flux_on(device, seed: int = 0):
    """A worker group's `ModelSource.load`: the tiny model, built in the worker, on its device."""
    return tiny_flux_model(seed).to(device)
