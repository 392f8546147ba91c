"""LoRA in every common layout adds strength · alpha/rank · up @ down to the right rows, and comes off exactly."""

from __future__ import annotations

import pytest
import torch
from tests.helpers.flux_files import flux_inputs, model_from_state, save_state, scaled_fp8_file
from tests.helpers.tiny_models import tiny_flux_model

from kontext_core import load_transformer
from kontext_core.checkpoints import CheckpointError
from kontext_core.runtime.lora import LoraFactor, apply_lora, load_lora, remove_lora, use_loras
from kontext_core.runtime.quant import Fp8Linear

H = 64  # tiny model hidden size; its MLP is 4 × 64 = 256 wide

# (name in the LoRA file, BFL layer, rows of that layer, halves swapped); written out by hand from the
# layouts, independently of kontext_core.runtime.lora's tables
DIFFUSERS_TARGETS = [
    ("transformer_blocks.0.attn.to_q", "double_blocks.0.img_attn.qkv", slice(0, H), False),
    ("transformer_blocks.0.attn.to_k", "double_blocks.0.img_attn.qkv", slice(H, 2 * H), False),
    ("transformer_blocks.1.attn.add_v_proj", "double_blocks.1.txt_attn.qkv", slice(2 * H, 3 * H), False),
    ("transformer_blocks.0.attn.to_out.0", "double_blocks.0.img_attn.proj", slice(None), False),
    ("transformer_blocks.1.ff_context.net.2", "double_blocks.1.txt_mlp.2", slice(None), False),
    ("transformer_blocks.0.norm1.linear", "double_blocks.0.img_mod.lin", slice(None), False),
    ("single_transformer_blocks.1.attn.to_v", "single_blocks.1.linear1", slice(2 * H, 3 * H), False),
    ("single_transformer_blocks.0.proj_mlp", "single_blocks.0.linear1", slice(3 * H, 7 * H), False),
    ("single_transformer_blocks.0.proj_out", "single_blocks.0.linear2", slice(None), False),
    ("single_transformer_blocks.1.norm.linear", "single_blocks.1.modulation.lin", slice(None), False),
    ("context_embedder", "txt_in", slice(None), False),
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer", slice(None), False),
    ("norm_out.linear", "final_layer.adaLN_modulation.1", slice(None), True),
]
BFL_TARGETS = [
    "double_blocks.0.img_attn.qkv",
    "double_blocks.1.txt_mlp.0",
    "double_blocks.0.txt_mod.lin",
    "single_blocks.0.linear1",
    "single_blocks.1.linear2",
    "img_in",
    "final_layer.linear",
]


def factors(model, layer: str, rows: slice, rank: int, gen: torch.Generator):
    linear = model.get_submodule(layer)
    out = len(range(linear.out_features)[rows])
    return torch.randn(out, rank, generator=gen) * 0.1, torch.randn(rank, linear.in_features, generator=gen) * 0.1


def make_lora(model, layout: str, seed: int = 0):
    """(LoRA tensors, expected {BFL key: new weight} at strength 0.7)."""
    gen = torch.Generator().manual_seed(seed)
    tensors, expected = {}, {}
    targets = (
        [(f"{layer}", layer, slice(None), False) for layer in BFL_TARGETS]
        if layout in ("kohya", "ai-toolkit")
        else DIFFUSERS_TARGETS
    )
    for i, (name, layer, rows, swap) in enumerate(targets):
        rank = 2 + i % 3
        up, down = factors(model, layer, rows, rank, gen)
        alpha = float(rank) if layout == "peft" else 1.5 + i
        delta = 0.7 * alpha / rank * (up @ down)
        if swap:  # diffusers keeps (scale, shift), BFL (shift, scale)
            delta = torch.cat(delta.chunk(2)[::-1])
        key = f"{layer}.weight"
        weight = expected.get(key, model.state_dict()[key]).clone()
        weight[rows] += delta
        expected[key] = weight
        if layout.startswith("kohya"):
            stem = ("lora_unet_" if layout == "kohya" else "lora_transformer_") + name.replace(".", "_")
            tensors |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
            tensors[f"{stem}.alpha"] = torch.tensor(alpha)
        elif layout == "peft":  # no alpha: scale 1
            tensors |= {f"transformer.{name}.lora_A.weight": down, f"transformer.{name}.lora_B.weight": up}
        else:  # ai-toolkit: BFL names, A/B, alpha beside
            stem = f"diffusion_model.{name}"
            tensors |= {
                f"{stem}.lora_A.weight": down,
                f"{stem}.lora_B.weight": up,
                f"{stem}.alpha": torch.tensor(alpha),
            }
    return tensors, expected


