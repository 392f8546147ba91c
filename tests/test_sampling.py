"""Schedule, packing, reference ids and the Euler loop."""

from __future__ import annotations

import math

import pytest
import torch
from tests.helpers.tiny_models import TINY_FLUX, tiny_flux_model

from kontext_core.sampling import (
    denoise_schedule,
    get_noise,
    get_schedule,
    pack,
    position_ids,
    reference_placements,
    reference_tokens,
    sample,
    unpack,
)


def bfl_formula(num_steps: int, seq_len: int) -> list[float]:
    """The schedule as BFL's paper-code states it: a float32 linspace, shifted by mu(seq_len)."""
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq_len - 256)
    t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float32)
    return (math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)).tolist()


@pytest.mark.parametrize("steps, seq_len", [(28, 4096), (28, 4592), (4, 60), (1, 256), (50, 8100)])
def test_schedule_bit_exact_with_bfl(steps, seq_len):
    sigmas = get_schedule(steps, seq_len)
    assert sigmas == bfl_formula(steps, seq_len)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and len(sigmas) == steps + 1
    assert all(a > b for a, b in zip(sigmas, sigmas[1:]))


def test_schedule_close_to_diffusers_scheduler():
    diffusers = pytest.importorskip("diffusers")
    import numpy as np

    steps, seq_len = 28, 4096
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq_len - 256)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    theirs = scheduler.sigmas.tolist()
    ours = get_schedule(steps, seq_len)
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-6


def test_unshifted_schedule_is_linear():
    assert get_schedule(4, 4096, shift=False) == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_denoise_schedule_keeps_the_tail():
    full = get_schedule(10, 100)
    assert denoise_schedule(5, 100, denoise=0.5) == full[-6:]
    assert denoise_schedule(10, 100) == full
    with pytest.raises(ValueError, match="steps"):
        denoise_schedule(0, 100)
    with pytest.raises(ValueError, match="denoise"):
        denoise_schedule(4, 100, denoise=0.0)


def test_pack_unpack_roundtrip_non_square():
    z = torch.randn(2, 16, 6, 10)
    tokens = pack(z)
    assert tokens.shape == (2, 15, 64)
    # token (row 1, col 2) holds the 2×2 patch at latent rows 2-3, cols 4-5, channel-major
    assert torch.equal(tokens[0, 1 * 5 + 2].reshape(16, 2, 2), z[0, :, 2:4, 4:6])
    assert torch.equal(unpack(tokens, 6, 10), z)
    with pytest.raises(ValueError, match="even"):
        pack(torch.randn(1, 16, 5, 4))


def test_noise_is_bfl_seeded_cpu_randn():
    noise = get_noise(1, 96, 160, seed=42)
    expected = torch.randn(1, 16, 12, 20, generator=torch.Generator().manual_seed(42))
    assert torch.equal(noise, expected)
    assert get_noise(1, 100, 150, seed=0).shape == (1, 16, 14, 20)  # BFL rounds up to whole tokens


def test_target_ids_layout():
    ids = position_ids(2, 3)
    assert ids.tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]


# Expected placements written by hand from the rules in shared/reference/README.md (ComfyUI 0.3.64):
# sizes are latent sizes; target 12×20 latent (6×10 tokens); references 16×8 then 8×24 then 10×10.
REFS = [(16, 8), (8, 24), (10, 10)]


def test_offset_placements_tile_right_or_below():
    # ref1 at origin; canvas 16×8. ref2 (8×24): 8+16 > 24+8? no -> below at h=16; canvas 24×24.
    # ref3 (10×10): 10+24 > 10+24? no -> below at h=24; tokens = (latent+1)//2.
    assert reference_placements((12, 20), REFS, "offset") == [(1, 0, 0), (1, 8, 0), (1, 12, 0)]
    # a tall canvas sends the next tall reference to the right: 16+16 > 8+8 -> w offset 8 latent = 4 tokens
    assert reference_placements((12, 20), [(16, 8), (16, 8)], "offset") == [(1, 0, 0), (1, 0, 4)]


def test_index_placements_count_up():
    assert reference_placements((12, 20), REFS, "index") == [(1, 0, 0), (2, 0, 0), (3, 0, 0)]


def test_uxo_placements_go_diagonally_past_the_target():
    # index 0; offsets target (12, 20) + sum of previous refs, in latent pixels, then (x+1)//2 tokens
    assert reference_placements((12, 20), REFS, "uxo") == [(0, 6, 10), (0, 14, 14), (0, 18, 26)]


