"""Model discovery in the Hugging Face cache, and its place after explicit paths and a ComfyUI folder.

Only paths matter to discovery, so the cache here is a tree of tiny dummy files shaped like huggingface_hub's:
`models--org--name/{blobs,refs/main,snapshots/<rev>/...}` with snapshot files linking to blobs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kontext_core.tools.discovery import (
    KONTEXT_REPO,
    TEXT_ENCODERS_REPO,
    any_model_configured,
    find_in_models_folder,
    hf_cache_dir,
    hf_snapshots,
    resolve_model_files,
)

REV = "a" * 40
OLD_REV = "b" * 40


@pytest.fixture(autouse=True)
def clean_env(tmp_path, monkeypatch):
    """No real ComfyUI or HF cache of the machine may leak into these tests."""
    for var in ("COMFYUI_ROOT", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def add_snapshot(cache: Path, repo_id: str, files: list[str], rev: str = REV, main: bool = True) -> Path:
    """Files in a snapshot as huggingface_hub lays them out: each a link to a blob (here named by its path)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / rev
    for name in files:
        blob = repo / "blobs" / f"{rev}-{name.replace('/', '_')}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(b"x")
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if main:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(rev)
    return snapshot


DIFFUSERS = [
    "transformer/config.json",
    "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder_2/model-00001-of-00002.safetensors",
    "tokenizer/vocab.json",
    "tokenizer_2/spiece.model",
]


