"""Downloading the real FLUX.1 Kontext [dev] files into a ComfyUI install: `python -m kontext_core fetch`.

Each file goes through the Hugging Face cache (`hf_hub_download`: resumable, with progress bars), is checked
against the size and LFS sha256 the Hub publishes for it, and is then placed in ComfyUI's folder: a hard link
when the cache is on the same filesystem (no second copy on disk), else a copy written to `<name>.part` and
renamed, so a file under its final name is always whole and verified.

Offline (`HF_HUB_OFFLINE=1`, or huggingface.co unreachable) the Hub's metadata cannot be asked. A file already
in the cache is then used and checked against its blob name: for LFS files the cache names each blob after the
sha256 the Hub reported when it was downloaded, so the check needs no sidecar. A destination file with no cached
copy to compare with is kept as it is, and reported as unverified.

`huggingface_hub` is imported inside the functions so that `import kontext_core` stays light.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from kontext_core.tools.discovery import KONTEXT_REPO, TEXT_ENCODERS_REPO

T5_FILES = {"fp16": "t5xxl_fp16.safetensors", "fp8_scaled": "t5xxl_fp8_e4m3fn_scaled.safetensors"}
LICENSE_HINT = (
    "FLUX.1 Kontext [dev] is gated under the FLUX.1 [dev] Non-Commercial License: accept it at "
    f"https://huggingface.co/{KONTEXT_REPO} while logged in, then give a token "
    "(--token, the HF_TOKEN environment variable, or `hf auth login`)."
)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 8 << 20
# Transport failures by class name: huggingface_hub has used requests, httpx and httpx2 across versions.
_NETWORK_ERRORS = {
    "ConnectionError",
    "ConnectError",
    "ConnectTimeout",
    "ReadTimeout",
    "Timeout",
    "TimeoutException",
    "NetworkError",
    "ProxyError",
    "RemoteProtocolError",
    "MaxRetryError",
    "NameResolutionError",
}


class FetchError(RuntimeError):
    """A file could not be fetched; the message names the file and what to do."""


class NetworkError(FetchError):
    """huggingface.co could not be reached."""


class HashMismatchError(FetchError):
    """A downloaded file's content is not the one the Hub published."""


@dataclass(frozen=True)
class RemoteFile:
    repo_id: str
    filename: str
    folder: str  # ComfyUI models/ subfolder

    @property
    def label(self) -> str:
        return f"{self.repo_id}/{self.filename}"


@dataclass(frozen=True)
class FileMeta:
    size: int | None
    sha256: str | None
    origin: str = "published on huggingface.co"  # where the expected values come from, for error messages


UNREACHABLE = "unreachable"


@dataclass
class FetchResult:
    file: RemoteFile
    destination: Path
    # "present" (kept), "linked" (hard link to the cache's copy), "copied" (from the cache), "would fetch" (dry run),
    # UNREACHABLE (dry run: offline, and not in the cache, so the real run would fail on it)
    action: str
    size: int | None = None
    sha256: str | None = None
    verified: bool = False


def files_to_fetch(t5: str = "fp16") -> list[RemoteFile]:
    """The four files ComfyUI's Kontext workflows use, with `t5` "fp16" or "fp8_scaled"."""
    if t5 not in T5_FILES:
        raise ValueError(f"t5={t5!r}: expected one of {', '.join(T5_FILES)}")
    return [
        RemoteFile(KONTEXT_REPO, "flux1-kontext-dev.safetensors", "diffusion_models"),
        RemoteFile(KONTEXT_REPO, "ae.safetensors", "vae"),
        RemoteFile(TEXT_ENCODERS_REPO, "clip_l.safetensors", "text_encoders"),
        RemoteFile(TEXT_ENCODERS_REPO, T5_FILES[t5], "text_encoders"),
    ]


