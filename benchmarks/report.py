"""The main job's wall time: the notebook sweep against the inline sweep of one preset, side by side, and
`make report` on a fresh clone, phase by phase.

    python benchmarks/report.py                  # both parts
    python benchmarks/report.py --part sweeps    # notebooks vs inline only (a minute or two on digits)
    python benchmarks/report.py --part report    # make report on a fresh clone of HEAD (pip's cache warm)

Every sweep is ``datadiet-nb sweep --quiet`` in a fresh process on a fresh store and book folder, timed from the
outside (start-up, data loading and kernels count, as a user sees them). The report part clones this checkout's
HEAD, times ``make install``, then runs each command ``make -n report`` lists (the Makefile's own, so nothing is
copied here) and times it, and counts the built pages. Prints tables and writes report.json next to this file.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, describe_machine, write_json

COMMAND = REPO / ".venv" / "bin" / "datadiet-nb"


def timed(command: list[str] | str, cwd: Path, **kwargs) -> float:
    """Seconds of one command (which must succeed)."""
    started = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL, **kwargs)
    return time.perf_counter() - started


def sweeps(preset: str, workers: int) -> list[dict]:
    """The preset's sweep as notebooks (the default executor and workers) and inline (one process, and
    ``workers`` worker processes), each from nothing."""
    configurations = [("inline (1 process)", ["--executor", "inline"]),
                      (f"inline ({workers} worker processes)", ["--executor", "inline", "--workers", str(workers)]),
                      ("notebooks (default: a kernel per core)", [])]
    rows = []
    for label, options in configurations:
        with tempfile.TemporaryDirectory(prefix="bench-sweep-") as folder:
            seconds = timed([str(COMMAND), "sweep", "--preset", preset, "--store", "runs", "--quiet", *options],
                            Path(folder))
        rows.append({"executor": label, "seconds": round(seconds, 1)})
        print(f"{label:42s} {seconds:7.1f} s", flush=True)
    for row in rows:
        row["vs inline"] = round(row["seconds"] / rows[0]["seconds"], 2)
    return rows


def report_commands(clone: Path) -> list[str]:
    """The commands of ``make report`` once installed, as the Makefile lists them."""
    listed = subprocess.run(["make", "-n", "report"], cwd=clone, check=True, capture_output=True, text=True).stdout
    return [line for line in listed.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("echo")]


def make_report() -> list[dict]:
    """``make report`` on a fresh clone of HEAD: the install, then each of its commands, timed."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-report-") as folder:
        clone = Path(folder) / "clone"
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
        rows.append({"phase": "make install", "seconds": round(timed(["make", "install"], clone, stderr=subprocess.DEVNULL), 1)})
        print(f"{'make install':42s} {rows[-1]['seconds']:7.1f} s", flush=True)
        for command in report_commands(clone):
            seconds = timed(command, clone, shell=True, stderr=subprocess.DEVNULL)
            name = re.sub(r"^\S*/", "", shlex.split(command)[0])
            label = " ".join([name, *shlex.split(command)[1:4]])
            rows.append({"phase": label, "seconds": round(seconds, 1)})
            print(f"{label[:42]:42s} {seconds:7.1f} s", flush=True)
        pages = len(list((clone / "_build" / "html").rglob("*.html")))
    rows.append({"phase": "make report (total)", "seconds": round(sum(r["seconds"] for r in rows), 1), "pages": pages})
    print(f"{'make report (total)':42s} {rows[-1]['seconds']:7.1f} s, {pages} pages")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["sweeps", "report", "both"], default="both")
    parser.add_argument("--preset", default="digits", help="the preset of the side-by-side sweeps")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if not COMMAND.exists():
        sys.exit(f"no {COMMAND}: run `make install` first")
    results = {"machine": describe_machine("cpu"), "cpu_count": os.cpu_count()}
    if args.part in ("sweeps", "both"):
        results["sweeps"] = {"preset": args.preset, "rows": sweeps(args.preset, args.workers)}
    if args.part in ("report", "both"):
        results["make_report"] = make_report()
    print(f"wrote {write_json(__file__, results)}")


if __name__ == "__main__":
    main()
