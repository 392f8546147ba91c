"""T5 + CLIP: parity with diffusers' prompt encoding, every file format, tokenizers, errors, the real manifests."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from tests.helpers.metrics import rel_l2
from tests.helpers.text_encoders import state, tiny_clip, tiny_t5, write_clip_tokenizer, write_t5_tokenizer
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from kontext_core import load_text_encoder
from kontext_core.checkpoints import CheckpointError
from kontext_core.checkpoints.text_encoders import clip_config_from_shapes, t5_config_from_shapes
from kontext_core.checkpoints.tokenizers import TokenizerNotFoundError
from kontext_core.model.text import FluxTextEncoder

DATA = Path(__file__).parent / "data"
PROMPTS = ["make the car red", "Turn the sky into a sunset, and add a small blue circle at the top left!"]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def read_manifest(name: str) -> dict[str, tuple[int, ...]]:
    rows = [line.split("\t") for line in (DATA / name).read_text().splitlines()[1:]]
    return {key: tuple(json.loads(shape)) for key, shape, *_ in rows}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Reference models and tokenizers built directly with transformers, and their ComfyUI-style files."""
    root = tmp_path_factory.mktemp("text")
    t5_tok_dir, clip_tok_dir = write_t5_tokenizer(root / "t5_tok"), write_clip_tokenizer(root / "clip_tok")
    t5_tok = T5TokenizerFast.from_pretrained(str(t5_tok_dir), local_files_only=True)
    clip_tok = CLIPTokenizer.from_pretrained(str(clip_tok_dir), local_files_only=True)
    t5, clip = tiny_t5(len(t5_tok)), tiny_clip(len(clip_tok))
    t5_state = state(t5)
    del t5_state["encoder.embed_tokens.weight"]  # ComfyUI's t5xxl files keep only `shared`
    save_file(t5_state, root / "t5xxl_fp32.safetensors")
    clip_state = {f"text_model.{k}": v for k, v in state(clip).items()}
    clip_state["text_projection.weight"] = torch.randn(128, 128)
    save_file(clip_state, root / "clip_l.safetensors")
    return {
        "root": root,
        "t5": t5,
        "clip": clip,
        "t5_tok": t5_tok,
        "clip_tok": clip_tok,
        "files": {
            "t5": root / "t5xxl_fp32.safetensors",
            "clip": root / "clip_l.safetensors",
            "t5_tokenizer": t5_tok_dir,
            "clip_tokenizer": clip_tok_dir,
        },
    }


@pytest.fixture(scope="module")
def expected(tiny):
    return load_text_encoder(**tiny["files"]).encode(PROMPTS)


def with_files(tiny, **files):
    return load_text_encoder(**{**tiny["files"], **files})


@pytest.mark.parametrize("length", [512, 256])
def test_encode_matches_diffusers_flux_kontext_pipeline(tiny, length):
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.FluxKontextPipeline(
        scheduler=None,
        vae=None,
        transformer=None,
        text_encoder=tiny["clip"],
        tokenizer=tiny["clip_tok"],
        text_encoder_2=tiny["t5"],
        tokenizer_2=tiny["t5_tok"],
    )
    with torch.no_grad():  # as the pipeline's __call__ runs it
        txt_ref, y_ref, _ = pipe.encode_prompt(PROMPTS, None, device=torch.device("cpu"), max_sequence_length=length)
    txt, y = with_files(tiny, t5_max_length=length).encode(PROMPTS)
    t5_err, clip_err = (txt - txt_ref).abs().max(), (y - y_ref).abs().max()
    print(f"\n[parity L={length}] T5 max |Δ| {t5_err:.2e}, CLIP pooled max |Δ| {clip_err:.2e}")
    assert txt.shape == (2, length, 40) and y.shape == (2, 128)
    assert t5_err <= 1e-5 and clip_err <= 1e-5
    assert (y[0] - y[1]).abs().max() > 1e-2 and (txt[0] - txt[1]).abs().max() > 1e-2


