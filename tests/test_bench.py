"""The benchmark at tiny size on CPU, so it cannot rot, and the FLOP count it divides by."""

from __future__ import annotations

import json

import pytest
import torch
from tests.helpers.flux_files import kontext_inputs
from tests.helpers.tiny_models import TINY_FLUX, tiny_flux_model
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.flops import flux_forward_flops

pytest.importorskip("diffusers")
from benchmarks import bench


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "tiny.json"
    argv = [
        "--size",
        "tiny",
        "--device",
        "cpu",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--modes",
        "exact,fast,fp8,offload",
        "--fast-sweep",
        "2",
        "--sweep-prompts",
        "1",
        "--sweep-seeds",
        "2",
        "--json",
        str(path),
    ]
    returned = bench.main(argv)
    return returned, json.loads(path.read_text())


def test_output_structure(result, capsys):
    returned, written = result
    assert written["config"]["size"] == "tiny" and written["config"]["device"] == "cpu"
    assert written["config"]["flops_per_step"] > written["config"]["flops_per_cached_step"] > 0
    step = {(r["impl"], r["mode"]) for r in written["step"]}
    edit = {(r["impl"], r["mode"]) for r in written["edit"]}
    assert {("ours", "exact"), ("diffusers", "exact"), ("ours", "block offload")} <= step
    assert {("ours", "exact"), ("diffusers", "exact"), ("ours", "fast K=2"), ("ours", "block offload")} <= edit
    assert any(mode.startswith("fp8") for _, mode in step)
    for row in written["step"]:
        assert row["s_per_step"] > 0 and row["tflops"] > 0 and row["peak_mib"] > 0
    for row in written["edit"]:
        # denoise_s is the remainder of the timed run, so the sum proves nothing; what can fail is that each
        # stage was seen by the code path it names (the VAE wrappers were called, the text encode was timed)
        # and that the reported total is one of the runs actually measured
        name = f"{row['impl']} {row['mode']}"
        assert row["text_encode_s"] > 0 and row["vae_encode_s"] > 0 and row["vae_decode_s"] > 0, name
        assert row["denoise_s"] > 0, name
        measured = row["s_per_edit"] - row["text_encode_s"]
        assert any(t == pytest.approx(measured, rel=1e-9) for t in row["times"]), name
        assert row["tflops_denoise"] == pytest.approx(row["flops_denoise"] / row["denoise_s"] / 1e12), name
    edit_flops = {(r["impl"], r["mode"]): r["flops_denoise"] for r in written["edit"]}
    # the reference cache skips the reference tokens on cached steps: fewer FLOPs, not the same count
    assert 0 < edit_flops[("ours", "fast K=2")] < edit_flops[("ours", "exact")] == edit_flops[("diffusers", "exact")]
    assert [r["k"] for r in written["fast_mode_sweep"]] == [2] and written["fast_mode_sweep"][0]["combos"] == 2
    assert returned["step"][0]["s_per_step"] == written["step"][0]["s_per_step"]
    table = bench.render_markdown(returned)
    for heading in ("### Transformer step", "### Whole edit", "### Fast mode"):
        assert heading in table


def test_ours_and_diffusers_agree(result):
    _, written = result
    rows = {(r["impl"], r["mode"]): r for r in written["step"]}
    step = rows[("diffusers", "exact")]["error"]
    assert step["max_abs"] <= 1e-5 * max(1.0, step["ref_max_abs"])
    edits = {(r["impl"], r["mode"]): r for r in written["edit"]}
    edit = edits[("diffusers", "exact")]["error"]
    # fp32 through 2 steps and both VAEs; images may differ where a pixel rounds the other way
    assert edit["max_abs"] <= 1e-5 * max(1.0, edit["ref_max_abs"])
    assert edit["image_max_abs_255"] <= 1
    # offloading moves weights, not arithmetic
    assert rows[("ours", "block offload")]["error"]["max_abs"] == 0
    assert edits[("ours", "block offload")]["error"]["max_abs"] == 0
    # the fast mode is an approximation: the benchmark must see it differ
    assert edits[("ours", "fast K=2")]["error"]["max_abs"] > 0


def test_unknown_size_and_mode_are_refused():
    with pytest.raises(ValueError, match="size"):
        bench.run(bench.Settings(size="huge"))
    with pytest.raises(ValueError, match="modes"):
        bench.run(bench.Settings(size="tiny", modes=("exact", "turbo")))


@torch.no_grad()
def test_flop_count_matches_torch_flop_counter():
    model = tiny_flux_model(seed=2)
    img, img_ids, txt, txt_ids, t, y, guidance = kontext_inputs(model.params, batch=2)
    # the math kernel runs attention as matrix products, which the counter sees
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(img, img_ids, txt, txt_ids, t, y, guidance)
    assert flux_forward_flops(model.params, txt.shape[1], img.shape[1], batch=2) == counter.get_total_flops()

    n_ref = 32  # kontext_inputs' reference: 16×8 latent → 32 tokens at the end
    cache = model.new_reference_cache(n_ref)
    model(img, img_ids, txt, txt_ids, t, y, guidance, ref_cache=cache)
    cache.set_recording(False)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(img[:, :-n_ref], img_ids[:, :-n_ref], txt, txt_ids, t, y, guidance, ref_cache=cache)
    expected = flux_forward_flops(model.params, txt.shape[1], img.shape[1] - n_ref, cached_tokens=n_ref, batch=2)
    assert expected == counter.get_total_flops()


def test_flop_count_rejects_bad_token_counts():
    with pytest.raises(ValueError, match="img_tokens"):
        flux_forward_flops(TINY_FLUX, 5, 0)
    with pytest.raises(ValueError, match="cached_tokens"):
        flux_forward_flops(TINY_FLUX, 5, 4, cached_tokens=-1)
