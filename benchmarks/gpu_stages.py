"""The measurements of ``benchmarks/gpu_check.py``, one stage per process: ``python gpu_stages.py STAGE --out DIR``.

A stage writes what it measured to ``DIR/STAGE.json`` after every measurement (one that dies keeps what it had),
under a faulthandler watchdog that dumps every thread's stack and exits shortly before the driver's timeout.
The package's modules are imported by the stages that use them, so that a dependency missing on a bare GPU
machine fails those stages with its error while the env stage still describes the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import importlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import git_commit, seconds_of  # noqa: E402  (benchmarks/ is on sys.path: this file runs as a script)
from gpu_check import FAILURE_MODES  # noqa: E402
from datadiet_nb import backends  # noqa: E402  (the repo root must be on sys.path first)
from datadiet_nb.data import CIFAR10_MEAN, CIFAR10_STD, Dataset  # noqa: E402
from datadiet_nb.provenance import resolve_device  # noqa: E402
from make_gpu_subset import DEFAULT_SUBSET, load_subset  # noqa: E402

if TYPE_CHECKING:
    from datadiet_nb.presets import Preset
    from datadiet_nb.train import Recipe

WATCHDOG_MARGIN_S = 5  # the watchdog fires this long before the driver's limit, so the stacks reach the log
HANG_S = 24 * 3600  # what --inject hang sleeps: longer than any limit
OPTIONAL_MODULES = ("tqdm", "scipy", "PIL", "torchvision", "triton", "pandas", "sklearn")
PACKAGE_MODULES = ("datadiet_nb.train", "datadiet_nb.grad_norms", "datadiet_nb.scores", "datadiet_nb.experiment",
                   "datadiet_nb.estimate", "datadiet_nb.sweep")
FAST_CIFAR10, FAST_CIFAR100 = "cifar10-resnet18-fast", "cifar100-resnet50-fast"
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
FULL_TRAIN, FULL_TEST = 50_000, 10_000  # CIFAR's sizes: what the study projection counts steps and examples of
IMAGE_SHAPE = (3, 32, 32)
ACCURACY_OVERHEAD_S = 60  # an accuracy run beyond its timed steps: compiling, evaluating


@dataclass(frozen=True)
class Sizes:
    """How big each measurement is: the real sizes on a GPU, tiny ones for the CPU smoke run."""

    preset_overrides: tuple[str, ...]  # ``--set`` edits of the fast presets (none: the real widths and batches)
    warmup_steps: int  # untimed optimiser steps before the timed ones (torch.compile compiles there)
    timed_steps: int
    compile_resnet50: bool
    grand_width: int
    grand_batch: int
    vmap_batch: int
    repeats: int  # timed calls of each GraNd method (their median counts)
    repeat_epochs: int  # the determinism stage's training run
    accuracy_epochs: int | None  # the accuracy run (None: the preset's)


GPU = Sizes(preset_overrides=(), warmup_steps=3, timed_steps=20, compile_resnet50=True, grand_width=64,
            grand_batch=256, vmap_batch=16, repeats=5, repeat_epochs=2, accuracy_epochs=None)
# Even batch sizes only: inductor's CPU code for an odd batch of ResNet-18 crashes (double free) in torch 2.14.
SMOKE = Sizes(preset_overrides=("model_options.width=4", "recipe.batch_size=8", "recipe.eval_batch_size=16",
                                "scoring.batch_size=16", "scoring.recipe.batch_size=8"),
              warmup_steps=2, timed_steps=4, compile_resnet50=False, grand_width=8, grand_batch=16, vmap_batch=4,
              repeats=2, repeat_epochs=1, accuracy_epochs=1)


@dataclass
class Context:
    """One stage's settings, and what it has measured so far (kept in its JSON file)."""

    stage: str
    smoke: bool
    out: Path
    limit_s: float
    subset: Path
    full_cifar: Path | None
    values: dict = dataclasses.field(default_factory=dict)

    @property
    def sizes(self) -> Sizes:
        return SMOKE if self.smoke else GPU

    @property
    def device(self) -> torch.device:
        return resolve_device("cpu" if self.smoke else "cuda")

    def emit(self, **values) -> None:
        """Record ``values`` and rewrite this stage's JSON file."""
        self.values.update(values)
        (self.out / f"{self.stage}.json").write_text(json.dumps(self.values, indent=1, default=str) + "\n")
        for key, value in values.items():
            print(f"{self.stage}.{key} = {value}", flush=True)


