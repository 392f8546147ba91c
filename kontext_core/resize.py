"""Fitting input images to the sizes Kontext handles well, for PIL images and ComfyUI IMAGE tensors.

"stretch": LANCZOS to the preferred resolution nearest in aspect (BFL, diffusers).
"crop":    center-crop to that resolution's aspect, then LANCZOS to it (ComfyUI's FluxKontextImageScale).
"keep":    each side rounded to a multiple of 16 (ComfyUI's ReferenceLatent keeps the image's own size).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from kontext_core.model.config import nearest_kontext_resolution

RESIZE_MODES = ("stretch", "crop", "keep")


def kontext_size(width: int, height: int, mode: str = "stretch") -> tuple[int, int]:
    """The (width, height) `resize_to_kontext` gives an image of this size."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if mode == "keep":
        # half rounds up (not Python's to-even), so a side of 40 gives 48 like 24 gives 32
        return max(16, int(width / 16 + 0.5) * 16), max(16, int(height / 16 + 0.5) * 16)
    return nearest_kontext_resolution(width, height)


def crop_box(width: int, height: int, target_width: int, target_height: int) -> tuple[int, int, int, int]:
    """The centered (left, top, right, bottom) box of `width`×`height` with the target's aspect ratio."""
    old, new = width / height, target_width / target_height
    x = round((width - width * (new / old)) / 2) if old > new else 0
    y = round((height - height * (old / new)) / 2) if old < new else 0
    return x, y, width - x, height - y


def resize_to_kontext(image: Image.Image | torch.Tensor, mode: str = "stretch") -> Image.Image | torch.Tensor:
    """`image` resized by `mode`; a tensor is ComfyUI's IMAGE layout [B, H, W, C] (or [H, W, C]) in 0..1."""
    if isinstance(image, Image.Image):
        return _resize_pil(image, mode)
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"image must be a PIL image or an IMAGE tensor [B, H, W, C], got {type(image).__name__}")
    if image.ndim == 3:
        return resize_to_kontext(image[None], mode)[0]
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image tensor must be [B, H, W, C] with 1, 3 or 4 channels, got {tuple(image.shape)}")
    height, width = image.shape[1:3]
    if kontext_size(width, height, mode) == (width, height) and mode != "crop":
        return image
    # Through 8-bit PIL like BFL (PIL input) and ComfyUI (its lanczos), so all three agree on the pixels.
    pixels = np.clip(image.detach().float().cpu().numpy() * 255.0, 0, 255).round().astype(np.uint8)
    out = [np.asarray(_resize_pil(Image.fromarray(_squeeze_gray(p)), mode)) for p in pixels]
    stacked = torch.from_numpy(np.stack(out)).float().div(255.0)
    if stacked.ndim == 3:
        stacked = stacked[..., None]
    return stacked.to(device=image.device, dtype=image.dtype)


def _squeeze_gray(pixels: np.ndarray) -> np.ndarray:
    return pixels[..., 0] if pixels.shape[-1] == 1 else pixels


def _resize_pil(image: Image.Image, mode: str) -> Image.Image:
    width, height = kontext_size(image.width, image.height, mode)
    if mode == "crop":
        image = image.crop(crop_box(image.width, image.height, width, height))
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)
