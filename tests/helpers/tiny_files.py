"""Tiny random model files in the formats a ComfyUI user has, under the names the example workflows use.

flux1-kontext-dev.safetensors   BFL keys, bf16, `flux_params` header (tests/helpers/tiny_models.py's TINY_FLUX)
ae.safetensors                  BFL VAE keys, fp32 (the real file's precision), every width cut to 32
t5xxl_fp16.safetensors          transformers T5EncoderModel keys, fp16, `config` header
clip_l.safetensors              ComfyUI's clip_l layout: `text_model.` keys + `text_projection.weight`, fp16
kontext_tiny_style.safetensors  a kohya LoRA (`lora_unet_…`, rank 4, alpha 2, bf16) on every block Linear of the
                                transformer, plus one text-encoder pair (`lora_te1_…`) the transformer cannot take
The vocabularies are the real ones (CLIP 49408, T5 32128) because inside ComfyUI the text encoder uses the
tokenizers ComfyUI ships; the widths match TINY_FLUX (T5 → context_in_dim, CLIP pooled → vec_in_dim).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from tests.helpers.tiny_models import TINY_FLUX, randomize_, tiny_flux_model

from kontext_core.model.config import AutoEncoderParams

TRANSFORMER = "flux1-kontext-dev.safetensors"
VAE = "ae.safetensors"
T5 = "t5xxl_fp16.safetensors"
CLIP = "clip_l.safetensors"
LORA = "kontext_tiny_style.safetensors"
# GroupNorm uses 32 groups, so 32 channels is the narrowest VAE; four levels keep the 8× downsampling
TINY_VAE = AutoEncoderParams(resolution=64, ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1)
# (name, width, height): non-square, multiples of 16 so that "keep" leaves them as they are
INPUT_IMAGES = [("kontext_example.png", 80, 48), ("kontext_character.png", 64, 48), ("kontext_object.png", 48, 64)]
BATCH_IMAGES = [("batch/a_first.png", 64, 32), ("batch/b_second.png", 32, 48)]


def _save(tensors: dict[str, torch.Tensor], path: Path, dtype: torch.dtype, metadata: dict[str, str]) -> None:
    save_file({k: v.detach().to(dtype).contiguous().clone() for k, v in tensors.items()}, str(path), metadata)


def write_transformer(path: Path, seed: int = 1) -> None:
    _save(tiny_flux_model(seed).state_dict(), path, torch.bfloat16, {"flux_params": json.dumps(asdict(TINY_FLUX))})


def write_lora(path: Path, seed: int = 5) -> None:
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
    }
    for name, linear in tiny_flux_model(1).named_modules():
        if isinstance(linear, torch.nn.Linear) and "blocks." in name:
            stem = "lora_unet_" + name.replace(".", "_")
            tensors[f"{stem}.lora_up.weight"] = torch.randn(linear.out_features, 4, generator=gen) * 0.5
            tensors[f"{stem}.lora_down.weight"] = torch.randn(4, linear.in_features, generator=gen) * 0.5
            tensors[f"{stem}.alpha"] = torch.tensor(2.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(tensors, path, torch.bfloat16, {})


def write_vae(path: Path, seed: int = 2) -> None:
    from kontext_core.model.autoencoder import AutoEncoder

    _save(randomize_(AutoEncoder(TINY_VAE), seed, std=0.1).state_dict(), path, torch.float32, {})


def write_t5(path: Path, seed: int = 3) -> None:
    from transformers import T5Config, T5EncoderModel

    widths = dict(d_model=TINY_FLUX.context_in_dim, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
    positions = dict(relative_attention_num_buckets=32, relative_attention_max_distance=128)
    config = T5Config(
        vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False, **widths, **positions
    )
    model = randomize_(T5EncoderModel(config), seed, std=0.2)
    _save(model.state_dict(), path, torch.float16, {"config": config.to_json_string()})


def write_clip(path: Path, seed: int = 4) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    width = TINY_FLUX.vec_in_dim
    widths = dict(
        hidden_size=width, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, projection_dim=width
    )
    specials = dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=1)  # CLIP-L's tokenizer's ids
    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", **widths, **specials)
    model = randomize_(CLIPTextModel(config), seed, std=0.2)
    tensors = {"text_model." + k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 100)
    tensors["text_projection.weight"] = torch.randn(config.projection_dim, config.hidden_size, generator=gen)
    _save(tensors, path, torch.float16, {"config": config.to_json_string()})


def random_png(path: Path, width: int, height: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def write_all(base: Path) -> None:
    """Models into base/models/…, the workflows' input images into base/input/."""
    models = base / "models"
    write_transformer(models / "diffusion_models" / TRANSFORMER)
    write_vae(models / "vae" / VAE)
    write_t5(models / "text_encoders" / T5)
    write_clip(models / "text_encoders" / CLIP)
    write_lora(models / "loras" / LORA)
    for seed, (name, width, height) in enumerate(INPUT_IMAGES + BATCH_IMAGES):
        random_png(base / "input" / name, width, height, seed)
    # the inputs shipped with the workflows (the small model's scene), as they are
    for shipped in (Path(__file__).resolve().parents[2] / "workflows" / "inputs").glob("*.png"):
        (base / "input" / shipped.name).write_bytes(shipped.read_bytes())
