"""The FLUX VAE: parity with diffusers' AutoencoderKL, every file layout, the real manifest, bad files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import randomize_

from kontext_core import load_vae
from kontext_core.autoencoder import AutoEncoder
from kontext_core.checkpoints import CheckpointError
from kontext_core.checkpoints.autoencoder import diffusers_vae_key_to_bfl
from kontext_core.config import AutoEncoderParams

diffusers = pytest.importorskip("diffusers")

SCALE, SHIFT = 0.3611, 0.1159


def read_manifest(name: str) -> dict[str, tuple[int, ...]]:
    from pathlib import Path

    rows = (Path(__file__).parent / "data" / name).read_text().splitlines()[1:]
    return {k: tuple(int(x) for x in s.strip("[]").split(",") if x.strip()) for k, s, *_ in (r.split("\t") for r in rows)}


def tiny_kl(seed: int = 0):
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=SCALE, shift_factor=SHIFT, sample_size=64,
    )  # fmt: skip
    return randomize_(vae, seed, std=0.1).eval()


@pytest.fixture(scope="module")
def kl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    kl = tiny_kl()
    kl.save_pretrained(folder, safe_serialization=True)
    return kl, folder


def image(h: int = 48, w: int = 80, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@torch.no_grad()
def test_encode_decode_match_diffusers(kl_folder):
    kl, folder = kl_folder
    ours = load_vae(folder)
    x = image()
    z = ours.encode(x)
    z_ref = (kl.encode(x).latent_dist.mean - SHIFT) * SCALE
    enc_err = (z - z_ref).abs().max().item()
    dec = ours.decode(z_ref)
    dec_ref = kl.decode(z_ref / SCALE + SHIFT).sample
    dec_err = (dec - dec_ref).abs().max().item()
    print(f"VAE encode max abs {enc_err:.2e}, decode max abs {dec_err:.2e}")
    assert z.shape == (1, 16, 6, 10)
    assert enc_err <= 1e-4
    assert dec_err <= 1e-5


@torch.no_grad()
def test_raw_latents_are_unscaled(kl_folder):
    _, folder = kl_folder
    vae = load_vae(folder)
    x = image(32, 32, seed=1)
    assert torch.allclose(vae.encode(x), (vae.encode_raw(x) - SHIFT) * SCALE, atol=1e-6)
    z = torch.randn(1, 16, 4, 4)
    assert torch.allclose(vae.decode(z), vae.decode_raw(z / SCALE + SHIFT), atol=1e-6)


def _bfl_state(kl) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in kl.state_dict().items():
        ours = diffusers_vae_key_to_bfl(key, 4)
        out[ours] = value[..., None, None] if value.ndim == 2 else value
    return out


@torch.no_grad()
def test_every_layout_loads_the_same(kl_folder, tmp_path):
    kl, folder = kl_folder
    state = {k: v.contiguous() for k, v in _bfl_state(kl).items()}
    save_file(state, tmp_path / "ae.safetensors")
    save_file({f"first_stage_model.{k}": v for k, v in state.items()} | {"model.diffusion_model.x": torch.zeros(1)},
              tmp_path / "full.safetensors")  # fmt: skip
    x = image(32, 48, seed=2)
    expected = load_vae(folder).encode(x)
    for name in ("ae.safetensors", "full.safetensors"):
        assert torch.equal(load_vae(tmp_path / name).encode(x), expected), name
    half = load_vae(tmp_path / "ae.safetensors", dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_real_config_matches_manifest():
    with torch.device("meta"):
        vae = AutoEncoder(AutoEncoderParams())
    ours = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert ours == read_manifest("flux_ae_keys.tsv")


def test_diffusers_manifest_maps_onto_bfl_manifest():
    theirs = read_manifest("flux_ae_keys_diffusers.tsv")
    mapped = {}
    for key, shape in theirs.items():
        ours = diffusers_vae_key_to_bfl(key, 4)
        mapped[ours] = (*shape, 1, 1) if len(shape) == 2 else shape
    assert mapped == read_manifest("flux_ae_keys.tsv")


@torch.no_grad()
def test_tiled_decode_close_to_plain(kl_folder):
    _, folder = kl_folder
    vae = load_vae(folder)
    z = torch.randn(1, 16, 24, 40, generator=torch.Generator().manual_seed(3))
    plain = vae.decode(z)
    tiled = vae.decode(z, tile=16)
    assert tiled.shape == plain.shape
    # tiles see less context at their borders; blending keeps the error small, not zero
    rel = ((tiled - plain).norm() / plain.norm()).item()
    assert 0 < rel < 0.15, rel


def test_sd_vae_refused(tmp_path):
    kl4 = diffusers.AutoencoderKL(
        latent_channels=4, block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
    )  # fmt: skip
    kl4.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(CheckpointError, match="4 latent channels.*SD1"):
        load_vae(tmp_path)


def test_transformer_passed_as_vae_refused(tmp_path):
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 2)}, tmp_path / "flux.safetensors")
    with pytest.raises(CheckpointError, match="transformer"):
        load_vae(tmp_path / "flux.safetensors")


def test_missing_keys_listed(kl_folder, tmp_path):
    kl, _ = kl_folder
    state = {k: v.contiguous() for k, v in _bfl_state(kl).items() if not k.startswith("decoder.up.0.block.1.")}
    save_file(state, tmp_path / "ae.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \(\d+\): decoder\.up\.0\.block\.1\."):
        load_vae(tmp_path / "ae.safetensors")


def test_bad_input_sizes(kl_folder):
    _, folder = kl_folder
    vae = load_vae(folder)
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="latent"):
        vae.decode(torch.zeros(1, 4, 4, 4))
