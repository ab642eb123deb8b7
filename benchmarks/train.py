"""Training throughput of datadiet_nb.train against the common way of training on CIFAR, side by side.

    python benchmarks/train.py [--width 16] [--batch-size 128] [--steps 10] [--repeats 5] [--workers 2]

Both train the same CIFAR ResNet-18 (``datadiet_nb.models``) with the same batch size and SGD (Nesterov,
weight decay), in train mode, over the same images, for --steps optimiser steps per repeat:

- baseline, "the common way": a PIL image per example through torchvision's RandomCrop(32, padding=4,
  reflect) + RandomHorizontalFlip + ToTensor + Normalize, batched by a DataLoader with --workers worker
  processes (persistent), fp32, NCHW;
- ours: one call of ``datadiet_nb.train.train`` (the data on the device as uint8, normalised and augmented
  there a batch at a time; bf16 autocast and channels_last on CUDA), timed as a whole, setup included.

Images are the first steps x batch-size training images of CIFAR-10 from ../shared/data/cifar10.zip
when it exists, else random uint8 images of the same shape. After one warm-up pass each, the two
alternate for --repeats passes; images/s is steps x batch-size over the median pass. Prints a table
and writes train.json next to this file.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
from typing import Callable

import torch
import torch.nn.functional as F
from common import REPO, describe_machine, pick_device, seconds_of, write_json
from PIL import Image
from torchvision import transforms

from datadiet_nb import data, models
from datadiet_nb.presets import SHARED_CIFAR10_ZIP
from datadiet_nb.train import Recipe, train

CIFAR10_ZIP = REPO / SHARED_CIFAR10_ZIP
NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)
WARMUP_STEPS = 2
DEFAULTS = {  # per device type: ResNet-18 width, batch size, steps per timed pass
    "cpu": {"width": 16, "batch_size": 128, "steps": 10},
    "cuda": {"width": 64, "batch_size": 512, "steps": 50},
}


def load_images(count: int, random: bool) -> tuple[data.Dataset, str]:
    """A dataset whose training set is ``count`` images: CIFAR-10's first ones if the zip is there, else random."""
    if CIFAR10_ZIP.is_file() and not random:
        full = data.load(f"{data.IMAGEFOLDER_PREFIX}{CIFAR10_ZIP}")
        source = f"CIFAR-10 ({CIFAR10_ZIP.name}), first {count} training images"
    else:
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (count, *IMAGE_SHAPE), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, NUM_CLASSES, (count,), generator=g)
        full = data.Dataset("random", images, labels, images[:1], labels[:1], tuple(map(str, range(NUM_CLASSES))),
                            data.CIFAR10_MEAN, data.CIFAR10_STD)
        source = "random uint8 images" + ("" if random else f" ({CIFAR10_ZIP} not found)")
    subset = dataclasses.replace(full, train_images=full.train_images[:count], train_labels=full.train_labels[:count])
    return subset, source


class PerImageDataset(torch.utils.data.Dataset):
    """Examples the way torchvision's CIFAR10 serves them: an HWC uint8 array to a PIL image, then transforms."""

    def __init__(self, dataset: data.Dataset):
        self.images = dataset.train_images.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = dataset.train_labels.numpy()
        self.transform = transforms.Compose([
            transforms.RandomCrop(IMAGE_SHAPE[1], padding=data.CROP_PADDING, padding_mode="reflect"),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(dataset.mean, dataset.std),
        ])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def baseline_pass(model: torch.nn.Module, loader: torch.utils.data.DataLoader, recipe: Recipe, device: str,
                  steps: int) -> None:
    """``steps`` SGD steps the common way: batches from the loader, fp32, NCHW, train mode."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)
    for x, y in itertools.islice(loader, steps):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def ours_pass(model: torch.nn.Module, dataset: data.Dataset, recipe: Recipe, device: str, steps: int) -> None:
    """``steps`` steps of datadiet_nb.train.train on the dataset's first steps x batch images (one epoch)."""
    indices = torch.arange(steps * recipe.batch_size)
    train(model, dataset, dataclasses.replace(recipe, epochs=1, budget="epochs"), seed=0, indices=indices,
          device=device)


Pass = Callable[[torch.nn.Module, int], None]  # trains a model for a number of steps


def time_alternately(passes: dict[str, Pass], width: int, device: str, steps: int, repeats: int
                     ) -> dict[str, list[float]]:
    """Seconds of each timed pass per method, on its own identically initialised model, after a warm-up pass;
    the methods alternate, so that a slower spell of a shared machine hits them alike."""
    models_by_method = {}
    for name, run in passes.items():
        torch.manual_seed(0)
        models_by_method[name] = models.build("resnet18", num_classes=NUM_CLASSES, width=width).to(device)
        run(models_by_method[name], WARMUP_STEPS)
    seconds: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(repeats):
        for name, run in passes.items():
            seconds[name].append(seconds_of(lambda: run(models_by_method[name], steps), device))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when there is a GPU), cpu, cuda, cuda:1, ...")
    parser.add_argument("--width", type=int, help="ResNet-18 width (default: 16 on CPU, 64 on CUDA)")
    parser.add_argument("--batch-size", type=int, help="default: 128 on CPU, 512 on CUDA")
    parser.add_argument("--steps", type=int, help="optimiser steps per timed pass (default: 10 on CPU, 50 on CUDA)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes of each, after a warm-up pass")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes of the baseline")
    parser.add_argument("--compile", action="store_true", help="ours with torch.compile (CUDA only)")
    parser.add_argument("--random-data", action="store_true", help="random images even when CIFAR-10 is there")
    args = parser.parse_args()
    device = pick_device(args.device)
    defaults = DEFAULTS["cuda" if torch.device(device).type == "cuda" else "cpu"]
    width, batch, steps = (getattr(args, k) or defaults[k] for k in ("width", "batch_size", "steps"))

    dataset, source = load_images(steps * batch, args.random_data)
    recipe = Recipe(batch_size=batch, compile=args.compile)
    loader = torch.utils.data.DataLoader(
        PerImageDataset(dataset), batch_size=batch, shuffle=True, drop_last=True, num_workers=args.workers,
        persistent_workers=args.workers > 0, pin_memory=torch.device(device).type == "cuda")
    baseline = f"baseline (torchvision per image, {args.workers} workers)"
    seconds = time_alternately({
        baseline: lambda model, n: baseline_pass(model, loader, recipe, device, n),
        "ours (datadiet_nb.train)": lambda model, n: ours_pass(model, dataset, recipe, device, n),
    }, width, device, steps, args.repeats)

    rows = [{"method": name, "images_per_s": steps * batch / statistics.median(times),
             "vs_baseline": statistics.median(seconds[baseline]) / statistics.median(times), "seconds": times}
            for name, times in seconds.items()]
    machine = describe_machine(device)
    config = {"model": "resnet18", "width": width, "batch_size": batch, "steps": steps, "repeats": args.repeats,
              "workers": args.workers, "compile": args.compile, "data": source}
    print(f"Training CIFAR ResNet-18 width {width}, batch {batch}, {steps} steps x {args.repeats} repeats, "
          f"{machine['device']}, {machine['threads']} threads, torch {machine['torch']}; data: {source}")
    print(f"{'method':44s} {'images/s':>9} {'vs baseline':>11}")
    for row in rows:
        print(f"{row['method']:44s} {row['images_per_s']:9.1f} {row['vs_baseline']:10.2f}x")
    print(f"wrote {write_json(__file__, {'machine': machine, 'config': config, 'rows': rows})}")


if __name__ == "__main__":
    main()
