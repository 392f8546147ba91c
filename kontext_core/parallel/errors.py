"""Why a split run stopped. Free of torch, so the command line can name these without importing it."""

from __future__ import annotations


class ParallelError(RuntimeError):
    """A run split across processes ended on this rank because of the group, not of its own inputs."""


class PeerFailed(ParallelError):
    """A collective failed: another rank raised, exited or stopped answering within the group's timeout."""


class StopRequested(ParallelError):
    """Rank 0 stopped the run (its callback raised: an interruption, a closed progress bar): every rank stops."""


NOT_LAUNCHED = (
    "--parallel splits one image across processes started by torchrun, one per device, e.g. "
    "`torchrun --nproc-per-node 2 -m kontext_core edit ... --parallel ulysses`; "
    "this process was not started by torchrun (no RANK/WORLD_SIZE in its environment)"
)