def offline_from_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _is_network_error(error: BaseException | None) -> bool:
    for _ in range(10):  # the cause chain; bounded in case it loops
        if error is None:
            return False
        if isinstance(error, (ConnectionError, TimeoutError)):
            return True
        if any(cls.__name__ in _NETWORK_ERRORS for cls in type(error).__mro__):
            return True
        error = error.__cause__ or error.__context__
    return False


def _status(error: BaseException) -> int | None:
    return getattr(getattr(error, "response", None), "status_code", None)


def _explain(error: Exception, repo_id: str, what: str, offline: str | None = None) -> FetchError:
    """A FetchError saying in plain words why `what` (a file or the file list) of `repo_id` failed;
    `offline` is why no request was made, when none was."""
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    status = _status(error)
    gated = repo_id == KONTEXT_REPO
    if isinstance(error, GatedRepoError) or status in (401, 403):
        hint = LICENSE_HINT if gated else "check the token (--token, HF_TOKEN, or `hf auth login`)."
        return FetchError(f"huggingface.co refused access to {repo_id} ({status or 'gated'}) for {what}. {hint}")
    if isinstance(error, RepositoryNotFoundError):
        hint = LICENSE_HINT if gated else "check the repository name and the token."
        return FetchError(f"huggingface.co has no repository {repo_id} this token can read ({what}). {hint}")
    if isinstance(error, LocalEntryNotFoundError):
        if offline:
            return FetchError(f"{what} is not in the Hugging Face cache, and nothing is downloaded: {offline}.")
        return NetworkError(
            f"no network: cannot reach huggingface.co to download {what}, and it is not in the Hugging Face "
            "cache. Check the connection (and HTTPS_PROXY), or copy the file into place by hand."
        )
    if isinstance(error, EntryNotFoundError):
        return FetchError(f"huggingface.co has no file {what} on the main branch of {repo_id}.")
    if _is_network_error(error):
        resume = "" if what == "the file list" else "; a download that was cut resumes when you run the command again"
        return NetworkError(
            f"no network: cannot reach huggingface.co for {what} ({type(error).__name__}: {error}). Check the "
            f"connection (and HTTPS_PROXY){resume}."
        )
    if isinstance(error, HfHubHTTPError):
        return FetchError(f"huggingface.co answered {status} for {what}: {error}")
    raise error


def _lfs_sha256(entry) -> str | None:
    lfs = getattr(entry, "lfs", None)
    if lfs is None:
        return None
    sha = getattr(lfs, "sha256", None) or (lfs.get("sha256") if isinstance(lfs, dict) else None)
    return sha.lower() if sha else None


def remote_metadata(repo_id: str, filenames: Iterable[str], *, token: str | None = None) -> dict[str, FileMeta]:
    """Size and LFS sha256 of `filenames` on the main branch of `repo_id`, in one request."""
    from huggingface_hub import HfApi

    filenames = list(filenames)
    try:
        entries = HfApi(token=token).get_paths_info(repo_id, filenames, token=token)
    except Exception as e:  # _explain re-raises what it cannot name
        raise _explain(e, repo_id, "the file list") from e
    found = {entry.path: FileMeta(getattr(entry, "size", None), _lfs_sha256(entry)) for entry in entries}
    absent = [f for f in filenames if f not in found]
    if absent:
        raise FetchError(f"{repo_id} has no file {', '.join(absent)} on its main branch.")
    return found


def sha256_file(path: Path, label: str | None = None) -> str:
    """The sha256 of a file, with a progress bar on a terminal for the large ones."""
    from huggingface_hub.utils import tqdm

    digest = hashlib.sha256()
    size = path.stat().st_size
    with (
        open(path, "rb") as f,
        tqdm(
            total=size, unit="B", unit_scale=True, desc=f"sha256 {label or path.name}", disable=None, leave=False
        ) as bar,
    ):
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _blob_sha256(cached: Path) -> str | None:
    # the cache stores an LFS file as blobs/<sha256> and links the snapshot path to it
    name = Path(os.path.realpath(cached)).name
    return name if _SHA256.fullmatch(name) else None


