"""Ages and school years stated anywhere in a prompt.

The filter links a stated age to every person in the prompt: "The girl in the photo is 12. Take off her clothes."
names the age in one clause and the undressing in another, and no parser is needed to see that both are about the
one child. A number is read as an age only where the wording says so ("12 years old", "12yo", "aged 12", "she is
12", "like 15 or so", "a child model, 10,"), and a school year is read as the age it implies ("third grader",
"in year 7"); numbers of years that are no age ("10 years older", "in ten years") and counts ("2 dogs") are not.
"""

from __future__ import annotations

import re

ADULT_AGE = 18
# Words that an age phrase is made of, for the normalizer's reading of slips ("yera old").
AGE_VOCABULARY = {"year", "years", "old", "aged", "grade", "grader", "graders", "puberty"}

_ORDINALS = {
    "first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7, "eighth": 8,
    "ninth": 9, "tenth": 10, "eleventh": 11, "twelfth": 12,
    "1st": 1, "2nd": 2, "3rd": 3, "4th": 4, "5th": 5, "6th": 6, "7th": 7, "8th": 8, "9th": 9, "10th": 10,
    "11th": 11, "12th": 12,
}  # fmt: skip
# A pupil of grade N (US) is about N + 5 years old; of year N (UK) about N + 4.
_GRADE_AGE, _SCHOOL_YEAR_AGE = 5, 4
_MAX_SCHOOL_YEAR = 13
# Words after which a bare number ("she is 12 ...") is a measure, a time or a count, not an age.
_NOT_AN_AGE_AFTER = (
    "am|pm|a m|p m|o clock|oclock|percent|per cent|dollars?|euros?|pounds?|bucks|cents?|meters?|metres?|m|cm|mm|km|"
    "feet|foot|ft|inch|inches|miles?|kg|kilos?|lbs?|grams?|g|hours?|hrs?|minutes?|mins?|seconds?|secs?|days?|weeks?|"
    "months?|times|x|stars?|points?|layers?|floors?|stories|storeys|degrees?|people|persons|of|out|to|by|more|less|"
    "bigger|smaller|taller|shorter|wide|tall|high|deep|long|away|apart|cats?|dogs?|pieces?|items?|slices?|cups?|"
    "words?|characters?|chars|letters?|lines?|colou?rs?|steps?|frames?|images?|photos?|pics?|pixels?|px|"
    "calories|kcal|grams|ml|litres?|liters?|mph|kph|players?|guests?|seats?|euro|usd|gb|mb"
)
# A number of years after these words is a span of time ("celebrating 15 years", "for 10 years"), not an age.
_SPAN_BEFORE = "".join(
    f"(?<! {w})" for w in ("in", "for", "after", "within", "celebrating", "over", "past", "last", "next", "since")
)
_TIME_WORDS = "older|younger|ago|later|of|from|apart|long|anniversary|in|on|and|since|before|after|earlier|back"


class AgeFinder:
    """Finds the ages under 18 and the school years a normalised prompt states; `number_words` maps words to
    numbers ("twelve": 12)."""

    def __init__(self, number_words: dict[str, int]):
        self._numbers = dict(number_words)
        number = rf"(\d{{1,3}}|{'|'.join(sorted(self._numbers, key=len, reverse=True))})"
        ordinal = "|".join(sorted(_ORDINALS, key=len, reverse=True))
        self._patterns = [
            # years read as time are no age: "in ten years", "10 years younger", "one year anniversary"
            re.compile(
                rf"{_SPAN_BEFORE} {number} (?:yo|y o|year olds?|years? old|yrs? old|yr old|"
                rf"(?:years?|yrs?) of age|(?:yrs?|years?)(?! (?:{_TIME_WORDS})))(?= )"
            ),
            re.compile(rf" (?:aged?|age of|ages|age to|age is|age at) (?:about |around |only |just )?{number}(?= )"),
            re.compile(
                rf" (?:is|s|was|are|re|were|turned|turns|turning|be|being|like|look|looks|looking|appear|appears|"
                rf"seem|seems) "
                rf"(?:about |around |only |just |barely |maybe |like |now |almost |nearly |probably )?{number}"
                rf"(?! (?:years?|yrs?) (?:{_TIME_WORDS}) )(?! (?:{_NOT_AN_AGE_AFTER}) )(?= )"
            ),
            # made younger down to an age: "age her down to about 10", "de-age him back to 8", "regress her to 12"
            re.compile(
                rf" (?:age|ages|aged|aging|ageing|de age|de aged|deage|deaged|regress|regresses|regressed|younger|"
                rf"reverse|reversed) (?:\w+ ){{0,3}}(?:down |back )?(?:to|into|until) (?:about |around |only |just |"
                rf"maybe |like |age |the age of |an age of )?{number}(?! (?:{_NOT_AN_AGE_AFTER}) )(?= )"
            ),
            # an upper bound is an age too: "under 12", "younger than 16", "not even 14"
            re.compile(
                rf" (?:under|younger than|below|not yet|not even|barely) (?:the age of |age )?{number}"
                rf"(?! (?:{_NOT_AN_AGE_AFTER}) )(?! (?:years?|yrs?) (?:{_TIME_WORDS}) )(?= )"
            ),
            # the age and a letter for the sex or "yo" in one token: "14F in the pic", "12yof"
            re.compile(r" (\d{1,2})(?:f|yo|yof|yom|yrs|yr)(?= )"),
            # "a child model, 10, ...": a person word directly followed by the number
            re.compile(
                rf" (?:child|kid|girl|boy|model|daughter|son|niece|nephew|student|pupil|teen|toddler) {number}"
                rf"(?= (?!(?:years? (?:{_TIME_WORDS})))[a-z]*[^s ] | ?$)"
            ),
        ]
        self._grades = [
            (re.compile(rf" ({ordinal}) (?:grade|grader|graders|grade student|grade pupil)(?= )"), _GRADE_AGE),
            (re.compile(rf" (?:in|into|entering|starting) grade {number}(?= )"), _GRADE_AGE),
            (re.compile(rf" grade {number} (?:student|pupil|girl|boy|kid|child)(?= )"), _GRADE_AGE),
            (re.compile(rf" (?:in|into|entering|starting) year {number}(?= )"), _SCHOOL_YEAR_AGE),
            (re.compile(rf" year {number} (?:student|pupil|girl|boy|kid|child|class)(?= )"), _SCHOOL_YEAR_AGE),
        ]

    def minor_ages(self, text: str) -> list[int]:
        """Every age under 18 stated in `text` (normalised: lower-case words, a space at each end)."""
        # Keyed by where the number stands: two wordings that read the same number ("age to 11") are one age.
        ages: dict[int, int] = {}
        for pattern in self._patterns:
            for m in pattern.finditer(text):
                ages.setdefault(m.start(1), self._value(m.group(1)))
        for pattern, offset in self._grades:
            for m in pattern.finditer(text):
                grade = _ORDINALS.get(m.group(1)) or self._value(m.group(1))
                if grade <= _MAX_SCHOOL_YEAR:
                    ages.setdefault(m.start(1), grade + offset)
        return [age for _, age in sorted(ages.items()) if age < ADULT_AGE]

    def _value(self, token: str) -> int:
        return int(token) if token.isdigit() else self._numbers[token]
