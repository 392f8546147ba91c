"""Safe, lazy reading of safetensors files and diffusers folders.

Nothing here ever unpickles: pickle-based formats are refused by name and by content, and every
safetensors header is validated against the file size before a tensor is touched, so a truncated
download fails with a message instead of a crash deep inside a model.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
# A safetensors header is JSON; anything larger than this is not a real header.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Hugging Face's shard names: model-00001-of-00004.safetensors
_SHARD_NAME = re.compile(r"(?P<stem>.+)-(?P<part>\d+)-of-(?P<total>\d+)\.safetensors")
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# ComfyUI's scaled-fp8 files (transformer and text encoders): a marker key and a float32 scale per fp8 weight.
SCALED_FP8_MARKERS = ("scaled_fp8",)
WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")


class CheckpointError(ValueError):
    """A model file that cannot be used, with the file and the problem named."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def _pickle_refusal(path: Path) -> CheckpointError:
    return CheckpointError(
        path,
        "pickle-based checkpoints (.ckpt/.pt/.pth/.bin) are refused because loading them can execute "
        "arbitrary code. Convert the file to safetensors on a machine you trust, e.g. "
        '`python -c "import torch, safetensors.torch as st; '
        "st.save_file(torch.load('in.ckpt', weights_only=True), 'out.safetensors')\"`, "
        "or download the .safetensors release of the model.",
    )


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """Validated (tensor entries, `__metadata__`) of one safetensors file, without reading any tensor."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _pickle_refusal(path)
    if not path.is_file():
        raise CheckpointError(path, "file not found")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(path, "the file is empty (0 bytes); the download or copy did not finish")
    with path.open("rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        raw = f.read(n) if n is not None and n <= MAX_HEADER_BYTES and 8 + n <= size else None
    try:
        header = json.loads(raw) if raw is not None else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if header is None:
        # only once it fails as safetensors: a header length may start with the same bytes as a pickle
        if head[:2] == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
            raise _pickle_refusal(path)
        raise CheckpointError(
            path, "not a safetensors file, or truncated: its header does not fit in the file or is not valid JSON"
        )
    if not isinstance(header, dict):
        raise CheckpointError(path, "not a safetensors file: the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    for key, entry in header.items():
        try:
            start, end = entry["data_offsets"]
            dtype, shape = entry["dtype"], entry["shape"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(path, f"malformed header entry for tensor {key!r}") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(path, f"tensor {key!r} has dtype {dtype}, which this loader does not support")
        if end > data_size:
            raise CheckpointError(
                path,
                f"truncated: tensor {key!r} ends at byte {8 + n + end} but the file has {size} bytes; "
                "download the file again",
            )
        if end - start != math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize:
            raise CheckpointError(
                path, f"malformed header: tensor {key!r} spans {end - start} bytes, not {shape} {dtype}"
            )
    if not header:
        raise CheckpointError(path, "the file holds no tensors")
    return header, metadata


class TensorNames:
    """The mapping part of a tensor source: its tensor names, in file order (`_entries` is keyed by them)."""

    _entries: dict

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self._entries:
            yield key, self.tensor(key)


class TensorSource(TensorNames):
    """The tensors of one checkpoint (a file, or a folder of shards) read lazily through memory maps.

    `keys()`, `shape(key)` and `dtype(key)` come from the headers alone; `tensor(key)` reads one tensor.
    """

    def __init__(self, files: list[Path], origin: Path):
        self.origin = origin
        self.metadata: dict[str, str] = {}
        self._entries: dict[str, dict] = {}
        self._file_of: dict[str, Path] = {}
        for file in files:
            entries, metadata = read_header(file)
            self.metadata.update(metadata)
            for key, entry in entries.items():
                if key in self._file_of:  # two files in one folder that are not shards of one model
                    raise CheckpointError(
                        origin, f"tensor {key!r} is in both {self._file_of[key].name} and {file.name}"
                    )
                self._entries[key] = entry
                self._file_of[key] = file
        self._handles: dict[Path, object] = {}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self._entries[key]["dtype"]]

    def nbytes(self) -> int:
        return sum(e["data_offsets"][1] - e["data_offsets"][0] for e in self._entries.values())

    def tensor(self, key: str) -> torch.Tensor:
        file = self._file_of[key]
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error type for corrupt files
                raise CheckpointError(file, f"cannot be read as safetensors: {e}") from None
            self._handles[file] = handle
        return handle.get_tensor(key)

    def close(self) -> None:
        self._handles.clear()


def open_tensors(path: str | os.PathLike, weights_name: str = "diffusion_pytorch_model") -> TensorSource:
    """Open a safetensors file, a diffusers-style folder (`<weights_name>.safetensors`, or shards + index), or a
    GGUF file (`gguf_io.GGUFSource`, the same interface)."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        from kontext_core.checkpoints.gguf_io import GGUFSource

        return GGUFSource(path)
    if path.is_dir():
        return TensorSource(_folder_shards(path, weights_name), path)
    return TensorSource([path], path)


