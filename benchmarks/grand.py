"""Per-example gradient norms (GraNd) on a CIFAR ResNet-18: throughput and peak memory of each method.

    python benchmarks/grand.py [--widths 16 64] [--batch 64] [--repeats 5]

Methods, each on the same batch in eval mode: (a) a plain batched forward+backward of the mean loss
(the reference), (b) a per-example autograd loop, (c) torch.func vmap(grad), (d) BackPACK's
BatchL2Grad when it is installed, (e) ours (datadiet_nb.grad_norms.hook_grad_norms). Each method
runs in its own process so that its peak memory (peak RSS on CPU, max allocated on CUDA) is its own.
Prints a table and writes grand.json next to this file. Times are medians of --repeats after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from datadiet_nb import models
from datadiet_nb.grad_norms import hook_grad_norms, vmap_grad_norms

NUM_CLASSES = 10
IMAGE_SIZE = 32


def plain(model, x, y):
    F.cross_entropy(model(x), y).backward()


def loop(model, x, y):
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        sum(p.grad.pow(2).sum() for p in model.parameters())


def backpack(model, x, y):
    from backpack import backpack as context, extend
    from backpack.extensions import BatchL2Grad

    extended = extend(model)
    loss = extend(torch.nn.CrossEntropyLoss(reduction="sum"))(extended(x), y)
    with context(BatchL2Grad()):
        loss.backward()
    return sum(p.batch_l2 for p in extended.parameters())


METHODS = {"plain fwd+bwd": plain, "per-example loop": loop, "vmap(grad)": vmap_grad_norms,
           "BackPACK BatchL2Grad": backpack, "ours (hooks)": hook_grad_norms}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def measure(method: str, width: int, batch: int, repeats: int, device: str, queue) -> None:
    torch.manual_seed(0)
    model = models.build("resnet18", num_classes=NUM_CLASSES, width=width).to(device).eval()
    x = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    fn = METHODS[method]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kib("VmRSS") * 1024  # model and batch exist; everything the method allocates comes after
    try:
        fn(model, x, y)  # warm-up (and the import, for BackPACK)
    except ImportError:
        queue.put(None)
        return
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        sync()
        start = time.perf_counter()
        fn(model, x, y)
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _rss_kib("VmHWM") * 1024
    queue.put({"seconds": statistics.median(times), "peak_bytes": peak - base})


def run(method: str, width: int, batch: int, repeats: int, device: str) -> dict | None:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=measure, args=(method, width, batch, repeats, device, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    widths = args.widths or ([16, 64] if device == "cpu" else [64])
    rows = []
    for width in widths:
        results = {m: run(m, width, args.batch, args.repeats, device) for m in METHODS}
        reference = results["plain fwd+bwd"]
        for method, result in results.items():
            if result is None:
                rows.append({"width": width, "method": method, "status": "not installed"})
                continue
            rows.append({"width": width, "method": method, "examples_per_s": args.batch / result["seconds"],
                         "throughput_vs_plain": reference["seconds"] / result["seconds"],
                         "peak_mib": result["peak_bytes"] / 2**20,
                         "memory_vs_plain": result["peak_bytes"] / max(1, reference["peak_bytes"])})
    machine = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": args.batch,
               "repeats": args.repeats}
    print(f"GraNd on CIFAR ResNet-18, batch {args.batch}, eval mode, {machine['device']}, "
          f"{machine['threads']} threads, torch {machine['torch']}")
    print(f"{'width':>5}  {'method':22s} {'examples/s':>10} {'vs plain':>8} {'peak MiB':>9} {'mem vs plain':>12}")
    for row in rows:
        if "status" in row:
            print(f"{row['width']:>5}  {row['method']:22s} {row['status']}")
        else:
            print(f"{row['width']:>5}  {row['method']:22s} {row['examples_per_s']:10.1f} {row['throughput_vs_plain']:7.2f}x "
                  f"{row['peak_mib']:9.1f} {row['memory_vs_plain']:11.2f}x")
    out = Path(__file__).with_suffix(".json")
    out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
