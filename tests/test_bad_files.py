"""Every file that is not a usable FLUX.1 Kontext transformer fails with a CheckpointError saying why."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from tests.helpers.flux_files import bfl_file, diffusers_folder, save_state, scaled_fp8_file
from tests.helpers.tiny_models import tiny_flux_model

from kontext_core import load_transformer
from kontext_core.checkpoints import CheckpointError, open_tensors


@pytest.fixture(scope="module")
def tiny():
    return tiny_flux_model(seed=31)


def refused(path, fragment: str, **kwargs) -> CheckpointError:
    with pytest.raises(CheckpointError, match=fragment) as info:
        load_transformer(path, **kwargs)
    assert str(path) in str(info.value)  # the message names the file
    return info.value


def rnd(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def test_empty_and_truncated_files(tiny, tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    refused(tmp_path / "empty.safetensors", "empty")
    whole = bfl_file(tiny, tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(whole[: len(whole) // 2])
    refused(tmp_path / "cut.safetensors", "truncated")
    (tmp_path / "junk.safetensors").write_bytes(b"\x13\x00\x00\x00\x00\x00\x00\x00not json at all....")
    refused(tmp_path / "junk.safetensors", "not a safetensors file")


class _Boom:
    """Unpickling this would create a file: proof that the loader never unpickles."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "pytorch_model.bin", "model.safetensors"])
def test_pickles_are_refused_never_unpickled(tmp_path, name):
    marker = tmp_path / "unpickled"
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"img_in.weight": _Boom(str(marker))}, protocol=4))
    error = refused(path, "refused" if name != "model.safetensors" else "pickle")
    assert "safetensors" in error.problem  # tells how to convert
    assert not marker.exists()


@pytest.mark.parametrize(
    "state, fragment",
    [
        (
            {
                "model.diffusion_model.input_blocks.0.0.weight": rnd(8, 4, 3, 3),
                "model.diffusion_model.out.2.weight": rnd(4, 8, 3, 3),
            },
            "UNet",
        ),
        (
            {
                "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": rnd(8, 8),
                "model.diffusion_model.label_emb.0.0.weight": rnd(8, 6),
            },
            "UNet",
        ),
        ({"redux_up.weight": rnd(12, 8), "redux_down.weight": rnd(8, 12)}, "Redux"),
        ({"encoder.conv_in.weight": rnd(8, 3, 3, 3), "decoder.conv_in.weight": rnd(8, 16, 3, 3)}, "VAE"),
        ({"encoder.block.0.layer.0.SelfAttention.q.weight": rnd(8, 8), "shared.weight": rnd(10, 8)}, "T5"),
        (
            {"text_model.embeddings.token_embedding.weight": rnd(10, 8), "text_model.final_layer_norm.weight": rnd(8)},
            "CLIP",
        ),
        ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": rnd(2, 8)}, "LoRA"),
        ({"something.else.weight": rnd(3, 5)}, "no FLUX transformer tensors"),
    ],
    ids=["sd15-unet", "sdxl-unet", "redux", "vae", "t5", "clip", "lora", "unknown"],
)
def test_other_architectures(tmp_path, state, fragment):
    refused(save_state(tmp_path / "other.safetensors", state), fragment)


@pytest.mark.parametrize("channels, variant", [(384, "Fill"), (128, "Depth/Canny")])
def test_fill_and_depth_models(tiny, tmp_path, channels, variant):
    state = dict(tiny.state_dict())
    state["img_in.weight"] = rnd(64, channels)
    error = refused(save_state(tmp_path / "variant.safetensors", state), variant)
    assert f"{channels} channels" in error.problem


def test_missing_and_unexpected_keys_are_listed(tiny, tmp_path):
    state = dict(tiny.state_dict())
    del state["double_blocks.1.txt_mlp.2.bias"]
    state["double_blocks.0.img_attn.extra.weight"] = rnd(4, 4)
    error = refused(save_state(tmp_path / "odd.safetensors", state), "missing keys")
    assert "double_blocks.1.txt_mlp.2.bias" in error.problem
    assert "unexpected keys (1): double_blocks.0.img_attn.extra.weight" in error.problem

    lean = {k: v for k, v in tiny.state_dict().items() if not k.startswith("single_blocks.1.")}
    lean = {k: v for k, v in lean.items() if not (k.startswith("double_blocks.1.") and k.endswith(".bias"))}
    error = refused(save_state(tmp_path / "lean.safetensors", lean), r"missing keys \(10\)")
    assert "more)" in error.problem  # a long list is cut short


def test_wrong_shape_is_listed(tiny, tmp_path):
    state = dict(tiny.state_dict())
    state["single_blocks.0.linear2.weight"] = rnd(64, 300)
    refused(save_state(tmp_path / "shape.safetensors", state), r"single_blocks.0.linear2.weight \(64, 300\)")


