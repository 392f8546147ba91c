"""One normalization of prompt text before any safety rule matches it.

`fold_script` maps look-alike letters from other scripts to their Latin skeleton with Unicode TR39's confusables
(the data that the `confusable-homoglyphs` package ships) and drops accents and invisible format characters, keeping
case; `PromptNormalizer` then reads the folded text as lower-case words: letters split by dots, spaces or dashes
joined, digits and symbols standing for letters read as the word they spell (tried as alternatives, so real numbers
such as ages and sizes stay numbers), and stretched letters shrunk.
"""

from __future__ import annotations

import importlib.resources
import itertools
import json
import re
import unicodedata
from collections.abc import Callable
from functools import lru_cache

# A look-alike is followed through the confusables graph this many steps at most ('н' → 'ʜ' → 'H').
_CONFUSABLE_DEPTH = 3
# Readings tried per word: a word with many ambiguous characters ('1' as i or l) has more than are worth trying.
_MAX_READINGS = 64

_SEPARATOR_RUN = re.compile(
    # Three or more single characters split by one repeated separator: "n u d e", "p.o.r.n", "s-e-x"; a
    # different separator ends the run, so "K-I-L-L A-L-L" is two words.
    # A short fragment before it may be the word's start: "und r e s s".
    r"(?:(?<![a-z0-9@$])(?P<head>[a-z0-9@$]{2,4}) )?"
    r"(?<![a-z0-9@$])(?P<run>[a-z0-9@$](?P<sep>[ .\-_*·•,:/\\~+]+)[a-z0-9@$](?:(?P=sep)[a-z0-9@$]){1,})(?![a-z0-9@$])"
)
# A capitalised word inside a sentence is a name or a place ("go back to Africa"): never read as a typing slip.
_MID_SENTENCE_CAPITAL = re.compile(r"(?<=[a-z,] )[A-Z][a-z]+")
_TOKEN_SPLIT = re.compile(r"[^a-z0-9@$!|€£*]+")
_INNER_SEPARATOR = re.compile(r"[.\-_·•~+]+")
_AGE_TOKEN = re.compile(r"^(\d{1,3})(yo|yr|yrs|y|yearold|yearolds|yrold|yrsold)$")
# A number with a unit or an ordinal ("4k", "35mm", "3d", "1080p", "5th"): a real number, not leetspeak.
_NUMBER_WITH_UNIT = re.compile(r"^\d+[a-z]{1,3}$")
_LONG_RUN = re.compile(r"(.)\1{2,}")
_DOUBLE = re.compile(r"(.)\1+")
# Typing slips are read only for words of at least this many letters (shorter words are too often other words),
# from tokens of at least _MIN_SLIP_TOKEN ("kil" for "kill").
_MIN_SLIP_WORD, _MIN_SLIP_TOKEN, _MIN_SUBSTITUTION_TOKEN = 4, 3, 6
_APOSTROPHES = str.maketrans({"'": " ", "\u2019": " ", "\u2018": " ", "`": " ", "\u00b4": " "})


class _LatinSkeletons(dict):
    """A `str.translate` table filled on first sight of each character: the Latin letters a look-alike stands for.

    TR39 lists some letters in one case only ('Н' is 'H' but 'н' is small-capital 'ʜ'), so a letter without a
    skeleton of its own takes its other case's; small capitals and other Latin letter forms not in TR39 are read
    from their Unicode names ('ᴅ' is LATIN LETTER SMALL CAPITAL D).
    """

    def __init__(self, graph: dict[str, list[str]]):
        super().__init__()
        self._graph = graph

    def __missing__(self, code: int) -> str:
        char = chr(code)
        target = char if char.isascii() else self._skeleton(char)
        self[code] = target
        return target

    def _skeleton(self, char: str) -> str:
        found = _latin_skeleton(char, self._graph)
        if found is None:
            other = char.upper() if char.islower() else char.lower()
            if len(other) == 1 and other != char:
                found = _latin_skeleton(other, self._graph)
                found = None if found is None else (found.lower() if char.islower() else found.upper())
        if found is None:
            named = _LATIN_LETTER_NAME.match(unicodedata.name(char, ""))
            found = None if named is None else named.group(1).lower()
        return char if found is None else found


_LATIN_LETTER_NAME = re.compile(r"^LATIN (?:SMALL |CAPITAL )?LETTER (?:SMALL CAPITAL |TURNED |REVERSED )?([A-Z])\b")


@lru_cache(maxsize=1)
def _confusable_table() -> _LatinSkeletons:
    data = json.loads(
        importlib.resources.files("confusable_homoglyphs").joinpath("confusables.json").read_text(encoding="utf-8")
    )
    return _LatinSkeletons({char: [entry["c"] for entry in entries] for char, entries in data.items()})


