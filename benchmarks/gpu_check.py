"""The package's one-command GPU check: the machine, training and GraNd throughput, determinism, study hours.

    python benchmarks/gpu_check.py [--out DIR] [--budget 480] [--subset data/cifar10-subset.npz]
                                   [--full-cifar ZIP] [--only STAGE,...]
    python benchmarks/gpu_check.py --smoke   # the same on the CPU at tiny sizes (tests/test_gpu_check.py)

Each stage (``benchmarks/gpu_stages.py``) runs in a process of its own, under a timeout (its cap, or what is
left of ``--budget``) and a faulthandler watchdog, so a segfault or a hung CUDA call fails that stage loudly
and the next one runs. Prints one table at the end and writes ``gpu_check.json`` plus each stage's JSON and log
to DIR (``--out``, else ``$OUT``, else ``.device/check/``). Exit status: 0 when every stage ran, 1 when one
failed, timed out or found no time left, 2 when torch sees no CUDA device (without ``--smoke``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGE_SCRIPT = Path(__file__).with_name("gpu_stages.py")
DEFAULT_OUT = REPO / ".device" / "check"
DEFAULT_BUDGET_S = 480  # a lent GPU's 8 minutes
SMOKE_ENV = "GPU_CHECK_SMOKE"
KILL_GRACE_S = 10  # past a stage's limit, beyond its own watchdog, before the driver kills its process group
SUMMARY_RESERVE_S = 5  # kept from the budget for the table
MIN_STAGE_S = 15  # a stage given less than this is not started
LOG_TAIL_LINES = 15
WATCHDOG_MARK = "Timeout ("  # how faulthandler.dump_traceback_later starts its dump
ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*: ")  # "ModuleNotFoundError: ...", the last line of a traceback
EXIT_FAILED, EXIT_NO_CUDA = 1, 2
FAILURE_MODES = ("raise", "crash", "hang")  # what --fail-stage makes a stage do (the first is the default)


@dataclass(frozen=True)
class Stage:
    """One stage of the check (its code: ``stage_<name>`` in gpu_stages.py)."""

    name: str
    cap_s: int  # the longest it may run (what is left of the budget may cut it shorter)
    optional: bool = False  # runs only when asked for (--full-cifar); a lack of time then skips it without failing


STAGES = (Stage("env", 60), Stage("grand", 90), Stage("train-resnet18", 150), Stage("train-resnet50", 180),
          Stage("determinism", 120), Stage("projection", 240), Stage("accuracy", 420, optional=True))


@dataclass
class Outcome:
    """How one stage ended, and what it measured."""

    name: str
    status: str
    ok: bool
    seconds: float = 0.0
    results: dict = field(default_factory=dict)


def exit_status(returncode: int | None, log: str, limit: float) -> tuple[str, bool]:
    """(status in words, ok) of a stage process that ended with ``returncode`` (None: killed at its timeout)."""
    if returncode == 0:
        return "ok", True
    if returncode is None:
        return f"TIMED OUT: killed after {limit + KILL_GRACE_S:.0f} s", False
    if returncode < 0:
        return f"CRASHED: {signal.Signals(-returncode).name}", False
    if WATCHDOG_MARK in log:
        return f"HUNG: stopped by its watchdog before the {limit:.0f} s limit; stacks in the log", False
    lines = [line.strip() for line in log.splitlines() if line.strip()] or ["no output"]
    error = next((line for line in reversed(lines) if ERROR_LINE.match(line)), lines[-1])
    return f"FAILED (exit {returncode}): {error[:200]}", False


def run_stage(stage: Stage, limit: float, args: argparse.Namespace, out: Path) -> Outcome:
    """Run one stage in its own process group, killed with all its children if it outlives its limit."""
    command = [sys.executable, str(STAGE_SCRIPT), stage.name, "--out", str(out), "--limit", f"{limit:.0f}"]
    command += ["--smoke"] * args.smoke
    command += [f"--{name}={value}" for name, value in (("subset", args.subset), ("full-cifar", args.full_cifar))
                if value is not None]
    failing, _, mode = (args.fail_stage or "").partition(":")
    command += [f"--inject={mode or FAILURE_MODES[0]}"] * (failing == stage.name)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    log_path, results_path = out / f"{stage.name}.log", out / f"{stage.name}.json"
    results_path.unlink(missing_ok=True)  # an earlier check's numbers must not pass for this one's
    started = time.monotonic()
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=limit + KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            try:  # its leftovers too (inductor's compile workers)
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
    status, ok = exit_status(returncode, log_path.read_text(errors="replace"), limit)
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    return Outcome(stage.name, status, ok, time.monotonic() - started, results)


def log_tail(out: Path, name: str) -> str:
    """The last lines of a stage's log, indented."""
    lines = (out / f"{name}.log").read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    return "\n".join(f"    | {line}" for line in lines)


