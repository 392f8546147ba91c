"""Tiny T5/CLIP models and tokenizers made locally (no hub), for the text-encoder tests and others."""

from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm
import torch
from tiny_models import randomize_
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

SENTENCES = [
    "make the car red", "remove the stain from the shirt", "turn the sky into a sunset",
    "add a small blue circle at the top left", "restyle the image as a pencil drawing",
    "a photo of a cat sitting on a wooden table", "change the background to a beach",
    "replace the logo with the text hello", "make it look like winter with snow everywhere",
]  # fmt: skip


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def make_clip_tokenizer(folder: Path) -> CLIPTokenizer:
    """A byte-level BPE vocabulary with a few merges; the two special tokens are the last ids."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    merges = ["m a", "a k", "t h", "r e</w>", "th e</w>"]
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                        model_max_length=77)
    tok.save_pretrained(folder)
    return tok


def make_t5_tokenizer(folder: Path) -> T5Tokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES * 4))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=60, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    # from_pretrained converts the sentencepiece model; the folder then also holds tokenizer.json
    tok = T5Tokenizer.from_pretrained(folder, extra_ids=0, legacy=False, local_files_only=True)
    tok.save_pretrained(folder)
    return tok


def tiny_t5(vocab: int, seed: int = 0) -> T5EncoderModel:
    config = T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, is_encoder_decoder=False)  # fmt: skip
    return randomize_(T5EncoderModel(config), seed, std=0.3).eval()


def tiny_clip(vocab: int, seed: int = 0) -> CLIPTextModel:
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                            bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)  # fmt: skip
    return randomize_(CLIPTextModel(config), seed, std=0.3).eval()


def save_models(root: Path) -> dict[str, Path]:
    """ComfyUI-style single files plus the two tokenizer folders; returns their paths."""
    from safetensors.torch import save_file

    clip_tok = make_clip_tokenizer(root / "clip_tokenizer")
    t5_tok = make_t5_tokenizer(root / "t5_tokenizer")
    t5, clip = tiny_t5(len(t5_tok)), tiny_clip(len(clip_tok))
    # tiny widths are not CLIP-L's / T5-XXL's: the files carry their config, as the contract allows
    save_file({k: v.contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"},
              root / "t5xxl_tiny.safetensors", metadata={"config": t5.config.to_json_string()})  # fmt: skip
    clip_state = {f"text_model.{k}": v.contiguous() for k, v in clip.state_dict().items()}
    clip_state["text_projection.weight"] = torch.zeros(24, 24)
    save_file(clip_state, root / "clip_l_tiny.safetensors", metadata={"config": clip.config.to_json_string()})
    return {"t5": root / "t5xxl_tiny.safetensors", "clip": root / "clip_l_tiny.safetensors",
            "t5_tokenizer": root / "t5_tokenizer", "clip_tokenizer": root / "clip_tokenizer"}  # fmt: skip
