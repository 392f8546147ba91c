"""The small model's tokenizers, trained on the words the synthetic tasks use.

T5's is a sentencepiece unigram model with T5's special ids (pad 0, eos 1, unk 2), trained on instructions
and descriptions of training tasks; CLIP's is CLIP's byte-level BPE (`vocab.json` + `merges.txt`) whose
merges spell each task word left to right (most become one token; where an earlier merge ranks first, a
word stays in a few pieces, as with any BPE). Both load with the classes the real tokenizers load with.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import sentencepiece as spm

from kontext_core.synthetic.tasks import make_task, vocabulary, words
from kontext_core.small_model import SMALL_T5_LENGTH

CLIP_LENGTH = 77
# An upper bound (hard_vocab_limit=False): the corpus yields 115 pieces, every task word one piece except
# "nothing" and the punctuation, which split in two.
T5_VOCAB_SIZE = 160


def corpus(count: int = 4000) -> list[str]:
    """Instructions of the first `count` training tasks, then each vocabulary word alone."""
    return [make_task(seed).instruction.lower() for seed in range(count)] + vocabulary()


def write_t5_tokenizer(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    # Trained into memory: a model_prefix would be stored in the model, so the same tokenizer written to
    # another folder would differ in bytes (and rewriting the shipped one would dirty the package).
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=model,
        vocab_size=T5_VOCAB_SIZE,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
        normalization_rule_name="nmt_nfkc_cf",
        minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(model.getvalue())
    config = {"extra_ids": 0, "legacy": False, "model_max_length": SMALL_T5_LENGTH}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return folder


def byte_symbols() -> list[str]:
    """The printable stand-ins byte-level BPE (GPT-2, CLIP) uses for the 256 byte values, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_clip_tokenizer(folder: Path) -> Path:
    """Tokens: the 256 bytes, the same ending a word (`</w>`), one merged token per step of spelling each task
    word left to right, then `<|startoftext|>` and `<|endoftext|>` (also the pad token, as CLIP-L's)."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    known, merges = set(tokens), []
    for word in sorted({w for w in vocabulary() if len(w) > 1} | {w for w in words(" ".join(corpus(400)))}):
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            if merged not in known:
                merges.append(f"{pieces[0]} {pieces[1]}")
                tokens.append(merged)
                known.add(merged)
            pieces = [merged, *pieces[2:]]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "model_max_length": CLIP_LENGTH,
        "pad_token": "<|endoftext|>",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return folder
