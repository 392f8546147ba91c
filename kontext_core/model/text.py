"""The text side of FLUX: T5-XXL token embeddings (`txt`) and CLIP-L's pooled vector (`y`).

The semantics of BFL's `HFEmbedder` and diffusers' Flux pipelines: T5 pads to a fixed length and runs
without an attention mask, so the pad length is part of the result (512 as BFL and diffusers, 256 as
ComfyUI); CLIP pads to 77 and gives its pooled output, the final-norm state at the first end-of-text
token. Tokenizers and the files are found and loaded by `kontext_core.checkpoints.tokenizers`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import CLIPTextModel, PreTrainedTokenizerBase, T5EncoderModel

CLIP_MAX_LENGTH = 77


def _check_vocabulary(tokenizer: PreTrainedTokenizerBase, model: nn.Module, kind: str) -> None:
    # a swapped or foreign tokenizer makes ids the embedding cannot look up (or silently wrong ones)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"the {kind.upper()} tokenizer ({tokenizer.name_or_path}) has {len(tokenizer)} tokens but the "
            f"{kind.upper()} model's vocabulary has {model.config.vocab_size}: wrong {kind}_tokenizer= folder?"
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
