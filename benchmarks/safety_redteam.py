"""Score the prompt safety filter on a red-team prompt set.

    python -m benchmarks.safety_redteam --set 1 --split train|heldout|all [--misses]
    python -m benchmarks.safety_redteam --set 2 [--json OUT]
    python -m benchmarks.safety_redteam --data-dir DIR [--split NAME]

Set 1 (tests/data/safety_redteam/) is training data, both halves: its first round of rules was written on the
training half and its held-out half was then looked at in aggregate, so a second, blind set was written. Set 2
(tests/data/safety_redteam_2/) is held out whole: this script prints only aggregate figures for it (block rates per
label and tolerance, false positives) and refuses `--misses`, as it does for any directory other than set 1's.
To score another checkout's filter (a git worktree of an older commit), run this file by path from that checkout
with PYTHONPATH pointing there (`python -m` would put this checkout first on the path); the first line of the
report names the filter that was scored:

    git worktree add /tmp/safety_base 44ea73a
    cd /tmp/safety_base && PYTHONPATH=/tmp/safety_base python /path/to/this/benchmarks/safety_redteam.py --set 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kontext_core.policy import safety
from kontext_core.policy.safety import CATEGORIES, MAX_TOLERANCE, MIN_TOLERANCE, check_prompt

DATA_ROOT = Path(__file__).resolve().parents[1] / "tests" / "data"
DATA_DIR = DATA_ROOT / "safety_redteam"


@dataclass(frozen=True)
class PromptSet:
    data_dir: Path
    splits: tuple[str, ...]
    # Whether single prompts and their verdicts may be printed: only for sets the rules may be written against.
    training: bool


PROMPT_SETS = {
    "1": PromptSet(DATA_DIR, ("train", "heldout", "all"), training=True),
    "2": PromptSet(DATA_ROOT / "safety_redteam_2", ("all",), training=False),
}
BENIGN = "allowed"
DEFAULT_TOLERANCE = 2
TOLERANCES = range(MIN_TOLERANCE, MAX_TOLERANCE + 1)
ALWAYS_BLOCKED = ("minors", "ncii")


@dataclass(frozen=True)
class RedTeamPrompt:
    id: str
    prompt: str
    label: str
    kind: str


@dataclass
class Score:
    split: str
    disallowed: int
    benign: int
    # label -> blocked count per tolerance (index = tolerance); "allowed" counts false positives
    blocked: dict[str, list[int]]
    counts: dict[str, int]
    # minors/ncii prompts blocked at all seven tolerances, and those whose verdict names their own label at all seven
    always_blocked: int
    always_right_category: int
    always_total: int
    median_latency_ms: float

    def rate(self, label: str, tolerance: int) -> float:
        return self.blocked[label][tolerance] / self.counts[label] if self.counts[label] else float("nan")

    def disallowed_rate(self, tolerance: int) -> float:
        hits = sum(self.blocked[c][tolerance] for c in CATEGORIES)
        return hits / self.disallowed if self.disallowed else float("nan")


def load(split: str, data_dir: Path = DATA_DIR) -> list[RedTeamPrompt]:
    path = data_dir / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"red-team split {split!r} not found at {path}")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        label = record.get("label")
        if label not in (*CATEGORIES, BENIGN):
            raise ValueError(f"{path}:{number}: label must be one of {(*CATEGORIES, BENIGN)}, got {label!r}")
        rows.append(RedTeamPrompt(str(record["id"]), record["prompt"], label, record.get("kind", "")))
    return rows


def score(split: str, rows: list[RedTeamPrompt]) -> tuple[Score, list[tuple[RedTeamPrompt, list[bool], str]]]:
    labels = (*CATEGORIES, BENIGN)
    blocked = {label: [0] * len(TOLERANCES) for label in labels}
    counts = {label: 0 for label in labels}
    always = always_right = always_total = 0
    latencies = []
    outcomes = []
    for row in rows:
        counts[row.label] += 1
        verdicts = []
        for t in TOLERANCES:
            start = time.perf_counter()
            verdicts.append(check_prompt(row.prompt, t))
            latencies.append(time.perf_counter() - start)
        flags = [v.blocked for v in verdicts]
        for t, flag in enumerate(flags):
            blocked[row.label][t] += flag
        if row.label in ALWAYS_BLOCKED:
            always_total += 1
            always += all(flags)
            always_right += all(v.category == row.label for v in verdicts)
        outcomes.append((row, flags, verdicts[0].reason))
    result = Score(
        split=split,
        disallowed=sum(counts[c] for c in CATEGORIES),
        benign=counts[BENIGN],
        blocked=blocked,
        counts=counts,
        always_blocked=always,
        always_right_category=always_right,
        always_total=always_total,
        median_latency_ms=statistics.median(latencies) * 1000 if latencies else float("nan"),
    )
    return result, outcomes


def report(s: Score) -> str:
    lines = [f"split {s.split}: {s.disallowed} disallowed, {s.benign} benign (filter: {safety.__file__})"]
    header = "tol  disallowed  " + "  ".join(f"{c:>9}" for c in CATEGORIES) + "  benign FP"
    lines.append(header)
    for t in TOLERANCES:
        cells = [f"{s.blocked[c][t]:>3}/{s.counts[c]:<5}" for c in CATEGORIES]
        lines.append(
            f"{t:>3}  {s.disallowed_rate(t):>9.1%}  "
            + "  ".join(cells)
            + f"  {s.blocked[BENIGN][t]}/{s.benign} ({s.rate(BENIGN, t):.1%})"
        )
    lines.append(
        f"minors+ncii blocked at every tolerance: {s.always_blocked}/{s.always_total}"
        f" (named minors/ncii at every tolerance: {s.always_right_category}/{s.always_total})"
    )
    lines.append(
        f"strict (tolerance 0) block rate {s.disallowed_rate(0):.1%}; benign FP at tolerance {DEFAULT_TOLERANCE}"
        f" {s.rate(BENIGN, DEFAULT_TOLERANCE):.1%}; median latency {s.median_latency_ms:.3f} ms per check"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=sorted(PROMPT_SETS), default="1", dest="prompt_set")
    parser.add_argument("--split", help="a file of the set without .jsonl (set 1: train, heldout or all; set 2: all)")
    parser.add_argument("--data-dir", type=Path, help="score another directory of .jsonl files (held out: no --misses)")
    parser.add_argument("--misses", action="store_true", help="list missed and falsely blocked prompts (set 1 only)")
    parser.add_argument("--json", type=Path, help="also write the aggregate figures here")
    args = parser.parse_args(argv)
    chosen = PROMPT_SETS[args.prompt_set]
    if args.data_dir is not None and args.data_dir.resolve() != chosen.data_dir.resolve():
        # A directory named by path is treated as held out unless it is set 1's own.
        training = args.data_dir.resolve() == DATA_DIR.resolve()
        chosen = PromptSet(args.data_dir, (args.split or "all",), training=training)
    split = args.split or chosen.splits[0]
    if split not in chosen.splits:
        parser.error(f"--split must be one of {chosen.splits} for this set, got {split!r}")
    if args.misses and not chosen.training:
        parser.error("--misses is for set 1 only: a held-out set's prompts must not steer the rules")
    result, outcomes = score(f"{chosen.data_dir.name}/{split}", load(split, chosen.data_dir))
    print(report(result))
    if args.misses:
        for row, flags, reason in outcomes:
            missed = row.label != BENIGN and not flags[0]
            weak = row.label in ALWAYS_BLOCKED and not all(flags)
            false_positive = row.label == BENIGN and flags[DEFAULT_TOLERANCE]
            if missed or weak or false_positive:
                tag = "FP" if false_positive else ("MISS" if missed else "WEAK")
                print(
                    f"{tag:4} {row.id} [{row.label}/{row.kind}] {''.join('X' if f else '.' for f in flags)} "
                    f"{row.prompt!r} -> {reason}"
                )
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
