"""Loaders: the transformer, the text encoders and the VAE from ComfyUI's own model folders."""

from __future__ import annotations

import torch

import kontext_core
from kontext_core.model import flux_math
from kontext_core.checkpoints import CheckpointError
from kontext_core.runtime.lora import load_lora, unmatched_note
from kontext_core.runtime.quant import COMPUTE_DTYPES, WEIGHT_DTYPES, weight_options

from ._comfy import ModelSlot, comfyui_root, torch_device
from ._models import check_model_name, list_models, model_path
from ._spec import Input, KontextNode, LoraModel, Output, is_worker_group, model_input

CATEGORY = "Kontext Core/loaders"
T5_LENGTHS = ("auto", "512", "256")  # auto: the tokenizer's own (512 for T5-XXL, 48 for the small model)


def _say_if_small(*names: str) -> None:
    from kontext_core.small_model import BUILTIN_PREFIX, NOTICE  # (the small model's code loads when used)

    if any(name.startswith(BUILTIN_PREFIX) for name in names):
        print(NOTICE, flush=True)


def auto_compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the GPU runs it natively, fp16 on older GPUs, fp32 on a CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


# inputs the Kontext Parallel Model Loader (nodes/parallel.py) shares
TRANSFORMER_FILE = Input(
    "model_name",
    "COMBO",
    "Transformer file in models/diffusion_models (or models/unet).",
    options=lambda: list_models("diffusion_models"),
)
COMPUTE_DTYPE = Input(
    "compute_dtype",
    "COMBO",
    "Precision of the arithmetic: 'auto' is bf16 on GPUs that support it, fp16 on older GPUs, fp32 on a CPU.",
    default="auto",
    options=tuple(COMPUTE_DTYPES),
)


class KontextCoreModelLoader(KontextNode):
    NODE_ID = "KontextCoreModelLoader"
    DISPLAY_NAME = "Kontext Model Loader"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Loads a FLUX.1 Kontext transformer (BFL, ComfyUI or fp8 single file) from models/diffusion_models "
        "with the Kontext Core engine. The model stays loaded between runs; picking another file frees the old one."
    )
    INPUTS = (
        TRANSFORMER_FILE,
        Input(
            "weight_dtype",
            "COMBO",
            "How the weights are stored in memory: 'default' keeps the file's precision "
            "(an fp8 file stays fp8); an fp8 choice casts a 16-bit file to fp8 to halve its memory.",
            default="default",
            options=tuple(WEIGHT_DTYPES),
        ),
        COMPUTE_DTYPE,
        Input(
            "attention",
            "COMBO",
            "Attention kernel: 'auto' picks FlashAttention for half precision when it "
            "is installed, else PyTorch SDPA. 'flash' and 'sage' need their packages.",
            default="auto",
            options=flux_math.ATTENTION_BACKENDS,
        ),
    )
    OUTPUTS = (Output("KONTEXT_MODEL", "model", "The loaded Kontext transformer."),)
    _slot = ModelSlot()

    @classmethod
    def validate_inputs(cls, model_name: str):
        return check_model_name("diffusion_models", model_name, "model_name")

    @classmethod
    def run(cls, model_name: str, weight_dtype: str = "default", compute_dtype: str = "auto", attention: str = "auto"):
        path = model_path("diffusion_models", model_name, "model_name")
        _say_if_small(model_name)
        device = torch_device()
        if attention not in ("auto", *flux_math.available_backends(device)):
            raise ValueError(
                f"input 'attention': {attention!r} is not available on {device} "
                f"(available: auto, {', '.join(flux_math.available_backends(device))})"
            )
        dtype = COMPUTE_DTYPES[compute_dtype] or auto_compute_dtype(device)
        options = weight_options(weight_dtype)

        def load():
            model = kontext_core.load_transformer(path, device=device, dtype=dtype, **options)
            from kontext_core.runtime.memory_plan import loaded_model_note  # the header reader, only when loading

            print(f"{cls.NODE_ID}: {model_name}: {loaded_model_note(model, device)}", flush=True)
            return model

        model = cls._slot.get(path, (weight_dtype, dtype, str(device)), load)
        model.attention_backend = attention
        return (model,)


