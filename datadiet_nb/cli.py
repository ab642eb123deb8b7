"""The ``datadiet-nb`` command: score, prune, train and sweep a preset from the shell."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from . import __version__, presets
from .errors import UserError
from .executors import EXECUTORS
from .experiment import RunFailed
from .presets import PRUNING_SCORES, Preset
from .train import Diverged

PROG = "datadiet-nb"


def _preset(args: argparse.Namespace) -> Preset:
    preset = presets.get(args.preset)
    assignments = list(args.set or [])
    if getattr(args, "offset", None) is not None:
        assignments.append(f"offset={args.offset}")
    if getattr(args, "sparsity", None) is not None:  # prune / train: the preset's grid is not in play, only this point
        assignments.append(f"sparsities={args.sparsity}")
    preset = presets.with_overrides(preset, assignments)
    return presets.with_rule(preset, args.score) if getattr(args, "score", None) else preset


def _store(args: argparse.Namespace, *, writing: bool = True):
    from .store import Store, check_writable
    if writing:
        check_writable(Path(args.store))  # fail now, not at the first result an hour from now
    return Store(args.store)


def cmd_presets(args: argparse.Namespace) -> None:
    for name, preset in presets.PRESETS.items():
        print(f"{name:20s} {preset.dataset} / {preset.model} {preset.model_options or ''}  "
              f"{len(preset.sparsities)} sparsities x {len(preset.scores)} scores x {len(preset.seeds)} seeds")


def cmd_score(args: argparse.Namespace) -> None:
    from .experiment import compute_scores, load_dataset, scored_dataset

    preset = _preset(args)
    dataset = load_dataset(preset)
    scores = compute_scores(preset, dataset, _store(args), progress=not args.quiet)
    dataset = scored_dataset(preset, dataset)
    labels = dataset.train_labels.numpy()
    epochs = ", ".join(preset.scoring.label(name) for name in ("el2n", "grand"))
    print(f"{dataset.name}: {dataset.num_train} training examples, K={preset.scoring.num_runs} runs "
          f"({epochs}); mean score per class:")
    print(f"{'class':>16s} {'el2n':>8s} {'grand':>8s}")
    for index, name in enumerate(dataset.classes):
        mask = labels == index
        print(f"{name:>16s} {scores['el2n'][mask].mean():8.4f} {scores['grand'][mask].mean():8.4f}")


def cmd_prune(args: argparse.Namespace) -> None:
    from .experiment import kept_indices, load_dataset
    from .prune import check_sparsity, class_keep_ratio, select_indices

    preset = _preset(args)
    check_sparsity(args.sparsity, preset.offset_at(args.sparsity))
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not args.force:
        raise UserError(f"{out} exists; choose another --out or pass --force to replace it")
    dataset = load_dataset(preset)
    if args.scores:
        try:
            scores = np.load(args.scores)
        except (OSError, ValueError) as error:
            raise UserError(f"cannot read scores file {args.scores}: {error}") from None
        if scores.shape != (dataset.num_train,):
            raise UserError(f"{args.scores} holds {scores.shape} scores but {dataset.name} has "
                            f"{dataset.num_train} training examples")
        kept = select_indices(scores, args.sparsity, offset=preset.offset)
    else:
        kept = kept_indices(preset, dataset, args.score, args.sparsity, args.seed, _store(args),
                            progress=not args.quiet)
    ratio = class_keep_ratio(dataset.train_labels.numpy(), kept, dataset.num_classes)
    print(f"kept {len(kept)} of {dataset.num_train} examples (sparsity {args.sparsity:g}); class keep ratio:")
    for name, r in sorted(zip(dataset.classes, ratio), key=lambda item: -item[1]):
        print(f"{name:>16s} {r:.3f}")
    if out is not None:
        from .store import write_npy
        write_npy(out, kept)
        print(f"kept indices written to {out}")


def cmd_train(args: argparse.Namespace) -> int | None:
    from .experiment import load_dataset, train_run

    preset = _preset(args)
    if args.nproc > 1:
        return _torchrun(args, preset)
    dataset = load_dataset(preset)
    record = train_run(preset, dataset, args.score, args.sparsity, args.seed, _store(args), progress=not args.quiet)
    print(f"{record['score']} sparsity {record['sparsity']:g} seed {record['seed']}: "
          f"test accuracy {record['overall_accuracy']:.4f}, std of class accuracy {record['bias']['std']:.4f}, "
          f"worst class {record['bias']['worst']:.4f}  (record {_store(args).run_path(record['key'])})")


def _torchrun(args: argparse.Namespace, preset: Preset) -> int:
    """``train --nproc N``: the run as N DistributedDataParallel processes on this machine (torchrun, standalone),
    after the preset's scores, computed the same way if the store lacks them."""
    from .distributed import check_sync_batchnorm
    from .experiment import load_dataset, run_config
    from .store import Store

    check_sync_batchnorm(args.sync_batchnorm, preset.device)

    common = ["--preset", args.preset, "--store", args.store, *[f"--set={a}" for a in args.set or []],
              *(["--quiet"] if args.quiet else []), *(["--sync-batchnorm"] if args.sync_batchnorm else [])]
    config = run_config(preset, load_dataset(preset), args.score, args.sparsity, args.seed)
    if "scores_key" in config and Store(args.store).load_scores(config["scores_key"]) is None:
        status = _run_torchrun(args.nproc, ["score", *common])
        if status:
            return status
    return _run_torchrun(args.nproc, ["train", *common, "--score", args.score, "--sparsity", str(args.sparsity),
                                      "--seed", str(args.seed),
                                      *(["--offset", str(args.offset)] if args.offset is not None else [])])