def comfyui_with(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "ComfyUI"
    for sub, name in files.items():
        (root / "models" / sub).mkdir(parents=True, exist_ok=True)
        (root / "models" / sub / name).write_bytes(b"x")
    (root / "models").mkdir(parents=True, exist_ok=True)
    return root


def test_cache_folder_follows_huggingface_hub_rules(tmp_path, monkeypatch):
    assert hf_cache_dir() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hf_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hf_cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hubcache"))
    assert hf_cache_dir() == tmp_path / "hubcache"
    assert hf_cache_dir(tmp_path / "given") == tmp_path / "given"


def test_single_files_and_text_encoder_folders_from_a_kontext_snapshot(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = add_snapshot(cache, KONTEXT_REPO, ["flux1-kontext-dev.safetensors", "ae.safetensors", *DIFFUSERS])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    files = resolve_model_files()
    assert files.transformer == snapshot / "flux1-kontext-dev.safetensors"  # the BFL file before transformer/
    assert files.vae == snapshot / "ae.safetensors"
    assert files.t5 == snapshot / "text_encoder_2"
    assert files.clip == snapshot / "text_encoder"
    assert files.sources == dict.fromkeys(("transformer", "t5", "clip", "vae"), "hf-cache")
    # folders find tokenizer_2/ and tokenizer/ beside themselves; nothing extra to pass
    assert files.t5_tokenizer is None and files.clip_tokenizer is None
    assert files.comfyui_root is None


def test_diffusers_folders_need_weights(tmp_path):
    cache = tmp_path / "hub"
    snapshot = add_snapshot(cache, KONTEXT_REPO, DIFFUSERS)
    files = resolve_model_files(hf_cache=cache)
    assert (files.transformer, files.vae) == (snapshot / "transformer", snapshot / "vae")

    configs_only = add_snapshot(tmp_path / "hub2", KONTEXT_REPO, ["transformer/config.json", "vae/config.json"])
    assert configs_only.is_dir()
    with pytest.raises(FileNotFoundError, match="--transformer .* --vae"):
        resolve_model_files(hf_cache=tmp_path / "hub2")


def test_refs_main_names_the_snapshot_to_prefer(tmp_path):
    cache = tmp_path / "hub"
    old = add_snapshot(cache, KONTEXT_REPO, ["flux1-kontext-dev.safetensors"], rev=OLD_REV)
    new = add_snapshot(cache, KONTEXT_REPO, ["flux1-kontext-dev.safetensors"], rev=REV, main=False)
    os.utime(old, (1, 1))  # the main snapshot is the older one: refs/main still wins
    assert hf_snapshots(cache, KONTEXT_REPO) == [old, new]
    (cache / ("models--" + KONTEXT_REPO.replace("/", "--")) / "refs" / "main").unlink()
    assert hf_snapshots(cache, KONTEXT_REPO) == [new, old]  # no ref: newest first


def test_text_encoder_singles_come_with_the_kontext_tokenizers(tmp_path):
    cache = tmp_path / "hub"
    kontext = add_snapshot(
        cache,
        KONTEXT_REPO,
        ["flux1-kontext-dev.safetensors", "ae.safetensors", "tokenizer/vocab.json", "tokenizer_2/spiece.model"],
    )
    singles = add_snapshot(
        cache, TEXT_ENCODERS_REPO, ["clip_l.safetensors", "t5xxl_fp8_e4m3fn.safetensors", "t5xxl_fp16.safetensors"]
    )
    files = resolve_model_files(hf_cache=cache)
    assert files.t5 == singles / "t5xxl_fp16.safetensors"  # fp16 before fp8, as in ComfyUI's folder
    assert files.clip == singles / "clip_l.safetensors"
    assert files.t5_tokenizer == kontext / "tokenizer_2"
    assert files.clip_tokenizer == kontext / "tokenizer"


def test_a_link_to_a_missing_blob_does_not_count(tmp_path):
    cache = tmp_path / "hub"
    snapshot = add_snapshot(cache, KONTEXT_REPO, ["flux1-kontext-dev.safetensors", *DIFFUSERS])
    os.remove(os.path.realpath(snapshot / "flux1-kontext-dev.safetensors"))
    assert resolve_model_files(hf_cache=cache).transformer == snapshot / "transformer"


def test_explicit_then_comfyui_then_cache_for_each_role(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = add_snapshot(cache, KONTEXT_REPO, ["flux1-kontext-dev.safetensors", "ae.safetensors", *DIFFUSERS])
    root = comfyui_with(tmp_path, {"diffusion_models": "flux1-kontext-dev.safetensors", "vae": "ae.safetensors"})
    monkeypatch.setenv("COMFYUI_ROOT", str(root))
    (tmp_path / "my_clip.safetensors").write_bytes(b"x")  # an explicit path must exist (checked up front)
    files = resolve_model_files(clip=tmp_path / "my_clip.safetensors", hf_cache=cache)
    assert files.clip == tmp_path / "my_clip.safetensors"
    assert files.transformer == root / "models" / "diffusion_models" / "flux1-kontext-dev.safetensors"
    assert files.vae == root / "models" / "vae" / "ae.safetensors"
    assert files.t5 == snapshot / "text_encoder_2"
    assert files.sources == {"transformer": "comfyui", "vae": "comfyui", "t5": "hf-cache", "clip": "explicit"}
    assert files.comfyui_root == root


def test_missing_roles_name_the_cache_and_the_fetch_command(tmp_path):
    cache = tmp_path / "hub"
    add_snapshot(cache, TEXT_ENCODERS_REPO, ["clip_l.safetensors", "t5xxl_fp16.safetensors"])
    root = comfyui_with(tmp_path, {})
    with pytest.raises(FileNotFoundError) as info:
        resolve_model_files(comfyui_root=root, hf_cache=cache)
    message = str(info.value)
    assert "--transformer flux1-kontext-dev.safetensors" in message and "--vae ae.safetensors" in message
    assert "--t5" not in message and "--clip" not in message  # those two were found in the cache
    assert str(root / "models") in message and str(cache) in message
    assert "python -m kontext_core fetch" in message


def test_a_comfyui_folder_that_does_not_exist_is_named(tmp_path):
    cache = tmp_path / "hub"
    add_snapshot(cache, KONTEXT_REPO, ["flux1-kontext-dev.safetensors", "ae.safetensors", *DIFFUSERS])
    with pytest.raises(FileNotFoundError, match=r"comfyui_root \(--comfyui\): .*ComfyUl is not a folder"):
        resolve_model_files(comfyui_root=tmp_path / "ComfyUl", hf_cache=cache)  # a typo: not the cache's files


def test_every_explicit_path_that_does_not_exist_is_named_at_once(tmp_path):
    (tmp_path / "ae.safetensors").write_bytes(b"x")
    with pytest.raises(FileNotFoundError) as info:
        resolve_model_files(
            transformer=tmp_path / "nope.safetensors",
            vae=tmp_path / "ae.safetensors",
            t5=tmp_path / "t5.safetensors",
            clip=tmp_path / "clip.safetensors",
            hf_cache=tmp_path / "hub",
        )
    message = str(info.value)
    assert all(
        f"{role} (--{role}): {tmp_path / name}" in message
        for role, name in [("transformer", "nope.safetensors"), ("t5", "t5.safetensors"), ("clip", "clip.safetensors")]
    )
    assert "ae.safetensors" not in message  # the one that exists


def test_any_model_configured(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    assert not any_model_configured(hf_cache=cache)
    assert any_model_configured(vae="ae.safetensors", hf_cache=cache)
    with pytest.raises(
        TypeError, match=r"any_model_configured: t5xxl is not a model role \(transformer, t5, clip, vae\)"
    ):
        any_model_configured(t5xxl="t5.safetensors", hf_cache=cache)  # a misspelt role must not read as "none"

    no_transformer = comfyui_with(tmp_path / "a", {"vae": "ae.safetensors"})
    assert any_model_configured(comfyui_root=no_transformer, hf_cache=cache)  # asked for: missing files are errors
    monkeypatch.setenv("COMFYUI_ROOT", str(no_transformer))
    assert not any_model_configured(hf_cache=cache)  # the variable alone needs a transformer behind it
    full = comfyui_with(tmp_path / "b", {"diffusion_models": "flux1-kontext-dev.safetensors"})
    monkeypatch.setenv("COMFYUI_ROOT", str(full))
    assert any_model_configured(hf_cache=cache)
    monkeypatch.delenv("COMFYUI_ROOT")

    add_snapshot(cache, TEXT_ENCODERS_REPO, ["clip_l.safetensors"])
    assert not any_model_configured(hf_cache=cache)  # text encoders alone are not a model
    add_snapshot(cache, KONTEXT_REPO, ["flux1-kontext-dev.safetensors"])
    assert any_model_configured(hf_cache=cache)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # $HF_HOME/hub is that same cache
    assert any_model_configured()


@pytest.mark.parametrize(
    ("names", "found"),
    [
        (["sdxl_vae.safetensors"], None),  # another model's VAE is not taken for FLUX's
        (["sdxl_vae.safetensors", "flux1_ae_bf16.safetensors"], "flux1_ae_bf16.safetensors"),
        (["ae.safetensors", "ae_fp16.safetensors"], "ae.safetensors"),
        (["sdxl_vae.safetensors", "FLUX1_vae.safetensors"], "FLUX1_vae.safetensors"),  # any case
        (["sdxl_vae.safetensors", "FLUX1/ae.safetensors"], "FLUX1/ae.safetensors"),  # a subfolder, as ComfyUI lists
        (["FLUX1/ae.safetensors", "ae.safetensors"], "ae.safetensors"),  # the same name: the top level first
    ],
)
def test_only_flux_vae_names_are_taken_from_the_vae_folder(tmp_path, names, found):
    vae = tmp_path / "models" / "vae"
    vae.mkdir(parents=True)
    for name in names:
        (vae / name).parent.mkdir(exist_ok=True)
        (vae / name).write_bytes(b"x")
    result = find_in_models_folder(tmp_path / "models", "vae")
    assert result == (vae / found if found else None)
