"""GGUF files (ComfyUI-GGUF's `flux1-kontext-dev-Q4_K_M.gguf`, city96's `t5-v1_1-xxl-encoder-Q8_0.gguf`), read as
a TensorSource.

Transformer tensors keep their BFL names in these files, so everything after reading (layout detection, the
architecture checks, loading) is the same as for safetensors; T5 files use llama.cpp's names (`enc.blk.0.attn_q`),
which the text-encoder loader maps. `blocks(key)` gives a quantized tensor's bytes as they are in the file (what
`GGUFLinear` keeps); `tensor(key)` dequantizes it to float32 with the `gguf` package's reference code, for a model
that expands its weights at load.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from kontext_core.checkpoints.safetensors_io import CheckpointError, TensorNames

# the image architectures ComfyUI-GGUF writes; this loader takes only FLUX
_IMAGE_ARCHITECTURES = (
    "flux",
    "sd1",
    "sdxl",
    "sd3",
    "aura",
    "hidream",
    "cosmos",
    "ltxv",
    "hyvid",
    "wan",
    "lumina2",
    "qwen_image",
)
# no architecture (stable-diffusion.cpp's files) or ComfyUI-GGUF's placeholders for "tell from the tensor names"
_UNNAMED = (None, "pig", "cow")
# the architectures llama.cpp and ComfyUI-GGUF name T5 encoders by
T5_ARCHITECTURES = ("t5", "t5encoder")
# what a reader accepts: a FLUX transformer, a T5 encoder, or either (to describe a file)
ACCEPT_FLUX, ACCEPT_T5, ACCEPT_EITHER = "flux", "t5", "either"
_ORIGINAL_SHAPE = "comfy.gguf.orig_shape."  # ComfyUI-GGUF's record of a tensor reshaped to fit GGUF


def _gguf():
    try:
        import gguf
    except ImportError:
        return None
    return gguf


class GGUFSource(TensorNames):
    """The tensors of one GGUF file, with `TensorSource`'s interface: names and shapes from the header,
    `tensor(key)` dequantizes one tensor."""

    def __init__(self, path: Path, *, accept: str = ACCEPT_FLUX):
        gguf = _gguf()
        if gguf is None:
            raise CheckpointError(path, "GGUF files need the `gguf` package: pip install gguf")
        if not path.is_file():
            raise CheckpointError(path, "file not found")
        self._gguf = gguf
        self.origin = path
        self.metadata: dict[str, str] = {}
        self._open()
        self._check_architecture(self._string("general.architecture"), accept)
        if not self._entries:
            raise CheckpointError(path, "the file holds no tensors")
        self._shapes = {name: self._shape(t) for name, t in self._entries.items()}
        self._types = {name: t.tensor_type for name, t in self._entries.items()}
        self._nbytes = sum(int(t.n_bytes) for t in self._entries.values())

    def _check_architecture(self, architecture: str | None, accept: str) -> None:
        if architecture in _UNNAMED or (accept != ACCEPT_FLUX and architecture in T5_ARCHITECTURES):
            return
        if accept == ACCEPT_T5:
            raise CheckpointError(self.origin, f"a GGUF file of architecture {architecture!r}, not a T5 encoder")
        if architecture not in _IMAGE_ARCHITECTURES:
            read = "FLUX transformers and T5 encoders are" if accept == ACCEPT_EITHER else "only FLUX transformers are"
            raise CheckpointError(
                self.origin,
                f"a GGUF file of architecture {architecture!r} (a language model or text "
                f"encoder?): {read} read from GGUF here",
            )
        if architecture != "flux":
            raise CheckpointError(self.origin, f"a GGUF {architecture!r} model, not a FLUX transformer")

    def _open(self) -> None:
        """Map the file and read its header; `close` unmaps it and the next `tensor` maps it again."""
        try:
            # copy-on-write: tensors kept as the file's pages may be written to without touching the file
            self._reader = self._gguf.GGUFReader(self.origin, "c")
        except Exception as e:  # a foreign parser: whatever it raises for a bad or cut file, the file is unusable
            raise CheckpointError(
                self.origin, f"not a readable GGUF file, or truncated ({type(e).__name__}: {e})"
            ) from None
        self._entries = {t.name: t for t in self._reader.tensors}

    def _string(self, key: str) -> str | None:
        field = self._reader.get_field(key)
        if field is None:
            return None
        return bytes(field.parts[field.data[-1]]).decode("utf-8", errors="replace")

    def _shape(self, tensor) -> tuple[int, ...]:
        stored = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
        field = self._reader.get_field(_ORIGINAL_SHAPE + tensor.name)
        if field is None:
            return stored
        types = self._gguf.GGUFValueType
        shape = tuple(int(field.parts[i][0]) for i in field.data) if field.types == [types.ARRAY, types.INT32] else None
        if shape is None or int(np.prod(shape)) != int(np.prod(stored)):
            raise CheckpointError(
                self.origin,
                f"bad {_ORIGINAL_SHAPE}{tensor.name} metadata: expected the "
                f"{int(np.prod(stored))} values' shape as INT32s",
            )
        return shape

    def quant_types(self) -> dict[str, int]:
        """How many tensors the file stores in each GGML type (Q4_K, F16, …)."""
        counts: dict[str, int] = {}
        for kind in self._types.values():
            counts[kind.name] = counts.get(kind.name, 0) + 1
        return counts

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        kind = self._types[key].name
        return {"F16": torch.float16, "BF16": torch.bfloat16}.get(kind, torch.float32)  # quantized: dequantized

    def nbytes(self) -> int:
        return self._nbytes

    def ggml_type(self, key: str) -> str:
        """The GGML type `key` is stored in: F32, F16, BF16, Q8_0, Q4_K, …"""
        return self._types[key].name

    def _entry(self, key: str):
        if self._reader is None:
            self._open()
        return self._entries[key]

    def blocks(self, key: str) -> torch.Tensor:
        """A block-quantized tensor's bytes as stored, `[n_blocks, type_size]` uint8: the file's pages on the CPU
        (copy-on-write), read when first used."""
        kind = self._types[key]
        type_size = self._gguf.constants.GGML_QUANT_SIZES[kind][1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = torch.from_numpy(self._entry(key).data)
        return raw.reshape(-1, type_size)

    def tensor(self, key: str) -> torch.Tensor:
        t = self._entry(key)
        kind = t.tensor_type
        try:
            if kind.name in ("F32", "F16"):
                array = np.array(t.data)  # a copy: the reader's array is a read-only view of the file
            else:
                array = self._gguf.quants.dequantize(t.data, kind)
        except NotImplementedError:
            raise CheckpointError(
                self.origin,
                f"tensor {key!r} is stored as {kind.name}, which the installed `gguf` package cannot dequantize",
            ) from None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = torch.from_numpy(array)
        if kind.name == "BF16":
            out = out.to(torch.bfloat16)  # dequantized to float32 exactly: back to the file's precision
        if out.numel() != int(np.prod(self._shapes[key])):
            raise CheckpointError(self.origin, f"tensor {key!r} holds {out.numel()} values, not {self._shapes[key]}")
        return out.reshape(self._shapes[key])

    def close(self) -> None:
        """Unmap the file (the pages read so far are converted copies by now); the names and shapes stay."""
        self._reader = None
        self._entries = dict.fromkeys(self._entries)
