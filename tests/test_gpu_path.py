"""The GPU path of the fast presets, run on the CPU: torch.compile (inductor), bf16 autocast, channels_last,
augmentation from a pass's draws copied once, batches with a dropped last partial batch, checkpoints under
compile, GraNd under every model state it hands over, strict float32 evaluation, and the paper presets
end to end through the command line.

``DATADIET_GPU_PATH_ON_CPU=1`` makes the CPU take the path CUDA takes; only the CUDA kernels differ.
Batch sizes are even: this torch's CPU inductor aborts on a compiled backward at an odd batch size
(a ``double free`` in the stride-2 shortcut's convolution backward, seen at 5 and 7; fine at 4-16 even),
and training never meets another size, since the last partial batch is dropped.
"""

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from datadiet_nb import backends, cli, data, models, presets
from datadiet_nb.grad_norms import per_example_grad_norms, vmap_grad_norms
from datadiet_nb.scores import el2n_scores, grand_scores
from datadiet_nb.train import Recipe, TrainingState, predict, train

from helpers import records_in
from test_fast_presets import random_dataset

BATCH = 8
NUM_TRAIN = 3 * BATCH + 6  # three whole batches and a partial one, which is dropped
WIDTH = 4
RTOL = 1e-4


@pytest.fixture
def gpu_path(monkeypatch):
    monkeypatch.setenv(backends.GPU_PATH_ENV, "1")


def fast_recipe(**changes) -> Recipe:
    """The fast presets' recipe (one-cycle, compile, decay on everything), shrunk to a CPU batch and 2 epochs."""
    recipe = presets.get("cifar10-resnet18-fast").recipe
    assert recipe.compile and recipe.schedule == "onecycle"
    return dataclasses.replace(recipe, **{"epochs": 2, "batch_size": BATCH, **changes})