class KontextCoreTextEncoderLoader(KontextNode):
    NODE_ID = "KontextCoreTextEncoderLoader"
    DISPLAY_NAME = "Kontext Text Encoder Loader"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Loads the T5-XXL and CLIP-L text encoders from models/text_encoders (ComfyUI's single files such as "
        "t5xxl_fp16.safetensors and clip_l.safetensors), with ComfyUI's shipped tokenizers."
    )
    INPUTS = (
        Input(
            "t5_name",
            "COMBO",
            "T5-XXL encoder file (t5xxl_fp16, t5xxl_fp8_e4m3fn or its _scaled variant, or a GGUF such as "
            "t5-v1_1-xxl-encoder-Q8_0.gguf, kept quantized).",
            options=lambda: list_models("text_encoders"),
        ),
        Input(
            "clip_name",
            "COMBO",
            "CLIP-L text encoder file (clip_l.safetensors).",
            options=lambda: list_models("text_encoders"),
        ),
        Input(
            "t5_max_length",
            "COMBO",
            "Tokens T5 pads to. 'auto' is the tokenizer's own: 512 for T5-XXL, as "
            "BFL and diffusers; 256 matches ComfyUI's own FLUX text encoder and is faster. The choice changes "
            "the result.",
            default="auto",
            options=T5_LENGTHS,
        ),
    )
    OUTPUTS = (Output("KONTEXT_TEXT_ENCODER", "text_encoder", "T5 + CLIP, ready for Kontext Text Encode."),)
    _slot = ModelSlot()

    @classmethod
    def validate_inputs(cls, t5_name: str, clip_name: str):
        t5 = check_model_name("text_encoders", t5_name, "t5_name")
        return t5 if t5 is not True else check_model_name("text_encoders", clip_name, "clip_name")

    @classmethod
    def run(cls, t5_name: str, clip_name: str, t5_max_length: str = "auto"):
        t5 = model_path("text_encoders", t5_name, "t5_name")
        clip = model_path("text_encoders", clip_name, "clip_name")
        if t5_max_length not in T5_LENGTHS:
            raise ValueError(f"input 't5_max_length': expected one of {T5_LENGTHS}, got {t5_max_length!r}")
        device = torch_device()
        dtype = auto_compute_dtype(device)
        # the small model's tokenizers live beside its files, not among ComfyUI's
        from kontext_core.small_model import small_model_files

        small = small_model_files()
        tokenizers = {"t5_tokenizer": small.t5_tokenizer} if t5 == str(small.t5) else {}
        tokenizers |= {"clip_tokenizer": small.clip_tokenizer} if clip == str(small.clip) else {}
        _say_if_small(t5_name, clip_name)

        def load():
            return kontext_core.load_text_encoder(
                t5=t5,
                clip=clip,
                t5_max_length=None if t5_max_length == "auto" else int(t5_max_length),
                device=device,
                dtype=dtype,
                comfyui_root=comfyui_root(),
                **tokenizers,
            )

        # the slot is keyed on the T5 file (the large one); the CLIP name and length go in the options
        return (cls._slot.get(t5, (clip, t5_max_length, str(device)), load),)


class KontextCoreVAELoader(KontextNode):
    NODE_ID = "KontextCoreVAELoader"
    DISPLAY_NAME = "Kontext VAE Loader"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads the 16-channel FLUX VAE (ae.safetensors) from models/vae."
    INPUTS = (
        Input(
            "vae_name",
            "COMBO",
            "FLUX VAE file in models/vae (ae.safetensors or a diffusers-named copy).",
            options=lambda: list_models("vae"),
        ),
    )
    OUTPUTS = (Output("KONTEXT_VAE", "vae", "The FLUX autoencoder."),)
    _slot = ModelSlot()

    @classmethod
    def validate_inputs(cls, vae_name: str):
        return check_model_name("vae", vae_name, "vae_name")

    @classmethod
    def run(cls, vae_name: str):
        path = model_path("vae", vae_name, "vae_name")
        _say_if_small(vae_name)
        device = torch_device()
        dtype = auto_compute_dtype(device)
        return (cls._slot.get(path, (str(device),), lambda: kontext_core.load_vae(path, device=device, dtype=dtype)),)


class KontextCoreLoraLoader(KontextNode):
    NODE_ID = "KontextCoreLoraLoader"
    DISPLAY_NAME = "Kontext LoRA Loader"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Adds a FLUX LoRA from models/loras to a Kontext model (kohya/ComfyUI, diffusers/PEFT and fal/ai-toolkit "
        "files). Chain several for several LoRAs. The loaded model is not changed: the sampler puts the LoRAs on "
        "for its run, so other branches of the graph can use the same model without them. Only the transformer "
        "is patched; a LoRA's text-encoder parts are reported and left out."
    )
    INPUTS = (
        Input("model", "KONTEXT_MODEL", "From Kontext Model Loader, or another Kontext LoRA Loader."),
        Input("lora_name", "COMBO", "LoRA file in models/loras.", options=lambda: list_models("loras")),
        Input(
            "strength",
            "FLOAT",
            "How much of the LoRA to add: 1.0 as trained, 0 leaves the model as it is, negative values subtract it.",
            default=1.0,
            min=-100.0,
            max=100.0,
            step=0.01,
        ),
    )
    OUTPUTS = (Output("KONTEXT_MODEL", "model", "The model with this LoRA added."),)

    @classmethod
    def validate_inputs(cls, lora_name: str):
        return check_model_name("loras", lora_name, "lora_name")

    @classmethod
    def run(cls, model, lora_name: str, strength: float = 1.0):
        transformer, loras = model_input(cls, "model", model)
        path = model_path("loras", lora_name, "lora_name")
        if strength == 0:
            return (model,)
        if is_worker_group(transformer):  # each worker loads it onto its own copy of the model
            from kontext_core.parallel.workers import LoraFile

            return (LoraModel(transformer, (*loras, LoraFile.of(path, strength))),)
        try:
            lora = load_lora(transformer, path, strength)
        except CheckpointError as e:
            raise ValueError(f"{cls.NODE_ID}: input 'lora_name': {e}") from None
        if lora.unmatched:
            print(f"{cls.NODE_ID}: {lora_name}: {unmatched_note(lora.unmatched)}", flush=True)
        return (LoraModel(transformer, (*loras, lora)),)


NODES = [KontextCoreModelLoader, KontextCoreLoraLoader, KontextCoreTextEncoderLoader, KontextCoreVAELoader]