def test_unknown_reference_method_is_refused():
    with pytest.raises(ValueError, match="reference_method"):
        reference_placements((12, 20), REFS, "tile")


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        (torch.zeros(1, 4, 4, 4), "reference 2 is not a FLUX latent"),
        (torch.zeros(1, 16, 5, 4), "reference 2 is 32×40 pixels; Kontext needs sides that are multiples of 16"),
        (torch.zeros(3, 16, 4, 4), "reference 2 holds 3 images; expected 1 or the batch of 2"),
    ],
)
def test_sample_names_the_reference_that_cannot_be_used(reference, message):
    model = tiny_flux_model()
    txt, y = torch.zeros(1, 3, TINY_FLUX.context_in_dim), torch.zeros(1, TINY_FLUX.vec_in_dim)
    with pytest.raises(ValueError, match=message):
        sample(model, torch.zeros(2, 16, 4, 4), txt, y, references=[torch.zeros(2, 16, 4, 4), reference], steps=1)


def test_reference_tokens_ids_follow_placements():
    refs = [torch.randn(1, 16, 16, 8), torch.randn(1, 16, 8, 24)]
    tokens, ids = reference_tokens(refs, (12, 20), "offset")
    assert tokens.shape == (1, 32 + 48, 64)
    assert ids[:32].tolist() == position_ids(8, 4, index=1).tolist()
    assert ids[32:].tolist() == position_ids(4, 12, index=1, h_offset=8).tolist()


def _inputs(batch=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 16, 12, 20, generator=gen)
    txt = torch.randn(1, 5, TINY_FLUX.context_in_dim, generator=gen)
    y = torch.randn(1, TINY_FLUX.vec_in_dim, generator=gen)
    refs = [torch.randn(1, 16, 16, 8, generator=gen), torch.randn(1, 16, 8, 12, generator=gen)]
    return noise, txt, y, refs


@torch.no_grad()
def test_one_step_is_one_euler_step_on_the_model():
    model = tiny_flux_model(seed=5)
    noise, txt, y, refs = _inputs()
    out = sample(model, noise, txt, y, references=refs, steps=1, guidance=3.0)
    ref_tok, ref_ids = reference_tokens(refs, (12, 20), "offset")
    img = torch.cat((pack(noise), ref_tok), dim=1)
    ids = torch.cat((position_ids(6, 10), ref_ids))[None]
    v = model(img, ids, txt, torch.zeros(1, 5, 3), torch.tensor([1.0]), y, torch.tensor([3.0]))[:, :60]
    assert torch.allclose(out, unpack(pack(noise) - v, 12, 20), atol=1e-6, rtol=0)


@torch.no_grad()
def test_references_and_method_change_the_result():
    model = tiny_flux_model(seed=5)
    noise, txt, y, refs = _inputs()
    plain = sample(model, noise, txt, y, steps=2)
    offset = sample(model, noise, txt, y, references=refs, steps=2)
    index = sample(model, noise, txt, y, references=refs, reference_method="index", steps=2)
    assert (plain - offset).abs().max() > 1e-3
    assert (offset - index).abs().max() > 1e-4


@torch.no_grad()
def test_batch_rows_match_single_runs():
    model = tiny_flux_model(seed=6)
    noise, txt, y, refs = _inputs(batch=2)
    both = sample(model, noise, txt, y, references=refs, steps=2)
    first = sample(model, noise[:1], txt, y, references=refs, steps=2)
    # fp32 round-off of batched matmuls: relative 1e-5 of the output's scale
    assert torch.allclose(both[:1], first, rtol=1e-5, atol=1e-5 * first.abs().max().item())


@torch.no_grad()
def test_true_cfg_combines_two_passes():
    model = tiny_flux_model(seed=7)
    noise, txt, y, refs = _inputs()
    neg = (torch.randn(1, 5, TINY_FLUX.context_in_dim), torch.randn(1, TINY_FLUX.vec_in_dim))
    pos_only = sample(model, noise, txt, y, references=refs, steps=1)
    neg_only = sample(model, noise, *neg, references=refs, steps=1)
    cfg = sample(model, noise, txt, y, references=refs, steps=1, negative=neg, true_cfg_scale=4.0)
    # one step from sigma 1 to 0: x_out = noise - v, so v combines linearly in the outputs too
    expected = neg_only + 4.0 * (pos_only - neg_only)
    assert torch.allclose(cfg, expected, atol=1e-4, rtol=0)
    same = sample(model, noise, txt, y, references=refs, steps=1, negative=neg, true_cfg_scale=1.0)
    assert torch.equal(same, pos_only)


