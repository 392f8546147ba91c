"""Library errors in the command line's words: the engine names its own arguments (`t5_tokenizer=`), while a
user of the command line knows only its flags (`--t5-tokenizer`)."""

from __future__ import annotations

import re

# The library's keyword arguments that the command line takes under a flag, by argument name.
FLAGS = {
    "t5_tokenizer": "--t5-tokenizer",
    "clip_tokenizer": "--clip-tokenizer",
    "comfyui_root": "--comfyui",
}
_ARGUMENT = re.compile(r"\b(" + "|".join(FLAGS) + r")=(\S?)")


def in_flags(message: str) -> str:
    """`message` with each `argument=` that has a flag said as the flag: `t5_tokenizer='x'` becomes
    `--t5-tokenizer 'x'`, a bare `comfyui_root=` becomes `--comfyui`."""
    return _ARGUMENT.sub(lambda m: FLAGS[m[1]] + (f" {m[2]}" if m[2] else ""), message)
