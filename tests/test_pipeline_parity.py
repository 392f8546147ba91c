"""The whole edit against diffusers' FluxKontextPipeline: same tiny random components, same injected noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import randomize_, tiny_flux_model

from kontext_core import load_vae
from kontext_core.pipeline import KontextPipeline
from kontext_core.sampling import pack

diffusers = pytest.importorskip("diffusers")
from reference_mappings import diffusers_twin  # noqa: E402


class FixedText:
    """A text encoder stand-in: both pipelines get the very same embeddings."""

    def __init__(self, txt: torch.Tensor, y: torch.Tensor):
        self.txt, self.y = txt, y

    def encode(self, prompts):
        n = 1 if isinstance(prompts, str) else len(prompts)
        return self.txt.expand(n, -1, -1), self.y.expand(n, -1)


def tiny_autoencoder_kl(seed: int = 0):
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159, sample_size=64,
    )  # fmt: skip
    randomize_(vae, seed, std=0.1)
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
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
        use_dynamic_shifting=True,
    )  # fmt: skip
    return diffusers.FluxKontextPipeline(
        scheduler=scheduler, vae=vae_kl, text_encoder=None, tokenizer=None, text_encoder_2=None,
        tokenizer_2=None, transformer=diffusers_twin(model),
    )  # fmt: skip


@torch.no_grad()
def test_edit_matches_diffusers_kontext_pipeline(components):
    model, vae_kl, vae, text = components
    image = scene(96, 64)  # non-square, sides multiples of 16: both pipelines keep the size
    noise = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(3))

    ours = KontextPipeline(model, vae, text).edit(image, "anything", steps=3, guidance=2.5, noise=noise, resize="keep")
    theirs = diffusers_pipe(model, vae_kl)(
        image=image, prompt_embeds=text.txt, pooled_prompt_embeds=text.y, width=96, height=64,
        num_inference_steps=3, guidance_scale=2.5, latents=pack(noise), _auto_resize=False, output_type="pil",
    ).images[0]  # fmt: skip

    a = np.asarray(ours, dtype=np.int16)
    b = np.asarray(theirs, dtype=np.int16)
    unsaturated = ((b > 0) & (b < 255)).mean()
    err = np.abs(a - b).max()
    print(f"whole edit vs diffusers: max abs {err}/255, mean abs {np.abs(a - b).mean():.4f}, unsaturated {unsaturated:.2f}")
    assert ours.size == (96, 64)
    assert unsaturated > 0.5  # a clipped image would hide differences
    assert err <= 2


@torch.no_grad()
def test_reference_changes_the_edit(components):
    """The parity above must depend on the reference: a different picture gives a different edit."""
    model, _, vae, text = components
    pipe = KontextPipeline(model, vae, text)
    noise = torch.randn(1, 16, 8, 12, generator=torch.Generator().manual_seed(3))
    a = np.asarray(pipe.edit(scene(96, 64), "x", steps=2, noise=noise, resize="keep"), dtype=np.int16)
    b = np.asarray(pipe.edit(scene(96, 64).transpose(Image.FLIP_LEFT_RIGHT), "x", steps=2, noise=noise, resize="keep"), dtype=np.int16)
    assert np.abs(a - b).max() > 2


@torch.no_grad()
def test_generate_matches_diffusers_flux_pipeline(components):
    model, vae_kl, vae, text = components
    noise = torch.randn(1, 16, 6, 10, generator=torch.Generator().manual_seed(4))
    ours = KontextPipeline(model, vae, text).generate("x", width=80, height=48, steps=3, noise=noise)
    pipe = diffusers_pipe(model, vae_kl)
    theirs = pipe(
        prompt_embeds=text.txt, pooled_prompt_embeds=text.y, width=80, height=48, num_inference_steps=3,
        guidance_scale=2.5, latents=pack(noise), max_area=80 * 48, output_type="pil",
    ).images[0]  # fmt: skip
    err = np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(theirs, dtype=np.int16)).max()
    print(f"text-to-image vs diffusers: max abs {err}/255")
    assert err <= 2
