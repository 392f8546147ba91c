"""Linear layers that keep a GGUF file's quantized blocks (Q4_K, Q8_0, …) as they are, as ComfyUI-GGUF does.

The weight is the file's bytes, `[n_blocks, type_size]` uint8, on whatever device the model is; each call
dequantizes it in torch (`gguf_dequant`, bit-exact with llama.cpp's reference) to float32, casts it to the
activations' dtype and multiplies. A 4.5-bit Q4_K weight then costs its 0.56 bytes per value at rest and one
layer's full-precision matrix while it runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from kontext_core.runtime.gguf_dequant import BLOCK_FORMATS, dequantize
from kontext_core.runtime.quant import DequantizingLinear, replace_linears


def block_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """The `[n_blocks, type_size]` bytes a tensor of `shape` takes in GGML type `kind`."""
    fmt = BLOCK_FORMATS[kind]
    values = math.prod(shape)
    if values % fmt.block_size:
        raise ValueError(f"{values} values do not fill whole {kind} blocks of {fmt.block_size}")
    return values // fmt.block_size, fmt.type_size


class GGUFLinear(DequantizingLinear):
    """nn.Linear whose `weight` holds GGML blocks of type `ggml_type`, dequantized at each call."""

    def __init__(self, in_features: int, out_features: int, ggml_type: str, bias: bool = True, device=None):
        super().__init__(in_features, out_features, bias=bias, device="meta")
        self.ggml_type = ggml_type
        blocks = torch.empty(block_shape(ggml_type, (out_features, in_features)), dtype=torch.uint8, device=device)
        self.weight = nn.Parameter(blocks, requires_grad=False)  # bytes have no gradient
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device))

    def stored_weight_as(self, dtype: torch.dtype) -> Tensor:
        # the bytes may be typed int8 (see t5_gguf.BYTES_AS_INT8): the same bytes either way
        matrix = dequantize(self.weight.view(torch.uint8), self.ggml_type).reshape(self.out_features, self.in_features)
        return matrix.to(dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ggml_type={self.ggml_type}"


def use_gguf_linears(model: nn.Module, kinds: Mapping[str, str]) -> None:
    """Swap the nn.Linear modules named in `kinds` (layer name -> GGML type) for GGUFLinear, in place (on `meta`,
    before loading)."""

    def make(name: str, old: nn.Linear) -> GGUFLinear:
        bias = old.bias is not None
        return GGUFLinear(old.in_features, old.out_features, kinds[name], bias=bias, device=old.weight.device)

    replace_linears(model, kinds, make)


def gguf_layers(model: nn.Module) -> dict[str, str]:
    """The layers of `model` that keep GGUF blocks, and their GGML types."""
    return {name: m.ggml_type for name, m in model.named_modules() if isinstance(m, GGUFLinear)}
