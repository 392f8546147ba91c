"""What fits on a card: the memory a Kontext edit needs with the user's files, from their headers alone.

Each model's weights are counted as the loaders hold them (a GGUF file's blocks as stored, fp8 as one byte a value,
everything else in the 2-byte compute dtype), the activations of the transformer's largest step (a single block:
its `linear1` output, q/k/v, attention output, MLP activation and the concatenation alive together) and of the VAE
decoder at the chosen size, plus a fixed reserve for the CUDA context and the allocator. The run has three phases,
each with its own peak: encoding the prompt (T5 + CLIP), sampling (transformer + VAE, T5 too unless it is moved to
the host once the prompt is encoded) and decoding. The options are tried from the cheapest in speed and quality
(none) to the dearest (block offload), and the first that fits is named.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kontext_core.checkpoints.gguf_io import ACCEPT_T5, GGUFSource
from kontext_core.checkpoints.transformer import BLOCK_PREFIXES, FLUX_PREFIXES
from kontext_core.checkpoints.safetensors_io import open_tensors
from kontext_core.runtime.gguf_dequant import BLOCK_FORMATS
from kontext_core.runtime.gguf_linear import gguf_layers

GiB = 2**30
COMPUTE_BYTES = 2  # bf16 / fp16 compute: what every tensor not kept quantized is held in
CUDA_RESERVE = int(0.75 * GiB)  # CUDA context, cuBLAS workspaces, allocator fragmentation
# values alive in the compute dtype at a single block's peak, per token: linear1's output (3·3072 + 12288),
# q/k/v after RoPE (3·3072), attention output (3072), MLP activation (12288), concatenation (15360), residuals (2·3072)
ACTIVATION_VALUES_PER_TOKEN = 21504 + 9216 + 3072 + 12288 + 15360 + 6144
# the VAE decoder's widest stage runs at full resolution with 128 channels; about four such maps are alive at once
VAE_DECODE_BYTES_PER_PIXEL = 4 * 128 * COMPUTE_BYTES
# dequantizing one GGUF weight keeps its codes, scaled values and result in float32 and the cast copy at once
GGUF_SCRATCH_BYTES_PER_VALUE = 3 * 4 + COMPUTE_BYTES
TEXT_TOKENS = 512
T5_SKIPPED = ("decoder.", "dec.", "lm_head.", "output.weight")
CLIP_SKIPPED = ("vision_model.", "visual_projection.", "text_projection.", "logit_scale")
FP8_NAMES = ("F8_E4M3", "F8_E5M2", "float8_e4m3fn", "float8_e5m2")
# the options, by the loader settings they stand for
AS_STORED = "as stored"  # weight dtype `default`: the file's precision (fp8 stays fp8), computed in bf16
GGUF_AS_IS = "GGUF as is"  # the same for a GGUF file: its blocks kept quantized
FP8_WEIGHTS = "fp8 weights"  # weight dtype fp8_e4m3fn: the block Linear weights cast to fp8
BLOCK_OFFLOAD = "block offload"  # kontext_core.runtime.offload: two blocks on the card at a time
T5_TO_HOST = "T5 to the host after encoding"
HOW = {
    FP8_WEIGHTS: "weight dtype fp8_e4m3fn (Model Loader, or --weight-dtype)",
    BLOCK_OFFLOAD: "kontext_core.runtime.offload.offload(model, 'cuda')",
    T5_TO_HOST: "encode the prompt first, then text_encoder.t5.to('cpu') (the encoder follows T5's device)",
}


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a file: its name (prefix stripped), values, and bytes as the file stores it."""

    name: str
    values: int
    stored: str  # a GGML type name for GGUF, else the torch dtype's name

    @property
    def block_kind(self) -> str | None:
        return self.stored if self.stored in BLOCK_FORMATS else None

    def bytes_kept(self) -> int:
        """Bytes as the loaders hold it by default: GGUF blocks as stored, fp8 as fp8, others in the compute dtype."""
        if self.block_kind:
            fmt = BLOCK_FORMATS[self.block_kind]
            return self.values // fmt.block_size * fmt.type_size
        return self.values if self.stored.endswith(FP8_NAMES) else self.values * COMPUTE_BYTES


