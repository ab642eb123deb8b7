"""Mutation score per module from the last ``mutmut run`` (``make mutation``): how many of the small code changes
mutmut makes to the modules whose numbers reach the book are caught by the tests.

A mutant is *killed* when a test fails (or times out) with it; a *survivor* is a change no test noticed. Survivors
judged equivalent (the change cannot alter any result) are listed in benchmarks/README.md with the reason.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, git_commit, write_json  # noqa: E402

CAUGHT = {"killed", "timeout", "caught by type check", "segfault"}
# scores.py is reported in two parts: EL2N (and the batching it shares with GraNd), and the rest
PARTS = {"datadiet_nb.scores": ("el2n", ("el2n_scores", "_batched_eval"))}
NAME = re.compile(r"^\s*(?P<module>[\w.]+?)\.x(?:ǁ(?P<cls>\w+)ǁ)?_?(?P<function>\w+?)__mutmut_\d+: (?P<status>.+)$")


def mutant_statuses() -> list[dict]:
    """Every mutant of the last run: module, class, function, status (from ``mutmut results --all true``)."""
    out = subprocess.run([str(Path(sys.executable).parent / "mutmut"), "results", "--all", "true"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    rows = [m.groupdict() for m in map(NAME.match, out.splitlines()) if m]
    if not rows:
        raise SystemExit("no mutants found: run `make mutation` (mutmut run) first")
    return rows


def group_of(row: dict) -> str:
    part = PARTS.get(row["module"])
    if part is None:
        return row["module"]
    name, functions = part
    return f"{row['module']} ({name})" if row["function"] in functions else f"{row['module']} (rest)"


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    groups: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    survivors: dict[str, list[str]] = defaultdict(list)
    for row in mutant_statuses():
        group = group_of(row)
        groups[group][row["status"]] += 1
        if row["status"] not in CAUGHT:
            survivors[group].append(f"{row['cls'] + '.' if row['cls'] else ''}{row['function']}: {row['status']}")
    print(f"{'module':36s} {'mutants':>7s} {'caught':>6s} {'score':>6s}  not caught")
    table = {}
    for group in sorted(groups):
        counts = groups[group]
        total, caught = sum(counts.values()), sum(counts[s] for s in CAUGHT)
        table[group] = {"mutants": total, "caught": caught, "score": caught / total, "statuses": dict(counts),
                        "not_caught": survivors[group]}
        others = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()) if s not in CAUGHT)
        print(f"{group:36s} {total:7d} {caught:6d} {caught / total:6.1%}  {others}")
    write_json(__file__, {"modules": table, **git_commit()})


if __name__ == "__main__":
    main()