TORCHRUN_FAILURE_REPORT = b"torch/distributed/elastic/"  # where torchrun's multi-page report of a failed rank starts


def _run_torchrun(nproc: int, arguments: list[str]) -> int:
    """Run ``datadiet_nb.distributed`` under torchrun, passing its output through; a rank's one-line error is
    shown, torchrun's report of the failed process (a traceback) is not."""
    import subprocess

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "datadiet_nb.distributed", *arguments]
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))  # a share each
    process = subprocess.Popen(command, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": threads})
    reported = False
    for chunk in iter(lambda: process.stderr.read1(4096), b""):
        reported = reported or TORCHRUN_FAILURE_REPORT in chunk
        if not reported:
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
    return process.wait()


def cmd_sweep(args: argparse.Namespace) -> int:
    import time

    from .report import score_labels, summary_table
    from .results import format_table, keep_ratio_table, load_results
    from .store import check_writable
    from .executors.notebooks import execute_chapters, run_sweep_notebooks
    from .sweep import run_sweep, sweep_with

    preset = _preset(args)
    if args.dry_run:
        return _dry_run(preset, _store(args, writing=False))
    run_elsewhere = _executor(args, preset)  # bad executor options are refused before the store is touched
    chapters = _chapters(args.chapters)
    store = _store(args)
    if args.executor == "notebooks" or chapters:
        check_writable(Path(args.book_runs))
    started = time.perf_counter()
    if args.executor == "inline":
        outcome = run_sweep(preset, store, progress=not args.quiet, retry_failed=args.retry_failed,
                            workers=args.workers or 1)
    elif args.executor == "notebooks":
        outcome = run_sweep_notebooks(preset, list(args.set or []), store, Path(args.book_runs),
                                      progress=not args.quiet, retry_failed=args.retry_failed, workers=args.workers)
    else:
        outcome = sweep_with(lambda: run_elsewhere(store), preset, store, retry_failed=args.retry_failed)
        if args.executor == "slurm" and not args.wait:
            print(f"{preset.name}: jobs submitted to Slurm; `{PROG} status --preset {args.preset} --store "
                  f"{args.store}` follows them, and the same sweep command with --wait waits for them")
            return 0
    if chapters and args.executor != "notebooks":
        execute_chapters(preset, list(args.set or []), store, Path(args.book_runs), chapters)
    print(f"\n{preset.name}: {len(outcome.records)} runs in {store.root} ({time.perf_counter() - started:.1f} s)\n")
    if outcome.records:
        results = load_results(store, keys=[r["key"] for r in outcome.records])
        for size, at_size in results.groupby("train_size"):
            if preset.train_sizes:
                print(f"training set: {size:g} examples per class")
            print(summary_table(at_size, score_labels(preset)).to_string())
            print("\nclass keep ratio:")
            print(format_table(keep_ratio_table(at_size)) + "\n")
    if outcome.failures:
        print(f"\n{len(outcome.failures)} jobs failed (rerun with --retry-failed to try them again):", file=sys.stderr)
        for label, message in outcome.failures.items():
            print(f"  {label}: {message.splitlines()[0] if message else ''}", file=sys.stderr)
        return 1
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number > 0, got {text!r}")
    return value


def _chapters(text: str | None) -> list[str]:
    from .executors.notebooks import CHAPTERS
    chapters = [name.strip() for name in (text or "").split(",") if name.strip()]
    unknown = [name for name in chapters if name not in CHAPTERS]
    if unknown:
        raise UserError(f"unknown chapter {unknown[0]!r}; choose from {list(CHAPTERS)}")
    return chapters


def _executor(args: argparse.Namespace, preset: Preset):
    """For ``ray`` and ``slurm``: the call that runs the preset's missing jobs there (options checked now)."""
    progress = not args.quiet
    if args.executor == "ray":
        from .executors import ray
        options = ray.RayOptions(args.ray_address, args.gpus_per_job, args.cpus_per_job)
        options.validate()
        return lambda store: ray.run(preset, store, options, progress=progress)
    if args.executor == "slurm":
        from .executors import slurm
        options = slurm.SlurmOptions(args.slurm_partition, args.slurm_gpus_per_job, args.cpus_per_job,
                                     args.slurm_timeout_min, args.slurm_max_parallel, args.wait)
        options.validate()
        return lambda store: slurm.run(preset, store, options, progress=progress)
    return None


def _dry_run(preset: Preset, store) -> int:
    """Print the jobs a sweep would run and their estimated time, from a short timed warm-up on this device."""
    from .estimate import job_seconds, measure
    from .experiment import load_dataset, scored_dataset
    from .sweep import jobs, job_state

    dataset = load_dataset(preset)
    costs = measure(preset, dataset)
    total, todo = 0.0, 0
    for job in jobs(preset, dataset):
        state, _ = job_state(store, job, scored_dataset(preset, dataset).num_train)
        seconds = job_seconds(preset, dataset, job, costs)
        if state != "done":
            total, todo = total + seconds, todo + 1
        print(f"{state:8s} {job.label:34s} {_duration(seconds):>10s}")
    print(f"\n{preset.name}: {todo} jobs to run, about {_duration(total)} on {costs.device} "
          f"(measured: {costs.train_step * 1e3:.1f} ms per training step of {preset.recipe.batch_size}, "
          f"{costs.scoring_step * 1e3:.1f} ms per scoring-run step, {costs.score_example * 1e6:.0f} us per scored "
          f"example, {costs.eval_example * 1e6:.0f} us per test image, {costs.compile_run:.1f} s compiling each run)")
    return 0


def _duration(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def cmd_export(args: argparse.Namespace) -> int:
    from .bank import export

    out = Path(args.out)
    header = export(_preset(args), _store(args, writing=False), out, force=args.force)
    print(f"{out}: {header['preset']}'s scores ({', '.join(sorted(header['scores']))}; K = {header['num_runs']}) "
          f"of {header['dataset']['num_train']} examples of {header['dataset']['name']}, and the kept indices of "
          f"{len(header['kept'])} runs ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .executors.slurm import annotate
    from .sweep import status

    store = _store(args, writing=False)
    states = annotate(store, status(_preset(args), store))
    counts = {}
    for job, state, detail in states:
        counts[state] = counts.get(state, 0) + 1
        if args.verbose or state != "done":
            print(f"{state:8s} {job.label:34s} {job.key}  {detail}".rstrip())
    print(f"{args.preset} in {store.root}: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in
                                                         ("done", "running", "failed", "missing")))
    return 1 if counts.get("failed") else 0


class CurrentStderrHandler(logging.StreamHandler):
    """Writes each record to the ``sys.stderr`` of the moment, not the one current when it was created
    (a test's or a notebook's captured stream may be closed and replaced between calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property always reads sys.stderr
        pass


@contextlib.contextmanager
def warnings_in_one_line() -> Iterator[None]:
    """The package's warnings (a corrupt file moved aside, an unusable checkpoint) as ``datadiet-nb: ...`` lines
    while a command runs; the caller's logging is left as it was (propagation on, no handler left behind)."""
    logger = logging.getLogger("datadiet_nb")
    if any(isinstance(h, CurrentStderrHandler) for h in logger.handlers):  # a nested main(): already printing
        yield
        return
    handler = CurrentStderrHandler()
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line (and exit status 2), pointing to --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="Class-wise effects of Data Diet pruning.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        if name != "presets":
            sub.add_argument("--preset", default="digits", help="a preset name or a .toml/.json preset file (default: digits)")
            sub.add_argument("--store", default="runs", help="results directory (default: runs/)")
            sub.add_argument("--set", action="append", metavar="KEY=VALUE",
                             help="edit the preset, e.g. recipe.epochs=5 or scoring.num_runs=2 (repeatable)")
            sub.add_argument("--quiet", action="store_true", help="no progress bars")
        return sub

    command("presets", cmd_presets, "list the built-in presets")
    command("score", cmd_score, "compute (or load) EL2N and GraNd scores of a preset's training set")
    for name, handler, help in (("prune", cmd_prune, "select the kept training examples at a sparsity"),
                                ("train", cmd_train, "prune, train on the kept examples, evaluate, store the record")):
        sub = command(name, handler, help)
        sub.add_argument("--score", default="el2n", choices=PRUNING_SCORES)
        sub.add_argument("--sparsity", type=float, required=True, help="fraction of training examples removed")
        sub.add_argument("--offset", type=float, default=None, help="fraction of the hardest examples skipped")
        sub.add_argument("--seed", type=int, default=0)
        if name == "train":
            sub.add_argument("--nproc", type=int, default=1,
                             help="train as this many DistributedDataParallel processes (torchrun; default: 1)")
            sub.add_argument("--sync-batchnorm", action="store_true", help="with --nproc: BatchNorm over all ranks")
        if name == "prune":
            sub.add_argument("--scores", help="a .npy file of your own scores, one per training example")
            sub.add_argument("--out", help="write the kept indices (.npy) here")
            sub.add_argument("--force", action="store_true", help="replace an existing --out file")
    sweep = command("sweep", cmd_sweep, "run every (score, sparsity, seed) of a preset and print the results tables")
    sweep.add_argument("--executor", choices=EXECUTORS, default="notebooks",
                       help="where the jobs run: papermill notebooks (default), this process (inline), Ray tasks, "
                            "or a Slurm array (submitit)")
    scale = sweep.add_argument_group("ray and slurm executors")
    scale.add_argument("--ray-address", help="join this Ray cluster (auto, host:port or ray://host:port); "
                                             "default: start a local Ray instance with this machine's resources")
    scale.add_argument("--gpus-per-job", type=float, help="GPUs per Ray task; a fraction packs several runs on one "
                                                          "GPU (default: 1 where the cluster has GPUs, else 0)")
    scale.add_argument("--cpus-per-job", type=float, default=1.0, help="CPUs per Ray task or Slurm job (default: 1)")
    scale.add_argument("--slurm-partition", help="the Slurm partition to submit to (required with --executor slurm)")
    scale.add_argument("--slurm-gpus-per-job", type=int, help="GPUs per Slurm job (default: 1, 0 for a CPU preset)")
    scale.add_argument("--slurm-timeout-min", type=int, default=240,
                       help="time limit of each Slurm job; a job that reaches it is requeued and resumes (default: 240)")
    scale.add_argument("--slurm-max-parallel", type=int, default=64,
                       help="at most this many jobs of an array run at once (default: 64)")
    scale.add_argument("--wait", action="store_true", help="with slurm: follow the jobs until all have finished")
    sweep.add_argument("--workers", type=_positive_int, help="jobs at once on this machine, each with a share of "
                       "the cores: notebook kernels (default: one per core, one on a GPU) or, inline, worker "
                       "processes (default: 1, this process)")
    sweep.add_argument("--book-runs", default="book/runs", help="where executed notebooks go (default: book/runs)")
    sweep.add_argument("--chapters", help="with an executor other than notebooks: also execute these chapter "
                                          "notebooks into --book-runs (analysis, bias, reproducibility; comma-separated)")
    sweep.add_argument("--retry-failed", action="store_true", help="run again the jobs recorded as failed")
    sweep.add_argument("--dry-run", action="store_true",
                       help="list the jobs and estimate their time from a short timed warm-up; run nothing")
    export = command("export", cmd_export, "write a preset's scores, its runs' kept indices and its data's identity "
                                           "to one .npz file (the score bank)")
    export.add_argument("--out", required=True, help="the file to write (.npz)")
    export.add_argument("--force", action="store_true", help="replace an existing --out file")
    status = command("status", cmd_status, "list the done, running, failed and missing jobs of a preset in a store")
    status.add_argument("--verbose", action="store_true", help="list the done jobs too")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings_in_one_line():
            return args.handler(args) or 0
    except UserError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except (Diverged, RunFailed) as error:
        print(f"{PROG}: run failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
