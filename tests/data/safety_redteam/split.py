#!/usr/bin/env python3
"""Split the red-team prompt set all.jsonl into train.jsonl and heldout.jsonl.

Rule (deterministic, idempotent, standard library only):
  * rows are grouped into strata by (label, kind), keeping the order of all.jsonl;
  * within each stratum the 1st, 3rd, 5th ... row goes to train.jsonl and the
    2nd, 4th, 6th ... row goes to heldout.jsonl;
  * both outputs keep the order of all.jsonl and are rewritten from scratch.

Every stratum has at least two rows, so both halves contain every (label, kind).
heldout.jsonl must never be used to tune the filter's rules; it is for
measuring them only.

Usage: python3 split.py   (run from anywhere; paths are relative to this file)
"""

import collections
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent


def main() -> int:
    rows = [json.loads(line) for line in (HERE / "all.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    seen = collections.Counter()
    halves = {"train": [], "heldout": []}
    for row in rows:
        stratum = (row["label"], row["kind"])
        halves["train" if seen[stratum] % 2 == 0 else "heldout"].append(row)
        seen[stratum] += 1
    small = sorted(s for s, n in seen.items() if n < 2)
    if small:
        print("strata with fewer than two rows (missing from heldout):", small, file=sys.stderr)
    for name, part in halves.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
        (HERE / f"{name}.jsonl").write_text(text, encoding="utf-8")
        labels = collections.Counter(r["label"] for r in part)
        print(f"{name}.jsonl: {len(part)} rows", dict(sorted(labels.items())))
    return 1 if small else 0


if __name__ == "__main__":
    sys.exit(main())
