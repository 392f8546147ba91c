"""Tiny T5/CLIP encoders and tokenizers made locally (no hub) for the text-encoder tests."""

from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm
import torch
from tests.helpers.tiny_models import randomize_
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from kontext_core.small_model.tokenizers import byte_symbols

SENTENCES = [
    "make the car red",
    "remove the stain from the shirt",
    "turn the sky into a sunset",
    "add a small blue circle at the top left",
    "restyle the image as a pencil drawing",
    "a photo of a cat sitting on a wooden table",
    "change the background to a beach",
    "replace the logo with the text hello",
    "make it look like winter with snow everywhere",
]
CLIP_WORDS = ["make", "the", "car", "red", "sky", "cat", "photo", "sunset"]


def write_clip_tokenizer(folder: Path) -> Path:
    """vocab.json + merges.txt as CLIP's: bytes, bytes+</w>, merged words, then <|startoftext|>, <|endoftext|>."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    for word in CLIP_WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            if f"{pieces[0]} {pieces[1]}" not in merges:
                merges.append(f"{pieces[0]} {pieces[1]}")
                tokens.append(merged)
            pieces = [merged, *pieces[2:]]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "pad_token": "<|endoftext|>"}))
    return folder


# T5's model kind and special ids (no BOS)
T5_SENTENCEPIECE = {"model_type": "unigram", "pad_id": 0, "eos_id": 1, "unk_id": 2, "bos_id": -1}


def write_t5_tokenizer(folder: Path) -> Path:
    """A sentencepiece unigram model with T5's special ids (pad 0, eos 1, unk 2), as `spiece.model`."""
    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 4),
        model_prefix=str(folder / "spiece"),
        vocab_size=70,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
        **T5_SENTENCEPIECE,
    )
    (folder / "spiece.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 0, "legacy": False}))
    return folder


def tiny_t5(vocab: int, seed: int = 0) -> T5EncoderModel:
    # non-square on purpose: attention width 4·6 = 24 ≠ d_model 40; buckets 8 ≠ T5-XXL's 32
    widths = {"d_model": 40, "d_kv": 6, "d_ff": 56, "num_layers": 2, "num_heads": 4}
    encoder_only = {"feed_forward_proj": "gated-gelu", "is_encoder_decoder": False, "use_cache": False}
    config = T5Config(vocab_size=vocab, relative_attention_num_buckets=8, **widths, **encoder_only)
    return randomize_(T5EncoderModel(config), seed, std=0.3).eval()


def tiny_clip(vocab: int, seed: int = 1, heads: int = 2, eos_token_id: int | None = None) -> CLIPTextModel:
    # 128 wide with 64-wide heads, so a file without a config infers the same heads as CLIP-L's rule
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=200,
        num_hidden_layers=2,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1 if eos_token_id is None else eos_token_id,
        pad_token_id=1,
    )
    return randomize_(CLIPTextModel(config), seed, std=0.3).eval()


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
