"""Our LoRA application against ComfyUI's own LoRA patcher, the reference FLUX users' LoRAs are made for.

The tiny transformer file (float32 and bfloat16) and LoRAs in every layout both tools read, one at a time and all
stacked, are patched by ComfyUI (its Python, in a fresh process: `comfy.sd.load_lora_for_models`, then
`patch_model`) and by `kontext_core.apply_lora` / `use_loras`; the patched weights must agree to float32 rounding. Skipped unless COMFYUI_ROOT and COMFYUI_PYTHON are set (no server needed).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from tests.helpers.comfyui_server import comfyui_paths
from tests.helpers.tiny_files import write_transformer
from tests.helpers.reference_mappings import diffusers_twin
from safetensors.torch import save_file
from tests.helpers.tiny_models import tiny_flux_model

import kontext_core

STRENGTH = 0.7

# ComfyUI's FLUX detection fixes the real model's widths; for the tiny file they are read from its tensors
COMFY_PATCH = """
import sys, torch
comfy_root, transformer, out, strength, dtype, *loras = sys.argv[1:]
sys.path.insert(0, comfy_root)
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.model_detection, comfy.sd, comfy.utils

detect = comfy.model_detection.detect_unet_config
def tiny(state_dict, key_prefix, *args, **kwargs):
    config = detect(state_dict, key_prefix, *args, **kwargs)
    width = state_dict[key_prefix + "img_in.weight"].shape[0]
    config.update(hidden_size=width, num_heads=width // 16, axes_dim=[4, 6, 6],
                  context_in_dim=state_dict[key_prefix + "txt_in.weight"].shape[1],
                  out_channels=state_dict[key_prefix + "final_layer.linear.weight"].shape[0] // 4)
    return config
comfy.model_detection.detect_unet_config = tiny

model = comfy.sd.load_diffusion_model(transformer, model_options={"dtype": getattr(torch, dtype)})
patched = {}
for lora in loras:
    clone, _ = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(lora), float(strength), 0)
    clone.patch_model()
    patched[lora] = {k: v.clone() for k, v in clone.model.diffusion_model.state_dict().items()}
    clone.unpatch_model()
stacked = model
for lora in loras:  # all of them at once, in order: ComfyUI sums the updates in float32, then rounds
    stacked, _ = comfy.sd.load_lora_for_models(stacked, None, comfy.utils.load_torch_file(lora), float(strength), 0)
