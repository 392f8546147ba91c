"""The small Kontext model we train and ship: the real architectures (Flux DiT, 16-channel VAE, T5 and CLIP
text towers) at a tiny size, trained on the synthetic edit tasks of `kontext_core.synthetic.tasks`.

Its files sit in `weights/` in the layouts the real loaders read (BFL transformer and `ae` keys, ComfyUI-style
text-encoder singles with their config in the header, Hugging Face tokenizer folders), so every loader, node
and workflow runs on them unchanged. `load_default_pipeline()` is the default when no real weights are given.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kontext_core.model.config import FLUX_KONTEXT_DEV, AutoEncoderParams

if TYPE_CHECKING:
    from kontext_core.pipeline import KontextPipeline

WEIGHTS_DIR = Path(__file__).parent / "weights"
# How the ComfyUI loaders list the small model's files beside the user's.
BUILTIN_PREFIX = "[built-in small model] "
NOTICE = (
    "Kontext Core: using the built-in small model, a tiny FLUX.1 Kontext trained on synthetic scenes of "
    "coloured shapes (64×64 to 96×64), not FLUX.1 Kontext [dev]"
)


@dataclass(frozen=True)
class SmallModelFiles:
    transformer: Path
    vae: Path
    t5: Path
    clip: Path
    t5_tokenizer: Path
    clip_tokenizer: Path

    def missing(self) -> list[Path]:
        return [path for path in vars(self).values() if not path.exists()]


def small_model_files(folder: str | os.PathLike[str] = WEIGHTS_DIR) -> SmallModelFiles:
    folder = Path(folder)
    return SmallModelFiles(
        transformer=folder / "flux1-kontext-small.safetensors",
        vae=folder / "ae-small.safetensors",
        t5=folder / "t5-small-encoder.safetensors",
        clip=folder / "clip-small.safetensors",
        t5_tokenizer=folder / "t5_tokenizer",
        clip_tokenizer=folder / "clip_tokenizer",
    )


# The real VAE's layout, narrow: 8× down, 16 latent channels, FLUX's scale/shift (so a ComfyUI LATENT of the
# small model means what it means for the real one); GroupNorm in groups of 4 channels, as the real VAE's.
SMALL_VAE = AutoEncoderParams(ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1, norm_groups=8)
# 4 heads of 32 (RoPE axes (4, 14, 14) by the default rule), 4 double + 12 single blocks, guidance embedding.
# (Trained as 2 + 6 blocks, then grown: `train_flux --deepen`.) Shipped with scaled-fp8 block weights
# (`store_fp8`), which is what fits this depth in 5 MiB; loaders dequantize them for fp32 compute.
_NARROW = dataclasses.replace(FLUX_KONTEXT_DEV, vec_in_dim=64, context_in_dim=64, hidden_size=128, mlp_ratio=2.0)
SMALL_FLUX = dataclasses.replace(_NARROW, num_heads=4, depth=4, depth_single_blocks=12, axes_dim=[4, 14, 14])
# T5 pads every prompt to this many tokens (the tokenizer's model_max_length), as the real one pads to 512.
SMALL_T5_LENGTH = 48


def load_default_pipeline(
    *, device: torch.device | str = "cpu", folder: str | os.PathLike[str] | None = None
) -> KontextPipeline:
    """The shipped small model as a `KontextPipeline` (fp32): it edits the synthetic scenes of
    `kontext_core.synthetic.tasks` at their own size (references keep their size: `resize="keep"`). `folder` loads the
    same six files (`small_model_files`) from another folder, such as a newly trained model's."""
    from kontext_core.checkpoints.autoencoder import load_vae
    from kontext_core.checkpoints.transformer import load_transformer
    from kontext_core.pipeline import KontextPipeline
    from kontext_core.checkpoints.tokenizers import load_text_encoder

    files = small_model_files(WEIGHTS_DIR if folder is None else folder)
    if missing := files.missing():
        # A missing shipped file means a broken install; a missing file in the caller's folder means a wrong folder.
        remedy = "reinstall the package" if folder is None else "folder= must hold every file of small_model_files"
        raise FileNotFoundError(f"the small model's files are missing: {', '.join(map(str, missing))}; {remedy}")
    pipeline = KontextPipeline(
        load_transformer(files.transformer, device=device, dtype=torch.float32),
        load_vae(files.vae, device=device, dtype=torch.float32),
        load_text_encoder(
            files.t5,
            files.clip,
            files.t5_tokenizer,
            files.clip_tokenizer,
            SMALL_T5_LENGTH,
            device=device,
            dtype=torch.float32,
        ),
    )
    pipeline.default_resize = "keep"
    return pipeline