def read_tensors(path: str | os.PathLike, skipped: tuple[str, ...] = (), t5: bool = False) -> list[StoredTensor]:
    """Every tensor of a model file, from its header (no weight is read)."""
    path = Path(path)
    source = GGUFSource(path, accept=ACCEPT_T5) if t5 and path.suffix.lower() == ".gguf" else open_tensors(path)
    try:
        kind = getattr(source, "ggml_type", None)
        tensors = []
        for key in source.keys():
            name = next((key[len(p) :] for p in FLUX_PREFIXES if key.startswith(p)), key)
            if name.startswith(skipped) or name in skipped:
                continue
            stored = kind(key) if kind else str(source.dtype(key)).removeprefix("torch.")
            tensors.append(StoredTensor(name, math.prod(source.shape(key)), stored))
        return tensors
    finally:
        source.close()


def _is_block_linear(t: StoredTensor) -> bool:
    return t.name.startswith(BLOCK_PREFIXES) and t.name.endswith(".weight")  # the blocks' norms are `.scale`


@dataclass(frozen=True)
class TransformerOption:
    """One way of holding the transformer: its resident weight bytes and the transient a call adds."""

    name: str
    weights: int
    scratch: int


def transformer_options(tensors: list[StoredTensor]) -> list[TransformerOption]:
    """As stored, fp8 block weights, and each of those with block offload (non-block weights and two double blocks
    on the card)."""
    largest = max((t.values for t in tensors if t.block_kind), default=0)
    name = GGUF_AS_IS if largest else AS_STORED
    stored = TransformerOption(name, sum(t.bytes_kept() for t in tensors), largest * GGUF_SCRATCH_BYTES_PER_VALUE)
    fp8_weights = sum(_bytes(t, FP8_WEIGHTS) for t in tensors)
    options = [stored]
    if fp8_weights < stored.weights:
        options.append(TransformerOption(FP8_WEIGHTS, fp8_weights, 0))
    for option in list(options):
        per_block = sum(_bytes(t, option.name) for t in tensors if t.name.startswith("double_blocks.0."))
        blocks = sum(_bytes(t, option.name) for t in tensors if t.name.startswith(BLOCK_PREFIXES))
        outside = sum(_bytes(t, option.name) for t in tensors if not t.name.startswith(BLOCK_PREFIXES))
        resident = outside + min(2 * per_block, blocks)  # a model of two blocks has no fewer on the card
        options.append(TransformerOption(f"{option.name} + {BLOCK_OFFLOAD}", resident, option.scratch))
    return options


def _bytes(t: StoredTensor, option: str) -> int:
    if option == FP8_WEIGHTS and _is_block_linear(t):
        return t.values
    return t.values * COMPUTE_BYTES if option == FP8_WEIGHTS else t.bytes_kept()


@dataclass(frozen=True)
class Phase:
    name: str
    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())


@dataclass(frozen=True)
class Plan:
    """The three phases' peaks for one combination of options."""

    transformer: str
    t5_offloaded: bool
    phases: tuple[Phase, ...]

    @property
    def peak(self) -> int:
        return max(p.total for p in self.phases)

    @property
    def label(self) -> str:
        return self.transformer + (f", {T5_TO_HOST}" if self.t5_offloaded else "")


@dataclass(frozen=True)
class PlanInputs:
    transformer: list[StoredTensor]
    t5: list[StoredTensor]
    clip: list[StoredTensor]
    vae: list[StoredTensor]
    width: int = 1024
    height: int = 1024
    references: int = 1