# --- helpers ---------------------------------------------------------------------------------------------

def sized(ctx: Context, name: str, *overrides: str) -> Preset:
    """The preset ``name`` at this run's sizes, with ``overrides``, on the stage's device."""
    from datadiet_nb import presets

    preset = presets.with_overrides(presets.get(name), [*ctx.sizes.preset_overrides, *overrides])
    return dataclasses.replace(preset, device=str(ctx.device))


def random_dataset(num_classes: int, num_train: int, num_test: int) -> Dataset:
    """Random uint8 images of CIFAR's shape, labels cycling through the classes (for timings only)."""
    generator = torch.Generator().manual_seed(0)

    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, *IMAGE_SHAPE), dtype=torch.uint8, generator=generator)

    return Dataset(f"random-{num_classes}", images(num_train), torch.arange(num_train) % num_classes,
                   images(num_test), torch.arange(num_test) % num_classes, tuple(str(c) for c in range(num_classes)),
                   CIFAR10_MEAN, CIFAR10_STD)


def memory_baseline(device: torch.device) -> int | None:
    """Bytes allocated now, with the peak counter restarted here (None on the CPU: no allocator statistics)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_mib(device: torch.device, baseline: int | None) -> float | None:
    """Peak bytes allocated since ``baseline`` was taken, above it, in MiB (None on the CPU)."""
    if baseline is None:
        return None
    return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is unknown."""
    return None if a is None or b is None else a / b


def path_label(path: dict) -> str:
    """A training step's DevicePath in words, e.g. ``compile+autocast+channels_last``."""
    return "+".join(name for name, on in path.items() if on) or "eager float32"


