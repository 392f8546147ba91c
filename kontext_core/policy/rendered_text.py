"""The text a prompt asks to have written into the image: quoted strings, and what follows write / say / read /
spell / caption / sign / banner / graffiti / billboard / tattoo and their kin.

Such text is judged as speech (a slogan on a banner, a shop sign), not as a description of the picture: "Muslims out"
on a banner is a call to exclude a group, while "muslims out shopping" describes people.
"""

from __future__ import annotations

import re

# Quotes of every kind people type, and the ASCII quotes used as quotes, not as apostrophes ("it's").
_QUOTED = re.compile(
    r"\"([^\"]+)\"|“([^”]+)”|„([^“”]+)[“”]|«([^»]+)»|‹([^›]+)›|‘([^’]+)’|(?<![A-Za-z0-9])'([^']+?)'(?![A-Za-z0-9])"
)
_TRIGGER = re.compile(
    r"\b(?:writes?|writing|written|wrote|says?|saying|said|reads?|reading|spells?|spelling|spelled|spelt|"
    r"captions?|captioned|signs?|signage|banners?|graffiti|billboards?|tattoos?|slogans?|stickers?|posters?|placards?|"
    r"prints?|printed|sprays?|sprayed|spray paint|lettering|text|message|headline|motto|chant|chanting|shouting|"
    r"stating|tells?|telling|words?|neon|mural|engraved|etched|stamped|banderole)\b\s*:?\s*(.+?)(?=[.!?\n]|$)",
    re.IGNORECASE,
)


def rendered_segments(folded: str) -> list[str]:
    """Each piece of `folded` (a prompt after `prompt_text.fold_script`) that is to be rendered as text."""
    segments = [next(g for g in m.groups() if g) for m in _QUOTED.finditer(folded)]
    segments += [m.group(1) for m in _TRIGGER.finditer(folded)]
    return [s.strip() for s in segments if s.strip()]