def _folder_shards(folder: Path, weights_name: str) -> list[Path]:
    index = folder / f"{weights_name}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(index, f"malformed shard index ({e})") from None
        shards = sorted({folder / name for name in weight_map.values()})
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise CheckpointError(folder, f"shards listed in {index.name} are missing: {', '.join(missing)}")
        return shards
    single = folder / f"{weights_name}.safetensors"
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1 or (found and _one_shard_set(found)):
        return found
    if found:  # e.g. ComfyUI's models/vae: several models side by side, which must never be merged
        names = ", ".join(f.name for f in found)
        raise CheckpointError(
            folder, f"holds several .safetensors files that are not the shards of one model ({names}): give one of them"
        )
    pickles = [p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise _pickle_refusal(folder / pickles[0])
    raise CheckpointError(folder, "no .safetensors weights in this folder")


def _one_shard_set(files: list[Path]) -> bool:
    """Whether `files` are exactly the parts 1..N of one `<stem>-0000k-of-0000N.safetensors` set."""
    matches = [_SHARD_NAME.fullmatch(f.name) for f in files]
    if not all(matches):
        return False
    sets = {(m["stem"], int(m["total"])) for m in matches}
    parts = sorted(int(m["part"]) for m in matches)
    return len(sets) == 1 and parts == list(range(1, next(iter(sets))[1] + 1))


def read_config_json(folder: str | os.PathLike) -> dict | None:
    """A diffusers/transformers folder's `config.json`, if it has one."""
    file = Path(folder) / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(file, f"malformed config.json ({e})") from None


def strip_prefix(keys: list[str], prefixes: tuple[str, ...]) -> str:
    """The first of `prefixes` that every key in `keys` starts with, or ''."""
    for prefix in prefixes:
        if prefix and keys and all(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def assign_tensors(
    module: torch.nn.Module,
    shapes: dict[str, tuple[int, ...]],
    get: Callable[[str], torch.Tensor],
    origin: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    what: str = "model",
) -> torch.nn.Module:
    """Load tensors into a module built on `meta`, strictly: every key and shape must match.

    `shapes` names what the file holds and `get(key)` reads one tensor, so each tensor is read, moved
    and cast on its own and the whole state never sits in memory twice. Floating tensors are cast to
    `dtype` when given; others keep theirs.
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if tuple(shapes[k]) != expected[k])
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {first_items(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {first_items(unexpected)}")
    if wrong:
        problems.append("shape mismatches: " + first_items([f"{k} {tuple(shapes[k])} != {expected[k]}" for k in wrong]))
    if problems:
        raise CheckpointError(origin, f"does not match the {what} layout: " + "; ".join(problems))
    state = {}
    for key in expected:
        t = get(key)
        cast = dtype if dtype is not None and t.is_floating_point() else None
        state[key] = t.to(device=device, dtype=cast) if cast is not None else t.to(device=device)
    module.load_state_dict(state, strict=True, assign=True)
    return module


def ensure_materialized(module: torch.nn.Module, origin: str | os.PathLike) -> None:
    """Fail loudly if anything is still on `meta` (a buffer no file holds), instead of computing garbage."""
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(origin, f"internal: tensors were not loaded: {first_items(left)}")


def first_items(items: list[str], n: int = 8) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", … ({len(items) - n} more)" if len(items) > n else "")
