"""Sweep jobs as executed notebooks (papermill), on a pool of Jupyter kernels kept warm for the whole sweep.

Each run notebook is stored under ``book/runs/`` for the book. Starting a kernel and importing torch, pandas and
matplotlib in it costs a few seconds, more than a digits job; so a sweep starts a :class:`KernelPool` (one
:class:`WarmKernel` per worker, each with a share of the cores) and runs every notebook in one of them, after
putting that kernel back into the state it had when fresh (see :data:`RESET`). A notebook that fails, or kills
its kernel, gets a new kernel for the next one.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

from ..errors import UserError
from ..experiment import RunFailed
from ..presets import PAPER_RULES, Preset
from ..store import Store, atomic_write_bytes
from ..sweep import (Job, SweepOutcome, _schedule, clear_failures, collect, default_workers, load_dataset, run_job,
                     threads_per_worker)

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
KERNEL = "python3"
# The kernel's own log at ERROR: at WARNING, ipykernel prints "Kernel is running over TCP without encryption" for
# every notebook of a sweep (into its progress bar). The kernel runs on this machine's loopback, for this user.
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=ERROR"]
TITLES = {"analysis": "Results: {preset}", "scores": "Scores: {preset}",
          "bias": "What drives class-wise bias: {preset}",
          "regime": "Which examples to keep depends on how many you have: {preset}"}



STARTUP_TIMEOUT_S = 120
RESTART_EVERY = 25  # notebooks a kernel runs before a new one replaces it (what leaks past the reset stays small)
# Run once in a new kernel: the libraries every notebook imports, imported once, then what a fresh kernel's state
# is, kept where the reset finds it (a module, which IPython's reset does not clear). The package itself is not
# imported here: the reset removes its modules, so each notebook imports it afresh. Last, the libraries' objects
# are frozen out of the garbage collector's reach (gc.freeze): IPython's reset runs a full collection, which over
# torch, pandas and matplotlib's millions of objects took 0.14 s per notebook; the frozen objects live as long as
# the kernel anyway, and what the notebooks create is collected as before.
SNAPSHOT = """
import gc, logging, os, random, sys, warnings
import numpy, torch, pandas, matplotlib, matplotlib.pyplot, seaborn, scipy.stats, sklearn.datasets
matplotlib.pyplot.close(matplotlib.pyplot.figure())  # the inline backend sets itself up (interactive) at a first figure
_fresh = type(sys)("_datadiet_fresh")
_fresh.state = dict(env=dict(os.environ), cwd=os.getcwd(), path=list(sys.path), filters=list(warnings.filters),
                    modules=set(sys.modules), loggers=set(logging.Logger.manager.loggerDict),
                    root=(logging.root.level, list(logging.root.handlers)), threads=torch.get_num_threads(),
                    torch_rng=torch.get_rng_state(), numpy_rng=numpy.random.get_state(), python_rng=random.getstate(),
                    rc=dict(matplotlib.rcParams), precision=torch.get_float32_matmul_precision(),
                    cudnn=(torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
                           torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision),
                    cudnn_enabled=torch.backends.cudnn.enabled, dtype=torch.get_default_dtype(),
                    grad=torch.is_grad_enabled(), deterministic=(torch.are_deterministic_algorithms_enabled(),
                                                                  torch.is_deterministic_algorithms_warn_only_enabled()),
                    anomaly=(torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()),
                    numpy_err=numpy.geterr(), numpy_print=numpy.get_printoptions())
sys.modules["_datadiet_fresh"] = _fresh
del _fresh
gc.collect(); gc.freeze()
"""
# Run before each notebook: the variables gone; the package's modules and any other module imported since the
# kernel started from outside the installed libraries (a user's own module, say) unloaded; and these settings as
# when fresh: environment, working folder, sys.path, warning filters, loggers; torch's threads, matmul precision,
# cuDNN switches, default dtype, grad mode, deterministic-algorithms and anomaly modes, and random state (the CUDA
# generators reseeded to torch's default seed where CUDA is in use); numpy's random state, error handling and
# print options; Python's random state; pandas' options; matplotlib's settings and figures. Then a new history
# session (its cell counter at 1, as IPython's own reset with a new session does), which also clears the
# variables of the last notebook and of this code. What a notebook changes beyond these (another library's
# global, a C extension's state) carries over; a kernel is replaced every RESTART_EVERY notebooks.
# tests/test_notebook_executor.py checks each, and that records equal a fresh kernel's.
RESET = """
import logging, os, random, sys, sysconfig, warnings
import numpy, pandas, torch, matplotlib, matplotlib.pyplot
_state = sys.modules["_datadiet_fresh"].state
_installed = tuple(os.path.realpath(sysconfig.get_paths()[_kind]) for _kind in ("stdlib", "platstdlib", "purelib", "platlib"))
def _unload(_name):
    if _name == "datadiet_nb" or _name.startswith("datadiet_nb."):
        return True
    _file = getattr(sys.modules.get(_name), "__file__", None)
    return bool(_file) and not os.path.realpath(_file).startswith(_installed)
