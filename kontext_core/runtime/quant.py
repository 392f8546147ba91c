"""Linear layers whose weights stay in fp8 on the device, as ComfyUI's weight_dtype fp8 does.

The weight is stored as fp8 with a per-tensor float32 scale (1 for a plain fp8 file, the file's
`scale_weight` / `weight_scale` for ComfyUI's scaled fp8) and upcast to the activations' dtype for each
matmul, halving memory against bf16 at the same arithmetic. On GPUs with fp8 tensor cores
(compute capability 8.9+), `fp8_matmul=True` multiplies in fp8 with `torch._scaled_mm` instead, with a
per-call activation scale (a file's static `scale_input` is not needed for that and is ignored).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# The weight precisions the command line and the loader node offer: "default" keeps the file's, an fp8 file's
# fp8 layers included (`load_transformer(keep_fp8=True)`); an fp8 type casts a 16-bit file's block weights to it.
WEIGHT_DTYPES = {"default": None, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# The compute precisions the command line and the loader node offer: "auto" (None) leaves it to the device.
COMPUTE_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def weight_options(choice: str) -> dict:
    """`load_transformer`'s keywords for a `WEIGHT_DTYPES` choice. 'default' keeps an fp8 file's fp8 layers: a
    float compute dtype alone would dequantize them."""
    weight_dtype = WEIGHT_DTYPES[choice]
    return {"keep_fp8": True} if weight_dtype is None else {"weight_dtype": weight_dtype}


def quantize_fp8(weight: Tensor, fp8: torch.dtype = torch.float8_e4m3fn) -> tuple[Tensor, Tensor]:
    """`weight` as fp8 with a per-tensor float32 scale (ComfyUI's scaled fp8): the largest magnitude maps to
    the format's largest finite value, so small weights keep their bits instead of falling into subnormals."""
    if fp8 not in FP8_DTYPES:
        raise ValueError(f"fp8 must be one of {FP8_DTYPES}, got {fp8}")
    scale = (weight.detach().abs().amax().float() / torch.finfo(fp8).max).clamp(min=torch.finfo(torch.float32).tiny)
    return (weight.detach().float() / scale).to(fp8), scale


class DequantizingLinear(nn.Linear):
    """nn.Linear whose stored weight is not its matrix (fp8, GGUF blocks): each call rebuilds the matrix in the
    activations' dtype, with the LoRA updates `kontext_core.runtime.lora` records on the layer added on top, so
    the stored weight never changes and removing a LoRA is exact."""

    def stored_weight_as(self, dtype: torch.dtype) -> Tensor:
        """The weight matrix in `dtype`, from what the layer stores."""
        raise NotImplementedError

    @property
    def lora_factors(self) -> list:
        """The LoRA updates on the weight, as `kontext_core.runtime.lora` records them for every layer it patches."""
        return self.__dict__.get("_lora_factors", {}).get("weight", [])

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        weight = self.stored_weight_as(dtype)
        if not self.lora_factors:
            return weight
        merged = weight.float()  # LoRA updates summed in float32 and rounded once, whatever their order
        for factor in self.lora_factors:
            merged = factor.add_to(merged)
        return merged.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return nn.functional.linear(x, self.dequantized_weight(x.dtype), bias)


class Fp8Linear(DequantizingLinear):
    """nn.Linear with an fp8 `weight` and a float32 `scale_weight`: W = weight · scale_weight."""

    fp8_matmul: bool = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("scale_weight", torch.ones((), dtype=torch.float32, device=device))

    def stored_weight_as(self, dtype: torch.dtype) -> Tensor:
        return self.weight.to(dtype) * self.scale_weight.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.fp8_matmul and not self.lora_factors and _scaled_mm_fits(x, self.weight):
            return self._scaled_mm_forward(x)
        return super().forward(x)

    def _scaled_mm_forward(self, x: Tensor) -> Tensor:
        # per-tensor dynamic scale for the activations, the stored one for the weight
        flat = x.reshape(-1, x.shape[-1])
        amax = flat.abs().amax().float().clamp(min=1e-12)
        scale_x = amax / torch.finfo(torch.float8_e4m3fn).max
        x8 = (flat / scale_x.to(flat.dtype)).to(torch.float8_e4m3fn)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        out = torch._scaled_mm(
            x8, self.weight.t(), scale_a=scale_x, scale_b=self.scale_weight.float(), bias=bias, out_dtype=x.dtype
        )
        return out.reshape(*x.shape[:-1], self.out_features)


def _scaled_mm_fits(x: Tensor, weight: Tensor) -> bool:
    # cuBLASLt fp8 GEMMs need e4m3 weights and both matrix dims in multiples of 16
    return (
        x.is_cuda
        and weight.dtype == torch.float8_e4m3fn
        and x.dtype in (torch.bfloat16, torch.float16)  # _scaled_mm takes no bias with a float32 output
        and weight.shape[0] % 16 == 0
        and weight.shape[1] % 16 == 0
    )


def fp8_matmul_supported(device: torch.device | str) -> bool:
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


def replace_linears(model: nn.Module, names: Iterable[str], make: Callable[[str, nn.Linear], nn.Module]) -> None:
    """Put `make(name, old)` in place of each nn.Linear named in `names`, in place (on `meta`, before loading)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        if not isinstance(old, nn.Linear):
            raise TypeError(f"{name} is a {type(old).__name__}, not a Linear")
        setattr(parent, child, make(name, old))


def use_fp8_linears(model: nn.Module, names: set[str]) -> None:
    """Swap the nn.Linear modules named in `names` for Fp8Linear, in place (on `meta`, before loading)."""

    def make(_name: str, old: nn.Linear) -> Fp8Linear:
        return Fp8Linear(old.in_features, old.out_features, bias=old.bias is not None, device=old.weight.device)

    replace_linears(model, names, make)


def enable_fp8_matmul(model: nn.Module, enabled: bool = True) -> int:
    """Turn the `_scaled_mm` path on for every Fp8Linear; returns how many layers it affects."""
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    if enabled and layers and not fp8_matmul_supported(layers[0].weight.device):
        raise RuntimeError(
            f"fp8 matmul needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper); "
            f"the model is on {layers[0].weight.device}"
        )
    for layer in layers:
        layer.fp8_matmul = enabled
    return len(layers)