def test_pooled_output_is_the_final_norm_state_at_the_first_end_token(tiny, expected):
    ids = tiny["clip_tok"](PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    eos = tiny["clip_tok"].eos_token_id
    assert ids.max() == eos and (ids == eos).sum(1).min() > 1  # padded with the end token, as CLIP's
    with torch.no_grad():
        hidden = tiny["clip"](input_ids=ids).last_hidden_state
    first = (ids == eos).int().argmax(1)
    assert torch.allclose(expected[1], hidden[torch.arange(2), first], atol=1e-6, rtol=0)


def test_legacy_clip_config_with_eos_2_pools_at_the_same_token(tiny, expected, tmp_path):
    # openai/clip-vit-large-patch14's config.json (and FLUX's text_encoder/) still says eos_token_id 2
    legacy = tiny_clip(len(tiny["clip_tok"]), eos_token_id=2)
    legacy.load_state_dict(tiny["clip"].state_dict())
    legacy.save_pretrained(tmp_path / "text_encoder")
    assert json.loads((tmp_path / "text_encoder" / "config.json").read_text())["eos_token_id"] == 2
    _, y = with_files(tiny, clip=tmp_path / "text_encoder").encode(PROMPTS)
    assert (y - expected[1]).abs().max() <= 1e-6


def test_t5_pad_length_changes_shape_and_numbers(tiny, expected):
    short, _ = with_files(tiny, t5_max_length=256).encode(PROMPTS)
    assert short.shape == (2, 256, 40) and expected[0].shape == (2, 512, 40)
    # no attention mask: the padding takes part in attention, so even the prompt's own tokens move
    assert (short[:, :5] - expected[0][:, :5]).abs().max() > 1e-3


def test_a_string_is_a_batch_of_one_and_batches_do_not_mix(tiny, expected):
    encoder = with_files(tiny)
    txt, y = encoder.encode(PROMPTS[1])
    assert txt.shape == (1, 512, 40) and y.shape == (1, 128)
    assert (txt[0] - expected[0][1]).abs().max() <= 1e-5 and (y[0] - expected[1][1]).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="non-empty list of strings"):
        encoder.encode([])


def test_clip_and_t5_layouts_load_to_the_same_output(tiny, expected, tmp_path):
    t5_state, clip_state = state(tiny["t5"]), state(tiny["clip"])
    save_file(clip_state, tmp_path / "clip_unprefixed.safetensors")  # as transformers 5.x writes it
    embed_only = {k: v for k, v in t5_state.items() if k != "shared.weight"}
    save_file(embed_only, tmp_path / "t5_embed_tokens.safetensors")
    save_file(t5_state, tmp_path / "t5_both_embeddings.safetensors")
    for t5, clip in [
        (tmp_path / "t5_embed_tokens.safetensors", tmp_path / "clip_unprefixed.safetensors"),
        (tmp_path / "t5_both_embeddings.safetensors", tiny["files"]["clip"]),
    ]:
        txt, y = with_files(tiny, t5=t5, clip=clip).encode(PROMPTS)
        assert (txt - expected[0]).abs().max() <= 1e-6 and (y - expected[1]).abs().max() <= 1e-6, (t5, clip)


