"""Sequence and CFG parallel (kontext_core.parallel): what each method sends per denoising step, computed from the
shapes, and what the split costs, measured.

    python -m benchmarks.parallel volume [--size full] [--ranks 2,4,8]
    torchrun --nproc-per-node 2 -m benchmarks.parallel measure --size mid --device cpu [--repeats 5] [--json out.json]
    torchrun --nproc-per-node N -m benchmarks.parallel measure --size full --device cuda --dtype bf16   # N GPUs, NCCL

`measure` times one transformer forward (a denoising step) unsplit on every rank at once (so each rank has what one
process would: a core, or a GPU) and split with each sequence method, and the time spent inside collectives.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from benchmarks.bench import SIZES, BenchSize, on_meta_then_fill
from kontext_core.model.config import FluxParams
from kontext_core.model.flux import Flux
from kontext_core.parallel import ParallelConfig, ParallelFlux, init_from_environment
from kontext_core.parallel.config import SEQUENCE_METHODS
from kontext_core.parallel.groups import split
from kontext_core.parallel.layout import ShardLayout
from kontext_core.sampling import pack, position_ids, reference_tokens

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Indicative link speeds for turning bytes into time: what one GPU sends per second in an all-to-all, in practice.
LINKS_GB_S = {"NVLink (H100 SXM)": 200.0, "PCIe 4.0 x16 (e.g. 2× RTX 4090)": 20.0}


@dataclass(frozen=True)
class Tokens:
    text: int
    target: int
    references: int

    @classmethod
    def of(cls, size: BenchSize) -> Tokens:
        image = (size.height // 16) * (size.width // 16)
        return cls(size.txt_tokens, image, image)  # one reference of the output's size


def sent_per_forward(
    params: FluxParams, tokens: Tokens, ranks: int, method: str, itemsize: int, batch: int = 1
) -> dict[str, int]:
    """Bytes each rank sends in one split forward (no reference cache): attention over all blocks, and the gather
    of the output. Counted with the padding of `kontext_core.parallel.layout`, as the code sends them."""
    text, image = ShardLayout([tokens.text], ranks), ShardLayout([tokens.target + tokens.references], ranks)
    local = text.local_length + image.local_length  # queries = keys (no cache)
    blocks = params.depth + params.depth_single_blocks
    width = params.hidden_size
    if method == "ulysses":  # q, k, v out to the head owners and the attention back: all but one's own share
        attention = 4 * batch * local * width * (ranks - 1) // ranks
    elif method == "ring":  # this rank's keys and values to each of the other ranks in turn
        attention = 2 * batch * local * width * (ranks - 1)
    else:
        raise ValueError(f"method must be one of {SEQUENCE_METHODS}, got {method!r}")
    gather = batch * image.local_length * params.out_channels * (ranks - 1)
    return {"attention": attention * blocks * itemsize, "gather": gather * itemsize}


def cfg_sent_per_step(params: FluxParams, tokens: Tokens, batch: int = 1) -> int:
    """Bytes each rank sends its CFG partner per step: its half's velocity of the target tokens, float32."""
    return batch * tokens.target * params.out_channels * 4


def volume(size_name: str, ranks: list[int], itemsize: int) -> list[dict]:
    size = SIZES[size_name]
    tokens = Tokens.of(size)
    rows = []
    for w in ranks:
        for method in SEQUENCE_METHODS:
            sent = sent_per_forward(size.flux, tokens, w, method, itemsize)
            total = sum(sent.values())
            row = {"ranks": w, "method": method, "MB per rank per step": total / 1e6}
            row |= {f"ms at {name}": total / (gb * 1e9) * 1e3 for name, gb in LINKS_GB_S.items()}
            rows.append(row)
    rows.append({"ranks": 2, "method": "cfg", "MB per rank per step": cfg_sent_per_step(size.flux, tokens) / 1e6})
    return rows