for _name in [m for m in sys.modules if m not in _state["modules"] and _unload(m)]:
    del sys.modules[_name]
os.environ.clear(); os.environ.update(_state["env"]); os.chdir(_state["cwd"]); sys.path[:] = _state["path"]
for _name in set(logging.Logger.manager.loggerDict) - _state["loggers"]:
    del logging.Logger.manager.loggerDict[_name]
logging.root.setLevel(_state["root"][0]); logging.root.handlers[:] = _state["root"][1]
torch.set_num_threads(_state["threads"]); torch.set_rng_state(_state["torch_rng"])
numpy.random.set_state(_state["numpy_rng"]); random.setstate(_state["python_rng"])
torch.set_float32_matmul_precision(_state["precision"])
(torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.conv.fp32_precision,
 torch.backends.cuda.matmul.fp32_precision) = _state["cudnn"]
torch.backends.cudnn.enabled = _state["cudnn_enabled"]; torch.set_default_dtype(_state["dtype"])
torch.set_grad_enabled(_state["grad"]); torch.use_deterministic_algorithms(_state["deterministic"][0], warn_only=_state["deterministic"][1])
torch.autograd.set_detect_anomaly(*_state["anomaly"])
if torch.cuda.is_initialized():
    torch.cuda.manual_seed_all(67280421310721)  # c10's default_rng_seed_val: a fresh process's CUDA seed
