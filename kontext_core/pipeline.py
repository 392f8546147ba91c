"""The whole path from images and text to images: edit (with references) and generate (text only)."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from kontext_core.model.autoencoder import AutoEncoder
from kontext_core.model.flux import Flux
from kontext_core.resize import RESIZE_MODES, resize_to_kontext
from kontext_core.sampling import SamplingOptions, StepInfo, get_noise, sample


class TextEncoder(Protocol):
    def encode(self, prompts: str | list[str]) -> tuple[Tensor, Tensor]: ...


# Pixels go k/255 → ×2 − 1 in and (x + 1)/2 → ×255, rounded, out, in float32 and in that order: the same
# operations as ComfyUI's LoadImage, our VAE nodes and save node, and diffusers' image processor, so the
# library and a graph give the same 8-bit images (k/127.5 − 1 differs from k/255·2 − 1 in the last bit).


def image_to_tensor(image: Image.Image) -> Tensor:
    """PIL image → 1×3×H×W in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0


def tensor_to_images(x: Tensor) -> list[Image.Image]:
    """B×3×H×W in [-1, 1] → PIL images, rounded to the nearest 8-bit value."""
    x = (((x.float().clamp(-1, 1) + 1.0) / 2.0) * 255.0).round().to(torch.uint8)
    return [Image.fromarray(img.permute(1, 2, 0).cpu().numpy()) for img in x]


def _round16(value: int, name: str) -> int:
    if value < 16:
        raise ValueError(f"{name} must be at least 16 pixels, got {value}")
    return value // 16 * 16


@dataclass
class _Request:
    """What one call asks for, apart from how it samples (`SamplingOptions`) and its references."""

    prompt: str | list[str]
    width: int
    height: int
    seed: int
    noise: Tensor | None
    negative_prompt: str | list[str] | None
    num_images: int

    def __post_init__(self) -> None:
        self.prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        if not self.prompts or not all(isinstance(p, str) for p in self.prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        if self.num_images < 1:
            raise ValueError(f"num_images must be at least 1, got {self.num_images}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if len(self.prompts) > 1 and self.num_images not in (1, len(self.prompts)):
            raise ValueError(
                f"got {len(self.prompts)} prompts and num_images={self.num_images}: give one prompt or one image each"
            )

    def noise_on(self, device: torch.device) -> Tensor:
        """The seeded noise, or the given one checked against the size and batch asked for."""
        batch = max(len(self.prompts), self.num_images)
        if self.noise is None:
            return get_noise(batch, self.height, self.width, self.seed, device=device)
        expected = (16, self.height // 8, self.width // 8)
        if self.noise.ndim != 4 or tuple(self.noise.shape[1:]) != expected:
            raise ValueError(
                f"noise must have shape B×{expected[0]}×{expected[1]}×{expected[2]}, got {tuple(self.noise.shape)}"
            )
        if batch > 1 and self.noise.shape[0] != batch:
            raise ValueError(
                f"noise has {self.noise.shape[0]} rows but {batch} images were asked for (prompts, num_images)"
            )
        return self.noise.to(device, torch.float32)


class KontextPipeline:
    """FLUX.1 Kontext: a transformer, the VAE and any text encoder with `encode(prompts) -> (txt, y)`."""

    # How references are sized when `edit` is not told: the real model works at Kontext's preferred
    # resolutions; the small model (`load_default_pipeline`) at the scenes' own sizes ("keep").
    default_resize = "stretch"

    def __init__(self, transformer: Flux, vae: AutoEncoder, text_encoder: TextEncoder):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def _vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> list[Tensor]:
        """Model-space latents of images whose sides are multiples of 16."""
        vae_device = next(self.vae.parameters()).device
        return [
            self.vae.encode(image_to_tensor(img).to(vae_device, self._vae_dtype())).float().to(self.device)
            for img in images
        ]

    @torch.no_grad()
    def decode(self, z: Tensor) -> list[Image.Image]:
        vae_device = next(self.vae.parameters()).device
        return tensor_to_images(self.vae.decode(z.to(vae_device, self._vae_dtype())))

    @torch.no_grad()
    def edit(
        self,
        image: Image.Image | Sequence[Image.Image],
        prompt: str | list[str],
        *,
        steps: int = 28,
        guidance: float = 2.5,
        seed: int = 0,
        width: int | None = None,
        height: int | None = None,
        noise: Tensor | None = None,
        reference_method: str = "offset",
        resize: str | None = None,
        negative_prompt: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        num_images: int = 1,
        callback: Callable[[StepInfo], None] | None = None,
        reference_cache_every: int = 0,
    ) -> Image.Image | list[Image.Image]:
        """Edit `image` (or several references) following `prompt`; one image, or a list for a batch.

        The output defaults to the first reference's size after `resize` ("stretch": the nearest preferred
        Kontext resolution as BFL and diffusers do; "crop": ComfyUI's center crop; "keep": own size
        rounded to 16; None: the pipeline's `default_resize`). `noise` (B×16×H/8×W/8, model space) overrides the seeded noise.
        """
        options = SamplingOptions(
            steps=steps,
            guidance=guidance,
            true_cfg_scale=true_cfg_scale,
            reference_method=reference_method,
            reference_cache_every=reference_cache_every,
        )
        images = [image] if isinstance(image, Image.Image) else list(image)
        if not images or not all(isinstance(i, Image.Image) for i in images):
            raise ValueError("image must be a PIL image or a non-empty list of PIL images")
        resize = self.default_resize if resize is None else resize
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        # RGB first, as BFL and diffusers: Pillow resizes palette and 1-bit images with NEAREST, RGBA alpha-weighted
        references = [resize_to_kontext(img.convert("RGB"), resize) for img in images]
        width = _round16(width if width is not None else references[0].width, "width")
        height = _round16(height if height is not None else references[0].height, "height")
        request = _Request(prompt, width, height, seed, noise, negative_prompt, num_images)
        return self._run(request, options, self.encode_images(references), callback)

    @torch.no_grad()
    def generate(
        self,
        prompt: str | list[str],
        *,
        width: int,
        height: int,
        steps: int = 28,
        guidance: float = 2.5,
        seed: int = 0,
        noise: Tensor | None = None,
        negative_prompt: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        num_images: int = 1,
        callback: Callable[[StepInfo], None] | None = None,
    ) -> Image.Image | list[Image.Image]:
        """Text to image at width×height (rounded down to multiples of 16)."""
        options = SamplingOptions(steps=steps, guidance=guidance, true_cfg_scale=true_cfg_scale)
        width, height = _round16(width, "width"), _round16(height, "height")
        request = _Request(prompt, width, height, seed, noise, negative_prompt, num_images)
        return self._run(request, options, [], callback)

    def _run(
        self,
        request: _Request,
        options: SamplingOptions,
        references: list[Tensor],
        callback: Callable[[StepInfo], None] | None,
    ) -> Image.Image | list[Image.Image]:
        noise = request.noise_on(self.device)
        txt, y = self.text_encoder.encode(request.prompts)
        negative = None  # true CFG without a negative prompt is refused by `sample`
        if request.negative_prompt is not None and options.true_cfg_scale != 1.0:
            negatives = request.negative_prompt
            negative = self.text_encoder.encode([negatives] if isinstance(negatives, str) else list(negatives))
        latent = sample(
            self.transformer, noise, txt, y, options, references=references, negative=negative, callback=callback
        )
        images = self.decode(latent)
        return images[0] if len(images) == 1 else images