def float_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's floating-point weights and buffers, on the CPU."""
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items() if v.is_floating_point()}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between two sets of equally named tensors."""
    return max((a[k] - b[k]).abs().max().item() for k in a)


def results_of(out: Path, stage: str) -> dict:
    """What an earlier stage of this check wrote (empty when it did not run)."""
    path = out / f"{stage}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# --- stages ----------------------------------------------------------------------------------------------

def stage_env(ctx: Context) -> None:
    """Versions, the GPU, the backend settings in force, a C compiler for Triton, missing modules, package imports."""
    ctx.emit(python=platform.python_version(), torch=torch.__version__, numpy=np.__version__,
             cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(), commit=git_commit())
    if torch.cuda.is_available():
        device = resolve_device("cuda")  # applies the package's determinism settings, as every CUDA run does
        props = torch.cuda.get_device_properties(device)
        ctx.emit(gpu=props.name, capability=f"{props.major}.{props.minor}",
                 gpu_memory_gib=props.total_memory / 2**30, cudnn=torch.backends.cudnn.version())
    ctx.emit(backends=backends.settings(), c_compiler=shutil.which("gcc") or shutil.which("cc") or "MISSING",
             missing_modules=[m for m in OPTIONAL_MODULES if importlib.util.find_spec(m) is None] or "none")
    problems = []
    for name in PACKAGE_MODULES:
        try:
            importlib.import_module(name)
        except Exception as error:  # what a bare machine lacks: report it, the other stages will fail on it
            problems.append(f"{name}: {type(error).__name__}: {error}")
    ctx.emit(package_imports=problems or "ok")


def plain_backward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """The reference cost: one batched forward + backward of the mean loss."""
    F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)


def method_cost(fn: Callable[[], object], examples: int, repeats: int, device: torch.device) -> dict:
    """Examples per second (median of ``repeats`` timed calls after one warm-up) and peak MiB of ``fn``."""
    fn()
    baseline = memory_baseline(device)
    seconds = statistics.median(seconds_of(fn, str(device)) for _ in range(repeats))
    return {"examples_per_s": examples / seconds, "peak_mib": peak_mib(device, baseline)}


def stage_grand(ctx: Context) -> None:
    """GraNd by hooks vs a plain forward+backward vs vmap, and the hooks' error against vmap, in strict float32."""
    from datadiet_nb import models
    from datadiet_nb.grad_norms import hook_grad_norms, vmap_grad_norms

    s, device = ctx.sizes, ctx.device
    torch.manual_seed(0)
    model = models.build("resnet18", num_classes=10, width=s.grand_width).to(device).eval()
    x = torch.randn(s.grand_batch, *IMAGE_SHAPE, device=device)
    y = torch.randint(0, 10, (s.grand_batch,), device=device)
    xs, ys = x[:s.vmap_batch], y[:s.vmap_batch]
    ctx.emit(width=s.grand_width, batch=s.grand_batch, vmap_batch=s.vmap_batch)
    with backends.strict_fp32():  # how scores are taken
        plain = method_cost(lambda: plain_backward(model, x, y), len(x), s.repeats, device)
        ctx.emit(**{f"plain_{k}": v for k, v in plain.items()})
        hooks = method_cost(lambda: hook_grad_norms(model, x, y), len(x), s.repeats, device)
        ctx.emit(**{f"hooks_{k}": v for k, v in hooks.items()},
                 hooks_vs_plain_throughput=hooks["examples_per_s"] / plain["examples_per_s"],
                 hooks_vs_plain_memory=ratio(hooks["peak_mib"], plain["peak_mib"]))
        vmap = method_cost(lambda: vmap_grad_norms(model, xs, ys), len(xs), s.repeats, device)
        ctx.emit(**{f"vmap_{k}": v for k, v in vmap.items()})
        reference = vmap_grad_norms(model, xs, ys).double()
        ours = hook_grad_norms(model, xs, ys).double()
    ctx.emit(hooks_vs_vmap_max_rel_diff=((ours - reference).abs() / reference.abs()).max().item())


def training_rate(ctx: Context, preset: Preset, dataset: Dataset, recipe: Recipe) -> dict:
    """Images/s of ``train`` itself over the timed steps, after a warm-up call of its own (where compiling happens)."""
    from datadiet_nb.experiment import seeded_model
    from datadiet_nb.train import train

    model = seeded_model(preset, dataset, seed=0)
    warm = train(model, dataset, recipe, seed=0, indices=torch.arange(recipe.batch_size * ctx.sizes.warmup_steps),
                 device=ctx.device)
    baseline = memory_baseline(ctx.device)
    timed = train(model, dataset, recipe, seed=0, device=ctx.device)
    step_s = timed.seconds / timed.steps
    return {"images_per_s": recipe.batch_size / step_s, "ms_per_step": 1e3 * step_s,
            "warmup_extra_s": warm.seconds - warm.steps * step_s, "peak_mib": peak_mib(ctx.device, baseline),
            "path": path_label(timed.path)}


def training_rates(ctx: Context, name: str, compile_too: bool) -> None:
    """The fast recipe's training rate eager and compiled, on random images of the preset's shapes."""
    preset = sized(ctx, name)
    recipe = dataclasses.replace(preset.recipe, epochs=1, budget="epochs")
    dataset = random_dataset(NUM_CLASSES[preset.dataset], recipe.batch_size * ctx.sizes.timed_steps, recipe.batch_size)
    ctx.emit(model=preset.model, width=preset.model_options.get("width", 64), classes=dataset.num_classes,
             batch=recipe.batch_size, timed_steps=ctx.sizes.timed_steps)
    eager = training_rate(ctx, preset, dataset, dataclasses.replace(recipe, compile=False))
    ctx.emit(**{f"eager_{k}": v for k, v in eager.items()})
    if not compile_too:
        ctx.emit(compiled="not measured in the smoke run (one compiled model there: ResNet-18's)")
        return
    compiled = training_rate(ctx, preset, dataset, dataclasses.replace(recipe, compile=True))
    extra = compiled.pop("warmup_extra_s")
    ctx.emit(**{f"compiled_{k}": v for k, v in compiled.items()}, compile_s=extra,
             compiled_vs_eager=compiled["images_per_s"] / eager["images_per_s"])


