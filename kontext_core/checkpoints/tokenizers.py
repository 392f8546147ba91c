"""The text encoders' files: T5 and CLIP towers through `text_encoders`, and their tokenizers, found in local
Hugging Face-format folders only (given, beside a diffusers model, or ComfyUI's shipped ones), never a hub."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from transformers import CLIPTokenizer, PreTrainedTokenizerBase, T5TokenizerFast

from kontext_core.checkpoints.text_encoders import load_clip, load_t5
from kontext_core.model.text import FluxTextEncoder

# Files that make a tokenizer folder usable, any one group suffices.
TOKENIZER_FILES = {
    "t5": (("tokenizer.json",), ("spiece.model",)),
    "clip": (("tokenizer.json",), ("vocab.json", "merges.txt")),
}
# Where ComfyUI keeps the tokenizers it ships, relative to its root.
COMFYUI_TOKENIZERS = {"t5": "comfy/text_encoders/t5_tokenizer", "clip": "comfy/sd1_tokenizer"}
# Where a diffusers pipeline folder keeps them, beside `text_encoder_2/` and `text_encoder/`.
DIFFUSERS_TOKENIZERS = {"t5": "tokenizer_2", "clip": "tokenizer"}
OPTION = {"t5": "t5_tokenizer", "clip": "clip_tokenizer"}


class TokenizerNotFoundError(FileNotFoundError):
    """No usable local tokenizer folder for a text encoder; the message says which folder to provide."""


def is_tokenizer_folder(folder: Path, kind: str) -> bool:
    return folder.is_dir() and any(all((folder / f).is_file() for f in group) for group in TOKENIZER_FILES[kind])


def _describe_files(kind: str) -> str:
    return " or ".join(" + ".join(group) for group in TOKENIZER_FILES[kind])


def tokenizer_candidates(
    kind: str, model_path: str | os.PathLike, comfyui_root: str | os.PathLike | None
) -> list[Path]:
    """Where a tokenizer not given is looked for, in order: inside and beside a diffusers model folder,
    in the ComfyUI root (argument, else $COMFYUI_ROOT), in a ComfyUI install the model file sits in."""
    model_path = Path(model_path).resolve()
    found = []
    if model_path.is_dir():
        found += [model_path, model_path.parent / DIFFUSERS_TOKENIZERS[kind]]
    root = comfyui_root or os.environ.get("COMFYUI_ROOT")
    if root:
        found.append(Path(root) / COMFYUI_TOKENIZERS[kind])
    # models/text_encoders/x.safetensors inside a ComfyUI install: its shipped tokenizers are two levels up
    found += [parent / COMFYUI_TOKENIZERS[kind] for parent in model_path.parents]
    return found


def find_tokenizer(
    kind: str, given: str | os.PathLike | None, model_path: str | os.PathLike, comfyui_root: str | os.PathLike | None
) -> Path:
    """The tokenizer folder for `kind` ("t5" or "clip"): the one given, else the first candidate that has one."""
    if given is not None:
        folder = Path(given)
        if is_tokenizer_folder(folder, kind):
            return folder
        raise TokenizerNotFoundError(
            f"{OPTION[kind]}={str(folder)!r} is not a {kind.upper()} tokenizer folder: it needs {_describe_files(kind)}"
        )
    candidates = tokenizer_candidates(kind, model_path, comfyui_root)
    for folder in candidates:
        if is_tokenizer_folder(folder, kind):
            return folder
    near = [str(c) for c in candidates if "comfy" not in c.parts][:2]
    raise TokenizerNotFoundError(
        f"no {kind.upper()} tokenizer found for {model_path} (looked in {', '.join(near) or 'no model folder'}, "
        f"and for ComfyUI's `{COMFYUI_TOKENIZERS[kind]}`). Pass {OPTION[kind]}= a folder in Hugging Face format "
        f"({_describe_files(kind)}), such as the `{DIFFUSERS_TOKENIZERS[kind]}/` folder of FLUX.1-Kontext-dev, or set "
        f"comfyui_root= or COMFYUI_ROOT to a ComfyUI install."
    )


def load_tokenizer(folder: str | os.PathLike, kind: str) -> PreTrainedTokenizerBase:
    """A T5 or CLIP tokenizer from a local folder (the classes diffusers' Flux pipelines use); no downloads."""
    cls = T5TokenizerFast if kind == "t5" else CLIPTokenizer
    try:
        return cls.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        hint = ""
        if kind == "t5" and not _has_protobuf():
            # transformers then blames a missing `tiktoken`, which is not what this folder needs
            hint = (
                "; a SentencePiece `spiece.model` is read with the `protobuf` package, which this pack "
                "requires: pip install protobuf"
            )
        raise ValueError(f"{folder}: cannot load a {kind.upper()} tokenizer from this folder ({e}){hint}") from None


def _has_protobuf() -> bool:
    try:
        return importlib.util.find_spec("google.protobuf") is not None
    except (ImportError, ValueError):  # no `google` package at all, or a stubbed-out module
        return False


def load_text_encoder(
    t5: str | os.PathLike,
    clip: str | os.PathLike,
    t5_tokenizer: str | os.PathLike | None = None,
    clip_tokenizer: str | os.PathLike | None = None,
    t5_max_length: int | None = 512,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    comfyui_root: str | os.PathLike | None = None,
) -> FluxTextEncoder:
    """T5 + CLIP from ComfyUI `text_encoders/` files or diffusers folders, with local tokenizers.

    A tokenizer not given is looked for in and beside a diffusers model folder, then among the tokenizers
    ComfyUI ships (`comfyui_root`, $COMFYUI_ROOT, or the ComfyUI install the model file lies in).
    `dtype=None` keeps each file's precision (bf16 for fp8 files). `t5_max_length=None` pads to the T5
    tokenizer's `model_max_length` (512 for T5-XXL's, the length the small model was trained at for its own).
    """
    t5_tok = load_tokenizer(find_tokenizer("t5", t5_tokenizer, t5, comfyui_root), "t5")
    clip_tok = load_tokenizer(find_tokenizer("clip", clip_tokenizer, clip, comfyui_root), "clip")
    return FluxTextEncoder(
        load_t5(t5, device=device, dtype=dtype),
        load_clip(clip, device=device, dtype=dtype),
        t5_tok,
        clip_tok,
        t5_max_length,
    )