@pytest.mark.parametrize("layout", ["kohya", "kohya-diffusers", "peft", "ai-toolkit"])
@torch.no_grad()
def test_every_layout_adds_the_low_rank_update(layout, tmp_path):
    model = tiny_flux_model(seed=7)
    before = model.state_dict(keep_vars=True)
    tensors, expected = make_lora(model, layout)
    path = save_state(tmp_path / "lora.safetensors", tensors)

    result = apply_lora(model, path, strength=0.7)
    assert result.unmatched == []
    assert len(result.applied) == len(DIFFUSERS_TARGETS if "diffusers" in layout or layout == "peft" else BFL_TARGETS)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in after.items():
        want = expected.get(key, before[key])
        assert (value - want).abs().max().item() <= 1e-6, key
        assert (key in expected) == (not torch.equal(value, before[key])), key

    result.remove()
    assert all(model.state_dict(keep_vars=True)[k] is before[k] for k in before)  # the very tensors, not copies


@pytest.mark.parametrize(
    ("loader", "layer", "message"),
    [
        (apply_lora, "lora_unet_down_blocks_0_attentions_0_proj_in", "no LoRA layer names a layer of this FLUX model"),
        (load_lora, "lora_te1_text_model_encoder_layers_0_mlp_fc1", "only text-encoder parts"),
    ],
    ids=["sdxl", "text-encoder-only"],
)
@torch.no_grad()
def test_a_lora_for_another_model_or_part_is_refused(loader, layer, message):
    model = tiny_flux_model(seed=8)
    tensors = {f"{layer}.lora_down.weight": torch.randn(2, 8), f"{layer}.lora_up.weight": torch.randn(8, 2)}
    with pytest.raises(CheckpointError, match=message):
        loader(model, tensors)  # nothing applied would otherwise look like success


def test_unmatched_keys_are_reported_not_dropped():
    model = tiny_flux_model(seed=8)
    tensors, _ = make_lora(model, "kohya")
    tensors |= {
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(2, 8),  # a text encoder
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(8, 2),
        "lora_unet_double_blocks_0_img_mlp_2.lora_down.weight": torch.randn(2, 256),  # no up
        "diffusion_model.double_blocks.0.img_attn.nonexistent.diff": torch.randn(H),  # names no parameter
    }
    result = apply_lora(model, tensors)
    assert result.unmatched == sorted(
        [
            "diffusion_model.double_blocks.0.img_attn.nonexistent.diff",
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight",
            "lora_unet_double_blocks_0_img_mlp_2.lora_down.weight",
        ]
    )
    assert len(result.applied) == len(BFL_TARGETS)


@torch.no_grad()
def test_wrong_shapes_change_nothing():
    model = tiny_flux_model(seed=9)
    before = model.state_dict(keep_vars=True)
    tensors, _ = make_lora(model, "peft")
    tensors["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"] = torch.randn(3072, 2)
    with pytest.raises(CheckpointError, match="do not fit this model"):
        apply_lora(model, tensors)
    assert all(model.state_dict(keep_vars=True)[k] is before[k] for k in before)


def test_not_a_lora_and_pickles_are_refused(tmp_path):
    model = tiny_flux_model(seed=10)
    with pytest.raises(CheckpointError, match="no LoRA tensors"):
        apply_lora(model, save_state(tmp_path / "model.safetensors", model.state_dict()))
    (tmp_path / "lora.pt").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(CheckpointError, match="refused"):
        apply_lora(model, tmp_path / "lora.pt")


@torch.no_grad()
def test_stacked_loras_come_off_in_any_order():
    model = tiny_flux_model(seed=11)
    before = model.state_dict(keep_vars=True)
    first = apply_lora(model, make_lora(model, "kohya", seed=1)[0], strength=0.7)
    after_first = {k: v.clone() for k, v in model.state_dict().items()}
    second = apply_lora(model, make_lora(model, "peft", seed=2)[0], strength=-0.4)
    remove_lora(first)
    remove_lora(second)
    assert all(model.state_dict(keep_vars=True)[k] is before[k] for k in before)
    third = apply_lora(model, make_lora(model, "kohya", seed=1)[0], strength=0.7)
    assert all(torch.equal(model.state_dict()[k], after_first[k]) for k in before)
    third.remove()


