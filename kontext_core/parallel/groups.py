"""The process group of a split run: which rank does what, on which device, checked before any work."""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kontext_core.parallel.comm import all_gather_objects, any_rank_set
from kontext_core.parallel.config import ParallelConfig
from kontext_core.parallel.errors import NOT_LAUNCHED, StopRequested

# What torchrun (and any launcher following its convention) sets in each process's environment.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in LAUNCH_VARIABLES)


@dataclass(frozen=True)
class ParallelPlan:
    """This rank's place: ranks are numbered CFG half first, rank = cfg_rank · sequence_degree + sequence_rank."""

    config: ParallelConfig
    rank: int
    world_size: int
    device: torch.device
    sequence_degree: int
    sequence_group: Any  # the ranks that split one forward's tokens (a ProcessGroup), None when unsplit
    cfg_group: Any  # the two ranks, one per CFG half, that hold the same shard; None without CFG parallel

    @property
    def sequence_rank(self) -> int:
        return self.rank % self.sequence_degree

    @property
    def cfg_rank(self) -> int:
        """0 runs the prompt's pass, 1 the negative prompt's."""
        return self.rank // self.sequence_degree

    @property
    def is_writer(self) -> bool:
        """Rank 0 reports progress and writes the outputs; the others write nothing."""
        return self.rank == 0

    def step_callback(self, callback: Callable[[Any], None] | None) -> Callable[[Any], None]:
        """A sampler callback for every rank: `callback` runs on rank 0 only, and when it raises (an
        interruption) every rank stops after the same step, rank 0 with that error, the others with StopRequested."""

        def after_step(info: Any) -> None:
            error = None
            if self.is_writer and callback is not None:
                try:
                    callback(info)
                except BaseException as e:  # KeyboardInterrupt too: the other ranks must not wait for a step
                    error = e
            if any_rank_set(error is not None, self.device):
                if error is not None:
                    raise error
                raise StopRequested(f"rank {self.rank}: rank 0 stopped the run after step {info.step}")

        return after_step

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def rank_device(requested: str | None, local_rank: int) -> torch.device:
    """Each rank's device: cuda:LOCAL_RANK when CUDA is asked for (or there by default) without an index."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type not in BACKENDS:
        raise ValueError(f"--parallel runs on {' or '.join(BACKENDS)} devices, got --device {requested}")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ValueError(
                f"local rank {local_rank} would use {device}, but this machine has {torch.cuda.device_count()} "
                "CUDA devices: start at most one process per GPU (--nproc-per-node)"
            )
    return device


def init_from_environment(config: ParallelConfig, device: str | None = None) -> ParallelPlan:
    """Join the process group torchrun describes in the environment, split it for `config`, and refuse a
    world size the method cannot use, or ranks on mixed device kinds or sharing one GPU, before any work."""
    if not launched_by_torchrun():
        raise ValueError(NOT_LAUNCHED)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    config.sequence_degree(world_size)  # every rank refuses a world size alike, before the rendezvous
    local = rank_device(device, int(os.environ["LOCAL_RANK"]))
    if local.type == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group(
        BACKENDS[local.type],
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=config.timeout_s),
        **({"device_id": local} if local.type == "cuda" else {}),
    )
    try:
        _check_devices([str(d) for d in all_gather_objects(str(local))])
        return split(config, local)
    except BaseException:
        dist.destroy_process_group()
        raise


def split(config: ParallelConfig, device: torch.device) -> ParallelPlan:
    """This rank's plan for `config` in the initialized default group; every rank must call it, in the same order
    (it creates the groups, which torch.distributed requires of all ranks)."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    sequence_degree = config.sequence_degree(world_size)
    sequence_groups = [
        dist.new_group(list(range(start, start + sequence_degree))) for start in range(0, world_size, sequence_degree)
    ]
    cfg_groups = (
        [dist.new_group([s, s + sequence_degree]) for s in range(sequence_degree)] if config.cfg_degree > 1 else []
    )
    return ParallelPlan(
        config=config,
        rank=rank,
        world_size=world_size,
        device=device,
        sequence_degree=sequence_degree,
        sequence_group=sequence_groups[rank // sequence_degree] if sequence_degree > 1 else None,
        cfg_group=cfg_groups[rank % sequence_degree] if cfg_groups else None,
    )


def _check_devices(devices: list[str]) -> None:
    kinds = {torch.device(d).type for d in devices}
    if len(kinds) > 1:
        raise ValueError(f"the ranks run on different kinds of device ({', '.join(devices)}): use one kind")
    if kinds == {"cuda"} and len(set(devices)) < len(devices):
        shared = sorted({d for d in devices if devices.count(d) > 1})
        raise ValueError(f"several ranks on the same GPU ({', '.join(shared)}): one process per GPU")


def agree(value: object, what: str) -> None:
    """Refuse to start when the ranks were given different `what` (each rank runs the same job on its shard)."""
    values = all_gather_objects(value)
    if any(v != values[0] for v in values):
        different = next(r for r, v in enumerate(values) if v != values[0])
        raise ValueError(
            f"the ranks were given different {what}: rank 0 {values[0]!r}, rank {different} {values[different]!r}; "
            "every rank must run the same command"
        )