def forward_inputs(size: BenchSize, device: torch.device, dtype: torch.dtype, seed: int = 0) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    h, w = size.height // 8, size.width // 8
    target, reference = (torch.randn(1, 16, h, w, generator=gen) for _ in range(2))
    ref_tokens, ref_ids = reference_tokens([reference], (h, w), "offset")
    img = torch.cat((pack(target), ref_tokens), dim=1)
    img_ids = torch.cat((position_ids(h // 2, w // 2), ref_ids))[None]
    p = size.flux
    txt = torch.randn(1, size.txt_tokens, p.context_in_dim, generator=gen)
    y = torch.randn(1, p.vec_in_dim, generator=gen)
    img, txt, y = (t.to(device, dtype) for t in (img, txt, y))
    ids, txt_ids = img_ids.to(device), torch.zeros(1, size.txt_tokens, 3, device=device)
    return img, ids, txt, txt_ids, torch.tensor([0.7], device=device), y, torch.tensor([2.5], device=device)


class CollectiveMeter:
    """Seconds spent inside the collectives kontext_core.parallel.comm calls (waiting for slower ranks included),
    and the bytes this rank sent in them (its own share of an all-to-all stays with it)."""

    def __init__(self):
        self.seconds = 0.0
        self.bytes_sent = 0
        self._originals: dict[str, Callable] = {}

    def __enter__(self) -> CollectiveMeter:
        sent = {
            "all_to_all_single": lambda out, x, group: (
                _nbytes(x) * (dist.get_world_size(group) - 1) // dist.get_world_size(group)
            ),
            "all_gather": lambda pieces, x, group: _nbytes(x) * (len(pieces) - 1),
            "isend": lambda x, dst, group: _nbytes(x),
            "irecv": lambda x, src, group: 0,
        }
        for name, count in sent.items():
            original = self._originals[name] = getattr(dist, name)
            setattr(dist, name, self._metered(original, count))
        return self

    def _metered(self, original: Callable, count: Callable) -> Callable:
        def metered(*args, group=None):
            self.bytes_sent += count(*args, group)
            start = time.perf_counter()
            try:
                return original(*args, group=group)
            finally:
                self.seconds += time.perf_counter() - start

        return metered

    def __exit__(self, *exc) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


def measure(args: argparse.Namespace) -> dict | None:
    """The timings, on rank 0 (None on the others)."""
    plan = init_from_environment(ParallelConfig("ulysses", timeout_s=1800), args.device)
    size, dtype = SIZES[args.size], DTYPES[args.dtype]
    model = on_meta_then_fill(lambda: Flux(size.flux), plan.device, dtype, seed=0)
    inputs = forward_inputs(size, plan.device, dtype)
    plans = {"ulysses": plan, "ring": split(ParallelConfig("ring"), plan.device)}

    def timed(fn: Callable[[], object]) -> float:
        dist.barrier()
        if plan.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if plan.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    report = {"size": args.size, "ranks": plan.world_size, "device": str(plan.device), "dtype": args.dtype}
    report["platform"] = platform.processor() or platform.machine()
    with torch.no_grad():
        for _ in range(args.warmup):
            model(*inputs)
        report["one process s"] = statistics.median(timed(lambda: model(*inputs)) for _ in range(args.repeats))
        for name, p in plans.items():
            split_model = ParallelFlux(model, p)
            for _ in range(args.warmup):
                split_model(*inputs)
            times, comm = [], []
            for _ in range(args.repeats):
                with CollectiveMeter() as meter:
                    times.append(timed(lambda: split_model(*inputs)))
                comm.append(meter.seconds)
            itemsize = torch.finfo(dtype).bits // 8
            sent = sum(sent_per_forward(size.flux, Tokens.of(size), plan.world_size, name, itemsize).values())
            report[name] = {
                "split s": statistics.median(times),
                "in collectives s": statistics.median(comm),
                "speed-up": report["one process s"] / statistics.median(times),
                "MB sent per rank": sent / 1e6,
            }
    plan.close()
    return report if plan.is_writer else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("volume", help="bytes each rank sends per step, computed")
    v.add_argument("--size", choices=SIZES, default="full")
    v.add_argument("--ranks", default="2,4,8")
    v.add_argument("--itemsize", type=int, default=2, help="bytes per activation value (2: bf16)")
    m = sub.add_parser("measure", help="time a split forward (run under torchrun)")
    m.add_argument("--size", choices=SIZES, default="mid")
    m.add_argument("--device", default=None)
    m.add_argument("--dtype", choices=DTYPES, default="fp32")
    m.add_argument("--repeats", type=int, default=5)
    m.add_argument("--warmup", type=int, default=1)
    for p in (v, m):
        p.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    if args.command == "volume":
        result = volume(args.size, [int(r) for r in args.ranks.split(",")], args.itemsize)
    else:
        result = measure(args)
        if result is None:
            return
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
