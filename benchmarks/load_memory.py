"""Peak memory and speed of `load_transformer` on a real-width FLUX file (1 double + 1 single block).

    python -m benchmarks.load_memory [--dir /tmp] [--keep]

Writes a transformer with Kontext's real widths (hidden 3072, 24 heads, context 4096, vec 768) but one
block of each kind, in bf16, in ComfyUI's scaled fp8 and as a GGUF Q4_K_M file (Q4_K blocks, Q6_K for the
down projections, as llama.cpp's _M mixes do; random valid blocks, since the `gguf` package cannot quantize
K-quants), then loads each in a fresh subprocess and reports
the peak RSS the load added (peak resident set after loading and touching every weight, minus the
resident set after the imports) against the file size, and
the throughput. The loader's promise is a peak of at most 1.2× the file when the file's precision is kept.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/load_memory.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

MiB = 1024 * 1024


def write_model(path: Path, scaled_fp8: bool) -> int:
    """A random real-width 1+1-block transformer file; returns its size in bytes."""
    from safetensors.torch import save_file

    shapes = real_width_shapes()
    gen = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        if scaled_fp8 and key.startswith(("double_blocks.", "single_blocks.")) and len(shape) == 2:
            scale = t.float().abs().max() / torch.finfo(torch.float8_e4m3fn).max
            state[key] = (t.float() / scale).to(torch.float8_e4m3fn)
            state[key.replace(".weight", ".scale_weight")] = scale.reshape(())
        else:
            state[key] = t
    if scaled_fp8:
        state["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(state, path)
    return path.stat().st_size


# Q4_K_M: the down projections (the second MLP layer of each stream, a single block's linear2) in Q6_K
Q6_K_LAYERS = ("_mlp.2.weight", ".linear2.weight")


def write_gguf_q4_k_m(path: Path) -> int:
    """The same transformer as GGUF Q4_K_M: every Linear weight whose rows fill 256-value super-blocks in Q4_K
    (Q6_K for `Q6_K_LAYERS`), `img_in` (64 wide) in F16, the 1-D tensors in F32; returns the file's size."""
    from tests.helpers.gguf_files import write_gguf_blocks

    shapes = real_width_shapes()
    kinds = {
        k: "Q6_K" if k.endswith(Q6_K_LAYERS) else "Q4_K"
        for k, shape in shapes.items()
        if len(shape) == 2 and shape[1] % 256 == 0
    }
    gen = torch.Generator().manual_seed(0)
    tensors = {
        k: torch.empty(shape, device="meta")
        if k in kinds
        else (torch.randn(shape, generator=gen) * 0.02).to(torch.float16 if len(shape) == 2 else torch.float32)
        for k, shape in shapes.items()
    }
    write_gguf_blocks(path, tensors, kinds, reference=False)
    return path.stat().st_size


def real_width_shapes() -> dict[str, tuple[int, ...]]:
    from dataclasses import replace

    from kontext_core.model.config import FLUX_KONTEXT_DEV
    from kontext_core.model.flux import Flux

    with torch.device("meta"):
        model = Flux(replace(FLUX_KONTEXT_DEV, depth=1, depth_single_blocks=1))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def child(path: str, dtype: str | None, dequantize: bool = False) -> None:
    """Runs in the fresh subprocess: imports, baseline, load, peak."""
    from kontext_core.checkpoints.transformer import load_transformer

    base = proc_status("VmRSS")
    start = time.perf_counter()
    model = load_transformer(path, dtype=getattr(torch, dtype) if dtype else None, dequantize=dequantize)
    # safetensors maps the file: tensors kept as stored are paged in on first use, so touch them all
    # to count what a forward pass will hold
    model_bytes = sum(touch(t) for t in model.state_dict().values())
    seconds = time.perf_counter() - start
    # not ru_maxrss: Linux carries the parent's peak across exec, so a child would report this script's
    peak = proc_status("VmHWM")
    print(json.dumps({"added": peak - base, "seconds": seconds, "model_bytes": model_bytes}))


def touch(t: torch.Tensor) -> int:
    t.reshape(-1).view(torch.uint8).max()
    return t.numel() * t.element_size()


def proc_status(field: str) -> int:
    """Bytes of a /proc/self/status field: VmRSS (resident now) or VmHWM (peak resident since exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(f"{field}:"))


def measure(path: Path, dtype: str | None, dequantize: bool = False) -> dict:
    args = (
        [sys.executable, "-m", "benchmarks.load_memory", "--child", str(path)]
        + (["--dtype", dtype] if dtype else [])
        + (["--dequantize"] if dequantize else [])
    )
    out = subprocess.run(
        args, check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=600
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where to write the temporary files")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dequantize", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.dtype, args.dequantize)
        return

    folder = Path(tempfile.mkdtemp(prefix="kontext-load-", dir=args.dir))
    # (row name, file, compute dtype, dequantize at load)
    cases = [
        ("bf16", "bf16", None, False),
        ("scaled fp8", "fp8", None, False),
        ("scaled fp8 → bf16", "fp8", "bfloat16", False),
        ("GGUF Q4_K_M, kept quantized", "gguf", "bfloat16", False),
        ("GGUF Q4_K_M, dequantize=True", "gguf", "bfloat16", True),
    ]
    writers = {
        "bf16": ("bf16.safetensors", lambda p: write_model(p, False)),
        "fp8": ("fp8_scaled.safetensors", lambda p: write_model(p, True)),
        "gguf": ("Q4_K_M.gguf", write_gguf_q4_k_m),
    }
    rows = []
    files: dict[str, tuple[Path, int]] = {}
    try:
        for name, kind, dtype, dequantize in cases:
            if kind not in files:
                filename, write = writers[kind]
                files[kind] = (folder / filename, write(folder / filename))
            path, size = files[kind]
            r = measure(path, dtype, dequantize)
            rows.append((name, dtype or "file's", size, r))
    finally:
        if not args.keep:
            for path, _ in files.values():
                path.unlink(missing_ok=True)
            folder.rmdir()

    print("| file | compute dtype | file MiB | model MiB | peak RSS added MiB | peak / file | peak / model | MB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, dtype, size, r in rows:
        print(
            f"| {name} | {dtype} | {size / MiB:.0f} | {r['model_bytes'] / MiB:.0f} | {r['added'] / MiB:.0f} | "
            f"{r['added'] / size:.2f} | {r['added'] / r['model_bytes']:.2f} | {size / 1e6 / r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