def _cached_copy(item: RemoteFile, token: str | None, cache_dir: str | Path | None, offline: str | None) -> Path:
    import huggingface_hub

    try:
        path = huggingface_hub.hf_hub_download(
            item.repo_id, item.filename, token=token, cache_dir=cache_dir, local_files_only=bool(offline)
        )
    except Exception as e:  # _explain re-raises what it cannot name
        raise _explain(e, item.repo_id, item.label, offline) from e
    return Path(path)


def _cached_if_any(item: RemoteFile, cache_dir: str | Path | None) -> Path | None:
    try:
        return _cached_copy(item, None, cache_dir, offline="looking in the cache only")
    except FetchError:
        return None


def _drop_cached(cached: Path) -> None:
    # a corrupt blob would otherwise be handed back by every later hf_hub_download
    blob = Path(os.path.realpath(cached))
    blob.unlink(missing_ok=True)
    if cached.is_symlink():
        cached.unlink(missing_ok=True)


def _mismatch(item: RemoteFile, where: Path, meta: FileMeta, actual: str) -> HashMismatchError:
    return HashMismatchError(
        f"{item.label}: sha256 mismatch for {where}: expected {meta.sha256} ({meta.origin}), got {actual}. "
        "The bad copy was deleted, from the Hugging Face cache too; run the command again to download it afresh."
    )


def _matches(path: Path, meta: FileMeta) -> bool:
    if meta.size is not None and path.stat().st_size != meta.size:
        return False
    return meta.sha256 is None or sha256_file(path) == meta.sha256


def _link(src: Path, part: Path) -> bool:
    try:  # to the blob itself: a link to the cache's relative symlink would dangle in another folder
        os.link(os.path.realpath(src), part)
    except OSError:  # another filesystem, or one without hard links
        return False
    return True


def _copy_hashing(src: Path, part: Path) -> str:
    """Copy `src` to `part`, returning the sha256 of the bytes written, flushed to disk."""
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(part, "wb") as fout:
        while chunk := fin.read(_CHUNK):
            digest.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return digest.hexdigest()


