"""Value types for the package's command lines: argparse then names the option in its error, before any work."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def at_least(minimum: int) -> Callable[[str], int]:
    """A whole number no smaller than `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def positive(text: str) -> float:
    """A finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def lora_option(text: str) -> tuple[str, float]:
    """`PATH` or `PATH:STRENGTH`, strength 1.0 when not given (a colon followed by no number is part of the path)."""
    path, colon, tail = text.rpartition(":")
    if not (colon and path):
        return text, 1.0
    try:
        strength = float(tail)
    except ValueError:
        return text, 1.0
    if not math.isfinite(strength):
        raise argparse.ArgumentTypeError(f"the strength must be a finite number, got {tail!r}")
    return path, strength
