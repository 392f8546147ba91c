"""The text side of FLUX: T5-XXL token embeddings (`txt`) and CLIP-L's pooled vector (`y`).

The semantics of BFL's `HFEmbedder` and diffusers' Flux pipelines: T5 pads to a fixed length and runs
without an attention mask, so the pad length is part of the result (512 as BFL and diffusers, 256 as
ComfyUI); CLIP pads to 77 and gives its pooled output, the final-norm state at the first end-of-text
token. Tokenizers load from local Hugging Face-format folders only, never from a hub.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTokenizer, PreTrainedTokenizerBase, T5EncoderModel, T5TokenizerFast

from kontext_core.checkpoints.text_encoders import load_clip, load_t5

CLIP_MAX_LENGTH = 77
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


def _check_vocabulary(tokenizer: PreTrainedTokenizerBase, model: nn.Module, kind: str) -> None:
    # a swapped or foreign tokenizer makes ids the embedding cannot look up (or silently wrong ones)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"the {kind.upper()} tokenizer ({tokenizer.name_or_path}) has {len(tokenizer)} tokens but the "
            f"{kind.upper()} model's vocabulary has {model.config.vocab_size}: wrong {OPTION[kind]} folder?"
        )


# Tokenizers without a length of their own report a huge sentinel as model_max_length.
_NO_LENGTH = 10**6
DEFAULT_T5_LENGTH = 512


def tokenizer_length(tokenizer: PreTrainedTokenizerBase) -> int:
    """The pad length a tokenizer folder states (`model_max_length`: 512 for T5-XXL's, 48 for the small
    model's), else BFL's 512."""
    length = getattr(tokenizer, "model_max_length", None)
    return length if isinstance(length, int) and 0 < length < _NO_LENGTH else DEFAULT_T5_LENGTH


class FluxTextEncoder(nn.Module):
    """T5 + CLIP with `encode(prompts) -> (txt [B, L, d_t5], y [B, d_clip])`, L = `t5_max_length`
    (None: the T5 tokenizer's own `model_max_length`)."""

    def __init__(
        self,
        t5: T5EncoderModel,
        clip: CLIPTextModel,
        t5_tokenizer: PreTrainedTokenizerBase,
        clip_tokenizer: PreTrainedTokenizerBase,
        t5_max_length: int | None = 512,
    ):
        super().__init__()
        if t5_max_length is None:
            t5_max_length = tokenizer_length(t5_tokenizer)
        if isinstance(t5_max_length, bool) or not isinstance(t5_max_length, int) or t5_max_length < 1:
            raise ValueError(f"t5_max_length must be a positive integer or None, got {t5_max_length!r}")
        _check_vocabulary(t5_tokenizer, t5, "t5")
        _check_vocabulary(clip_tokenizer, clip, "clip")
        self.t5, self.clip = t5, clip
        self.t5_tokenizer, self.clip_tokenizer = t5_tokenizer, clip_tokenizer
        self.t5_max_length = t5_max_length
        self.clip_max_length = min(CLIP_MAX_LENGTH, clip.config.max_position_embeddings)
        # Pool at the tokenizer's own end token. Old CLIP configs say eos 2 and pool at the largest id
        # instead, which is the same token for CLIP's vocabulary but not for every tokenizer.
        if clip_tokenizer.eos_token_id is not None:
            clip.config.eos_token_id = clip_tokenizer.eos_token_id
            getattr(clip, "text_model", clip).eos_token_id = clip_tokenizer.eos_token_id  # 4.x nests the tower

    def _ids(self, tokenizer: PreTrainedTokenizerBase, prompts: list[str], length: int) -> Tensor:
        return tokenizer(
            prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids

    @torch.no_grad()
    def encode(self, prompts: str | list[str]) -> tuple[Tensor, Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a string or a non-empty list of strings")
        t5_ids = self._ids(self.t5_tokenizer, prompts, self.t5_max_length).to(self.t5.device)
        clip_ids = self._ids(self.clip_tokenizer, prompts, self.clip_max_length).to(self.clip.device)
        txt = self.t5(input_ids=t5_ids, attention_mask=None, output_hidden_states=False).last_hidden_state
        y = self.clip(input_ids=clip_ids, attention_mask=None, output_hidden_states=False).pooler_output
        return txt, y


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
