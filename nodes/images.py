"""Pixels and latents: Kontext-friendly resizing, VAE encode/decode, and loading a folder one image per run."""

from __future__ import annotations

import fnmatch
import os

import numpy as np
import torch
from PIL import Image, ImageOps

from kontext_core.recomposite import DEFAULT_GROW, DEFAULT_THRESHOLD, keep_unchanged
from kontext_core.resize import RESIZE_MODES, resize_to_kontext

from . import _comfy
from ._spec import Input, KontextNode, Output, image_input, latent_input

CATEGORY = "Kontext Core/image"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def _vae_place(node: type, vae, method: str) -> tuple[torch.device, torch.dtype]:
    """Where `vae` runs, after checking it is a KONTEXT_VAE (it has `method`) for `node`'s input 'vae'."""
    if not hasattr(vae, method):
        raise ValueError(f"{node.NODE_ID}: input 'vae' must be a KONTEXT_VAE")
    param = next(vae.parameters())
    return param.device, param.dtype


class KontextCoreImageScale(KontextNode):
    NODE_ID = "KontextCoreImageScale"
    DISPLAY_NAME = "Kontext Image Scale"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Resizes an image to a size Kontext was trained on: 'stretch' to the nearest preferred resolution "
        "(BFL/diffusers), 'crop' center-crops to it (ComfyUI's FluxKontextImageScale), 'keep' only rounds "
        "each side to a multiple of 16."
    )
    INPUTS = (
        Input("image", "IMAGE", "The image (batch) to resize."),
        Input(
            "mode",
            "COMBO",
            "'stretch' keeps all content but may distort slightly; 'crop' keeps proportions "
            "but trims the edges; 'keep' keeps the size (rounded to 16).",
            default="stretch",
            options=RESIZE_MODES,
        ),
    )
    OUTPUTS = (Output("IMAGE", "image", "The resized image."),)

    @classmethod
    def run(cls, image, mode: str = "stretch"):
        return (resize_to_kontext(image_input(cls, "image", image), mode),)


class KontextCoreKeepUnchanged(KontextNode):
    NODE_ID = "KontextCoreKeepUnchanged"
    DISPLAY_NAME = "Kontext Keep Unchanged"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Puts the original's pixels back wherever the edit did not visibly change them, so an image edited round "
        "after round drifts less (colours, detail) outside what each instruction changed. The edited region is "
        "found by comparing the two images: no mask to draw. The output is RGB (an alpha channel is dropped)."
    )
    INPUTS = (
        Input(
            "original",
            "IMAGE",
            "The image that was edited, at the edited image's size (the Kontext Image Scale "
            "output that went into the edit).",
        ),
        Input("edited", "IMAGE", "The edited image (from Kontext VAE Decode)."),
        Input(
            "threshold",
            "INT",
            "A pixel counts as changed when a colour channel moved by more than this many "
            "8-bit levels. Lower keeps less of the original.",
            default=DEFAULT_THRESHOLD,
            min=0,
            max=255,
        ),
        Input(
            "grow",
            "INT",
            "Pixels added around the changed region, so the edit's soft edges come from the edited image.",
            default=DEFAULT_GROW,
            min=0,
            max=64,
        ),
    )
    OUTPUTS = (
        Output("IMAGE", "image", "The edited image with the original's unchanged pixels."),
        Output("MASK", "changed", "1 where the pixels come from the edited image."),
    )

    @classmethod
    def run(cls, original, edited, threshold: int = DEFAULT_THRESHOLD, grow: int = DEFAULT_GROW):
        original, edited = image_input(cls, "original", original), image_input(cls, "edited", edited)
        if original.shape[1:3] != edited.shape[1:3]:
            raise ValueError(
                f"{cls.NODE_ID}: input 'original' is {original.shape[2]}×{original.shape[1]} pixels and 'edited' "
                f"{edited.shape[2]}×{edited.shape[1]}; connect the scaled image that went into the edit"
            )
        if original.shape[0] not in (1, edited.shape[0]):
            raise ValueError(
                f"{cls.NODE_ID}: input 'original' holds {original.shape[0]} images; expected 1, or as "
                f"many as 'edited' ({edited.shape[0]})"
            )
        before, after = (x[..., :3].movedim(-1, 1).float() for x in (original, edited))
        image, changed = keep_unchanged(before, after, threshold=threshold, grow=grow)
        return image.movedim(1, -1), changed


class KontextCoreVAEEncode(KontextNode):
    NODE_ID = "KontextCoreVAEEncode"
    DISPLAY_NAME = "Kontext VAE Encode"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Encodes an image to a FLUX LATENT (raw VAE space, like ComfyUI's VAE Encode). Sides that are not "
        "multiples of 16 are center-cropped; use Kontext Image Scale first to resize instead."
    )
    INPUTS = (
        Input("vae", "KONTEXT_VAE", "From Kontext VAE Loader."),
        Input("pixels", "IMAGE", "The image (batch) to encode."),
    )
    OUTPUTS = (Output("LATENT", "latent", "16-channel latent, 1/8 of the image size."),)

    @classmethod
    def run(cls, vae, pixels):
        pixels = image_input(cls, "pixels", pixels)
        device, dtype = _vae_place(cls, vae, "encode_raw")
        height, width = pixels.shape[1] // 16 * 16, pixels.shape[2] // 16 * 16
        if height == 0 or width == 0:
            raise ValueError(f"{cls.NODE_ID}: input 'pixels' must be at least 16×16, got {tuple(pixels.shape)}")
        top, left = (pixels.shape[1] - height) // 2, (pixels.shape[2] - width) // 2
        pixels = pixels[:, top : top + height, left : left + width, :3]
        with torch.no_grad():
            # contiguous NCHW, as the library passes it: a channels-last view takes another convolution kernel,
            # which moves the latent in the last bits and the decoded image by a level here and there
            x = pixels.to(device, dtype).movedim(-1, 1).contiguous() * 2.0 - 1.0
            return ({"samples": vae.encode_raw(x).float().cpu()},)