def test_diffusers_folders_with_sharded_t5_and_their_tokenizers(tiny, expected, tmp_path):
    tiny["t5"].save_pretrained(tmp_path / "text_encoder_2", max_shard_size="20KB")
    tiny["clip"].save_pretrained(tmp_path / "text_encoder")
    assert (tmp_path / "text_encoder_2" / "model.safetensors.index.json").is_file()
    shutil.copytree(tiny["files"]["t5_tokenizer"], tmp_path / "tokenizer_2")
    tiny["clip_tok"].save_pretrained(tmp_path / "tokenizer")  # tokenizer.json form
    encoder = load_text_encoder(t5=tmp_path / "text_encoder_2", clip=tmp_path / "text_encoder")
    txt, y = encoder.encode(PROMPTS)
    assert (txt - expected[0]).abs().max() <= 1e-6 and (y - expected[1]).abs().max() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_t5_files(tiny, expected, tmp_path, dtype):
    half = {k: v.to(dtype) for k, v in state(tiny["t5"]).items()}
    save_file(half, tmp_path / "t5xxl_half.safetensors")
    encoder = with_files(tiny, t5=tmp_path / "t5xxl_half.safetensors", dtype=torch.float32)
    txt, _ = encoder.encode(PROMPTS)
    rounded = T5EncoderModel(tiny["t5"].config).eval()
    rounded.load_state_dict({k: v.float() for k, v in half.items()})
    ids = tiny["t5_tok"](PROMPTS, padding="max_length", max_length=512, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = rounded(input_ids=ids).last_hidden_state
    print(f"\n[{dtype}] T5 file vs fp32 weights: rel-L2 {rel_l2(txt, expected[0]):.2e}")
    assert (txt - reference).abs().max() <= 1e-5  # the loader adds nothing to the file's own rounding
    assert rel_l2(txt, expected[0]) <= 1e-2  # and that rounding is within half precision


def test_half_compute_keeps_the_dtypes_from_pretrained_would(tiny, tmp_path):
    tiny["t5"].save_pretrained(tmp_path / "text_encoder_2")
    for dtype in (torch.float16, torch.bfloat16):
        ours = with_files(tiny, t5=tmp_path / "text_encoder_2", dtype=dtype).t5
        theirs = T5EncoderModel.from_pretrained(tmp_path / "text_encoder_2", dtype=dtype, local_files_only=True)
        dtypes = {k: v.dtype for k, v in ours.state_dict().items()}
        assert dtypes == {k: v.dtype for k, v in theirs.state_dict().items()}
        wo = "encoder.block.0.layer.1.DenseReluDense.wo.weight"
        # T5's wo activations overflow fp16, so from_pretrained keeps wo in fp32 there (and only there)
        assert dtypes[wo] == (torch.float32 if dtype == torch.float16 else dtype)


def _fp8_files(tiny, tmp_path):
    """Plain fp8, ComfyUI scaled fp8 (marker + scale_weight + scale_input) and the newer weight_scale form,
    with the dequantized weights each one stands for."""
    full = state(tiny["t5"])
    del full["encoder.embed_tokens.weight"]
    linears = [k for k, v in full.items() if v.ndim == 2 and ".block." in k and "relative_attention_bias" not in k]
    plain, scaled, newer = dict(full), dict(full), dict(full)
    plain_ref, scaled_ref = dict(full), dict(full)
    for i, key in enumerate(linears):
        layer = key.removesuffix(".weight")
        plain[key] = full[key].to(torch.float8_e4m3fn)
        plain_ref[key] = plain[key].float()
        scale = full[key].abs().amax() / 448.0 * (1.0 + 0.1 * i)  # distinct scales: a mixed-up scale shows
        scaled[key] = newer[key] = (full[key] / scale).to(torch.float8_e4m3fn)
        scaled[f"{layer}.scale_weight"] = newer[f"{layer}.weight_scale"] = scale.reshape(())
        scaled[f"{layer}.scale_input"] = torch.tensor(1.7)
        scaled_ref[key] = scaled[key].float() * scale
    scaled["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    layers = {k.removesuffix(".weight"): {"format": "float8_e4m3fn"} for k in linears}
    save_file(plain, tmp_path / "t5xxl_fp8_e4m3fn.safetensors")
    save_file(scaled, tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors")
    save_file(
        newer,
        tmp_path / "t5xxl_fp8_new.safetensors",
        metadata={"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})},
    )
    return {"t5xxl_fp8_e4m3fn": plain_ref, "t5xxl_fp8_e4m3fn_scaled": scaled_ref, "t5xxl_fp8_new": scaled_ref}


def test_fp8_t5_files_match_their_dequantized_weights(tiny, expected, tmp_path):
    ids = tiny["t5_tok"](PROMPTS, padding="max_length", max_length=512, return_tensors="pt").input_ids
    for name, weights in _fp8_files(tiny, tmp_path).items():
        reference = T5EncoderModel(tiny["t5"].config).eval()
        reference.load_state_dict({**weights, "encoder.embed_tokens.weight": weights["shared.weight"]})
        with torch.no_grad():
            dequantized = reference(input_ids=ids).last_hidden_state
        encoder = with_files(tiny, t5=tmp_path / f"{name}.safetensors", dtype=torch.float32)
        txt, _ = encoder.encode(PROMPTS)
        print(
            f"\n[{name}] vs dequantized max |Δ| {(txt - dequantized).abs().max():.1e}; "
            f"vs full precision rel-L2 {rel_l2(txt, expected[0]):.3e}"
        )
        assert (txt - dequantized).abs().max() <= 1e-5
        # e4m3 keeps 3 mantissa bits (~2% RMS error per weight); through the 7 linears of each of the
        # 2 blocks those errors add up to several percent of the output, and stay well under 10%
        assert 1e-3 < rel_l2(txt, expected[0]) < 0.1
    assert with_files(tiny, t5=tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors").t5.dtype == torch.bfloat16


def test_unsupported_quantization_and_stray_scales_are_refused(tiny, tmp_path):
    full = state(tiny["t5"])
    layers = {"encoder.block.0.layer.0.SelfAttention.q": {"format": "nvfp4"}}
    save_file(full, tmp_path / "nvfp4.safetensors", metadata={"_quantization_metadata": json.dumps({"layers": layers})})
    with pytest.raises(CheckpointError, match=r"nvfp4\.safetensors.*'nvfp4'"):
        with_files(tiny, t5=tmp_path / "nvfp4.safetensors")
    stray = {**full, "encoder.block.0.layer.0.SelfAttention.x.scale_weight": torch.tensor(2.0)}
    save_file(stray, tmp_path / "stray.safetensors")
    with pytest.raises(CheckpointError, match="scales without their weights"):
        with_files(tiny, t5=tmp_path / "stray.safetensors")


def test_config_in_the_file_header_wins_over_shapes(tiny, tmp_path):
    # four 32-wide heads: the shapes alone would say two 64-wide ones
    four_heads = tiny_clip(len(tiny["clip_tok"]), seed=5, heads=4)
    config = json.dumps(four_heads.config.to_dict())
    save_file(state(four_heads), tmp_path / "clip_4h.safetensors", metadata={"config": config})
    save_file(state(four_heads), tmp_path / "clip_no_config.safetensors")
    ids = tiny["clip_tok"](PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = four_heads(input_ids=ids).pooler_output
    _, y = with_files(tiny, clip=tmp_path / "clip_4h.safetensors").encode(PROMPTS)
    _, y_inferred = with_files(tiny, clip=tmp_path / "clip_no_config.safetensors").encode(PROMPTS)
    assert (y - reference).abs().max() <= 1e-5
    assert (y_inferred - reference).abs().max() > 1e-3


def test_tokenizer_files_spiece_and_tokenizer_json_agree(tiny, tmp_path):
    tiny["t5_tok"].save_pretrained(tmp_path / "t5_json")
    assert not (tmp_path / "t5_json" / "spiece.model").exists()
    from kontext_core.checkpoints.tokenizers import load_tokenizer

    a = load_tokenizer(tiny["files"]["t5_tokenizer"], "t5")(PROMPTS).input_ids
    b = load_tokenizer(tmp_path / "t5_json", "t5")(PROMPTS).input_ids
    assert a == b and all(ids[-1] == 1 for ids in a)  # T5 appends </s>


def test_tokenizers_found_in_a_comfyui_install(tiny, expected, tmp_path, monkeypatch):
    root = tmp_path / "ComfyUI"
    shutil.copytree(tiny["files"]["clip_tokenizer"], root / "comfy" / "sd1_tokenizer")
    shutil.copytree(tiny["files"]["t5_tokenizer"], root / "comfy" / "text_encoders" / "t5_tokenizer")
    models = {"t5": tiny["files"]["t5"], "clip": tiny["files"]["clip"]}
    monkeypatch.delenv("COMFYUI_ROOT", raising=False)
    txt, y = load_text_encoder(**models, comfyui_root=root).encode(PROMPTS)
    assert (txt - expected[0]).abs().max() == 0 and (y - expected[1]).abs().max() == 0
    monkeypatch.setenv("COMFYUI_ROOT", str(root))
    assert load_text_encoder(**models).t5_tokenizer.name_or_path.endswith("t5_tokenizer")
    monkeypatch.delenv("COMFYUI_ROOT")
    inside = root / "models" / "text_encoders"
    inside.mkdir(parents=True)
    shutil.copy(tiny["files"]["clip"], inside / "clip_l.safetensors")
    shutil.copy(tiny["files"]["t5"], inside / "t5xxl.safetensors")
    found = load_text_encoder(t5=inside / "t5xxl.safetensors", clip=inside / "clip_l.safetensors")
    assert Path(found.clip_tokenizer.name_or_path) == root / "comfy" / "sd1_tokenizer"


@pytest.mark.skipif(
    not Path(os.environ.get("COMFYUI_ROOT", "/nonexistent"), "comfy", "sd1_tokenizer").is_dir(),
    reason="needs COMFYUI_ROOT pointing at a ComfyUI checkout (its shipped tokenizers)",
)
def test_comfyui_shipped_tokenizers_and_real_clip_pooling():
    from kontext_core.checkpoints.tokenizers import find_tokenizer, load_tokenizer

    root = os.environ["COMFYUI_ROOT"]
    t5_tok = load_tokenizer(find_tokenizer("t5", None, "t5xxl.safetensors", root), "t5")
    clip_tok = load_tokenizer(find_tokenizer("clip", None, "clip_l.safetensors", root), "clip")
    assert t5_tok("a cat wearing a hat").input_ids == [3, 9, 1712, 5119, 3, 9, 3, 547, 1]
    ids = clip_tok(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]  # padded with <|endoftext|>
    # narrow towers with the real vocabularies; CLIP with openai's legacy `eos_token_id: 2`, whose argmax
    # rule picks the first <|endoftext|> for real CLIP ids, as the encoder's own first-end-token rule does
    clip = tiny_clip(49408, eos_token_id=2)
    with torch.no_grad():
        legacy = clip(input_ids=ids).pooler_output
        hidden = clip(input_ids=ids).last_hidden_state
    encoder = FluxTextEncoder(tiny_t5(32128), clip, t5_tok, clip_tok)
    _, y = encoder.encode("a photo of a cat")
    assert encoder.clip.eos_token_id == 49407
    assert torch.equal(y, legacy) and torch.equal(y[0], hidden[0, 6])


def test_missing_tokenizer_says_which_folder_to_provide(tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_ROOT", raising=False)
    files = tiny["files"]
    with pytest.raises(
        TokenizerNotFoundError,
        match=r"no T5 tokenizer.*Pass t5_tokenizer= a folder.*tokenizer_2/.*comfyui_root= or COMFYUI_ROOT",
    ):
        load_text_encoder(t5=files["t5"], clip=files["clip"], clip_tokenizer=files["clip_tokenizer"])
    with pytest.raises(TokenizerNotFoundError, match=r"clip_tokenizer=.*not a CLIP tokenizer folder.*vocab\.json"):
        with_files(tiny, clip_tokenizer=tmp_path)
    assert issubclass(TokenizerNotFoundError, FileNotFoundError)


def test_foreign_tokenizers_are_caught(tiny, tmp_path):
    clip_json = tmp_path / "clip_json"  # CLIP's tokenizer.json, which a T5 tokenizer folder may hold too
    tiny["clip_tok"].save_pretrained(clip_json)
    with pytest.raises(ValueError, match=r"clip_json: cannot load a T5 tokenizer"):
        with_files(tiny, t5_tokenizer=clip_json)
    # without its tokenizer_config, T5's tokenizer adds 100 <extra_id_n> tokens the tiny model has no row for
    shutil.copy(tiny["files"]["t5_tokenizer"] / "spiece.model", tmp_path / "spiece.model")
    with pytest.raises(ValueError, match=r"T5 tokenizer .* has 167 tokens but the T5 model's vocabulary has 67"):
        with_files(tiny, t5_tokenizer=tmp_path)


def test_wrong_files_are_named(tiny, tmp_path):
    files = tiny["files"]
    save_file(
        {"double_blocks.0.img_attn.qkv.weight": torch.randn(6, 2), "img_in.weight": torch.randn(2, 64)},
        tmp_path / "flux1-kontext-dev.safetensors",
    )
    save_file(
        {"encoder.conv_in.weight": torch.randn(4, 3, 3, 3), "decoder.conv_in.weight": torch.randn(4, 16, 3, 3)},
        tmp_path / "ae.safetensors",
    )
    cases = [
        ({"t5": tmp_path / "flux1-kontext-dev.safetensors"}, r"flux1-kontext-dev\.safetensors: not a T5 .*transformer"),
        ({"clip": tmp_path / "ae.safetensors"}, r"ae\.safetensors: not a CLIP text model: .*VAE"),
        ({"t5": files["clip"]}, r"clip_l\.safetensors: not a T5 text encoder: this is a CLIP text model"),
        ({"clip": files["t5"]}, r"t5xxl_fp32\.safetensors: not a CLIP text model: this is a T5 encoder"),
    ]
    for given, message in cases:
        with pytest.raises(CheckpointError, match=message):
            with_files(tiny, **given)
    broken = state(tiny["t5"])
    del broken["encoder.block.1.layer.0.SelfAttention.o.weight"]
    broken["encoder.block.1.layer.0.SelfAttention.extra.weight"] = torch.randn(2, 2)
    save_file(broken, tmp_path / "t5_broken.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"missing keys \(1\): encoder\.block\.1\.layer\.0\.SelfAttention\.o\.weight;"
        r" unexpected keys \(1\): .*extra\.weight",
    ):
        with_files(tiny, t5=tmp_path / "t5_broken.safetensors")
    (tmp_path / "t5.bin").write_bytes(b"\x80\x04fake pickle")
    with pytest.raises(CheckpointError, match="pickle"):
        with_files(tiny, t5=tmp_path / "t5.bin")


def test_real_configs_on_meta_match_the_manifests():
    builders = {
        "t5xxl_encoder_keys.tsv": (t5_config_from_shapes, T5EncoderModel),
        "clip_l_text_keys.tsv": (clip_config_from_shapes, CLIPTextModel),
    }
    for name, (make_config, model_class) in builders.items():
        manifest = read_manifest(name)
        with torch.device("meta"):  # 4.9B parameters: never allocated
            model = model_class(make_config(manifest, name))
        ours = {k.removeprefix("text_model."): tuple(v.shape) for k, v in model.state_dict().items()}
        assert ours == manifest, name
    t5 = t5_config_from_shapes(read_manifest("t5xxl_encoder_keys.tsv"), "t5")
    assert (t5.num_heads, t5.d_kv, t5.d_ff, t5.num_layers) == (64, 64, 10240, 24)
    assert (t5.dense_act_fn, t5.is_gated_act, t5.layer_norm_epsilon) == ("gelu_new", True, 1e-6)
    assert (t5.relative_attention_num_buckets, t5.relative_attention_max_distance) == (32, 128)
    clip = clip_config_from_shapes(read_manifest("clip_l_text_keys.tsv"), "clip")
    assert (clip.num_attention_heads, clip.hidden_act, clip.layer_norm_eps) == (12, "quick_gelu", 1e-5)
    assert (clip.bos_token_id, clip.eos_token_id, clip.max_position_embeddings) == (49406, 49407, 77)


def test_a_t5_tokenizer_that_fails_without_protobuf_names_protobuf(tiny, monkeypatch):
    import kontext_core.checkpoints.tokenizers as text

    assert text._has_protobuf()  # a dependency of the pack, so installed here
    folder = tiny["files"]["t5_tokenizer"]
    text.load_tokenizer(folder, "t5")  # loads while protobuf is there

    def fails(*args, **kwargs):  # what transformers 5 raises for a `spiece.model` when protobuf is missing
        raise ValueError("`tiktoken` is required to read a `tiktoken` file. Install it with `pip install tiktoken`.")

    monkeypatch.setattr(T5TokenizerFast, "from_pretrained", fails)
    monkeypatch.setattr(text, "_has_protobuf", lambda: False)
    with pytest.raises(ValueError, match=r"cannot load a T5 tokenizer .*tiktoken.*pip install protobuf"):
        text.load_tokenizer(folder, "t5")
    monkeypatch.setattr(text, "_has_protobuf", lambda: True)  # another cause: no protobuf hint
    with pytest.raises(ValueError, match="cannot load a T5 tokenizer") as error:
        text.load_tokenizer(folder, "t5")
    assert "protobuf" not in str(error.value)