def tiny_resnet(seed: int = 0, name: str = "resnet18", num_classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return models.build(name, num_classes=num_classes, width=WIDTH)


class Watch(TorchFunctionMode):
    """Counts, during training, what would stall a GPU: host reads (item, cpu, tolist, numpy) and copies of
    tensors to a device (``.to`` with a device, ``.cuda``), and notes autocast and channels_last at each conv."""

    HOST_READS = {"item", "cpu", "tolist", "numpy"}

    def __init__(self):
        super().__init__()
        self.host_reads, self.copies, self.convs = 0, 0, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in self.HOST_READS:
            self.host_reads += 1
        if name == "cuda" or (name == "to" and (any(isinstance(a, (torch.device, str)) for a in args[1:])
                                                or "device" in kwargs)):
            self.copies += 1
        if func is torch.conv2d:
            self.convs.append((torch.is_autocast_enabled("cpu"), args[0].is_contiguous(memory_format=torch.channels_last)))
        return func(*args, **kwargs)


def test_the_gpu_path_trains_compiled_on_channels_last_dropping_the_partial_batch(gpu_path):
    dataset = random_dataset(10, NUM_TRAIN)
    model = tiny_resnet()
    result = train(model, dataset, fast_recipe(epochs=3), seed=0, device="cpu")
    assert result.path == {"compile": True, "autocast": True, "channels_last": True}
    assert result.steps == 3 * 3 and all(np.isfinite(result.epoch_losses))  # the partial batch dropped each pass
    assert model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_the_gpu_path_steps_in_bf16_on_channels_last_without_a_host_sync_per_step(gpu_path):
    """Eager here, as a TorchFunctionMode would be traced into a compiled graph; the loop around it is the same.
    Counted for 1 and 3 passes: what two more passes (6 steps) add must be one loss read and one copy each."""
    watches = {}
    for epochs in (1, 3):
        watches[epochs] = watch = Watch()
        with watch:
            train(tiny_resnet(), random_dataset(10, NUM_TRAIN), fast_recipe(epochs=epochs, compile=False), seed=0,
                  device="cpu")
    convs = watches[3].convs
    assert convs and all(autocast and channels_last for autocast, channels_last in convs)
    assert watches[3].host_reads - watches[1].host_reads == 2
    assert watches[3].copies - watches[1].copies == 2  # the old loop copied 4 tensors a step: 24


def test_the_cpu_path_is_plain_eager_float32():
    dataset = random_dataset(10, NUM_TRAIN)
    watch = Watch()
    with watch:
        result = train(tiny_resnet(), dataset, fast_recipe(epochs=1), seed=0, device="cpu")
    assert result.path == {"compile": False, "autocast": False, "channels_last": False}
    assert watch.convs and not any(autocast or channels_last for autocast, channels_last in watch.convs)


class Interrupted(Exception):
    pass


def test_a_compiled_run_resumes_from_its_checkpoint_bit_for_bit_and_its_weights_load_uncompiled(gpu_path, tmp_path,
                                                                                                monkeypatch):
    dataset = random_dataset(10, NUM_TRAIN)
    recipe = fast_recipe(epochs=3)
    reference = tiny_resnet()
    train(reference, dataset, recipe, seed=1, device="cpu")

    checkpoint = tmp_path / "run.pt"
    real_save = TrainingState.save

    def save_then_die(self, path, step, result):
        real_save(self, path, step, result)
        raise Interrupted

    monkeypatch.setattr(TrainingState, "save", save_then_die)
    with pytest.raises(Interrupted):
        train(tiny_resnet(), dataset, recipe, seed=1, device="cpu", checkpoint=checkpoint, checkpoint_every=1)
    monkeypatch.setattr(TrainingState, "save", real_save)

    saved = torch.load(checkpoint, weights_only=True)
    assert not any(name.startswith("_orig_mod.") for name in saved["model"])  # the module's own names
    plain = tiny_resnet(seed=5)
    plain.load_state_dict(saved["model"])  # strict: an uncompiled model takes the compiled run's weights
    compiled = torch.compile(tiny_resnet(seed=6))
    compiled.load_state_dict({f"_orig_mod.{k}": v for k, v in plain.state_dict().items()})  # and back
    assert all(torch.equal(a, b) for a, b in zip(compiled.parameters(), plain.parameters()))

    resumed = tiny_resnet()
    result = train(resumed, dataset, recipe, seed=1, device="cpu", checkpoint=checkpoint, checkpoint_every=1)
    assert result.resumes == [3] and result.steps == 9
    for a, b in zip(resumed.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)


# --- the checkpoint load: checked whole, then restored whole, on the CPU ---------------------------------

def _state(model: nn.Module, run: dict) -> TrainingState:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return TrainingState(model, optimizer, scheduler, torch.Generator().manual_seed(0), run=run)


def _mid_run_checkpoint(tmp_path) -> Path:
    """A real checkpoint, saved after the first of two passes (a finished run leaves its last one behind)."""
    path = tmp_path / "run.pt"
    train(tiny_resnet(), random_dataset(10, NUM_TRAIN), fast_recipe(epochs=2, compile=False), seed=0, device="cpu",
          checkpoint=path, checkpoint_every=1)
    return path


def _untouched(model: nn.Module, before: dict) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_checkpoint_that_fails_after_the_weights_would_load_leaves_the_run_untouched(tmp_path):
    """The old load restored weights, momentum and schedule, then failed on the generator and 'started afresh'
    from step k with its counter at 0. A checkpoint broken in its last part must change nothing."""
    path = _mid_run_checkpoint(tmp_path)
    saved = torch.load(path, weights_only=True)
    saved["generator"] = saved["generator"].float()  # the kind of state Generator.set_state refuses
    torch.save(saved, path)
    model = tiny_resnet(seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = _state(model, saved["run"])
    step, result = state.load(path)
    assert (step, result.resumes, result.epoch_losses) == (0, [], [])
    assert _untouched(model, before) and state.optimizer.state_dict()["state"] == {}
    assert path.with_name("run.pt.unusable").is_file() and not path.exists()


def test_a_failure_while_restoring_puts_every_part_back(tmp_path, monkeypatch):
    path = _mid_run_checkpoint(tmp_path)
    model = tiny_resnet(seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = _state(model, torch.load(path, weights_only=True)["run"])
    generator_before, rng_before = state.generator.get_state(), torch.get_rng_state()
    real_set_rng_state, calls = torch.set_rng_state, []

    def refuse_once(value):  # the last part restored fails; putting the old state back succeeds
        calls.append(value)
        if len(calls) == 1:
            raise RuntimeError("refused")
        real_set_rng_state(value)

    monkeypatch.setattr(torch, "set_rng_state", refuse_once)
    step, _ = state.load(path)
    assert step == 0 and len(calls) == 2
    assert _untouched(model, before) and state.optimizer.state_dict()["state"] == {}
    assert torch.equal(state.generator.get_state(), generator_before) and torch.equal(torch.get_rng_state(), rng_before)


def test_a_checkpoint_is_read_onto_the_cpu_whatever_the_training_device(tmp_path, monkeypatch):
    """The old load mapped the RNG states to the training device, where set_state refuses them (on CUDA)."""
    path = _mid_run_checkpoint(tmp_path)
    real_load, locations = torch.load, []

    def spy_load(*args, **kwargs):
        locations.append(kwargs.get("map_location"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy_load)
    result = train(tiny_resnet(), random_dataset(10, NUM_TRAIN), fast_recipe(epochs=2, compile=False), seed=0,
                   device="cpu", checkpoint=path, checkpoint_every=1)
    assert locations == ["cpu"] and result.resumes == [3]


# --- GraNd under the model states training hands over ------------------------------------------------------

def _batch(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _trained(gpu: bool, monkeypatch) -> nn.Module:
    if gpu:
        monkeypatch.setenv(backends.GPU_PATH_ENV, "1")
    model = tiny_resnet()
    train(model, random_dataset(10, NUM_TRAIN), fast_recipe(epochs=1), seed=0, device="cpu")
    monkeypatch.delenv(backends.GPU_PATH_ENV, raising=False)
    return model.eval()


@pytest.mark.parametrize("state", ["bf16-trained channels_last", "compiled", "channels_last input"])
def test_grand_is_exact_under_each_model_state_training_hands_over(state, monkeypatch):
    model = _trained(gpu=True, monkeypatch=monkeypatch)
    assert model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    x, y = _batch()
    reference = vmap_grad_norms(model, x, y)
    if state == "compiled":
        handed = torch.compile(model)
    else:
        handed = model
    if state == "channels_last input":
        x = x.contiguous(memory_format=torch.channels_last)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact by the hook rules: no fallback warning
        norms = per_example_grad_norms(handed, x, y)
    torch.testing.assert_close(norms, reference, rtol=RTOL, atol=0)


def test_grand_is_exact_with_sync_batchnorm_not_a_silent_vmap_fallback():
    torch.manual_seed(0)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(tiny_resnet()).eval()
    for module in model.modules():
        if isinstance(module, nn.SyncBatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    x, y = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        norms = per_example_grad_norms(model, x, y)
    torch.testing.assert_close(norms, vmap_grad_norms(model, x, y), rtol=RTOL, atol=0)


# --- evaluation and scoring: outside autocast, strict float32 --------------------------------------------

class PrecisionSpy(nn.Module):
    """A model that notes, at every forward, the conv fp32 precision in force and whether autocast is on."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)
        self.seen = []

    def forward(self, x):
        self.seen.append((torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision,
                          torch.is_autocast_enabled("cpu")))
        return self.fc(x.flatten(1))


def test_evaluation_and_scoring_run_in_strict_float32_outside_autocast():
    """This torch defaults cuDNN convolutions to TF32; predictions and scores must not use it."""
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"  # the default this guards against
    dataset = random_dataset(10, 8)
    x, y = _batch(8)
    for call in (lambda m: predict(m, dataset.test_images, dataset, batch_size=4),
                 lambda m: el2n_scores(m, x, y, batch_size=4), lambda m: grand_scores(m, x, y, batch_size=4)):
        spy = PrecisionSpy()
        call(spy)
        assert spy.seen and set(spy.seen) == {("ieee", "ieee", False)}
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"  # restored after


def test_scoring_runs_score_outside_the_training_steps_autocast(gpu_path, tmp_path):
    from datadiet_nb.experiment import compute_scores
    from datadiet_nb.store import Store

    preset = _tiny_preset("cifar10-resnet18-fast")
    spy_calls = []
    real = grand_scores.__globals__["per_example_grad_norms"]

    def spy(model, x, y):
        spy_calls.append((torch.is_autocast_enabled("cpu"), torch.backends.cudnn.conv.fp32_precision))
        return real(model, x, y)

    grand_scores.__globals__["per_example_grad_norms"] = spy
    try:
        dataset = random_dataset(10, NUM_TRAIN)
        scores = compute_scores(preset, dataset, Store(tmp_path))
    finally:
        grand_scores.__globals__["per_example_grad_norms"] = real
    assert spy_calls and set(spy_calls) == {(False, "ieee")}
    assert scores["grand_runs"].shape == (2, NUM_TRAIN) and np.isfinite(scores["grand"]).all()


def test_cuda_work_gets_the_determinism_settings_and_provenance_records_them(monkeypatch):
    from datadiet_nb.provenance import provenance

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    backends.configure_determinism()
    recorded = provenance("cpu")["backends"]
    assert recorded["cudnn_deterministic"] and not recorded["cudnn_benchmark"]
    assert recorded["cublas_workspace_config"] == backends.CUBLAS_WORKSPACE


# --- the paper presets end to end through the command line ------------------------------------------------

def _sizes(name: str) -> list[str]:
    """Only sizes shrunk: a few hundred images, width 4, 2 epochs, K = 2, one seed, two sparsities."""
    return ["--set", "train_per_class=3" if name.startswith("cifar100") else "train_per_class=30",
            "--set", f"model_options.width={WIDTH}", "--set", "recipe.epochs=2", "--set", f"recipe.batch_size={BATCH}",
            "--set", "scoring.num_runs=2", "--set", "scoring.epoch=1", "--set", "scoring.recipe.epochs=2",
            "--set", f"scoring.recipe.batch_size={4 * BATCH}", "--set", "scoring.batch_size=64",
            "--set", "seeds=0", "--set", "sparsities=0,0.5"]


def _tiny_preset(name: str) -> presets.Preset:
    args = _sizes(name)
    return presets.with_overrides(presets.get(name), [a for a in args if a != "--set"])


@pytest.mark.parametrize("name, on_gpu_path", [("cifar10-resnet18-fast", True), ("cifar100-resnet50-fast", False)])
def test_a_fast_paper_preset_runs_end_to_end_through_the_cli(name, on_gpu_path, tmp_path, monkeypatch, capsys):
    """ResNet-18's study on the GPU path, compiled; ResNet-50's on the CPU path (its compilation on this CPU costs
    a minute of the test suite, and the compiled path is the same code as ResNet-18's)."""
    if on_gpu_path:
        monkeypatch.setenv(backends.GPU_PATH_ENV, "1")
    preset = presets.get(name)
    num_classes = {"cifar10": 10, "cifar100": 100}[preset.dataset]
    per_class = 30 if num_classes == 10 else 3
    # The preset's own dataset name and loader slot, filled with random CIFAR-shaped images (no CIFAR files here).
    fake = random_dataset(num_classes, 0)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(num_classes).repeat_interleave(per_class + 2)
    images = torch.randint(0, 256, (len(labels), 3, 32, 32), dtype=torch.uint8, generator=g)
    test_labels = torch.arange(num_classes).repeat(2)
    test_images = torch.randint(0, 256, (len(test_labels), 3, 32, 32), dtype=torch.uint8, generator=g)
    cifar = dataclasses.replace(fake, name=preset.dataset, train_images=images, train_labels=labels,
                                test_images=test_images, test_labels=test_labels)
    monkeypatch.setitem(data.DATASETS, preset.dataset, lambda download: cifar)
    code = cli.main(["sweep", "--preset", name, "--store", str(tmp_path / "runs"), "--executor", "inline", "--quiet",
                     *_sizes(name)])
    out = capsys.readouterr().out
    assert code == 0
    assert f"{name}: 4 runs" in out and "class keep ratio" in out  # dense + EL2N, GraNd, random at s = 0.5
    records = records_in(tmp_path / "runs")
    assert sorted((r["score"], r["sparsity"]) for r in records) == [("dense", 0.0), ("el2n", 0.5), ("grand", 0.5),
                                                                     ("random", 0.5)]
    path = {"compile": on_gpu_path, "autocast": on_gpu_path, "channels_last": on_gpu_path}
    assert all(r["train"]["path"] == path for r in records)
    assert all(r["model"] == preset.model and r["recipe"]["schedule"] == "onecycle" for r in records)


# --- what a GPU worker needs, and how a sweep is priced and packed -------------------------------------------

BARE_WORKER = """
import torch
from datadiet_nb import backends, distributed, estimate, experiment, grad_norms, presets, scores, sweep, train
from datadiet_nb.executors import ray
from test_fast_presets import random_dataset
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
result = train.train(model, random_dataset(10, 16), train.Recipe(epochs=1, batch_size=8), seed=0)
print('trained', result.steps)
"""
NOT_ON_A_GPU_WORKER = ("tqdm", "scipy", "tomllib", "tomli", "pandas", "matplotlib", "seaborn", "sklearn", "PIL")


def test_a_bare_torch_machine_imports_the_package_and_trains(tmp_path):
    """A GPU worker may have torch and numpy only: tqdm, scipy and tomllib are imported where they are used."""
    import subprocess
    import sys

    for name in NOT_ON_A_GPU_WORKER:  # found first on the path, and failing to import as a missing module does
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ModuleNotFoundError('No module named {name}')\n")
    tests = Path(__file__).parent
    env = {"PYTHONPATH": f"{tmp_path}:{tests.parent}:{tests}", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", BARE_WORKER], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trained 2" in done.stdout


def test_a_toml_preset_without_tomllib_is_refused_in_one_line(tmp_path, monkeypatch):
    import builtins

    from datadiet_nb.errors import UserError

    real_import = builtins.__import__

    def no_toml(name, *args, **kwargs):
        if name in ("tomllib", "tomli"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    path = tmp_path / "mine.toml"
    path.write_text('base = "digits"\n')
    monkeypatch.setattr(builtins, "__import__", no_toml)
    with pytest.raises(UserError, match="needs Python >= 3.11 or `pip install tomli`"):
        presets.load_file(path)


def test_the_estimate_prices_scoring_steps_at_the_scoring_recipe_and_each_runs_compilation():
    from datadiet_nb.estimate import Costs, job_seconds
    from datadiet_nb.sweep import jobs

    preset = presets.get("cifar10-resnet18-fast")
    dataset = random_dataset(10, 50_000)
    costs = Costs("gpu", train_step=0.01, score_example=1e-5, eval_example=1e-6, scoring_step=0.02,
                  compile_run=30.0, compile_scoring=0.0)
    by_kind = {}
    for job in jobs(preset, dataset):
        by_kind.setdefault(job.kind, job)
    scoring = job_seconds(preset, dataset, by_kind["scoring-run"], costs)
    steps = 20 * (50_000 // 128)  # the paper's scoring: epoch 20 of batch 128
    assert scoring == pytest.approx(steps * 0.02 + 50_000 * 1e-5)
    run = next(j for j in jobs(preset, dataset) if j.kind == "run" and j.spec.sparsity == 0)
    assert job_seconds(preset, dataset, run, costs) == pytest.approx(30.0 + 40 * (50_000 // 512) * 0.01 + len(dataset.test_labels) * 1e-6)


def test_measure_times_a_compiling_recipe_its_compilation_apart(gpu_path):
    from datadiet_nb.estimate import measure

    preset = _tiny_preset("cifar10-resnet18-fast")
    preset = dataclasses.replace(preset, recipe=dataclasses.replace(preset.recipe, batch_size=BATCH))
    costs = measure(preset, random_dataset(10, 4 * BATCH))
    assert costs.compile_run > 0 and costs.compile_scoring == 0  # the paper's scoring recipe runs eagerly
    assert costs.train_step > 0 and costs.scoring_step > 0 and costs.scoring_step != costs.train_step


@pytest.mark.parametrize("available, gpus, cpus, expected", [
    ({"GPU": 1, "CPU": 16}, 0.25, 1, 4),   # four to a GPU
    ({"GPU": 8, "CPU": 16}, 0.25, 1, 16),  # the CPUs bind before the GPUs
    ({"GPU": 2, "CPU": 16}, 1, 2, 2),
    ({"GPU": 0, "CPU": 6}, 0, 1.5, 4),
    ({"GPU": 1, "CPU": 16}, 1 / 3, 1, 3),  # a third each: three, not two for the rounding
])
def test_ray_packs_jobs_by_their_gpu_and_cpu_shares(available, gpus, cpus, expected):
    from datadiet_nb.executors.ray import jobs_at_once

    assert jobs_at_once(available, gpus, cpus) == expected


def test_a_ray_job_granted_no_gpu_runs_on_the_cpu():
    from datadiet_nb.errors import UserError
    from datadiet_nb.executors.ray import RayOptions, gpus_per_job, job_preset

    preset = presets.get("cifar10-resnet18-fast")
    assert gpus_per_job({"GPU": 0, "CPU": 4}, preset, RayOptions()) == 0
    assert job_preset(preset, 0).device == "cpu" and job_preset(preset, 0.5).device == "auto"
    assert gpus_per_job({"GPU": 2, "CPU": 4}, preset, RayOptions()) == 1
    with pytest.raises(UserError, match="--gpus-per-job 2 but the Ray cluster has 1 GPUs"):
        gpus_per_job({"GPU": 1, "CPU": 4}, preset, RayOptions(gpus_per_job=2))