def stage_train_resnet18(ctx: Context) -> None:
    """ResNet-18 on CIFAR-10 shapes; in the smoke run the CPU takes the GPU path, compiling included."""
    if ctx.smoke:
        os.environ[backends.GPU_PATH_ENV] = "1"
    training_rates(ctx, FAST_CIFAR10, compile_too=True)


def stage_train_resnet50(ctx: Context) -> None:
    """ResNet-50 on CIFAR-100 shapes (100 classes)."""
    training_rates(ctx, FAST_CIFAR100, compile_too=ctx.sizes.compile_resnet50)


def trained(ctx: Context, preset: Preset, dataset: Dataset) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict]:
    """Final weights, test predictions and step path of one training run of the preset's recipe, seed 0."""
    from datadiet_nb.experiment import seeded_model
    from datadiet_nb.train import predict, train

    model = seeded_model(preset, dataset, seed=0)
    result = train(model, dataset, preset.recipe, seed=0, device=ctx.device)
    return float_weights(model), predict(model, dataset.test_images, dataset, device=ctx.device), result.path


def stage_determinism(ctx: Context) -> None:
    """A scoring run and a training run on the carried subset, each twice with the same seed: equal results?"""
    from datadiet_nb.experiment import compute_scoring_run
    from datadiet_nb.scores import SCORES
    from datadiet_nb.store import Store

    if not ctx.subset.is_file():
        raise FileNotFoundError(f"{ctx.subset} is missing: make it with benchmarks/make_gpu_subset.py and carry it")
    dataset = load_subset(ctx.subset)
    preset = sized(ctx, FAST_CIFAR10, f"recipe.epochs={ctx.sizes.repeat_epochs}", "scoring.epoch=1",
                   "scoring.num_runs=1")
    ctx.emit(data=f"{ctx.subset.name}: {dataset.num_train} train / {len(dataset.test_labels)} test",
             scoring=f"epoch {preset.scoring.epoch}, batch {preset.scoring.recipe.batch_size}",
             training=f"epochs {preset.recipe.epochs}, batch {preset.recipe.batch_size}")
    with tempfile.TemporaryDirectory() as scratch:
        runs = [compute_scoring_run(preset, dataset, Store(Path(scratch) / f"store{i}"), preset.scoring.seeds[0])
                for i in range(2)]
    for name in SCORES:
        a, b = runs[0][name], runs[1][name]
        ctx.emit(**{f"{name}_equal": bool(np.array_equal(a, b)), f"{name}_max_abs_diff": float(np.abs(a - b).max())})
    (weights_a, predictions_a, path), (weights_b, predictions_b, _) = (trained(ctx, preset, dataset) for _ in range(2))
    ctx.emit(training_path=path_label(path),
             weights_equal=all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a),
             weights_max_abs_diff=max_abs_diff(weights_a, weights_b),
             predictions_equal=bool(torch.equal(predictions_a, predictions_b)),
             predictions_differing=int((predictions_a != predictions_b).sum()))