numpy.seterr(**_state["numpy_err"]); numpy.set_printoptions(**_state["numpy_print"])
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pandas.reset_option("all")
# last: torch.use_deterministic_algorithms adds a warning filter of its own the first time it is called
warnings.filters[:] = _state["filters"]; warnings.resetwarnings() if not _state["filters"] else None
matplotlib.pyplot.close("all")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    matplotlib.rcParams.update(_state["rc"])
get_ipython().reset(new_session=True)
"""


class WarmKernel:
    """One Jupyter kernel for many notebooks, each run in the state a fresh kernel has (:data:`RESET`)."""

    def __init__(self, restart_every: int = RESTART_EVERY, *, threads: int | None = None):
        self.restart_every = restart_every
        self.threads = threads  # torch (and OpenMP) threads of the kernel; None: the library's default
        self.km = self.kc = None
        self.used = 0

    def __enter__(self) -> "WarmKernel":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        # An asynchronous manager: papermill's client then polls the kernel's liveness while it waits for output,
        # so a notebook that kills its kernel fails at once instead of waiting forever. The reset talks to the
        # kernel through a blocking client of its own.
        from jupyter_client import AsyncKernelManager
        from jupyter_core.utils import run_sync

        env = dict(os.environ, **({"OMP_NUM_THREADS": str(self.threads)} if self.threads else {}))
        self.km = AsyncKernelManager(kernel_name=KERNEL)
        run_sync(self.km.start_kernel)(extra_arguments=KERNEL_ARGUMENTS, cwd=os.getcwd(), env=env)
        self.kc = self.km.blocking_client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=STARTUP_TIMEOUT_S)
        self._run(SNAPSHOT)
        self.used = 0

    def alive(self) -> bool:
        from jupyter_core.utils import run_sync

        return self.km is not None and run_sync(self.km.is_alive)()

    def stop(self) -> None:
        from jupyter_core.utils import run_sync

        if self.km is not None:
            self.kc.stop_channels()
            run_sync(self.km.shutdown_kernel)(now=True)
            self.km = self.kc = None

    def _run(self, code: str) -> None:
        reply = self.kc.execute_interactive(code, store_history=False, timeout=STARTUP_TIMEOUT_S,
                                            output_hook=lambda message: None)
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"the warm kernel could not be reset: {reply['content'].get('evalue')}")

    def run(self, execute: Callable[[dict], object]) -> object:
        """``execute(kernel_options)`` on this kernel, reset first; a failure, or a
        kernel that died, gets a new kernel for the next notebook."""
        if not self.alive() or self.used >= self.restart_every:
            self.stop()
            self.start()
        self._run(RESET)
        self.used += 1
        try:
            return execute({"km": self.km})
        except BaseException:
            self.stop()  # whatever the failed notebook left (or a dead kernel) is not carried into the next one
            raise


class KernelPool:
    """``size`` warm kernels, each with ``threads`` threads, for notebooks run from that many threads at once;
    a kernel starts at its first notebook."""

    def __init__(self, size: int, threads: int | None = None):
        self.size = size
        self.idle: queue.SimpleQueue[WarmKernel] = queue.SimpleQueue()
        self.kernels = [WarmKernel(threads=threads) for _ in range(size)]
        for kernel in self.kernels:
            self.idle.put(kernel)

    def __enter__(self) -> "KernelPool":
        return self

    def __exit__(self, *exc) -> None:
        for kernel in self.kernels:
            kernel.stop()

    def run(self, execute: Callable[[dict], object]) -> object:
        """:meth:`WarmKernel.run` on an idle kernel (waiting for one)."""
        kernel = self.idle.get()
        try:
            return kernel.run(execute)
        finally:
            self.idle.put(kernel)

def execute_notebook(name: str | Path, output: Path, parameters: dict, *, scratch: Path, title: str | None = None,
                     kernel: WarmKernel | KernelPool | None = None) -> None:
    """Run ``notebooks/<name>.ipynb`` (or the notebook at a path) with papermill, in ``kernel`` (else a kernel of
    its own); the executed copy appears at ``output`` only when done.

    Papermill writes the notebook as it runs into ``scratch`` (outside the book). In the copy, the
    parameter cells are tagged for removal from the book and ``title`` (if given) replaces the
    first heading, so that each preset's chapter is named after it.
    """
    import nbformat
    import papermill

    scratch.mkdir(parents=True, exist_ok=True)
    partial = scratch / f"{output.stem}.{os.getpid()}.{threading.get_ident()}.partial.ipynb"
    source = name if isinstance(name, Path) else NOTEBOOKS / f"{name}.ipynb"

    def execute(kernel_options: dict):
        return papermill.execute_notebook(str(source), str(partial), parameters=parameters, kernel_name=KERNEL,
                                          progress_bar=False, cwd=os.getcwd(), extra_arguments=KERNEL_ARGUMENTS,
                                          **kernel_options)
    try:
        notebook = execute({}) if kernel is None else kernel.run(execute)
    finally:
        partial.unlink(missing_ok=True)
    for cell in notebook.cells:
        tags = cell.metadata.setdefault("tags", [])
        if {"parameters", "injected-parameters"} & set(tags):
            tags.append("remove-cell")
    if title:
        first = next(c for c in notebook.cells if c.cell_type == "markdown")
        first.source = "\n".join([f"# {title}", *first.source.splitlines()[1:]])
    atomic_write_bytes(output, nbformat.writes(notebook).encode())


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """This process's torch threads set to ``threads`` for the block (the scoring runs of a sweep run here, beside
    the kernels)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_sweep_notebooks(preset: Preset, overrides: list[str], store: Store, book_runs: Path,
                        *, progress: bool = True, retry_failed: bool = False,
                        workers: int | None = None) -> SweepOutcome:
    """The sweep as executed notebooks under ``book_runs/<preset>/``: scores, one per run, then analysis, run on
    ``workers`` kernels at once (default: :func:`~datadiet_nb.sweep.default_workers`).

    A job whose result and executed notebook both exist is skipped, so a rerun does only what is missing. The
    scoring runs have no notebook (the scores notebook shows them all): they run in this process, one at a time
    (each seeds torch's global generator to draw its model).
    """
    from papermill.exceptions import PapermillExecutionError

    workers = workers or default_workers(preset)
    dataset = load_dataset(preset)
    folder = Path(book_runs) / preset.name
    scratch = store.checkpoint_path("notebooks")
    common = {"preset": preset.name, "store": str(Path(store.root).resolve()), "overrides": list(overrides)}
    here = threading.Lock()

    def notebook(job: Job) -> Path | None:
        if job.kind == "scoring-run":
            return None  # computed by the scores notebook, which shows all K runs
        return folder / "scores.ipynb" if job.kind == "scores" else folder / "train" / f"{job.label}.ipynb"

    def execute(job: Job) -> bool:
        if job.kind == "scoring-run":
            with here:
                run_job(preset, dataset, store, job, progress=progress and workers == 1)
            return True
        # The job itself is claimed inside the notebook's kernel; this claim stops a second sweep from
        # starting a kernel for the same job in the seconds before that.
        launch = store.try_claim(f"{job.key}-notebook")
        if launch is None:
            return False
        with launch:
            run_notebook(job)
        return True

    def run_notebook(job: Job) -> None:
        name, parameters = "scores", common
        if job.spec is not None:
            name = "train_sparse"
            parameters = {**common, "score": job.spec.score, "sparsity": job.spec.sparsity, "seed": job.spec.seed}
            if job.size is not None:  # one size of the grid: the preset at that size
                parameters["overrides"] = [*overrides, "train_sizes=", f"train_per_class={job.size}"]
        try:
            execute_notebook(name, notebook(job), parameters, scratch=scratch,
                             title=TITLES.get(name, "").format(preset=preset.name) or None, kernel=kernels)
        except PapermillExecutionError as error:
            if error.ename == "UserError":
                raise UserError(error.evalue) from None
            if error.ename == "RunFailed":
                raise RunFailed(error.evalue) from None
            raise

    if retry_failed:
        clear_failures(preset, dataset, store)
    threads = threads_per_worker(workers)
    with KernelPool(workers, threads) as kernels, torch_threads(threads):
        failures = _schedule(preset, dataset, store, execute, progress=progress, workers=workers,
                             extra_done=lambda job: notebook(job) is None or notebook(job).is_file())
        outcome = collect(preset, dataset, store, failures)
        execute_chapters(preset, overrides, store, book_runs, default_chapters(preset), kernel=kernels)
    return outcome


