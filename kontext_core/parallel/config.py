"""How a run is split: the methods, and how a process group's ranks divide between them. Free of torch."""

from __future__ import annotations

from dataclasses import dataclass

# Sequence parallel splits the tokens of one forward; CFG parallel runs true CFG's two passes on two halves.
SEQUENCE_METHODS = ("ulysses", "ring")
CFG = "cfg"
METHODS = (*SEQUENCE_METHODS, CFG, *(f"{CFG}+{m}" for m in SEQUENCE_METHODS))


@dataclass(frozen=True)
class ParallelConfig:
    """`method`: one of METHODS. `timeout_s`: how long a rank waits on the others before it fails (gloo, NCCL)."""

    method: str
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"parallel method must be one of {METHODS}, got {self.method!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"parallel timeout must be positive seconds, got {self.timeout_s!r}")

    @property
    def cfg_degree(self) -> int:
        return 2 if self.method.startswith(CFG) else 1

    @property
    def sequence_method(self) -> str | None:
        """ "ulysses", "ring", or None when the tokens are not split (CFG parallel alone)."""
        return self.method.rpartition("+")[2] if self.method != CFG else None

    def sequence_degree(self, world_size: int) -> int:
        """Ranks per sequence group for `world_size` processes; refuses a count this method cannot use."""
        if self.method == CFG:
            if world_size != 2:
                raise ValueError(
                    f"--parallel cfg runs the two passes of true CFG on 2 processes, got {world_size}; "
                    f"for more use {CFG}+ulysses or {CFG}+ring (an even number: 2 CFG halves × the rest)"
                )
            return 1
        if self.cfg_degree == 2:
            if world_size < 4 or world_size % 2:
                raise ValueError(
                    f"--parallel {self.method} needs an even number of processes, at least 4 "
                    f"(2 CFG halves × a sequence group of 2 or more), got {world_size}"
                )
            return world_size // 2
        if world_size < 2:
            raise ValueError(f"--parallel {self.method} needs at least 2 processes, got {world_size}")
        return world_size
