"""The FLUX VAE: parity with diffusers' AutoencoderKL, every file layout, the real manifests, tiling, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tests.helpers.tiny_models import randomize_

from kontext_core import load_vae

from kontext_core.model import autoencoder
from kontext_core.model.autoencoder import AutoEncoder, decode_tiled
from kontext_core.checkpoints import CheckpointError
from kontext_core.checkpoints.autoencoder import diffusers_vae_key_to_bfl, is_vae_checkpoint
from kontext_core.model.config import AutoEncoderParams

diffusers = pytest.importorskip("diffusers")
from tests.helpers.diffusers_models import VAE_SCALE, VAE_SHIFT, flux_like_kl  # noqa: E402 (after the skip)

DATA = Path(__file__).parent / "data"


def read_manifest(name: str) -> dict[str, tuple[int, ...]]:
    rows = (DATA / name).read_text().splitlines()[1:]
    return {
        k: tuple(int(x) for x in s.strip("[]").split(",") if x.strip()) for k, s, *_ in (r.split("\t") for r in rows)
    }


def tiny_kl(seed: int = 0, **extra) -> torch.nn.Module:
    # distinct widths per level, so a decoder level read from the wrong `up.{i}` cannot even load
    return randomize_(flux_like_kl((32, 64, 96, 96), 1, **extra), seed, std=0.1).eval()


def bfl_state(kl: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in kl.state_dict().items():
        ours = diffusers_vae_key_to_bfl(key, 4)
        out[ours] = (value[..., None, None] if value.ndim == 2 else value).contiguous()
    return out


@pytest.fixture(scope="module")
def kl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    kl = tiny_kl()
    kl.save_pretrained(folder, safe_serialization=True)
    return kl, folder


@pytest.fixture(scope="module")
def vae(kl_folder) -> AutoEncoder:
    return load_vae(kl_folder[1])


def images(b: int = 1, h: int = 48, w: int = 80, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@torch.no_grad()
def test_encode_decode_match_diffusers(kl_folder, vae):
    kl, _ = kl_folder
    x = images(b=2, h=32, w=64)
    z = vae.encode(x)
    z_ref = (kl.encode(x).latent_dist.mean - VAE_SHIFT) * VAE_SCALE
    enc_err = (z - z_ref).abs().max().item()
    dec = vae.decode(z_ref)
    dec_ref = kl.decode(z_ref / VAE_SCALE + VAE_SHIFT).sample
    dec_err = (dec - dec_ref).abs().max().item()
    print(f"VAE parity vs diffusers: encode max abs {enc_err:.2e}, decode max abs {dec_err:.2e}")
    assert z.shape == (2, 16, 4, 8) and dec.shape == x.shape
    assert enc_err <= 1e-4
    assert dec_err <= 1e-5


@torch.no_grad()
def test_raw_latents_are_unscaled(vae):
    x = images(h=16, w=24, seed=1)
    assert torch.equal(vae.encode(x), (vae.encode_raw(x) - VAE_SHIFT) * VAE_SCALE)
    z = torch.randn(1, 16, 2, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(vae.decode(z), vae.decode_raw(z / VAE_SCALE + VAE_SHIFT))


@torch.no_grad()
def test_decode_is_not_clamped(vae):
    z = torch.randn(1, 16, 2, 3, generator=torch.Generator().manual_seed(1))
    plain = vae.decode(z)
    bias = vae.decoder.conv_out.bias
    saved = bias.clone()
    bias += 2.0
    try:
        shifted = vae.decode(z)
    finally:
        bias.copy_(saved)
    assert shifted.max() > 1.5  # BFL returns the decoder's output as is; so do we
    assert torch.allclose(shifted, plain + 2.0, atol=1e-6)


@torch.no_grad()
def test_every_layout_loads_the_same(kl_folder, tmp_path):
    kl, folder = kl_folder
    state = bfl_state(kl)
    save_file(state, tmp_path / "ae.safetensors")
    others = {
        "model.diffusion_model.img_in.weight": torch.randn(4, 4),
        "text_encoders.t5.shared.weight": torch.randn(2),
    }
    for prefix in ("first_stage_model.", "vae."):
        save_file({prefix + k: v for k, v in state.items()} | others, tmp_path / f"full_{prefix}safetensors")
    pipeline = tmp_path / "pipeline"
    (pipeline / "vae").mkdir(parents=True)
    for file in folder.iterdir():
        (pipeline / "vae" / file.name).write_bytes(file.read_bytes())
    x = images(h=16, w=32, seed=2)
    expected = load_vae(folder).encode(x)
    for source in ("ae.safetensors", "full_first_stage_model.safetensors", "full_vae.safetensors", "pipeline"):
        assert is_vae_checkpoint(tmp_path / source), source
        assert torch.equal(load_vae(tmp_path / source).encode(x), expected), source


def test_dtype_kept_or_cast(kl_folder, tmp_path):
    kl, _ = kl_folder
    save_file({k: v.to(torch.bfloat16) for k, v in bfl_state(kl).items()}, tmp_path / "ae_bf16.safetensors")
    assert {p.dtype for p in load_vae(tmp_path / "ae_bf16.safetensors").parameters()} == {torch.bfloat16}
    cast = load_vae(tmp_path / "ae_bf16.safetensors", dtype=torch.float32)
    assert {p.dtype for p in cast.parameters()} == {torch.float32}


@torch.no_grad()
def test_group_count_from_config_matches_diffusers(tmp_path):
    """A narrow VAE (the small model's) normalizes in 8 groups: read from config.json or the file's header."""
    kl = randomize_(flux_like_kl((32, 32, 64, 64), 1, groups=8), 3, std=0.1).eval()
    kl.save_pretrained(tmp_path / "vae", safe_serialization=True)
    config = json.dumps({"norm_num_groups": 8})
    save_file(bfl_state(kl), tmp_path / "narrow.safetensors", metadata={"config": config})
    x = images(b=1, h=32, w=48, seed=4)
    z_ref = (kl.encode(x).latent_dist.mean - VAE_SHIFT) * VAE_SCALE
    dec_ref = kl.decode(z_ref / VAE_SCALE + VAE_SHIFT).sample
    for path in (tmp_path / "vae", tmp_path / "narrow.safetensors"):
        vae = load_vae(path)
        assert vae.params.norm_groups == 8
        assert (vae.encode(x) - z_ref).abs().max().item() <= 1e-4
        assert (vae.decode(z_ref) - dec_ref).abs().max().item() <= 1e-5
    # a group count that does not divide every width cannot build the layers: refused, naming the file
    save_file(bfl_state(kl), tmp_path / "groups3.safetensors", metadata={"config": json.dumps({"norm_num_groups": 3})})
    with pytest.raises(CheckpointError, match=r"groups3\.safetensors.*not all multiples of 3"):
        load_vae(tmp_path / "groups3.safetensors")


def test_scale_and_shift_from_config(tmp_path):
    kl = tiny_kl(seed=1, scaling_factor=0.5, shift_factor=-0.25)
    kl.save_pretrained(tmp_path / "vae", safe_serialization=True)
    params = load_vae(tmp_path / "vae").params
    assert (params.scale_factor, params.shift_factor) == (0.5, -0.25)

    state = bfl_state(kl)
    save_file(state, tmp_path / "plain.safetensors")
    params = load_vae(tmp_path / "plain.safetensors").params
    assert (params.scale_factor, params.shift_factor) == (VAE_SCALE, VAE_SHIFT)
    config = json.dumps({"scaling_factor": 0.75, "shift_factor": 0.125})
    save_file(state, tmp_path / "meta.safetensors", metadata={"config": config})
    params = load_vae(tmp_path / "meta.safetensors").params
    assert (params.scale_factor, params.shift_factor) == (0.75, 0.125)

    save_file(state, tmp_path / "bad.safetensors", metadata={"config": json.dumps({"scaling_factor": "x"})})
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*scale_factor is 'x'"):
        load_vae(tmp_path / "bad.safetensors")


def test_real_config_matches_manifest():
    with torch.device("meta"):
        vae = AutoEncoder(AutoEncoderParams())
    ours = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert ours == read_manifest("flux_ae_keys.tsv")


def test_diffusers_real_config_maps_onto_bfl_manifest():
    theirs = read_manifest("flux_ae_keys_diffusers.tsv")
    with torch.device("meta"):
        kl = flux_like_kl((128, 256, 512, 512), 2)
    assert {k: tuple(v.shape) for k, v in kl.state_dict().items()} == theirs
    mapped = {}
    for key, shape in theirs.items():
        ours = diffusers_vae_key_to_bfl(key, 4)
        mapped[ours] = (*shape, 1, 1) if len(shape) == 2 else shape
    # equal dicts of equal size: the mapping is one-to-one, so it also reads back from BFL to diffusers
    assert len(mapped) == len(theirs)
    assert mapped == read_manifest("flux_ae_keys.tsv")


@torch.no_grad()
def test_chunked_attention_matches_whole(vae, monkeypatch):
    z = torch.randn(1, 16, 5, 7, generator=torch.Generator().manual_seed(4))
    whole = vae.decode(z)
    monkeypatch.setattr(autoencoder, "ATTENTION_SCORE_BUDGET", 35 * 4)  # 4 query rows per SDPA call
    # the same math row by row; only the kernel's rounding may differ
    assert (vae.decode(z) - whole).abs().max() <= 1e-6


@torch.no_grad()
def test_tiles_are_placed_and_blended_exactly():
    # with a decoder that looks at one latent pixel per output pixel, tiling changes nothing but rounding
    conv = torch.nn.Conv2d(16, 3, 1)
    randomize_(conv, seed=5)

    def local(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(conv(torch.nn.functional.interpolate(z, scale_factor=8.0, mode="nearest")))

    z = torch.randn(2, 16, 19, 30, generator=torch.Generator().manual_seed(5))
    tiled = decode_tiled(local, z, tile=8, overlap=3, scale=8)
    assert tiled.shape == (2, 3, 152, 240)
    assert (tiled - local(z)).abs().max() <= 1e-6


@torch.no_grad()
def test_tiled_decode_within_documented_tolerance(vae):
    z = torch.randn(1, 16, 16, 28, generator=torch.Generator().manual_seed(3))
    plain = vae.decode(z)
    assert torch.equal(vae.decode(z, tile=28), plain)  # one tile covers it all: exact
    tiled = vae.decode(z, tile=12, overlap=3)
    rel = ((tiled - plain).norm() / plain.norm()).item()
    print(f"tiled decode (12/3) relative L2 error {rel:.3f}")
    # per-tile GroupNorm statistics and attention: the bound documented in AutoEncoder.decode_raw
    assert rel < 0.1
    with pytest.raises(ValueError, match="twice the overlap"):
        vae.decode(z, tile=8, overlap=4)


def test_sd_vae_refused(tmp_path):
    kl4 = diffusers.AutoencoderKL(
        latent_channels=4,
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32,
    )
    kl4.save_pretrained(tmp_path, safe_serialization=True)
    assert is_vae_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=rf"{tmp_path.name}: .*4 latent channels.*16-channel FLUX VAE"):
        load_vae(tmp_path)


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        (["double_blocks.0.img_attn.qkv.weight", "img_in.weight"], "diffusion transformer"),
        (["transformer_blocks.0.attn.to_q.weight", "x_embedder.weight"], "diffusion transformer"),
        (["encoder.block.0.layer.0.SelfAttention.q.weight", "shared.weight"], "T5 text encoder"),
        (["text_model.embeddings.token_embedding.weight"], "CLIP text encoder"),
        (["model.diffusion_model.input_blocks.0.0.weight"], "UNet"),
        (["something.weight"], "not a FLUX VAE"),
    ],
)
def test_other_models_refused(tmp_path, keys, named):
    save_file({k: torch.zeros(2, 2) for k in keys}, tmp_path / "model.safetensors")
    assert not is_vae_checkpoint(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: .*{named}"):
        load_vae(tmp_path / "model.safetensors")


def test_missing_and_unexpected_keys_listed(kl_folder, tmp_path):
    kl, _ = kl_folder
    state = {k: v for k, v in bfl_state(kl).items() if not k.startswith("decoder.up.0.block.1.")}
    save_file(state | {"decoder.extra.weight": torch.zeros(1)}, tmp_path / "ae.safetensors")
    with pytest.raises(
        CheckpointError, match=r"ae\.safetensors.*missing keys \(\d+\): decoder\.up\.0\.block\.1\."
    ) as e:
        load_vae(tmp_path / "ae.safetensors")
    assert "unexpected keys (1): decoder.extra.weight" in str(e.value)


def test_bad_input_sizes(vae):
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="latent"):
        vae.decode(torch.zeros(1, 4, 4, 4))
