"""What keeping GGUF blocks quantized costs per layer: each distinct Linear of a real-width Q4_K_M transformer
(1 double + 1 single block, the file `benchmarks.load_memory` writes), kept (`GGUFLinear`, dequantized at each
call) against the same layer expanded at load (`dequantize=True`), and the whole 1 + 1-block forward.

    python -m benchmarks.gguf_speed [--tokens 1024] [--dtype float32] [--device cpu] [--repeats 3]

Best of `--repeats` runs, after one warm-up; the outputs of the two must be equal (the same dequantized weights).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/gguf_speed.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.load_memory import write_gguf_q4_k_m

# one of each shape: (3072 → 9216, 3072, 12288, 18432, 21504; 12288 → 3072, 15360 → 3072)
LAYERS = (
    "double_blocks.0.img_attn.qkv",
    "double_blocks.0.img_attn.proj",
    "double_blocks.0.img_mlp.0",
    "double_blocks.0.img_mlp.2",
    "double_blocks.0.img_mod.lin",
    "single_blocks.0.linear1",
    "single_blocks.0.linear2",
)


def best_time(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up: allocator, kernels
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def forward_inputs(context: int, vec: int, gen: torch.Generator, device: torch.device, dtype: torch.dtype):
    """`Flux.forward`'s inputs for a 512 × 512 image (32 × 32 latent patches, 1024 tokens) and 512 text tokens."""
    from kontext_core.sampling import position_ids

    img = torch.randn(1, 1024, 64, generator=gen)
    txt = torch.randn(1, 512, context, generator=gen)
    floats = [img, txt, torch.tensor([0.6]), torch.randn(1, vec, generator=gen), torch.tensor([2.5])]
    img, txt, t, y, guidance = (x.to(device, dtype) for x in floats)
    ids = position_ids(32, 32)[None].to(device)
    return img, ids, txt, torch.zeros(1, 512, 3, device=device), t, y, guidance


@torch.no_grad()
def main() -> None:
    from kontext_core.checkpoints.transformer import load_transformer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per Linear call (image + text)")
    parser.add_argument("--dtype", default="float32", help="compute dtype")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write the temporary file")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    folder = Path(tempfile.mkdtemp(prefix="kontext-gguf-", dir=args.dir))
    path = folder / "Q4_K_M.gguf"
    try:
        write_gguf_q4_k_m(path)
        kept = load_transformer(path, device=device, dtype=dtype)
        full = load_transformer(path, device=device, dtype=dtype, dequantize=True)
    finally:
        path.unlink(missing_ok=True)
        folder.rmdir()

    gen = torch.Generator().manual_seed(0)
    print(
        f"device {device}, {args.dtype}, {args.tokens} tokens, best of {args.repeats}, threads {torch.get_num_threads()}"
    )
    print("| layer | GGML type | in → out | dequantize only ms | kept ms | expanded ms | kept / expanded |")
    print("|---|---|---|---|---|---|---|")
    for name in LAYERS:
        layer, dense = kept.get_submodule(name), full.get_submodule(name)
        x = torch.randn(1, args.tokens, layer.in_features, generator=gen).to(device, dtype)
        assert torch.equal(layer(x), dense(x)), name
        dequant = best_time(lambda: layer.stored_weight_as(dtype), args.repeats, device)
        t_kept = best_time(lambda: layer(x), args.repeats, device)
        t_full = best_time(lambda: dense(x), args.repeats, device)
        print(
            f"| {name} | {layer.ggml_type} | {layer.in_features} → {layer.out_features} | {dequant * 1e3:.0f} | "
            f"{t_kept * 1e3:.0f} | {t_full * 1e3:.0f} | {t_kept / t_full:.2f} |"
        )
    inputs = forward_inputs(kept.params.context_in_dim, kept.params.vec_in_dim, gen, device, dtype)
    t_kept = best_time(lambda: kept(*inputs), args.repeats, device)
    t_full = best_time(lambda: full(*inputs), args.repeats, device)
    tokens = inputs[0].shape[1] + inputs[2].shape[1]
    print(
        f"| whole forward, 1 + 1 blocks, {tokens} tokens | | | | {t_kept * 1e3:.0f} | {t_full * 1e3:.0f} | "
        f"{t_kept / t_full:.2f} |"
    )


if __name__ == "__main__":
    main()