def test_broken_quantization(tiny, tmp_path):
    path, _ = scaled_fp8_file(tiny, tmp_path / "fp8.safetensors", "weight_scale")
    source = open_tensors(path)
    state, metadata = dict(source.items()), source.metadata
    layers = json.loads(metadata["_quantization_metadata"])["layers"]
    layers["model.diffusion_model.double_blocks.0.img_attn.qkv"] = {"format": "nvfp4"}
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    error = refused(save_state(tmp_path / "nvfp4.safetensors", state, meta), "nvfp4")
    assert "not supported" in error.problem

    block = dict(state)
    block["model.diffusion_model.double_blocks.0.img_attn.qkv.weight_scale"] = torch.rand(3, 2)
    refused(save_state(tmp_path / "block.safetensors", block, metadata), "per-tensor only")

    orphan = dict(state)
    orphan["model.diffusion_model.double_blocks.0.img_attn.gone.weight_scale"] = torch.tensor(0.1)
    refused(save_state(tmp_path / "orphan.safetensors", orphan, metadata), "without a weight")

    bad = save_state(tmp_path / "badmeta.safetensors", state, {"_quantization_metadata": "{not json"})
    refused(bad, "_quantization_metadata")


def test_unsupported_precision_on_the_device(tiny, tmp_path, monkeypatch):
    path, _ = scaled_fp8_file(tiny, tmp_path / "fp8.safetensors", "scale_weight")
    refused(path, "compute capability 8.9", fp8_matmul=True)  # on the CPU
    refused(path, "fp8 matmul computes in bf16 or fp16, not torch.float32", fp8_matmul=True, dtype=torch.float32)
    if not torch.cuda.is_available():
        refused(path, "no CUDA device", device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    refused(path, "bf16 is not supported", device="cuda", dtype=torch.bfloat16)
    refused(path, "bf16 is not supported", device="cuda")  # fp8 kept: computes in bf16
    refused(path, "cannot be kept on MPS", device="mps")
    with pytest.raises(ValueError, match="float compute dtype"):
        load_transformer(path, dtype=torch.float8_e4m3fn)


def test_bad_diffusers_folders(tiny, tmp_path):
    folder = diffusers_folder(tiny, tmp_path / "transformer")
    shard = max(folder.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    refused(folder, "truncated")
    shard.unlink()
    refused(folder, "missing")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "no .safetensors")


def test_bad_flux_params_metadata(tiny, tmp_path):
    state = tiny.state_dict()
    refused(save_state(tmp_path / "a.safetensors", state, {"flux_params": "{oops"}), "flux_params")
    refused(
        save_state(tmp_path / "b.safetensors", state, {"flux_params": json.dumps({"depth": 2, "bogus": 1})}),
        "flux_params",
    )
    wrong = json.dumps({**tiny.params.__dict__, "depth": 3})
    refused(save_state(tmp_path / "c.safetensors", state, {"flux_params": wrong}), "missing keys")


def test_a_folder_of_several_models_is_never_merged(tiny, tmp_path):
    # ComfyUI's models/diffusion_models (or vae/) holds models side by side: pointing at the folder must not
    # load a mix of them
    folder = tmp_path / "diffusion_models"
    folder.mkdir()
    bfl_file(tiny, folder / "flux1-kontext-dev.safetensors")
    bfl_file(tiny_flux_model(seed=32), folder / "flux1-kontext-dev-other.safetensors")
    error = refused(folder, "several .safetensors files that are not the shards of one model")
    assert "(flux1-kontext-dev-other.safetensors, flux1-kontext-dev.safetensors)" in str(error)


def test_shards_without_an_index_load_only_as_a_whole_set(tiny, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in tiny.state_dict().items()}
    keys = sorted(state)
    halves = {1: keys[: len(keys) // 2], 2: keys[len(keys) // 2 :]}
    folder = tmp_path / "transformer"
    folder.mkdir()
    for part, names in halves.items():
        save_file({k: state[k] for k in names}, folder / f"model-0000{part}-of-00003.safetensors")
    refused(folder, "not the shards of one model")  # part 3 of 3 is missing
    (folder / "model-00002-of-00003.safetensors").rename(folder / "model-00002-of-00002.safetensors")
    (folder / "model-00001-of-00003.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    assert sorted(open_tensors(folder).keys()) == keys
    # one tensor in two shards: which copy wins would be an accident of reading order
    save_file({keys[0]: state[keys[0]]}, folder / "extra.safetensors")
    weight_map = {k: f"model-0000{p}-of-00002.safetensors" for p, names in halves.items() for k in names}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {**weight_map, "x": "extra.safetensors"}})
    )
    with pytest.raises(CheckpointError, match=f"tensor '{keys[0]}' is in both"):
        open_tensors(folder, weights_name="model")