@torch.no_grad()
def test_lora_on_fp8_layers_keeps_them_fp8(tmp_path):
    model = tiny_flux_model(seed=12)
    path, dequantized = scaled_fp8_file(model, tmp_path / "fp8.safetensors", "scale_weight")
    loaded = load_transformer(path, dtype=torch.float32, weight_dtype=torch.float8_e4m3fn)
    inputs = flux_inputs(model.params)
    base_out = loaded(*inputs)
    fp8_before = loaded.state_dict(keep_vars=True)

    twin = model_from_state(model.params, dequantized)
    tensors, expected = make_lora(twin, "ai-toolkit")
    gen = torch.Generator().manual_seed(9)
    for param in ("double_blocks.1.img_attn.proj.weight", "double_blocks.1.img_attn.proj.bias"):  # full differences
        diff = torch.randn(twin.state_dict()[param].shape, generator=gen) * 0.1
        tensors[
            "diffusion_model.double_blocks.1.img_attn.proj." + ("diff" if param.endswith("weight") else "diff_b")
        ] = diff
        expected[param] = twin.state_dict()[param] + 0.7 * diff
    result = apply_lora(loaded, tensors, strength=0.7)
    assert result.unmatched == [] and "double_blocks.0.img_attn.qkv" in result.applied
    qkv, proj = loaded.double_blocks[0].img_attn.qkv, loaded.double_blocks[1].img_attn.proj
    assert isinstance(qkv, Fp8Linear) and qkv.weight.dtype == torch.float8_e4m3fn
    assert isinstance(proj, Fp8Linear) and proj.weight.dtype == torch.float8_e4m3fn
    twin.load_state_dict({**twin.state_dict(), **expected})
    out = loaded(*inputs)
    assert ((out - twin(*inputs)).abs().max() / out.abs().max()).item() <= 1e-5

    result.remove()
    assert all(loaded.state_dict(keep_vars=True)[k] is fp8_before[k] for k in fp8_before)
    assert torch.equal(loaded(*inputs), base_out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_on_the_gpu_the_original_weight_waits_in_host_memory():
    model = tiny_flux_model(seed=7).cuda()
    before = model.state_dict(keep_vars=True)
    tensors, _ = make_lora(model, "kohya")
    result = apply_lora(model, {k: v.cuda() for k, v in tensors.items()})
    qkv = model.get_submodule(result.applied[0].split("[")[0])
    assert qkv.weight.is_cuda and qkv.__dict__["_lora_base"]["weight"].device.type == "cpu"  # one copy on the device
    result.remove()
    assert all(model.state_dict(keep_vars=True)[k] is before[k] for k in before)
    assert all(v.is_cuda for v in model.state_dict().values())


@torch.no_grad()
def test_load_lora_matches_without_changing_the_model():
    model = tiny_flux_model(seed=13)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tensors, _ = make_lora(model, "kohya")
    tensors["lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha"] = torch.tensor(1.0)
    patch = load_lora(model, tensors, strength=0.5)
    assert patch.strength == 0.5 and len(patch.layers) == len(BFL_TARGETS)
    assert patch.unmatched == ["lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha"]
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


@torch.no_grad()
def test_use_loras_switches_sets_and_keeps_what_is_already_on():
    model = tiny_flux_model(seed=14)
    original = model.state_dict(keep_vars=True)
    loras = make_lora(model, "kohya", seed=1)[0], make_lora(model, "peft", seed=2)[0]
    first, second = load_lora(model, loras[0], strength=0.7), load_lora(model, loras[1], strength=-0.4)

    def weights_with(*applied):  # what apply_lora makes of the same LoRAs, taken off again after
        results = [apply_lora(model, tensors, strength) for tensors, strength in applied]
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        for result in reversed(results):
            result.remove()
        return weights

    want_both = weights_with((loras[0], 0.7), (loras[1], -0.4))
    want_first = weights_with((loras[0], 0.7))
    key = "double_blocks.0.img_attn.qkv.weight"  # both LoRAs update it
    assert not torch.equal(want_both[key], want_first[key]) and not torch.equal(want_first[key], original[key])

    use_loras(model, [first, second])
    assert all(torch.equal(model.state_dict()[k], want_both[k]) for k in want_both)
    qkv = model.double_blocks[0].img_attn.qkv
    merged = qkv.weight
    use_loras(model, [first, second])  # the same set again: nothing re-merged
    assert qkv.weight is merged
    use_loras(model, [first])
    assert all(torch.equal(model.state_dict()[k], want_first[k]) for k in want_first)
    use_loras(model, [])
    assert all(model.state_dict(keep_vars=True)[k] is original[k] for k in original)


@torch.no_grad()
def test_use_loras_leaves_apply_lora_alone_and_refuses_foreign_patches():
    model, other = tiny_flux_model(seed=15), tiny_flux_model(seed=16)
    by_hand = apply_lora(model, make_lora(model, "kohya", seed=3)[0])
    with_by_hand = {k: v.clone() for k, v in model.state_dict().items()}
    patch = load_lora(model, make_lora(model, "peft", seed=4)[0])
    use_loras(model, [patch])
    use_loras(model, [])
    assert all(torch.equal(model.state_dict()[k], with_by_hand[k]) for k in with_by_hand)
    by_hand.remove()
    with pytest.raises(ValueError, match="matched to another model"):
        use_loras(other, [patch])
    with pytest.raises(ValueError, match="listed twice"):
        use_loras(model, [patch, patch])


@torch.no_grad()
def test_a_lora_that_fails_half_way_comes_off_again(monkeypatch):
    model = tiny_flux_model(seed=17)
    original = model.state_dict(keep_vars=True)
    patch = load_lora(model, make_lora(model, "kohya", seed=5)[0])
    calls = []
    add_to = type(patch.factors[0]).add_to

    def failing(self, weight):
        calls.append(self.layer)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("out of memory (test)")
        return add_to(self, weight)

    monkeypatch.setattr(type(patch.factors[0]), "add_to", failing)
    with pytest.raises(torch.OutOfMemoryError):
        use_loras(model, [patch])
    assert len(calls) == 3
    assert all(model.state_dict(keep_vars=True)[k] is original[k] for k in original)
    monkeypatch.undo()
    use_loras(model, [patch])  # nothing was left half on: the same patch goes on whole
    use_loras(model, [])
    assert all(model.state_dict(keep_vars=True)[k] is original[k] for k in original)


@torch.no_grad()
def test_full_differences_add_to_weights_biases_and_norm_scales():
    """ComfyUI's trainer and extractor write `.diff` (weight) and `.diff_b` (bias) beside the low-rank pairs, and
    `.diff` on a parameter named in full (a norm's scale); each adds strength · diff, no alpha."""
    model = tiny_flux_model(seed=18)
    before = model.state_dict(keep_vars=True)
    state = model.state_dict()
    gen = torch.Generator().manual_seed(6)
    tensors, expected = make_lora(model, "ai-toolkit")  # low-rank pairs at 0.7, on BFL_TARGETS
    diffs = {
        # (key in the file, parameter, rows of it, halves swapped)
        "diffusion_model.double_blocks.0.img_attn.qkv.diff_b": (
            "double_blocks.0.img_attn.qkv.bias",
            slice(None),
            False,
        ),
        "diffusion_model.double_blocks.1.img_attn.proj.diff": (
            "double_blocks.1.img_attn.proj.weight",
            slice(None),
            False,
        ),
        "diffusion_model.double_blocks.1.img_attn.proj.diff_b": (
            "double_blocks.1.img_attn.proj.bias",
            slice(None),
            False,
        ),
        "transformer.single_transformer_blocks.1.attn.to_k.diff": (
            "single_blocks.1.linear1.weight",
            slice(H, 2 * H),
            False,
        ),
        "transformer.norm_out.linear.diff_b": ("final_layer.adaLN_modulation.1.bias", slice(None), True),
        "diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale.diff": (
            "double_blocks.0.img_attn.norm.key_norm.scale",
            slice(None),
            False,
        ),
        "lycoris_single_transformer_blocks_0_proj_out.w_norm": ("single_blocks.0.linear2.weight", slice(None), False),
    }
    for key, (param, rows, swap) in diffs.items():
        diff = torch.randn(state[param][rows].shape, generator=gen)
        tensors[key] = diff
        change = 0.7 * diff
        if swap:
            change = torch.cat(change.chunk(2)[::-1])
        value = expected.get(param, state[param]).clone()
        value[rows] += change
        expected[param] = value

    result = apply_lora(model, tensors, strength=0.7)
    assert result.unmatched == []
    assert {
        "double_blocks.0.img_attn.qkv.bias",
        "double_blocks.0.img_attn.norm.key_norm.scale",
        "single_blocks.1.linear1[64:128]",
    } <= set(result.applied)
    after = model.state_dict()
    for key, value in after.items():
        want = expected.get(key, before[key])
        assert (value - want).abs().max().item() <= 1e-6, key
        assert (key in expected) == (not torch.equal(value, before[key])), key
    result.remove()
    assert all(model.state_dict(keep_vars=True)[k] is before[k] for k in before)


@pytest.mark.parametrize(("suffix", "kind"), [("dora_scale", "DoRA"), ("lokr_w1", "LoKr"), ("hada_w1_a", "LoHa")])
def test_dora_lokr_and_loha_are_refused_not_half_applied(suffix, kind):
    model = tiny_flux_model(seed=19)
    tensors, _ = make_lora(model, "kohya")
    tensors[f"lora_unet_double_blocks_0_img_attn_qkv.{suffix}"] = torch.ones(1, H)
    with pytest.raises(CheckpointError, match=f"{kind}.* not supported"):
        load_lora(model, tensors)


@torch.no_grad()
def test_linear1_qkv_and_a_wrong_difference():
    model = tiny_flux_model(seed=20)
    gen = torch.Generator().manual_seed(8)
    up, down = torch.randn(3 * H, 2, generator=gen), torch.randn(2, H, generator=gen)
    weight = model.single_blocks[0].linear1.weight.clone()
    result = apply_lora(
        model,
        {
            "diffusion_model.single_blocks.0.linear1_qkv.lora_up.weight": up,
            "diffusion_model.single_blocks.0.linear1_qkv.lora_down.weight": down,
        },
    )
    assert result.applied == [f"single_blocks.0.linear1[0:{3 * H}]"]
    want = weight.clone()
    want[: 3 * H] += up @ down
    assert (model.single_blocks[0].linear1.weight - want).abs().max().item() <= 1e-6
    result.remove()
    with pytest.raises(CheckpointError, match=r"img_attn.proj.diff_b \(\(3,\) for double_blocks.0.img_attn.proj.bias"):
        load_lora(model, {"diffusion_model.double_blocks.0.img_attn.proj.diff_b": torch.ones(3)})


@torch.no_grad()
def test_a_failed_switch_can_be_retried_and_ends_right(monkeypatch):
    model = tiny_flux_model(seed=21)
    loras = make_lora(model, "kohya", seed=1)[0], make_lora(model, "peft", seed=2)[0]
    first, second = load_lora(model, loras[0]), load_lora(model, loras[1])
    want_first = apply_lora(model, loras[0])
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    want_first.remove()

    use_loras(model, [first, second])
    add_to = LoraFactor.add_to
    calls = []

    def failing_once(self, weight):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("out of memory (test)")
        return add_to(self, weight)

    monkeypatch.setattr(LoraFactor, "add_to", failing_once)
    with pytest.raises(torch.OutOfMemoryError):
        use_loras(model, [first])  # taking `second` off fails on its first layer
    use_loras(model, [first])  # the retry takes it off whole
    assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)


