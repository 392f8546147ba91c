"""The whole edit against diffusers' FluxKontextPipeline: same tiny random components, same injected noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tests.helpers.tiny_models import randomize_, tiny_flux_model

from kontext_core import load_vae
from kontext_core.pipeline import KontextPipeline
from kontext_core.sampling import pack, unpack

diffusers = pytest.importorskip("diffusers")
from tests.helpers.diffusers_models import flux_like_kl, kontext_pipeline  # noqa: E402 (after the skip: imports diffusers)
from tests.helpers.reference_mappings import diffusers_twin  # noqa: E402


class FixedText:
    """A text encoder stand-in: both pipelines get the very same embeddings."""

    def __init__(self, txt: torch.Tensor, y: torch.Tensor):
        self.txt, self.y = txt, y

    def encode(self, prompts):
        n = 1 if isinstance(prompts, str) else len(prompts)
        return self.txt.expand(n, -1, -1), self.y.expand(n, -1)


def tiny_autoencoder_kl(seed: int = 0):
    vae = flux_like_kl((32, 32, 64, 64), 1)
    randomize_(vae, seed, std=0.2)  # large enough that decoded images span a good range
    return vae.eval()


def scene(width: int, height: int) -> Image.Image:
    """A deterministic picture with edges and gradients, not noise, so the VAE sees structure."""
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // width, yy * 255 // height, ((xx // 16 + yy // 16) % 2) * 200], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    vae_kl = tiny_autoencoder_kl()
    vae_kl.save_pretrained(folder, safe_serialization=True)
    model = tiny_flux_model(seed=11)
    gen = torch.Generator().manual_seed(5)
    txt = torch.randn(1, 9, model.params.context_in_dim, generator=gen)
    y = torch.randn(1, model.params.vec_in_dim, generator=gen)
    return model, vae_kl, load_vae(folder), FixedText(txt, y)


def diffusers_pipe(model, vae_kl):
    return kontext_pipeline(diffusers_twin(model), vae_kl)


def _diffusers_args(text, noise, width: int, height: int) -> dict:
    """What diffusers takes for our precomputed text and noise: 3 steps at guidance 2.5, as our side runs."""
    embeds = {"prompt_embeds": text.txt, "pooled_prompt_embeds": text.y, "latents": pack(noise)}
    size = {"width": width, "height": height, "max_area": width * height}
    return {**embeds, **size, "num_inference_steps": 3, "guidance_scale": 2.5}


def _final_latent(pipe_call):
    """Run our pipeline and keep the last step's latent, as well as the image."""
    seen = []
    image = pipe_call(callback=seen.append)
    return image, seen[-1].latent


@torch.no_grad()
def test_edit_matches_diffusers_kontext_pipeline(components):
    model, vae_kl, vae, text = components
    image = scene(96, 64)  # non-square, sides multiples of 16: both pipelines keep the size
    noise = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(3))
    ours = KontextPipeline(model, vae, text)
    args = dict(steps=3, guidance=2.5, noise=noise, resize="keep")
    ours_image, ours_latent = _final_latent(lambda callback: ours.edit(image, "anything", callback=callback, **args))

    pipe = diffusers_pipe(model, vae_kl)
    common = {"image": image, "_auto_resize": False, **_diffusers_args(text, noise, 96, 64)}
    theirs_latent = unpack(pipe(**common, output_type="latent").images, 8, 12)
    theirs_image = pipe(**common, output_type="pil").images[0]

    latent_err = (ours_latent - theirs_latent).abs().max().item()
    a = np.asarray(ours_image, dtype=np.int16)
    b = np.asarray(theirs_image, dtype=np.int16)
    err = np.abs(a - b).max()
    unsaturated = ((b > 0) & (b < 255)).mean()
    print(
        f"whole edit vs diffusers: latent max abs {latent_err:.2e} (latent max {theirs_latent.abs().max():.2f}); "
        f"image max abs {err}/255, mean {np.abs(a - b).mean():.4f}/255, unsaturated pixels {unsaturated:.2f}"
    )
    assert ours_image.size == (96, 64)
    assert unsaturated > 0.5  # a clipped image would hide differences
    assert err <= 2
    # fp32 (≈1e-5 relative) through 3 steps; the two differ in where sigmas and pixels are rounded
    assert latent_err <= 1e-5 * theirs_latent.abs().max().item()

    # the comparison above must be sensitive to the reference: a mirrored picture moves the latent far more
    _, mirrored = _final_latent(
        lambda callback: ours.edit(image.transpose(Image.FLIP_LEFT_RIGHT), "anything", callback=callback, **args)
    )
    assert (mirrored - ours_latent).abs().max().item() > 100 * max(latent_err, 1e-7)


@torch.no_grad()
def test_generate_matches_diffusers_flux_pipeline(components):
    model, vae_kl, vae, text = components
    noise = torch.randn(1, 16, 6, 10, generator=torch.Generator().manual_seed(4))
    ours = KontextPipeline(model, vae, text).generate("x", width=80, height=48, steps=3, noise=noise)
    pipe = diffusers_pipe(model, vae_kl)
    theirs = pipe(**_diffusers_args(text, noise, 80, 48), output_type="pil").images[0]
    b = np.asarray(theirs, dtype=np.int16)
    err = np.abs(np.asarray(ours, dtype=np.int16) - b).max()
    print(f"text-to-image vs diffusers: max abs {err}/255")
    assert ((b > 0) & (b < 255)).mean() > 0.5
    assert err <= 2
