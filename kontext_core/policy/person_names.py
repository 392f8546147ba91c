"""Whether a prompt names a person: any personal name, not only a list of celebrities.

Read from the prompt as written (look-alike letters folded, case kept), since case is most of what tells a name:
- a word after a title ("Mrs. Thompson", "Dr Lee");
- a capitalised word inside a sentence that is no dictionary word ("Priya", "Okafor"), or that is a first name
  from the census lists ("my neighbour Tom");
- a lower-case first name that is no dictionary word ("undress amanda");
- a word followed by "from" and a place people meet ("Jessica from accounting", "anna from the gym").
Creators are no subjects: a name after "by", "after" or "style of", or before "painting" or "sculpture",
names an artist, not the person shown.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_WORD = re.compile(r"[A-Za-z]+")
_TITLE = re.compile(r"\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Sir|Lady|Lord|Madam|mr|mrs|ms|dr)\b\.? ([A-Za-z][a-z]+)")
_ACQUAINTANCE = re.compile(
    r"\b([A-Za-z][a-z]+) from (?:the |my |our |her |his )?"
    r"(?:gym|office|work|school|class|accounting|marketing|sales|church|uni|university|college|next door|"
    r"downstairs|upstairs|the club|club|team|hr|it|finance|reception|my class|the bar|yoga|work)\b"
)
# A sentence starts after these marks, so its first word is capitalised whatever it is.
_SENTENCE_END = set(".!?:;\"'«»“”()[]0123456789")
_CREATOR_CUES = {"by", "after", "style of", "manner of", "school of"}
# A name right before one of these is the artist's: "a Rubens painting", "the Rodin sculpture".
_ARTWORK_AFTER = re.compile(
    r"\s*(?:s\s+|'s\s+)?(?:painting|paintings|sculpture|sculptures|statue|statues|fresco|frescoes|drawing|"
    r"drawings|etching|etchings|canvas|canvases|masterpiece|altarpiece|mural|murals)\b"
)


def named_people(folded: str, first_names: frozenset[str], is_english_word: Callable[[str], bool]) -> list[str]:
    """The personal names `folded` (a prompt after `prompt_text.fold_script`) mentions, lower-cased."""
    found = [m.group(1).lower() for m in _TITLE.finditer(folded)]
    found += [m.group(1).lower() for m in _ACQUAINTANCE.finditer(folded) if not is_english_word(m.group(1).lower())]
    previous: list[str] = []
    creator = False
    for m in _WORD.finditer(folded):
        word, lower = m.group(0), m.group(0).lower()
        before = folded[: m.start()].rstrip()
        sentence_start = not before or before[-1] in _SENTENCE_END
        capitalised = word[0].isupper() and word[1:].islower()
        # The creator's name runs on over the capitalised words after the cue ("by Sandro Botticelli").
        creator = capitalised and (creator or bool(_CREATOR_CUES & {" ".join(previous[-1:]), " ".join(previous[-2:])}))
        previous.append(lower)
        if creator or len(word) < 2 or _ARTWORK_AFTER.match(folded, m.end()):
            continue
        if capitalised and not sentence_start:
            if lower in first_names or not is_english_word(lower):
                found.append(lower)
        elif word.islower() and lower in first_names and not is_english_word(lower):
            found.append(lower)
    return found