def tokens(inputs: PlanInputs) -> int:
    """Image tokens (one per 16 × 16 pixels) for the output and each reference, plus T5's."""
    return (inputs.width // 16) * (inputs.height // 16) * (1 + inputs.references) + TEXT_TOKENS


def plans(inputs: PlanInputs) -> list[Plan]:
    """Every combination, from the cheapest in speed and quality to the dearest."""
    t5 = sum(t.bytes_kept() for t in inputs.t5)
    clip = sum(t.values * COMPUTE_BYTES for t in inputs.clip)
    vae = sum(t.values * COMPUTE_BYTES for t in inputs.vae)
    activations = tokens(inputs) * ACTIVATION_VALUES_PER_TOKEN * COMPUTE_BYTES
    decode = inputs.width * inputs.height * VAE_DECODE_BYTES_PER_PIXEL
    found = []
    options = transformer_options(inputs.transformer)
    for offload_t5 in (False, True):
        for option in options:
            on_card = {"transformer": option.weights, "VAE": vae, "CLIP": clip, "CUDA reserve": CUDA_RESERVE}
            if not offload_t5:
                on_card["T5"] = t5
            # offloading T5 means encoding first, with the text encoders alone on the card
            encode = {"T5": t5, "CLIP": clip, "CUDA reserve": CUDA_RESERVE} if offload_t5 else on_card
            phases = (
                Phase("encode", encode),
                Phase("sample", on_card | {"activations": activations, "GGUF dequantization": option.scratch}),
                Phase("decode", on_card | {"VAE decode": decode}),
            )
            found.append(Plan(option.name, offload_t5, phases))
    # no cost first; then T5's trip to the host (seconds), fp8 (a little precision), streaming blocks (every step)
    return sorted(found, key=lambda p: (BLOCK_OFFLOAD in p.transformer, FP8_WEIGHTS in p.transformer, p.t5_offloaded))


def gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def describe_plan(inputs: PlanInputs, vram: float, files: dict[str, str] | None = None) -> str:
    """The plan as text: the numbers used, each combination's peak, and the first that fits in `vram` GiB."""
    budget = int(vram * GiB)
    lines = [f"memory plan for a {inputs.width}×{inputs.height} edit with {inputs.references} reference(s) "
             f"on a {vram:g} GiB card (bf16 compute):"]  # fmt: skip
    for role, path in (files or {}).items():
        lines.append(f"  {role}: {path}")
    for role, group in (("transformer", inputs.transformer), ("T5", inputs.t5), ("CLIP", inputs.clip)):
        kinds = sorted({t.stored for t in group})
        held = sum(t.bytes_kept() for t in group) if role != "CLIP" else sum(t.values for t in group) * COMPUTE_BYTES
        values = sum(t.values for t in group)
        lines.append(f"  {role}: {values / 1e9:.2f} B values ({', '.join(kinds)}), {gib(held)} as loaded")
    lines.append(
        f"  activations: {tokens(inputs)} tokens × {ACTIVATION_VALUES_PER_TOKEN} values × {COMPUTE_BYTES} bytes; "
        f"VAE decode {VAE_DECODE_BYTES_PER_PIXEL} bytes a pixel; CUDA reserve {gib(CUDA_RESERVE)}"
    )
    lines.append(f"  {'GiB at each phase':<62}encode  sample  decode    peak  fits")
    all_plans = plans(inputs)
    for plan in all_plans:
        peaks = "".join(f"{p.total / GiB:8.1f}" for p in plan.phases)
        lines.append(f"  {plan.label:<60}{peaks}{plan.peak / GiB:8.1f}  {'yes' if plan.peak <= budget else 'no'}")
    fitting = next((p for p in all_plans if p.peak <= budget), None)
    if fitting is None:
        smallest = min(all_plans, key=lambda p: p.peak)
        lines.append(
            f"nothing fits: the smallest plan ({smallest.label}) needs {gib(smallest.peak)}; try a smaller size, "
            "fewer references, or a smaller GGUF file"
        )
    else:
        lines.append(f"fits with: {fitting.label} (peak {gib(fitting.peak)} of {vram:g} GiB)")
        lines += [f"  {option}: {how}" for option, how in HOW.items() if option in fitting.label]
    return "\n".join(lines)


def plan_for_files(
    transformer: str | os.PathLike,
    t5: str | os.PathLike,
    clip: str | os.PathLike,
    vae: str | os.PathLike,
    *,
    width: int = 1024,
    height: int = 1024,
    references: int = 1,
) -> PlanInputs:
    """The plan's inputs from four model files' headers."""
    return PlanInputs(
        read_tensors(transformer),
        read_tensors(t5, T5_SKIPPED, t5=True),
        read_tensors(clip, CLIP_SKIPPED),
        read_tensors(vae),
        width,
        height,
        references,
    )


def loaded_model_note(model: torch.nn.Module, device: torch.device | str, width: int = 1024, height: int = 1024) -> str:
    """One line for a loader's log: what the loaded transformer holds, what a `width`×`height` edit with one
    reference adds, and, on CUDA, what the card has left."""
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    kinds = sorted(set(gguf_layers(model).values()))
    kept = f" (GGUF {', '.join(kinds)} blocks kept)" if kinds else ""
    activations = (width // 16) * (height // 16) * 2 + TEXT_TOKENS
    line = (
        f"transformer weights {gib(held)}{kept}; a {width}×{height} edit adds about "
        f"{gib(activations * ACTIVATION_VALUES_PER_TOKEN * COMPUTE_BYTES)} of activations"
    )
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        line += f"; {gib(free)} of {gib(total)} free on {device}"
        vram = f"{total / GiB:.0f}"
    else:
        vram = "N"
    return f"{line} (the whole plan: python -m kontext_core inspect --plan --vram {vram})"
