"""The collectives a split run uses, each turning a failed exchange into PeerFailed (one line, not a hang)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from kontext_core.parallel.errors import PeerFailed


@contextlib.contextmanager
def _exchange(what: str) -> Iterator[None]:
    try:
        yield
    except RuntimeError as e:  # gloo and NCCL raise RuntimeError (DistError is one) for a lost or silent peer
        if isinstance(e, PeerFailed):
            raise
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PeerFailed(
            f"rank {dist.get_rank()}: {what} failed ({first_line}): another rank stopped or did not answer "
            "within the timeout; its own error says why"
        ) from e


def all_to_all(x: Tensor, group) -> Tensor:
    """Chunk i of dim 0 goes to rank i of `group`; chunk i of the result came from rank i."""
    x = x.contiguous()  # first: empty_like keeps a view's strides, and the exchange fills memory in order
    out = torch.empty_like(x)
    with _exchange("the all-to-all of attention"):
        dist.all_to_all_single(out, x, group=group)
    return out


def all_gather(x: Tensor, group) -> list[Tensor]:
    x = x.contiguous()
    pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    with _exchange("gathering the shards"):
        dist.all_gather(pieces, x, group=group)
    return pieces


class RingPass:
    """Send `x` to the next rank of `group` and receive the previous rank's, while the caller computes."""

    def __init__(self, x: Tensor, group):
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        x = x.contiguous()
        self.received = torch.empty_like(x)
        with _exchange("the ring pass of attention"):
            self._requests = [
                dist.isend(x, dist.get_global_rank(group, (rank + 1) % size), group=group),
                dist.irecv(self.received, dist.get_global_rank(group, (rank - 1) % size), group=group),
            ]

    def wait(self) -> Tensor:
        with _exchange("the ring pass of attention"):
            for request in self._requests:
                request.wait()
        return self.received


def any_rank_set(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is set on any rank of the whole group."""
    value = torch.tensor([int(flag)], device=device)
    with _exchange("agreeing to go on after a step"):
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def all_gather_objects(value: object) -> list:
    values = [None] * dist.get_world_size()
    with _exchange("comparing the ranks' settings"):
        dist.all_gather_object(values, value)
    return values
