"""Tiny T5/CLIP files as ComfyUI keeps them (single safetensors + tokenizer folders), for end-to-end tests."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.text_encoders import state, tiny_clip, tiny_t5, write_clip_tokenizer, write_t5_tokenizer
from safetensors.torch import save_file

from kontext_core.checkpoints.tokenizers import load_tokenizer


def save_models(root: Path) -> dict[str, Path]:
    """t5xxl/clip_l single files carrying their config (tiny widths are not the published ones) + tokenizers."""
    clip_dir = write_clip_tokenizer(root / "clip_tokenizer")
    t5_dir = write_t5_tokenizer(root / "t5_tokenizer")
    t5 = tiny_t5(len(load_tokenizer(t5_dir, "t5")))
    clip = tiny_clip(len(load_tokenizer(clip_dir, "clip")))
    t5_state = {k: v for k, v in state(t5).items() if k != "encoder.embed_tokens.weight"}
    save_file(t5_state, root / "t5xxl_tiny.safetensors", metadata={"config": t5.config.to_json_string()})
    clip_state = {f"text_model.{k}": v for k, v in state(clip).items()}
    save_file(clip_state, root / "clip_l_tiny.safetensors", metadata={"config": clip.config.to_json_string()})
    return {
        "t5": root / "t5xxl_tiny.safetensors",
        "clip": root / "clip_l_tiny.safetensors",
        "t5_tokenizer": t5_dir,
        "clip_tokenizer": clip_dir,
    }


def text_widths(files: dict[str, Path]) -> tuple[int, int]:
    """(T5 width, CLIP width) of the files `save_models` wrote: what a matching transformer takes."""
    from safetensors import safe_open

    with safe_open(files["t5"], "pt") as f:
        t5 = f.get_slice("shared.weight").get_shape()[1]
    with safe_open(files["clip"], "pt") as f:
        clip = f.get_slice("text_model.embeddings.token_embedding.weight").get_shape()[1]
    return t5, clip