CHAPTERS = ("analysis", "bias", "regime", "reproducibility", "findings")
STORE_CHAPTERS = ("reproducibility", "findings")  # of the whole store, not of one preset: under book_runs/


def default_chapters(preset: Preset) -> list[str]:
    """The chapters a notebooks sweep executes: the results, the bias chapter when the preset compares rules
    beyond the paper's, and the findings page and the reproducibility appendix (of the whole store); a grid of
    training-set sizes gets the regime chapter instead of the results and bias chapters."""
    if preset.train_sizes:
        return ["regime", *STORE_CHAPTERS]
    return ["analysis", *(["bias"] if set(preset.scores) - set(PAPER_RULES) else []), *STORE_CHAPTERS]


def execute_chapters(preset: Preset, overrides: list[str], store: Store, book_runs: Path, chapters: list[str],
                     *, kernel: WarmKernel | KernelPool | None = None) -> None:
    """Execute the book's chapter notebooks of a preset (``analysis``, ``bias``, ``regime``) into
    ``book_runs/<preset>/``, and the store's (:data:`STORE_CHAPTERS`) into ``book_runs/``, from the runs in the store (a missing run is run in the kernel), in
    ``kernel`` (a pool runs them at once) or a pool of their own."""
    if kernel is None:
        size = max(1, min(len(chapters), default_workers(preset)))
        with KernelPool(size, threads_per_worker(size)) as own:
            return execute_chapters(preset, overrides, store, book_runs, chapters, kernel=own)
    folder = Path(book_runs) / preset.name
    common = {"preset": preset.name, "store": str(Path(store.root).resolve()), "overrides": list(overrides)}

    def chapter(name: str) -> None:
        if name in STORE_CHAPTERS:
            path, parameters = Path(book_runs) / f"{name}.ipynb", {"store": common["store"]}
        else:
            path, parameters = folder / f"{name}.ipynb", {**common, "figures": str((folder / "figures").resolve())}
        execute_notebook(name, path, parameters, scratch=store.checkpoint_path("notebooks"),
                         title=TITLES.get(name, "").format(preset=preset.name) or None, kernel=kernel)

    workers = kernel.size if isinstance(kernel, KernelPool) else 1
    with ThreadPoolExecutor(workers, thread_name_prefix="chapter") as threads:
        for done in [threads.submit(chapter, name) for name in chapters]:
            done.result()
