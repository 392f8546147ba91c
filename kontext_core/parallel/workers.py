"""A persistent group of worker processes, one per device, that hold a split model between sampling jobs: for a
host that is itself one process (a server such as ComfyUI), where torchrun cannot start the ranks.

The workers are fresh interpreters (`python -m kontext_core.parallel.workers`), not multiprocessing children:
a spawned child would re-import the host's main module (ComfyUI's main.py parses arguments and loads every
custom node at import). Each talks to the host over an authenticated local connection. The host sends every
job to every worker and reads rank 0's step events (progress, previews) and result; its callback raising stops
every rank after the same step and leaves the group ready. A worker that fails exits, since only a lost
connection unblocks its peers before the group's timeout: the group is then closed and must be started anew.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import secrets
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection, Listener, wait
from typing import Any

import torch
from torch import Tensor

from kontext_core.parallel.comm import any_rank_set
from kontext_core.parallel.config import ParallelConfig
from kontext_core.parallel.errors import ParallelError, StopRequested
from kontext_core.sampling import SamplingOptions, StepInfo

POLL_S = 0.5  # how often the host, waiting for the workers, checks that they are still alive
ADDRESS, KEY = "KONTEXT_WORKER_ADDRESS", "KONTEXT_WORKER_KEY"  # how a worker finds its host
STOP = "stop"  # the host's message to rank 0: stop this job after the current step


@dataclass(frozen=True)
class ModelSource:
    """How each worker builds its copy of the model: `load(device=..., **kwargs) -> Flux`, a module-level function
    (pickled by name, so the workers import it)."""

    load: Callable[..., Any]
    kwargs: dict = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class LoraFile:
    """A LoRA each worker loads onto its own copy of the model (`runtime.lora.load_lora`); `stamp` (the file's
    size and mtime) makes a changed file load again."""

    path: str
    strength: float
    stamp: tuple[int, int]

    @classmethod
    def of(cls, path: str, strength: float) -> LoraFile:
        stat = os.stat(path)
        return cls(path, strength, (stat.st_size, stat.st_mtime_ns))


@dataclass
class SamplingJob:
    """`sampling.sample`'s arguments, on the CPU; each worker moves them to its device. `loras`: exactly the
    LoRAs the model carries for this job, in order (those of an earlier job come off)."""

    noise: Tensor
    txt: Tensor
    y: Tensor
    options: SamplingOptions
    references: list[Tensor]
    negative: tuple[Tensor, Tensor] | None = None
    init_latent: Tensor | None = None
    loras: tuple[LoraFile, ...] = ()


class WorkerGroupStopped(ParallelError):
    """The group cannot take jobs: a worker failed, or it was closed."""


class _HostStop(Exception):
    """Raised in rank 0's callback when the host asked the run to stop."""


class WorkerGroup:
    """`len(devices)` workers (e.g. ["cpu", "cpu"] over gloo, ["cuda:0", "cuda:1"] over NCCL), each holding
    `source`'s model split by `config`; started here, ready when the constructor returns."""

    def __init__(self, source: ModelSource, config: ParallelConfig, devices: list[str]):
        config.sequence_degree(len(devices))  # refuse a count the method cannot use before starting anything
        self.timeout_s = config.timeout_s
        key = secrets.token_bytes(32)
        listener = Listener(("127.0.0.1", 0), authkey=key)
        host, port = listener.address
        group = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(len(devices))}
        env = os.environ | group | {ADDRESS: f"{host}:{port}", KEY: key.hex()}
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the host's imports, the model's loader too
        self._workers = [
            subprocess.Popen(
                [sys.executable, "-m", "kontext_core.parallel.workers"],
                env=env | {"RANK": str(rank), "LOCAL_RANK": str(rank)},
            )
            for rank in range(len(devices))
        ]
        self._conns: list[Connection | None] = [None] * len(devices)
        self._finalizer = weakref.finalize(self, _shut_down, self._workers, self._conns)
        try:
            self._accept(listener)
            for conn, device in zip(self._conns, devices):
                _send(conn, (config, source, device))
            self._wait_for(lambda kind, _: kind == "ready", len(devices))
        except BaseException:
            self.close()
            raise
        finally:
            listener.close()

    def _accept(self, listener: Listener) -> None:
        def accept_all() -> None:
            for _ in self._workers:
                conn = listener.accept()
                self._conns[_recv(conn)] = conn  # each worker says its rank first

        accepting = threading.Thread(target=accept_all, daemon=True)
        accepting.start()
        accepting.join(self.timeout_s)
        if accepting.is_alive() or None in self._conns:
            raise WorkerGroupStopped(f"the workers did not all report within {self.timeout_s} s")

    @property
    def alive(self) -> bool:
        return self._finalizer.alive and all(w.poll() is None for w in self._workers)

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self._workers]

    @property
    def exit_codes(self) -> list[int | None]:
        """Each worker's exit status, None while it runs."""
        return [w.poll() for w in self._workers]

    def sample(self, job: SamplingJob, callback: Callable[[StepInfo], None] | None = None) -> Tensor:
        """The model-space latent `sampling.sample` gives for `job`; `callback` sees rank 0's steps here."""
        if not self.alive:
            raise WorkerGroupStopped(
                "the worker group has stopped (a worker failed, or it was closed): start a new one"
            )
        for conn in self._conns:
            _send(conn, job)
        result, stopped_by, refused = None, None, []

        def on_event(kind: str, payload) -> bool:
            nonlocal result, stopped_by
            if kind == "step" and callback is not None and stopped_by is None:
                try:
                    callback(payload)
                except BaseException as e:  # an interruption: every rank stops after the same step
                    stopped_by = e
                    _send(self._conns[0], STOP)
            elif kind == "done" and payload is not None:
                result = payload
            elif kind == "refused" and payload:
                refused.append(payload)
            return kind in ("done", "stopped", "refused")

        self._wait_for(on_event, len(self._workers))
        if stopped_by is not None:
            raise stopped_by
        if refused:  # every worker skipped the job together: the group is ready for the next one
            raise ValueError(refused[0])
        if result is None:
            raise WorkerGroupStopped("the workers stopped the run without a result")
        return result

    def _wait_for(self, counts: Callable[[str, Any], bool], expected: int) -> None:
        """Handle the workers' events until `expected` of them count; a worker's error or exit closes the group."""
        seen, last_event = 0, time.monotonic()
        while seen < expected:
            ready = wait(self._conns, timeout=POLL_S)
            if not ready:
                if time.monotonic() - last_event > self.timeout_s:
                    self.close()
                    raise WorkerGroupStopped(f"no word from the workers in {self.timeout_s} s")
                continue
            last_event = time.monotonic()
            for conn in ready:
                try:
                    kind, rank, payload = _recv(conn)
                except (EOFError, OSError):
                    self.close()
                    raise WorkerGroupStopped("a worker exited without a word") from None
                if kind == "error":
                    self.close()
                    raise WorkerGroupStopped(f"worker {rank}: {payload}")
                seen += counts(kind, payload)

    def close(self) -> None:
        """Stop the workers (also done when the group is garbage-collected, and at exit)."""
        self._finalizer()


