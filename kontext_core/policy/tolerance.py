"""The filters' tolerance scale, apart from the filters so that a caller can name it without loading them."""

MIN_TOLERANCE, MAX_TOLERANCE, DEFAULT_TOLERANCE = 0, 6, 2
TOLERANCE_HELP = (
    "0 is the strictest, 6 the most permissive, 2 the default (as in BFL's API). Content involving minors "
    "and non-consensual intimate imagery is blocked at every tolerance."
)