stacked.patch_model()
patched["stacked"] = {k: v.clone() for k, v in stacked.model.diffusion_model.state_dict().items()}
torch.save(patched, out)
"""


def _pairs(shapes: dict[str, tuple[int, int]], gen: torch.Generator, alpha: bool) -> dict[str, dict[str, torch.Tensor]]:
    """A low-rank pair (rank 2–4) per Linear, by its name: {name: {"up", "down"[, "alpha"]}}."""
    out = {}
    for i, (name, (rows, cols)) in enumerate(sorted(shapes.items())):
        rank = 2 + i % 3
        pair = {
            "up": torch.randn(rows, rank, generator=gen) * 0.3,
            "down": torch.randn(rank, cols, generator=gen) * 0.3,
        }
        if alpha:
            pair["alpha"] = torch.tensor(1.0 + i % 4)
        out[name] = pair
    return out


def _linears(module: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {n: tuple(m.weight.shape) for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


def lora_files(folder: Path) -> list[Path]:
    """One LoRA file per layout ComfyUI reads for FLUX, names and shapes taken from the two model classes."""
    model = tiny_flux_model(1)
    bfl, diffusers = _linears(model), _linears(diffusers_twin(model))
    gen = torch.Generator().manual_seed(21)
    layouts: dict[str, dict[str, torch.Tensor]] = {}

    def kohya(prefix: str, names: dict) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, pair in _pairs(names, gen, alpha=True).items():
            stem = prefix + name.replace(".", "_")
            tensors |= {
                f"{stem}.lora_up.weight": pair["up"],
                f"{stem}.lora_down.weight": pair["down"],
                f"{stem}.alpha": pair["alpha"],
            }
        return tensors

    layouts["kohya_bfl"] = kohya("lora_unet_", bfl)
    layouts["kohya_diffusers"] = kohya("lora_transformer_", diffusers)
    layouts["lycoris"] = kohya("lycoris_", diffusers)
    layouts["peft"] = {
        f"transformer.{name}.lora_{ab}.weight": pair[part]
        for name, pair in _pairs(diffusers, gen, alpha=False).items()
        for ab, part in (("A", "down"), ("B", "up"))
    }
    # ComfyUI's trainer / extractor: BFL names, pairs with alpha, full differences of biases and norm scales
    trainer = {}
    for name, pair in _pairs({n: s for n, s in bfl.items() if "blocks.0." in n}, gen, alpha=True).items():
        trainer |= {
            f"diffusion_model.{name}.lora_up.weight": pair["up"],
            f"diffusion_model.{name}.lora_down.weight": pair["down"],
            f"diffusion_model.{name}.alpha": pair["alpha"],
            f"diffusion_model.{name}.diff_b": torch.randn(pair["up"].shape[0], generator=gen) * 0.1,
        }
    state = model.state_dict()
    for name in ("double_blocks.1.img_attn.proj.weight", "single_blocks.1.linear2.weight"):
        trainer[f"diffusion_model.{name.removesuffix('.weight')}.diff"] = (
            torch.randn(state[name].shape, generator=gen) * 0.1
        )
    for name in ("double_blocks.1.txt_attn.norm.key_norm.scale", "single_blocks.0.norm.query_norm.scale"):
        trainer[f"diffusion_model.{name}.diff"] = torch.randn(state[name].shape, generator=gen) * 0.1
    hidden = model.params.hidden_size
    qkv = _pairs({"single_blocks.1.linear1_qkv": (3 * hidden, hidden)}, gen, alpha=True)["single_blocks.1.linear1_qkv"]
    trainer |= {
        "diffusion_model.single_blocks.1.linear1_qkv.lora_up.weight": qkv["up"],
        "diffusion_model.single_blocks.1.linear1_qkv.lora_down.weight": qkv["down"],
        "diffusion_model.single_blocks.1.linear1_qkv.alpha": qkv["alpha"],
    }
    layouts["comfyui_trainer"] = trainer

    paths = []
    for name, tensors in layouts.items():
        path = folder / f"{name}.safetensors"
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, str(path))
        paths.append(path)
    return paths


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_apply_lora_equals_comfyuis_lora_patcher(tmp_path, dtype):
    root, python = comfyui_paths()
    transformer = tmp_path / "flux1-kontext-dev.safetensors"
    write_transformer(transformer)
    loras = lora_files(tmp_path)
    out = tmp_path / "comfy.pt"
    subprocess.run(
        [str(python), "-c", COMFY_PATCH, str(root), str(transformer), str(out), str(STRENGTH), dtype, *map(str, loras)],
        check=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    reference = torch.load(out)

    model = kontext_core.load_transformer(transformer, dtype=getattr(torch, dtype))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    for lora in loras:
        comfy = reference[str(lora)]
        result = kontext_core.apply_lora(model, lora, strength=STRENGTH)
        ours = model.state_dict()
        assert result.unmatched == [], lora.name
        assert comfy.keys() == ours.keys()
        changed = {k for k in ours if not torch.equal(comfy[k], original[k])}
        assert changed == {k for k in ours if not torch.equal(ours[k], original[k])}, lora.name
        assert all(ours[k].dtype == comfy[k].dtype == getattr(torch, dtype) for k in changed)
        worst = max(
            (ours[k] - comfy[k]).float().abs().max().item() / comfy[k].float().abs().max().item() for k in changed
        )
        print(
            f"\n[lora vs ComfyUI, {dtype}] {lora.stem}: {len(changed)} tensors changed, "
            f"max |ours − ComfyUI| / max |W| = {worst:.1e}"
        )
        # the same float32 sums rounded once to the weight's dtype: float32 rounding of the sum at most
        assert len(changed) >= 10 and worst <= 1e-6, lora.name
        result.remove()
        assert all(torch.equal(model.state_dict()[k], original[k]) for k in original)

    kontext_core.use_loras(model, [kontext_core.load_lora(model, lora, STRENGTH) for lora in loras])
    ours, comfy = model.state_dict(), reference["stacked"]
    worst = max((ours[k] - comfy[k]).float().abs().max().item() / comfy[k].float().abs().max().item() for k in ours)
    print(f"[lora vs ComfyUI, {dtype}] all {len(loras)} stacked: max |ours − ComfyUI| / max |W| = {worst:.1e}")
    assert worst <= 1e-6 and not all(torch.equal(ours[k], original[k]) for k in ours)


@pytest.fixture(autouse=True)
def _comfyui_set():
    comfyui_paths()  # skips here, before any file is written, when no ComfyUI is configured