def _shut_down(workers: list[subprocess.Popen], conns: list[Connection | None]) -> None:
    for conn in conns:
        if conn is not None:
            try:
                _send(conn, None)
                conn.close()
            except OSError:  # that worker is gone already
                pass
    for worker in workers:
        try:
            worker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def _send(conn: Connection, message: object) -> None:
    # plain pickle, by value: Connection.send's pickler passes tensors as shared memory through a helper that
    # authenticates with multiprocessing's per-family key, which these separately started processes do not share
    conn.send_bytes(pickle.dumps(message))


def _recv(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerLoras:
    """The LoRAs on a worker's model: each loaded from its file once, kept while jobs ask for it."""

    def __init__(self, model):
        self.model = model
        self.patches: dict[tuple[int, LoraFile], Any] = {}

    def use(self, wanted: tuple[LoraFile, ...]) -> str | None:
        """Put exactly `wanted` on; the reason when a LoRA cannot be (the model is then left as it was)."""
        from kontext_core.runtime.lora import load_lora, use_loras

        keys = list(enumerate(wanted))  # by place too: the same file twice is two LoRAs, as with one process
        try:
            patches = {k: self.patches.get(k) or load_lora(self.model, k[1].path, k[1].strength) for k in keys}
            use_loras(self.model, [patches[k] for k in keys])
        except (ValueError, OSError) as e:  # CheckpointError is a ValueError
            return f"LoRA: {e}"
        self.patches = patches
        return None


def serve() -> None:
    """A worker: join the group, build the model once, then run jobs until told to stop or one fails."""
    from kontext_core.parallel.groups import init_from_environment
    from kontext_core.parallel.model import ParallelFlux
    from kontext_core.sampling import sample

    host, port = os.environ[ADDRESS].rsplit(":", 1)
    rank = int(os.environ["RANK"])
    conn = Client((host, int(port)), authkey=bytes.fromhex(os.environ.pop(KEY)))
    _send(conn, rank)
    config, source, device = _recv(conn)
    try:
        plan = init_from_environment(config, device)
        model = ParallelFlux(source.load(device=plan.device, **source.kwargs), plan)
    except BaseException as e:
        _send(conn, ("error", rank, f"{type(e).__name__}: {e}"))
        return
    _send(conn, ("ready", rank, None))

    def on_step(info: StepInfo) -> None:
        _send(conn, ("step", rank, dataclasses.replace(info, latent=info.latent.cpu(), denoised=info.denoised.cpu())))
        if conn.poll() and _recv(conn) == STOP:
            raise _HostStop()

    loras = WorkerLoras(model.model)
    try:
        while (job := _recv(conn)) is not None:
            if job == STOP:  # it came after the job it meant had ended
                continue
            refusal = loras.use(job.loras)
            if any_rank_set(refusal is not None, plan.device):  # the ranks skip the job together, or none does
                _send(conn, ("refused", rank, refusal))
                continue
            try:
                with torch.no_grad():
                    out = sample(
                        model,
                        job.noise.to(plan.device),
                        job.txt.to(plan.device),
                        job.y.to(plan.device),
                        job.options,
                        references=[r.to(plan.device) for r in job.references],
                        negative=None if job.negative is None else tuple(t.to(plan.device) for t in job.negative),
                        init_latent=None if job.init_latent is None else job.init_latent.to(plan.device),
                        callback=plan.step_callback(on_step if plan.is_writer else None),
                    )
                _send(conn, ("done", rank, out.cpu() if plan.is_writer else None))
            except (_HostStop, StopRequested):
                _send(conn, ("stopped", rank, None))
    except BaseException as e:  # this worker must exit: its peers wait on it until their connection to it drops
        _send(conn, ("error", rank, f"{type(e).__name__}: {e}"))
    finally:
        plan.close()


if __name__ == "__main__":
    serve()