def stage_projection(ctx: Context) -> None:
    """Hours of each whole fast study on this device, as ``datadiet-nb sweep --dry-run`` projects them."""
    from datadiet_nb import estimate, sweep

    for name in (FAST_CIFAR10, FAST_CIFAR100):
        preset = sized(ctx, name)
        dataset = random_dataset(NUM_CLASSES[preset.dataset], FULL_TRAIN, FULL_TEST)
        costs = estimate.measure(preset, dataset)
        hours: dict[str, float] = {}
        jobs = sweep.jobs(preset, dataset)
        for job in jobs:
            hours[job.kind] = hours.get(job.kind, 0.0) + estimate.job_seconds(preset, dataset, job, costs) / 3600
        ctx.emit(**{f"{name}.hours": sum(hours.values()), f"{name}.scoring_runs_hours": hours.get("scoring-run", 0.0),
                    f"{name}.training_runs_hours": hours.get("run", 0.0), f"{name}.jobs": len(jobs),
                    f"{name}.train_step_ms": 1e3 * costs.train_step,
                    f"{name}.scoring_step_ms": 1e3 * costs.scoring_step,
                    f"{name}.score_example_ms": 1e3 * costs.score_example,
                    f"{name}.compile_per_run_s": costs.compile_run})


def stage_accuracy(ctx: Context) -> None:
    """Test accuracy of one dense run of cifar10-resnet18-fast's recipe on the full CIFAR-10 zip, if time allows."""
    from datadiet_nb import data
    from datadiet_nb.experiment import seeded_model
    from datadiet_nb.train import predict, total_steps, train

    started = time.perf_counter()
    dataset = data.load(f"{data.IMAGEFOLDER_PREFIX}{ctx.full_cifar}")
    epochs = ctx.sizes.accuracy_epochs
    preset = sized(ctx, FAST_CIFAR10, *([f"recipe.epochs={epochs}"] if epochs else []))
    steps = total_steps(preset.recipe, dataset.num_train, dataset.num_train)
    rates = results_of(ctx.out, "train-resnet18")
    step_ms = rates.get("compiled_ms_per_step", rates.get("eager_ms_per_step"))
    needed = None if step_ms is None else steps * step_ms / 1e3 + ACCURACY_OVERHEAD_S
    left = ctx.limit_s - WATCHDOG_MARGIN_S - (time.perf_counter() - started)
    ctx.emit(data=f"{dataset.num_train} train / {len(dataset.test_labels)} test", epochs=preset.recipe.epochs,
             steps=steps, estimated_s=needed)
    if needed is not None and needed > left:
        ctx.emit(skipped=f"needs about {needed:.0f} s, {left:.0f} s left (raise --budget)")
        return
    model = seeded_model(preset, dataset, seed=0)
    result = train(model, dataset, preset.recipe, seed=0, device=ctx.device)
    predictions = predict(model, dataset.test_images, dataset, device=ctx.device)
    ctx.emit(train_s=result.seconds, final_loss=result.epoch_losses[-1],
             test_accuracy=(predictions == dataset.test_labels).float().mean().item())


STAGES: dict[str, Callable[[Context], None]] = {
    "env": stage_env, "grand": stage_grand, "train-resnet18": stage_train_resnet18,
    "train-resnet50": stage_train_resnet50, "determinism": stage_determinism, "projection": stage_projection,
    "accuracy": stage_accuracy,
}


def inject(mode: str) -> None:
    """Fail on purpose, as a broken stage would (tests of the driver): raise, crash with SIGSEGV, or hang."""
    if mode == "raise":
        raise RuntimeError("failure injected with --fail-stage")
    if mode == "crash":
        faulthandler._sigsegv()
    time.sleep(HANG_S)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=float, required=True, help="seconds the driver allows this stage")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--subset", type=Path, default=DEFAULT_SUBSET)
    parser.add_argument("--full-cifar", type=Path)
    parser.add_argument("--inject", choices=FAILURE_MODES)
    args = parser.parse_args()
    faulthandler.dump_traceback_later(max(1.0, args.limit - WATCHDOG_MARGIN_S), exit=True)
    ctx = Context(args.stage, args.smoke, args.out, args.limit, args.subset, args.full_cifar)
    if args.inject:
        inject(args.inject)
    STAGES[args.stage](ctx)


if __name__ == "__main__":
    main()
