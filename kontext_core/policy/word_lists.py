"""Reference word lists the prompt rules consult, from maintained packages rather than lists of our own.

- English words: the GNU Collaborative International Dictionary of English word list shipped by `english-words`
  (a word found here is spelled as meant, so it is never "corrected" to a listed term, and a capitalised one
  is no personal name by itself);
- first names: the US Census Bureau's 1990 lists of first names shipped by `names` (public-domain data).
"""

from __future__ import annotations

import importlib.resources
from functools import lru_cache

_CENSUS_FILES = ("dist.female.first", "dist.male.first")
# Endings stripped to find a listed stem: the dictionary lists "girl", not "girls".
_INFLECTIONS = ("s", "es", "ed", "d", "ing", "ly", "er", "ers", "est")


@lru_cache(maxsize=1)
def english_words() -> frozenset[str]:
    from english_words import get_english_words_set

    return frozenset(get_english_words_set(["gcide"], alpha=True, lower=True))


def is_english_word(word: str) -> bool:
    words = english_words()
    if word in words:
        return True
    return any(word.endswith(end) and word[: -len(end)] in words for end in _INFLECTIONS if len(word) > len(end) + 2)


@lru_cache(maxsize=1)
def first_names() -> frozenset[str]:
    folder = importlib.resources.files("names")
    found = set()
    for name in _CENSUS_FILES:
        for line in folder.joinpath(name).read_text(encoding="ascii").splitlines():
            if line.strip():
                found.add(line.split()[0].lower())
    return frozenset(found)