@torch.no_grad()
def test_partial_denoise_starts_from_the_noised_input():
    model = tiny_flux_model(seed=8)
    noise, txt, y, refs = _inputs()
    init = torch.randn(1, 16, 12, 20)
    seen = []
    out = sample(model, noise, txt, y, steps=2, denoise=0.5, init_latent=init, callback=seen.append)
    s0, s1, _ = denoise_schedule(2, 60, 0.5)
    assert s0 < 1.0 and len(seen) == 2 and out.shape == init.shape
    # the first step went from x0 to x0 + (s1 − s0)·v and saw x0 − s0·v as its denoised guess, so both
    # together give back x0: it must be the input noised to s0, not the noise alone
    first = seen[0]
    x0 = (first.denoised * (s1 - s0) + s0 * first.latent) / s1
    torch.testing.assert_close(x0, s0 * noise + (1 - s0) * init, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="init_latent"):
        sample(model, noise, txt, y, steps=2, denoise=0.5)


@torch.no_grad()
def test_callback_sees_every_step_and_can_interrupt():
    model = tiny_flux_model(seed=9)
    noise, txt, y, refs = _inputs()
    seen = []
    sample(model, noise, txt, y, references=refs, steps=3, callback=seen.append)
    assert [s.step for s in seen] == [1, 2, 3] and all(s.total == 3 for s in seen)
    assert seen[-1].sigma == 0.0 and seen[0].denoised.shape == noise.shape

    class Stop(Exception):
        pass

    def stop_at_two(info):
        if info.step == 2:
            raise Stop

    with pytest.raises(Stop):
        sample(model, noise, txt, y, steps=5, callback=stop_at_two)


@torch.no_grad()
def test_reference_cache_is_exact_refreshed_every_step_and_close_when_reused():
    model = tiny_flux_model(seed=10)
    noise, txt, y, refs = _inputs()
    exact = sample(model, noise, txt, y, references=refs, steps=4)
    cached = sample(model, noise, txt, y, references=refs, steps=4, reference_cache_every=1)
    assert torch.allclose(exact, cached, atol=1e-6, rtol=0)
    fast = sample(model, noise, txt, y, references=refs, steps=4, reference_cache_every=2)
    rel = ((fast - exact).norm() / exact.norm()).item()
    assert 0 < rel < 0.5, rel


@torch.no_grad()
def test_text_of_another_model_is_refused_by_name():
    model = tiny_flux_model(seed=5)
    noise, txt, y, _ = _inputs()
    wide_txt, wide_y = torch.randn(1, 5, 2 * TINY_FLUX.context_in_dim), torch.randn(1, 2 * TINY_FLUX.vec_in_dim)
    for bad in ((wide_txt, y), (txt, wide_y)):
        with pytest.raises(ValueError, match="txt/y: .* different models"):
            sample(model, noise, *bad, steps=1)
    with pytest.raises(ValueError, match=f"negative: .*{2 * TINY_FLUX.context_in_dim} wide"):
        sample(model, noise, txt, y, steps=1, negative=(wide_txt, y), true_cfg_scale=2.0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"guidance": float("nan")}, "guidance must be a finite number"),
        ({"true_cfg_scale": 4.0}, "needs a negative"),  # never silently single-pass
        ({"reference_cache_every": -2}, "reference_cache_every must be 0"),
        ({"init_latent": torch.zeros(3, 16, 4, 4), "denoise": 0.5}, "init_latent: expected 1 or 2 rows"),
    ],
)
def test_bad_sampling_options_are_refused_by_name(options, message):
    model = tiny_flux_model(seed=5)
    noise, txt, y, refs = _inputs()
    with pytest.raises(ValueError, match=message):
        sample(model, noise.expand(2, -1, -1, -1), txt, y, references=refs, steps=1, **options)
    with pytest.raises(ValueError, match="txt: expected 1 or 2 rows"):
        sample(model, noise.expand(2, -1, -1, -1), txt.expand(3, -1, -1), y, steps=1)


def test_sampling_builds_no_autograd_graph():
    # called with grad enabled, as a library user would: no graph is kept over the steps (memory)
    model = tiny_flux_model(seed=5)
    noise, txt, y, refs = _inputs()
    assert not sample(model, noise, txt, y, references=refs, steps=2).requires_grad