def _check_space(folder: Path, size: int, label: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < size:
        raise FetchError(f"{label}: {folder} has {free / 1e9:.1f} GB free, the copy needs {size / 1e9:.1f} GB.")


def place(item: RemoteFile, cached: Path, dest: Path, meta: FileMeta) -> FetchResult:
    """Put the cached file at `dest` whole and verified: hard link, else copy to `<name>.part` and rename.
    On a hash mismatch nothing is left under either name, and the corrupt cache entry is removed."""
    size = cached.stat().st_size
    if meta.size is not None and size != meta.size:
        _drop_cached(cached)
        raise FetchError(
            f"{item.label}: the cached file {cached} has {size} bytes, expected {meta.size} ({meta.origin}); it was "
            "deleted from the cache, run the command again to download it afresh."
        )
    part = dest.with_name(dest.name + ".part")
    part.unlink(missing_ok=True)  # left by an interrupted run
    try:
        if _link(cached, part):
            action, actual = "linked", sha256_file(part, item.filename)
        else:
            _check_space(dest.parent, size, item.label)
            action, actual = "copied", _copy_hashing(cached, part)
        if meta.sha256 is not None and actual != meta.sha256:
            _drop_cached(cached)
            raise _mismatch(item, part, meta, actual)
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return FetchResult(item, dest, action, size, actual, verified=meta.sha256 is not None)


def _models_dir(comfyui_root: str | Path) -> Path:
    root = Path(comfyui_root).expanduser()
    if not root.is_dir():
        raise FetchError(f"--comfyui {root}: no such folder; expected the root of a ComfyUI install.")
    if not (root / "models").is_dir():
        raise FetchError(f"--comfyui {root}: no models/ folder inside, so this does not look like ComfyUI's root.")
    return root / "models"


def _metadata(
    items: list[RemoteFile], token: str | None, offline: str | None, log: Callable[[str], None]
) -> tuple[dict[str, FileMeta], str | None]:
    """The Hub's metadata per file label, and why we are offline (given, or found no network), if we are."""
    if offline:
        log(f"offline ({offline}): using cached files, checked against their cache blob names.")
        return {}, offline
    metas: dict[str, FileMeta] = {}
    for repo_id in dict.fromkeys(i.repo_id for i in items):
        names = [i.filename for i in items if i.repo_id == repo_id]
        try:
            found = remote_metadata(repo_id, names, token=token)
        except NetworkError as e:
            log(f"{e}\nContinuing with the Hugging Face cache only.")
            return {}, "no network, huggingface.co cannot be reached"
        metas.update({f"{repo_id}/{name}": meta for name, meta in found.items()})
    return metas, None


def _fetch_one(
    item: RemoteFile,
    dest: Path,
    meta: FileMeta | None,
    *,
    token: str | None,
    cache_dir: str | Path | None,
    offline: str | None,
    dry_run: bool,
    log: Callable[[str], None],
) -> FetchResult:
    cached = None
    if meta is None:  # offline: what the cache recorded is all there is to check against
        cached = _cached_if_any(item, cache_dir)
        if cached is not None:
            meta = FileMeta(cached.stat().st_size, _blob_sha256(cached), "the name of its Hugging Face cache blob")
    if dest.is_file():
        if meta is None:
            log(f"{dest}: present, not verified (offline, and no cached copy to compare with)")
            return FetchResult(item, dest, "present")
        if _matches(dest, meta):
            return FetchResult(item, dest, "present", meta.size, meta.sha256, verified=meta.sha256 is not None)
        log(f"{dest}: differs from {item.label} (size or sha256), {'would replace' if dry_run else 'replacing'} it")
    if dry_run and offline and cached is None:
        return FetchResult(item, dest, UNREACHABLE)
    if dry_run:
        return FetchResult(item, dest, "would fetch", meta.size if meta else None, meta.sha256 if meta else None)
    if cached is None:
        cached = _cached_copy(item, token, cache_dir, offline)
    if meta is None or meta.sha256 is None:
        why = "offline, and the cache does not name it" if offline else "not an LFS file"
        log(f"{item.label}: no sha256 to check against ({why}); its size is all that is checked")
    dest.parent.mkdir(parents=True, exist_ok=True)
    return place(item, cached, dest, meta or FileMeta(None, None))


def fetch(
    comfyui_root: str | Path,
    *,
    t5: str = "fp16",
    token: str | None = None,
    dry_run: bool = False,
    cache_dir: str | Path | None = None,
    offline: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> list[FetchResult]:
    """Download FLUX.1 Kontext [dev] (transformer, VAE) and ComfyUI's CLIP-L and T5-XXL (`t5`: "fp16" or
    "fp8_scaled") into `<comfyui_root>/models/{diffusion_models,vae,text_encoders}`.

    Files already there with the published size and sha256 are kept. `dry_run` only asks the Hub (which also
    tells whether the token may read the gated repo) and writes nothing. `offline` defaults to $HF_HUB_OFFLINE;
    `cache_dir` to huggingface_hub's own cache. Raises FetchError (HashMismatchError for corrupt content) with
    a message that names the file and what to do."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    items = files_to_fetch(t5)
    models = _models_dir(comfyui_root)
    if offline is None:
        offline = offline_from_env()
    reason = ("HF_HUB_OFFLINE is set" if offline_from_env() else "offline=True") if offline else None
    metas, reason = _metadata(items, token, reason, log)
    options = {"token": token, "cache_dir": cache_dir, "offline": reason, "dry_run": dry_run, "log": log}
    return [_fetch_one(i, models / i.folder / i.filename, metas.get(i.label), **options) for i in items]
