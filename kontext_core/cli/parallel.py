"""`--parallel`: one image split across the processes torchrun starts (kontext_core.parallel). Imports torch only
when the flag is given, so the rest of the command line stays as quick to start as before."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from kontext_core.cli.options import positive
from kontext_core.parallel.config import CFG, METHODS


def add_parallel_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "split one image across GPUs or processes (start with torchrun --nproc-per-node N -m kontext_core ...)",
        "Rank 0 reports progress and writes the outputs; the other ranks write nothing. See docs/parallel.md.",
    )
    g.add_argument(
        "--parallel",
        choices=METHODS,
        help="ulysses: tokens split, heads exchanged (the ranks must divide the heads); ring: keys and values "
        "passed around (any rank count); cfg: true CFG's two passes on 2 ranks; cfg+ulysses, cfg+ring: both",
    )
    g.add_argument(
        "--parallel-timeout",
        type=positive,
        default=600.0,
        metavar="SECONDS",
        help="how long a rank waits for the others before every rank fails (default 600)",
    )


def start(args: argparse.Namespace):
    """The plan of this rank when `--parallel` is given (`args.device` set to its device), else None."""
    if getattr(args, "parallel", None) is None:
        return None
    if args.parallel.startswith(CFG) and (args.negative_prompt is None or args.true_cfg_scale == 1.0):
        raise ValueError(
            f"--parallel {args.parallel} splits true CFG's two passes: give --negative-prompt and "
            "--true-cfg-scale above 1, or use ulysses or ring"
        )
    from kontext_core.parallel import ParallelConfig, agree, init_from_environment

    plan = init_from_environment(ParallelConfig(args.parallel, args.parallel_timeout), args.device)
    agree(sorted(vars(args).items()), "command lines")
    args.device = str(plan.device)
    return plan


def split_transformer(pipe, plan) -> None:
    if plan is not None:
        from kontext_core.parallel import ParallelFlux

        pipe.transformer = ParallelFlux(pipe.transformer, plan)


def step_callback(plan, callback: Callable) -> Callable:
    """`callback` as is in one process; split, on rank 0 only, every rank stopping when it raises."""
    return callback if plan is None else plan.step_callback(callback)


def stop() -> None:
    """Leave the process group, if this command joined one."""
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
