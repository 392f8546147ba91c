"""A persistent group of worker processes, one per device, that hold a split model between sampling jobs: for a
host that is itself one process (a server such as ComfyUI), where torchrun cannot start the ranks.

The host sends each job to every worker and reads rank 0's step events (progress, previews) and result; its
callback raising stops every rank after the same step and leaves the group ready for the next job. A worker
that fails exits, since only a lost connection unblocks its peers before the group's timeout: the group is then
closed and the host must start a new one.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import socket
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import Tensor

from kontext_core.parallel.config import ParallelConfig
from kontext_core.parallel.errors import ParallelError, StopRequested
from kontext_core.sampling import SamplingOptions, StepInfo

POLL_S = 0.5  # how often the host, waiting for an event, checks that the workers are still alive


@dataclass(frozen=True)
class ModelSource:
    """How each worker builds its copy of the model: `load(device=..., **kwargs) -> Flux`, a module-level function
    (it is pickled by name into the worker processes)."""

    load: Callable[..., Any]
    kwargs: dict = dataclasses.field(default_factory=dict)


@dataclass
class SamplingJob:
    """`sampling.sample`'s arguments, on the CPU; each worker moves them to its device."""

    noise: Tensor
    txt: Tensor
    y: Tensor
    options: SamplingOptions
    references: list[Tensor]
    negative: tuple[Tensor, Tensor] | None = None
    init_latent: Tensor | None = None


class WorkerGroupStopped(ParallelError):
    """The group cannot take jobs: a worker failed, or it was closed."""


class _HostStop(Exception):
    """Raised in rank 0's callback when the host asked the run to stop."""


class WorkerGroup:
    """`len(devices)` workers (e.g. ["cpu", "cpu"] over gloo, ["cuda:0", "cuda:1"] over NCCL), each holding
    `source`'s model split by `config`; started here, ready when the constructor returns."""

    def __init__(self, source: ModelSource, config: ParallelConfig, devices: list[str]):
        config.sequence_degree(len(devices))  # refuse a count the method cannot use before starting anything
        context = mp.get_context("spawn")
        self._events = context.Queue()
        self._stop = context.Event()
        self._jobs = [context.Queue() for _ in devices]
        address = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(len(devices))}
        self._workers = [
            context.Process(
                target=_serve,
                args=(rank, address, device, config, source, self._jobs[rank], self._events, self._stop),
                daemon=True,  # a host that dies takes its workers with it
                name=f"kontext-parallel-{rank}",
            )
            for rank, device in enumerate(devices)
        ]
        for worker in self._workers:
            worker.start()
        self._finalizer = weakref.finalize(self, _shut_down, self._workers, self._jobs)
        self.timeout_s = config.timeout_s
        try:
            self._wait_for(lambda kind, _: kind == "ready", len(devices))
        except BaseException:
            self.close()
            raise

    @property
    def alive(self) -> bool:
        return self._finalizer.alive and all(w.is_alive() for w in self._workers)

    def sample(self, job: SamplingJob, callback: Callable[[StepInfo], None] | None = None) -> Tensor:
        """The model-space latent `sampling.sample` gives for `job`; `callback` sees rank 0's steps here."""
        if not self.alive:
            raise WorkerGroupStopped(
                "the worker group has stopped (a worker failed, or it was closed): start a new one"
            )
        self._stop.clear()
        for jobs in self._jobs:
            jobs.put(job)
        result, stopped_by = None, None

        def on_event(kind: str, payload) -> bool:
            nonlocal result, stopped_by
            if kind == "step" and callback is not None and stopped_by is None:
                try:
                    callback(payload)
                except BaseException as e:  # an interruption: every rank stops after the same step
                    stopped_by = e
                    self._stop.set()
            elif kind == "done" and payload is not None:
                result = payload
            return kind in ("done", "stopped")

        self._wait_for(on_event, len(self._workers))
        if stopped_by is not None:
            raise stopped_by
        if result is None:
            raise WorkerGroupStopped("the workers stopped the run without a result")
        return result

    def _wait_for(self, counts: Callable[[str, Any], bool], expected: int) -> None:
        """Handle events until `expected` of them count; a worker's error or death closes the group."""
        seen, last_event = 0, time.monotonic()
        while seen < expected:
            try:
                kind, rank, payload = self._events.get(timeout=POLL_S)
            except queue.Empty:
                dead = [w.name for w in self._workers if not w.is_alive()]
                if dead or time.monotonic() - last_event > self.timeout_s:
                    self.close()
                    why = f"{', '.join(dead)} exited" if dead else f"no word from the workers in {self.timeout_s} s"
                    raise WorkerGroupStopped(f"the worker group stopped: {why}") from None
                continue
            last_event = time.monotonic()
            if kind == "error":
                self.close()
                raise WorkerGroupStopped(f"worker {rank}: {payload}")
            seen += counts(kind, payload)

    def close(self) -> None:
        """Stop the workers (also done when the group is garbage-collected, and at exit)."""
        self._finalizer()


def _shut_down(workers, jobs) -> None:
    for job_queue, worker in zip(jobs, workers):
        if worker.is_alive():
            job_queue.put(None)
    for worker in workers:
        worker.join(timeout=10)
        if worker.is_alive():
            worker.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, address: dict, device: str, config, source: ModelSource, jobs, events, stop) -> None:
    """A worker: join the group, build the model once, then run jobs until told to stop or one fails."""
    from kontext_core.parallel.groups import init_from_environment
    from kontext_core.parallel.model import ParallelFlux
    from kontext_core.sampling import sample

    os.environ.update(address | {"RANK": str(rank), "LOCAL_RANK": str(rank)})
    try:
        plan = init_from_environment(config, device)
        model = ParallelFlux(source.load(device=plan.device, **source.kwargs), plan)
    except BaseException as e:
        events.put(("error", rank, f"{type(e).__name__}: {e}"))
        return
    events.put(("ready", rank, None))

    def on_step(info: StepInfo) -> None:
        events.put(("step", rank, dataclasses.replace(info, latent=info.latent.cpu(), denoised=info.denoised.cpu())))
        if stop.is_set():
            raise _HostStop()

    try:
        while (job := jobs.get()) is not None:
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
                        callback=plan.step_callback(on_step),
                    )
                events.put(("done", rank, out.cpu() if plan.is_writer else None))
            except (_HostStop, StopRequested):
                events.put(("stopped", rank, None))
    except BaseException as e:  # this worker must exit: its peers wait on it until their connection to it drops
        events.put(("error", rank, f"{type(e).__name__}: {e}"))
    finally:
        plan.close()
