"""`python -m kontext_core fetch` without a network: huggingface_hub's download and metadata calls are replaced
by a fake Hub that serves tiny files through a cache laid out as huggingface_hub's (blobs named by sha256)."""

from __future__ import annotations

import argparse
import errno
import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import GatedRepoError, LocalEntryNotFoundError

from kontext_core.tools import fetch as fetch_mod
from kontext_core.tools.discovery import KONTEXT_REPO, TEXT_ENCODERS_REPO, resolve_model_files
from kontext_core.cli.fetch import add_fetch_parser, run_fetch
from kontext_core.tools.fetch import FetchError, HashMismatchError, fetch, files_to_fetch

REV = "c" * 40
CONTENT = {
    (KONTEXT_REPO, "flux1-kontext-dev.safetensors"): b"transformer weights " * 50,
    (KONTEXT_REPO, "ae.safetensors"): b"vae weights " * 20,
    (TEXT_ENCODERS_REPO, "clip_l.safetensors"): b"clip weights " * 10,
    (TEXT_ENCODERS_REPO, "t5xxl_fp16.safetensors"): b"t5 fp16 weights " * 30,
    (TEXT_ENCODERS_REPO, "t5xxl_fp8_e4m3fn_scaled.safetensors"): b"t5 fp8 weights " * 15,
}
PLACED = {
    "flux1-kontext-dev.safetensors": "diffusion_models",
    "ae.safetensors": "vae",
    "clip_l.safetensors": "text_encoders",
    "t5xxl_fp16.safetensors": "text_encoders",
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def gated_error() -> GatedRepoError:
    # built without an HTTP response object, whose class changes with huggingface_hub's HTTP client
    error = GatedRepoError.__new__(GatedRepoError)
    Exception.__init__(error, f"403 Client Error. Cannot access gated repo {KONTEXT_REPO}.")
    error.response = SimpleNamespace(status_code=403)
    return error


class FakeHub:
    """Serves CONTENT; `published` is what the Hub's metadata says (change it to fake a corrupt download)."""

    def __init__(self, cache: Path):
        self.cache = cache
        self.published = {key: (len(data), sha(data)) for key, data in CONTENT.items()}
        self.downloads: list[tuple[str, str]] = []
        self.info_calls: list[str] = []
        self.info_error: Exception | None = None
        self.download_error: Exception | None = None

    def snapshot_path(self, repo_id: str, filename: str) -> Path:
        return self.cache / ("models--" + repo_id.replace("/", "--")) / "snapshots" / REV / filename

    def put_in_cache(self, repo_id: str, filename: str, data: bytes | None = None) -> Path:
        """A cache entry as huggingface_hub leaves it: blobs/<published sha256>, linked from the snapshot."""
        real = CONTENT[(repo_id, filename)]
        blob = self.cache / ("models--" + repo_id.replace("/", "--")) / "blobs" / sha(real)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(real if data is None else data)
        link = self.snapshot_path(repo_id, filename)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        return link

    def hf_hub_download(self, repo_id, filename, *, token=None, cache_dir=None, local_files_only=False, **_):
        assert Path(cache_dir) == self.cache
        path = self.snapshot_path(repo_id, filename)
        if path.exists():
            return str(path)
        if local_files_only:
            raise LocalEntryNotFoundError(f"{filename} is not in the local cache")
        if self.download_error is not None:
            raise self.download_error
        self.downloads.append((repo_id, filename))
        return str(self.put_in_cache(repo_id, filename))

    def get_paths_info(self, repo_id, paths, **_):
        self.info_calls.append(repo_id)
        if self.info_error is not None:
            raise self.info_error
        entries = []
        for path in paths:
            size, digest = self.published[(repo_id, path)]
            entries.append(
                RepoFile(path=path, size=size, oid="0" * 40, lfs={"size": size, "oid": digest, "pointerSize": 134})
            )
        return entries


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(
        huggingface_hub.HfApi, "get_paths_info", lambda api, *args, **kw: fake.get_paths_info(*args, **kw)
    )
    for var in ("HF_HUB_OFFLINE", "COMFYUI_ROOT", "HF_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    return fake


@pytest.fixture
def comfyui(tmp_path) -> Path:
    (tmp_path / "ComfyUI" / "models").mkdir(parents=True)
    return tmp_path / "ComfyUI"


def run(comfyui: Path, hub: FakeHub, **kwargs) -> tuple[list, list[str]]:
    logs: list[str] = []
    return fetch(comfyui, cache_dir=hub.cache, log=logs.append, **kwargs), logs


def placed(comfyui: Path, filename: str) -> Path:
    return comfyui / "models" / PLACED.get(filename, "text_encoders") / filename


def leftovers(comfyui: Path) -> list[Path]:
    return list((comfyui / "models").rglob("*.part"))


def test_downloads_verifies_and_hard_links_into_comfyui(comfyui, hub):
    results, _ = run(comfyui, hub)
    assert [r.action for r in results] == ["linked"] * 4
    assert all(r.verified for r in results)
    assert sorted(hub.downloads) == sorted(k for k in CONTENT if "fp8" not in k[1])
    assert hub.info_calls == [KONTEXT_REPO, TEXT_ENCODERS_REPO]  # one metadata request per repo
    for (repo_id, name), data in CONTENT.items():
        if "fp8" in name:
            continue
        dest = placed(comfyui, name)
        assert dest.read_bytes() == data
        assert dest.stat().st_ino == Path(os.path.realpath(hub.snapshot_path(repo_id, name))).stat().st_ino
    assert leftovers(comfyui) == []
    files = resolve_model_files(comfyui_root=comfyui, hf_cache=hub.cache)  # what fetch placed is what is found
    assert files.sources == dict.fromkeys(("transformer", "t5", "clip", "vae"), "comfyui")


def test_copies_when_hard_links_fail(comfyui, hub, monkeypatch):
    def cross_device(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(fetch_mod.os, "link", cross_device)
    results, _ = run(comfyui, hub, t5="fp8_scaled")
    assert [r.action for r in results] == ["copied"] * 4
    dest = placed(comfyui, "t5xxl_fp8_e4m3fn_scaled.safetensors")
    assert dest.read_bytes() == CONTENT[(TEXT_ENCODERS_REPO, dest.name)]
    assert not dest.is_symlink() and dest.stat().st_nlink == 1
    assert not placed(comfyui, "t5xxl_fp16.safetensors").exists()
    assert leftovers(comfyui) == []


def test_files_already_in_place_are_kept(comfyui, hub):
    run(comfyui, hub)
    hub.downloads.clear()
    results, _ = run(comfyui, hub)
    assert [r.action for r in results] == ["present"] * 4 and all(r.verified for r in results)
    assert hub.downloads == []


def test_a_wrong_file_under_the_name_is_replaced(comfyui, hub):
    ae, clip = placed(comfyui, "ae.safetensors"), placed(comfyui, "clip_l.safetensors")
    good_ae, good_clip = CONTENT[(KONTEXT_REPO, ae.name)], CONTENT[(TEXT_ENCODERS_REPO, clip.name)]
    for dest, data in ((ae, b"X" * len(good_ae)), (clip, b"truncated")):  # right size wrong bytes; wrong size
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    results, logs = run(comfyui, hub)
    assert [r.action for r in results] == ["linked"] * 4
    assert ae.read_bytes() == good_ae and clip.read_bytes() == good_clip
    assert sum("differs" in line for line in logs) == 2


@pytest.mark.parametrize("can_link", [True, False])
def test_hash_mismatch_leaves_no_file_and_names_both_hashes(comfyui, hub, monkeypatch, can_link):
    if not can_link:
        monkeypatch.setattr(fetch_mod.os, "link", lambda src, dst: (_ for _ in ()).throw(OSError(errno.EXDEV, "")))
    data = CONTENT[(KONTEXT_REPO, "ae.safetensors")]
    hub.published[(KONTEXT_REPO, "ae.safetensors")] = (len(data), "f" * 64)
    with pytest.raises(HashMismatchError) as info:
        run(comfyui, hub)
    message = str(info.value)
    assert "ae.safetensors" in message and "f" * 64 in message and sha(data) in message
    assert not placed(comfyui, "ae.safetensors").exists() and leftovers(comfyui) == []
    assert not hub.snapshot_path(KONTEXT_REPO, "ae.safetensors").exists()  # the bad cache copy is gone too
    assert placed(comfyui, "flux1-kontext-dev.safetensors").is_file()  # the file before it was fine


def test_size_mismatch_is_refused_before_placing(comfyui, hub):
    hub.published[(TEXT_ENCODERS_REPO, "clip_l.safetensors")] = (7, "0" * 64)
    with pytest.raises(FetchError, match="clip_l.safetensors.* bytes, expected 7 \\(published on huggingface.co"):
        run(comfyui, hub)
    assert not placed(comfyui, "clip_l.safetensors").exists() and leftovers(comfyui) == []


@pytest.mark.parametrize("where", ["metadata", "download"])
def test_gated_repo_explains_the_license_and_the_token(comfyui, hub, where, capsys):
    if where == "metadata":
        hub.info_error = gated_error()
    else:
        hub.download_error = gated_error()
    with pytest.raises(FetchError) as info:
        run(comfyui, hub)
    message = str(info.value)
    assert KONTEXT_REPO in message and "403" in message
    assert "FLUX.1 [dev] Non-Commercial License" in message
    assert f"https://huggingface.co/{KONTEXT_REPO}" in message
    assert "--token" in message and "HF_TOKEN" in message and "hf auth login" in message
    assert list((comfyui / "models").rglob("*")) == []


def test_cli_reports_errors_and_returns_1(comfyui, hub, monkeypatch, capsys):
    hub.info_error = gated_error()
    monkeypatch.setattr(fetch_mod, "fetch", lambda root, **kw: fetch(root, cache_dir=hub.cache, **kw))
    parser = argparse.ArgumentParser()
    add_fetch_parser(parser.add_subparsers(dest="command"))
    assert run_fetch(parser.parse_args(["fetch", "--comfyui", str(comfyui)])) == 1
    assert "error: huggingface.co refused access" in capsys.readouterr().err


def test_offline_uses_the_cache_and_checks_blob_names(comfyui, hub, monkeypatch):
    hub.info_error = AssertionError("no metadata request may be made offline")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for repo_id, name in CONTENT:
        hub.put_in_cache(repo_id, name)
    results, logs = run(comfyui, hub)
    assert [r.action for r in results] == ["linked"] * 4 and all(r.verified for r in results)
    assert hub.downloads == [] and "HF_HUB_OFFLINE" in logs[0]
    assert placed(comfyui, "ae.safetensors").read_bytes() == CONTENT[(KONTEXT_REPO, "ae.safetensors")]


def test_offline_with_a_corrupt_cached_file(comfyui, hub):
    hub.put_in_cache(KONTEXT_REPO, "flux1-kontext-dev.safetensors", data=b"bit rot " * 125)
    with pytest.raises(HashMismatchError, match="flux1-kontext-dev.safetensors.*the name of its Hugging Face cache"):
        run(comfyui, hub, offline=True)
    assert leftovers(comfyui) == [] and not placed(comfyui, "flux1-kontext-dev.safetensors").exists()


def test_offline_without_the_file_says_what_is_missing(comfyui, hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.put_in_cache(KONTEXT_REPO, "flux1-kontext-dev.safetensors")
    with pytest.raises(FetchError, match="ae.safetensors is not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        run(comfyui, hub)


def test_no_network_falls_back_to_the_cache_then_says_so(comfyui, hub):
    hub.info_error = ConnectionError("Failed to resolve 'huggingface.co'")
    hub.download_error = AssertionError("no download may be tried without a network")
    hub.put_in_cache(KONTEXT_REPO, "flux1-kontext-dev.safetensors")
    with pytest.raises(FetchError, match="ae.safetensors is not in the Hugging Face cache.*no network"):
        run(comfyui, hub)
    assert placed(comfyui, "flux1-kontext-dev.safetensors").is_file()


def test_dry_run_writes_nothing(comfyui, hub, monkeypatch, capsys):
    monkeypatch.setattr(fetch_mod, "fetch", lambda root, **kw: fetch(root, cache_dir=hub.cache, **kw))
    parser = argparse.ArgumentParser()
    add_fetch_parser(parser.add_subparsers(dest="command"))
    monkeypatch.setenv("COMFYUI_ROOT", str(comfyui))
    args = parser.parse_args(["fetch", "--dry-run", "--t5", "fp8_scaled"])
    assert run_fetch(args) == 0
    out = capsys.readouterr().out
    assert out.count("would fetch") == 4 and "t5xxl_fp8_e4m3fn_scaled.safetensors" in out
    total = sum(len(d) for (_, name), d in CONTENT.items() if name != "t5xxl_fp16.safetensors")
    assert f"dry run: 4 file(s) to fetch, {total / 1e9:.2f} GB in all." in out
    assert hub.downloads == [] and list((comfyui / "models").rglob("*")) == []
    assert hub.info_calls == [KONTEXT_REPO, TEXT_ENCODERS_REPO]  # access is still checked


def test_a_dry_run_without_network_fails_on_what_the_cache_lacks(comfyui, hub, monkeypatch, capsys):
    monkeypatch.setattr(fetch_mod, "fetch", lambda root, **kw: fetch(root, cache_dir=hub.cache, **kw))
    hub.info_error = ConnectionError("Failed to resolve 'huggingface.co'")
    hub.put_in_cache(KONTEXT_REPO, "flux1-kontext-dev.safetensors")
    parser = argparse.ArgumentParser()
    add_fetch_parser(parser.add_subparsers(dest="command"))
    monkeypatch.setenv("COMFYUI_ROOT", str(comfyui))
    assert run_fetch(parser.parse_args(["fetch", "--dry-run"])) == 1  # the real run would fail on the other three
    captured = capsys.readouterr()
    assert captured.out.count("would fetch") == 1 and captured.out.count("unreachable") == 3
    assert "not in the Hugging Face cache, and offline: fetching would fail" in captured.err
    assert "ae.safetensors" in captured.err and "flux1-kontext-dev" not in captured.err
    assert hub.downloads == [] and list((comfyui / "models").rglob("*.safetensors")) == []


def test_bad_arguments(tmp_path, hub, capsys):
    assert run_fetch(argparse.Namespace(comfyui=None, t5="fp16", token=None, dry_run=False)) == 2
    assert "--comfyui DIR or set COMFYUI_ROOT" in capsys.readouterr().err
    with pytest.raises(FetchError, match="no models/ folder"):
        fetch(tmp_path)
    with pytest.raises(FetchError, match="no such folder"):
        fetch(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="t5='fp32': expected one of fp16, fp8_scaled"):
        files_to_fetch("fp32")


def test_offline_with_the_real_huggingface_hub(comfyui, tmp_path, monkeypatch):
    """The installed huggingface_hub finds our cache entries offline, and its blob names are the sha256."""
    cache = tmp_path / "realhub"
    fake = FakeHub(cache)
    for repo_id, name in CONTENT:
        fake.put_in_cache(repo_id, name)
    for repo_id in (KONTEXT_REPO, TEXT_ENCODERS_REPO):
        refs = cache / ("models--" + repo_id.replace("/", "--")) / "refs"
        refs.mkdir()
        (refs / "main").write_text(REV)
    monkeypatch.setattr(huggingface_hub.HfApi, "get_paths_info", lambda *a, **k: pytest.fail("no request offline"))
    results = fetch(comfyui, cache_dir=cache, offline=True, log=lambda _: None)
    assert [(r.action, r.verified) for r in results] == [("linked", True)] * 4
    assert placed(comfyui, "clip_l.safetensors").read_bytes() == CONTENT[(TEXT_ENCODERS_REPO, "clip_l.safetensors")]
