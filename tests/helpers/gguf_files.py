"""GGUF test files in the block formats the `gguf` package cannot quantize (the K-quants): random bytes with
finite float16 scales, so every value the reference dequantizes is a number, sized like a model weight."""

from __future__ import annotations

import numpy as np
import torch

# where each format keeps its float16 scales (and mins), and the largest |code| a scale multiplies
F16_FIELDS = {
    "Q4_0": ((0,), 8),
    "Q4_1": ((0, 2), 15),
    "Q5_0": ((0,), 16),
    "Q5_1": ((0, 2), 31),
    "Q8_0": ((0,), 127),
    "Q2_K": ((80, 82), 15 * 3),
    "Q3_K": ((108,), 32 * 4),
    "Q4_K": ((0, 2), 63 * 15),
    "Q5_K": ((0, 2), 63 * 31),
    "Q6_K": ((208,), 128 * 32),
}


def gguf_writer(path, architecture: str | None):
    """The `gguf` package's writer for `path`; `architecture=None` writes none, as stable-diffusion.cpp does."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture or "")
    if architecture is None:
        writer.kv_data[0].pop("general.architecture", None)
    return writer


def finish(writer) -> None:
    """Header, metadata and tensors to the file, and close it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def random_blocks(kind: str, n_values: int, rng: np.random.Generator, magnitude: float = 0.3) -> np.ndarray:
    """Valid `kind` blocks for `n_values` values, `[n_blocks, type_size]` uint8, whose values stay within about
    ±`magnitude`."""
    import gguf

    block_size, type_size = gguf.constants.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    raw = rng.integers(0, 256, (n_values // block_size, type_size), dtype=np.uint8)
    offsets, largest = F16_FIELDS[kind]
    for offset in offsets:
        scales = (rng.uniform(0.25, 1.0, len(raw)) * magnitude / largest).astype(np.float16)
        raw[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw


def write_gguf_blocks(
    path,
    tensors: dict[str, torch.Tensor],
    kinds: dict[str, str],
    *,
    architecture: str | None = "flux",
    seed: int = 0,
    reference: bool = True,
) -> dict[str, torch.Tensor]:
    """A GGUF file whose tensors named in `kinds` are random valid blocks of that GGML type (their entries in
    `tensors` only give the shape: `meta` tensors will do), the others stored as given (F32, F16 or BF16). Returns
    {key: what the reference dequantizes the stored tensor to}, float32, in the tensor's shape (for the blocks
    only with `reference`)."""
    import gguf

    rng = np.random.default_rng(seed)
    writer = gguf_writer(path, architecture)
    expected = {}
    for key, value in tensors.items():
        if key in kinds:
            kind = gguf.GGMLQuantizationType[kinds[key]]
            raw = random_blocks(kinds[key], value.numel(), rng).reshape(value.shape[0], -1)
            writer.add_tensor(key, raw, raw_dtype=kind)
            if reference:
                expected[key] = torch.from_numpy(gguf.quants.dequantize(raw, kind)).reshape(value.shape)
        elif value.dtype == torch.bfloat16:  # numpy has no bfloat16: the package's bytes of it
            raw = gguf.quants.quantize(value.float().numpy(), gguf.GGMLQuantizationType.BF16)
            writer.add_tensor(key, raw, raw_dtype=gguf.GGMLQuantizationType.BF16)
            expected[key] = value.float()
        else:
            array = value.detach().numpy()
            writer.add_tensor(key, array)
            expected[key] = torch.from_numpy(array.astype(np.float32))
    finish(writer)
    return expected