def _latin_skeleton(char: str, graph: dict[str, list[str]]) -> str | None:
    frontier, seen = [char], {char}
    for _ in range(_CONFUSABLE_DEPTH):
        following = []
        for node in frontier:
            for glyph in graph.get(node, ()):
                # Letters only: a Latin digit or symbol is no skeleton of a letter ('О' is 'O', not '0').
                if glyph.isascii() and glyph.isalpha():
                    return glyph
                if len(glyph) == 1 and glyph not in seen:
                    seen.add(glyph)
                    following.append(glyph)
        frontier = following
    return None


def fold_script(text: str) -> str:
    """NFKC, format characters dropped, look-alikes folded to Latin, accents dropped; case is kept."""
    text = unicodedata.normalize("NFKC", text)
    # Zero-width joiners, soft hyphens and other format characters hide words from matchers.
    text = "".join(c for c in text if unicodedata.category(c) != "Cf")
    text = text.translate(_confusable_table())
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return text


class PromptNormalizer:
    """Reads folded prompt text as lower-case words.

    `vocabulary` holds the words the rules know: an ambiguous spelling ('1' as i or l, a split or stretched word)
    is read as the known word it can spell, and a word one typing slip away from one of them (a letter missing,
    added, changed or two swapped: "remvoe", "clothse", "kil") is read as it, unless `is_real_word` says it is a
    word in its own right. `glossary` maps words of other languages (and English written without apostrophes)
    to the English words the rules know; a key of several words replaces that word sequence. `compounds` are words
    that a dash may split into two known words ("top-less", "strip-tease"): they are read whole.
    """

    def __init__(
        self,
        leet: dict[str, list[str]],
        vocabulary: set[str],
        glossary: dict[str, str],
        is_real_word: Callable[[str], bool],
        compounds: frozenset[str] = frozenset(),
    ):
        self._leet = leet
        self._compounds = compounds
        self._vocabulary = frozenset(vocabulary)
        self._star_candidates = sorted(compounds & self._vocabulary) + sorted(self._vocabulary - compounds)
        self._is_real_word = is_real_word
        self._glossary = {k: v for k, v in glossary.items() if " " not in k}
        phrases = sorted((k for k in glossary if " " in k), key=len, reverse=True)
        self._phrases = {k: glossary[k] for k in phrases}
        self._phrase_pattern = (
            re.compile(" (" + "|".join(re.escape(k) for k in phrases) + ")(?= )") if phrases else None
        )
        self._slips: dict[str, set[str]] = {}
        for word in self._vocabulary:
            if len(word) >= _MIN_SLIP_WORD and word.isalpha():
                for key in {word, *_deletions(word)}:
                    self._slips.setdefault(key, set()).add(word)

    def normalize(self, prompt: str) -> str:
        """Space-separated lower-case words with a space at each end, so rules can match ' word '."""
        return self.read(fold_script(prompt))

    def read(self, folded: str) -> str:
        """`normalize` for text that `fold_script` has already folded."""
        proper = {w.casefold() for w in _MID_SENTENCE_CAPITAL.findall(folded)}
        # Folded again after case folding: TR39 lists some letters in one case only.
        text = folded.casefold().translate(_confusable_table())
        text = text.translate(_APOSTROPHES)
        text = _SEPARATOR_RUN.sub(self._join_run, text)
        tokens = []
        for chunk in text.split():
            tokens += self._chunk_tokens(chunk)
        text = " " + " ".join(tokens) + " "
        # Phrases first, so that no word of one is read as a slip ("morte agli" is not "more agli").
        if self._phrase_pattern is not None:
            text = self._phrase_pattern.sub(lambda m: " " + self._phrases[m.group(1)], text)
        words = [self._glossary.get(t) or (t if t in proper else self._unslipped(t)) for t in text.split()]
        return " " + " ".join(words) + " "

    def _unslipped(self, token: str) -> str:
        if (
            len(token) < _MIN_SLIP_TOKEN
            or token in self._vocabulary
            or not token.isalpha()
            or self._is_real_word(token)
        ):
            return token
        # A letter typed twice ("kidd", "bikinni") is the commonest slip and the safest to read back.
        single = _DOUBLE.sub(r"\1", token)
        if single != token and single in self._vocabulary and len(single) >= _MIN_SLIP_TOKEN:
            return single
        # Slips by how often typists make them: two letters swapped, a letter missing, one too many, one changed.
        missing = {w for w in self._slips.get(token, ()) if len(w) == len(token) + 1}
        if len(token) < _MIN_SLIP_WORD:
            # A three-letter word is read as a slip only for a doubled letter typed once ("kil"): "org" is no "orgy".
            return next(iter(missing), token) if len(missing) == 1 and _DOUBLE.search(next(iter(missing))) else token
        nearby = {w for key in _deletions(token) for w in self._slips.get(key, ()) if _one_slip(token, w)}
        extra = {w for w in nearby if len(w) == len(token) - 1}
        changed = {w for w in nearby if len(w) == len(token)} if len(token) >= _MIN_SUBSTITUTION_TOKEN else set()
        swapped = {w for w in _transpositions(token) if w in self._vocabulary}
        for candidates in (swapped, missing, extra, changed):
            if candidates:
                # Ambiguous slips ("bood": blood or boob?) are left alone rather than guessed.
                return candidates.pop() if len(candidates) == 1 else token
        return token

    def _chunk_tokens(self, chunk: str) -> list[str]:
        # A known word split by dots or dashes inside one chunk ("nu.de", "na-ked") is that word.
        pieces = [p for p in _INNER_SEPARATOR.split(chunk) if p]
        if len(pieces) > 1:
            joined = self._read("".join(pieces))
            if joined in self._compounds or (
                joined in self._vocabulary and not all(self._read(p) in self._vocabulary for p in pieces)
            ):
                return [joined]
        tokens = []
        for raw in _TOKEN_SPLIT.split(chunk):
            age = _AGE_TOKEN.match(raw)
            if age:
                tokens += [age.group(1), "yo"]
            elif raw:
                tokens += self._canonical(raw)
        return tokens

    def _join_run(self, m: re.Match) -> str:
        joined = re.sub(r"[^a-z0-9@$]", "", m.group("run"))
        head = m.group("head")
        if head and self._read(head + joined) in self._vocabulary:
            return head + joined
        # "a n u d e" is the article "a" before a spelled-out word, not the word "anude".
        if joined[0] in "ai" and joined not in self._vocabulary and self._read(joined[1:]) in self._vocabulary:
            joined = f"{joined[0]} {joined[1:]}"
        return f"{head} {joined}" if head else joined

    def _canonical(self, raw: str) -> list[str]:
        word = raw.strip("!|.*€£")
        if not word:
            return []
        if "*" in word:
            # "p**n", "f*ck": each star hides one letter of a listed word.
            pattern = re.compile("^" + re.escape(word).replace(r"\*", "[a-z]") + "$")
            # The word lists' own terms first: "p**n" is "porn" before it is "plan".
            match = next((v for v in self._star_candidates if pattern.match(v)), None)
            return [match] if match else [w for w in word.split("*") if w]
        return [self._read(word)]

    def _read(self, word: str) -> str:
        """The known word this spelling stands for, or its plain leetspeak reading; numbers stay numbers."""
        if word in self._vocabulary or not any(c.isalpha() for c in word):
            return word
        readings = self._readings(word)
        # A number with a unit ("3d") is read as a word only as one of three letters or more ("5ex").
        shortest = max(3, len(word)) if _NUMBER_WITH_UNIT.match(word) else 1
        for reading in readings:
            for candidate in _unstretched(reading):
                if candidate in self._vocabulary and len(candidate) >= shortest:
                    return candidate
        if _NUMBER_WITH_UNIT.match(word):
            return word
        first = readings[0]
        return _LONG_RUN.sub(r"\1\1", first)

    def _readings(self, word: str) -> list[str]:
        options = [self._leet.get(c, [c]) for c in word]
        return ["".join(p) for p in itertools.islice(itertools.product(*options), _MAX_READINGS)]


def _deletions(word: str) -> set[str]:
    return {word[:i] + word[i + 1 :] for i in range(len(word))}


def _transpositions(word: str) -> set[str]:
    return {word[:i] + word[i + 1] + word[i] + word[i + 2 :] for i in range(len(word) - 1)}


def _one_slip(token: str, word: str) -> bool:
    """Whether `word` is `token` with one letter missing, added or changed (found by a shared deletion)."""
    if len(token) == len(word):
        return sum(a != b for a, b in zip(token, word)) == 1
    short, long = (token, word) if len(token) < len(word) else (word, token)
    return short in _deletions(long)


def _unstretched(word: str) -> tuple[str, ...]:
    """The word, then long runs shrunk to two letters, then every run to one ("nuuuude", "naaked", "sexxy").

    A doubled letter alone is shrunk only into a word of four letters or more: "Kidd" is a name, not "kid".
    """
    single = _DOUBLE.sub(r"\1", word)
    stretched = _LONG_RUN.search(word) is not None
    return (word, _LONG_RUN.sub(r"\1\1", word)) + ((single,) if stretched or len(single) >= 4 else ())