def fmt(value) -> str:
    """A measured value for the table: numbers to a few digits, mappings as key=value."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    if isinstance(value, dict):
        return " ".join(f"{k}={fmt(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "; ".join(str(v) for v in value)
    return str(value)


def table(outcomes: list[Outcome]) -> str:
    """One table of every stage: its status row, then a row per measurement."""
    rows = [("stage", "measurement", "value")]
    for o in outcomes:
        rows.append((o.name, "status", f"{o.status} ({o.seconds:.1f} s)" if o.seconds else o.status))
        rows += [(o.name, key, fmt(value)) for key, value in o.results.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows)


def parse_args() -> argparse.Namespace:
    names = [s.name for s in STAGES]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", default=os.environ.get(SMOKE_ENV) == "1",
                        help=f"tiny sizes on the CPU, to test this script (also ${SMOKE_ENV}=1)")
    parser.add_argument("--out", type=Path, help="results folder (default: $OUT, else .device/check/)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole check")
    parser.add_argument("--subset", type=Path, help="the carried CIFAR-10 subset (default data/cifar10-subset.npz, "
                                                    "made by benchmarks/make_gpu_subset.py)")
    parser.add_argument("--full-cifar", type=Path, help="the CIFAR-10 ImageFolder zip: adds a dense accuracy run")
    parser.add_argument("--only", type=lambda text: text.split(","), help=f"comma-separated stages of {names}")
    parser.add_argument("--fail-stage", metavar="STAGE[:MODE]",
                        help=f"make STAGE fail on purpose, MODE one of {list(FAILURE_MODES)} (to test this script)")
    args = parser.parse_args()
    failing, _, mode = (args.fail_stage or "").partition(":")
    unknown = set(args.only or []) - set(names) | ({failing} - set(names) if failing else set())
    if unknown:
        parser.error(f"unknown stage(s) {sorted(unknown)}; choose from {names}")
    if mode and mode not in FAILURE_MODES:
        parser.error(f"unknown failure mode {mode!r}; choose from {list(FAILURE_MODES)}")
    return args


def main() -> int:
    args = parse_args()
    out = (args.out or Path(os.environ.get("OUT") or DEFAULT_OUT)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    deadline = started + args.budget - SUMMARY_RESERVE_S
    outcomes: list[Outcome] = []
    no_cuda = False
    for stage in STAGES:
        if args.only and stage.name not in args.only:
            continue
        if no_cuda:
            outcomes.append(Outcome(stage.name, "not run: no CUDA device", False))
            continue
        if stage.optional and args.full_cifar is None:
            outcomes.append(Outcome(stage.name, "skipped: no --full-cifar zip given", True))
            continue
        limit = min(stage.cap_s, deadline - time.monotonic())
        if limit < MIN_STAGE_S:
            outcomes.append(Outcome(stage.name, f"SKIPPED: {max(0.0, limit):.0f} s of the budget left", stage.optional))
            continue
        print(f"== {stage.name} (limit {limit:.0f} s, {time.monotonic() - started:.0f} s elapsed)", flush=True)
        outcome = run_stage(stage, limit, args, out)
        outcomes.append(outcome)
        print(f"   {outcome.status} in {outcome.seconds:.1f} s", flush=True)
        if not outcome.ok:
            print(log_tail(out, stage.name), flush=True)
        no_cuda = stage.name == "env" and not args.smoke and outcome.results.get("cuda_available") is False
    failed = [o.name for o in outcomes if not o.ok]
    wall = time.monotonic() - started
    summary = {"smoke": args.smoke, "budget_s": args.budget, "wall_s": wall, "failed": failed,
               "stages": [asdict(o) for o in outcomes]}
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\n{table(outcomes)}\n")
    verdict = f"FAILED: {', '.join(failed)}" if failed else "every stage ran"
    print(f"gpu check{' (smoke)' if args.smoke else ''}: {verdict}; {wall:.0f} s; results and logs in {out}")
    if no_cuda:
        return EXIT_NO_CUDA
    return EXIT_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