@torch.no_grad()
def test_an_offload_refusal_changes_nothing_and_a_cast_model_comes_back_in_its_dtype():
    from kontext_core.runtime.offload import offload

    model = tiny_flux_model(seed=22)
    original = model.state_dict(keep_vars=True)
    patch = load_lora(model, make_lora(model, "kohya", seed=3)[0])
    use_loras(model, [patch])
    handle = offload(model, "cpu")
    with pytest.raises(ValueError, match="offloaded"):
        use_loras(model, [])
    handle.remove()
    use_loras(model, [])  # still known to be on, so it comes off now
    assert all(model.state_dict(keep_vars=True)[k] is original[k] for k in original)

    use_loras(model, [patch])
    model.half()  # moved or cast while a LoRA is on: taken off, the originals follow
    use_loras(model, [])
    assert {v.dtype for v in model.state_dict().values()} == {torch.float16}


@torch.no_grad()
def test_stacked_loras_are_summed_before_rounding_so_their_order_does_not_matter():
    model = tiny_flux_model(seed=23)
    loras = make_lora(model, "kohya", seed=1)[0], make_lora(model, "kohya", seed=2)[0]
    model.to(torch.bfloat16)
    a, b = load_lora(model, loras[0]), load_lora(model, loras[1])
    use_loras(model, [a, b])
    ab = {k: v.clone() for k, v in model.state_dict().items()}
    use_loras(model, [b, a])
    ba = model.state_dict()
    # float32 sums in another order differ in their last float32 bits, which bf16 rounding hides but for values
    # right at a rounding boundary: at most one bf16 step there (rounding after each LoRA moved about a quarter)
    differ = sum((ab[k] != ba[k]).sum().item() for k in ab)
    assert differ <= 1e-4 * sum(v.numel() for v in ab.values())
    assert all(((ab[k].float() - ba[k].float()).abs() <= ab[k].float().abs() * 2**-7).all() for k in ab)
    use_loras(model, [])


def test_peft_dora_is_refused():
    model = tiny_flux_model(seed=24)
    tensors, _ = make_lora(model, "peft")
    tensors["transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector"] = torch.ones(H)
    with pytest.raises(CheckpointError, match=r"DoRA \(`lora_magnitude_vector`\) LoRAs are not supported"):
        load_lora(model, tensors)