class KontextCoreVAEDecode(KontextNode):
    NODE_ID = "KontextCoreVAEDecode"
    DISPLAY_NAME = "Kontext VAE Decode"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Decodes a FLUX LATENT (raw VAE space) to an image, in 8-bit levels as a saved PNG holds it, so an image "
        "edited again from its saved file starts from the very pixels the graph passed on."
    )
    INPUTS = (
        Input("vae", "KONTEXT_VAE", "From Kontext VAE Loader."),
        Input("samples", "LATENT", "The latent to decode, e.g. from Kontext Sampler."),
    )
    OUTPUTS = (Output("IMAGE", "image", "The decoded image, [B, H, W, 3] in 0..1."),)

    @classmethod
    def run(cls, vae, samples):
        raw = latent_input(cls, "samples", samples)
        device, dtype = _vae_place(cls, vae, "decode_raw")
        with torch.no_grad():
            x = vae.decode_raw(raw.to(device, dtype)).float()
            image = ((x.clamp(-1.0, 1.0) + 1.0) / 2.0).movedim(1, -1).cpu()
            # k/255 exactly, as LoadImage reads a saved round back: a round chained in the graph and one made
            # from the saved file (the editor's Edit again) then edit the same pixels
            return ((image * 255.0).round() / 255.0,)


def folder_images(folder: str, pattern: str) -> tuple[str, list[str]]:
    """The folder (inside ComfyUI's input folder) and its image files matching `pattern`, sorted by name."""
    root = os.path.realpath(_comfy.input_directory())
    path = os.path.realpath(os.path.join(root, folder))
    if os.path.isabs(folder) or os.path.commonpath([root, path]) != root:
        raise ValueError(f"input 'folder' must be a folder inside ComfyUI's input folder, got {folder!r}")
    if not os.path.isdir(path):
        raise ValueError(f"input 'folder': {folder!r} is not a folder in ComfyUI's input folder ({root})")
    if not pattern or "/" in pattern or "\\" in pattern or ".." in pattern:
        raise ValueError(f"input 'pattern' must be a file-name pattern such as '*.png', got {pattern!r}")
    files = sorted(
        name
        for name in os.listdir(path)
        if fnmatch.fnmatch(name.lower(), pattern.lower())
        and name.lower().endswith(IMAGE_EXTENSIONS)
        and os.path.isfile(os.path.join(path, name))
    )
    return path, files


class KontextCoreLoadImageBatch(KontextNode):
    NODE_ID = "KontextCoreLoadImageBatch"
    DISPLAY_NAME = "Kontext Load Image From Folder"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Loads the index-th image (sorted by name) of a folder inside ComfyUI's input folder, so a batch "
        "client can queue one prompt per image by changing only the index."
    )
    INPUTS = (
        Input(
            "folder",
            "STRING",
            "Folder relative to ComfyUI's input folder (e.g. 'batch'); paths outside it are refused.",
            default="batch",
        ),
        Input("pattern", "STRING", "File-name pattern, e.g. '*.png' or 'shot_*'. Only image files count.", default="*"),
        Input("index", "INT", "Which image, counting from 0 in name order.", default=0, min=0, max=100_000),
    )
    OUTPUTS = (
        Output("IMAGE", "image", "The image, [1, H, W, 3] in 0..1."),
        Output("STRING", "filename", "Its file name without extension (use it as the save prefix)."),
        Output("INT", "count", "How many images the folder holds for the pattern."),
    )

    @classmethod
    def fingerprint_inputs(cls, folder: str, pattern: str = "*", index: int = 0):
        """The chosen file's name, size and time, and the match count: ComfyUI reruns the node when a file is
        replaced or added, not only when an input changes (core LoadImage hashes its file for the same reason)."""
        try:
            path, files = folder_images(folder, pattern)
        except ValueError:
            return float("nan")  # never equal to itself: the node runs and `run` names the bad input
        if not 0 <= index < len(files):
            return float("nan")
        stat = os.stat(os.path.join(path, files[index]))
        return files[index], stat.st_size, stat.st_mtime_ns, len(files)

    @classmethod
    def run(cls, folder: str, pattern: str = "*", index: int = 0):
        path, files = folder_images(folder, pattern)
        if index >= len(files):
            raise ValueError(
                f"input 'index' is {index} but {folder!r} holds {len(files)} image(s) matching {pattern!r}"
            )
        with Image.open(os.path.join(path, files[index])) as image:
            rgb = ImageOps.exif_transpose(image).convert("RGB")
        pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0)[None]
        return (pixels, os.path.splitext(files[index])[0], len(files))


NODES = [
    KontextCoreImageScale,
    KontextCoreKeepUnchanged,
    KontextCoreVAEEncode,
    KontextCoreVAEDecode,
    KontextCoreLoadImageBatch,
]
