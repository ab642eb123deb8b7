"""Per-example gradient norms (GraNd) on a CIFAR ResNet-18: throughput and peak memory of each method.

    python benchmarks/grand.py [--widths 16 64] [--batch 64] [--repeats 5] [--profile]

Methods, each on the same batch in eval mode: (a) a plain batched forward+backward of the mean loss
(the reference), (b) a per-example autograd loop, (c) torch.func vmap(grad), (d) BackPACK's
BatchL2Grad when it is installed, (e) ours (datadiet_nb.grad_norms.hook_grad_norms). Each method
runs in its own process so that its peak memory is its own: on CPU the growth of peak RSS over the
process's RSS once the model and batch exist (the peak counter is reset there), on CUDA max allocated
over allocated. Prints a table and writes grand.json next to this file. Times are medians of --repeats
after a warm-up. Every method runs in strict IEEE float32 (``backends.strict_fp32``, as scoring does), so
that on a GPU no method is timed with TF32 convolutions against another without. --profile adds, for ours, the time per layer shape and the conv rule it chose.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from common import describe_machine, pick_device, seconds_of, write_json

from datadiet_nb import models
from datadiet_nb.backends import strict_fp32
from datadiet_nb.grad_norms import LayerTime, hook_grad_norms, vmap_grad_norms

NUM_CLASSES = 10
IMAGE_SIZE = 32
OURS = "ours (hooks)"
PLAIN = "plain fwd+bwd"


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


METHODS = {PLAIN: plain, "per-example loop": loop, "vmap(grad)": vmap_grad_norms,
           "BackPACK BatchL2Grad": backpack, OURS: hook_grad_norms}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def _memory_baseline(device: str) -> int:
    """Bytes in use now, with the peak counter restarted from here, so that peak - baseline is what comes after.

    On CPU the peak RSS (VmHWM) would otherwise keep whatever peak the imports and the model's
    initialisation reached; Linux restarts it when 5 is written to /proc/self/clear_refs.
    """
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    Path("/proc/self/clear_refs").write_text("5")
    return _rss_kib("VmRSS") * 1024


def _peak(device: str) -> int:
    return torch.cuda.max_memory_allocated(device) if torch.device(device).type == "cuda" else _rss_kib("VmHWM") * 1024


def layer_profile(model, x, y, repeats: int) -> list[dict]:
    """For ours, per layer shape: how many such layers, the rule used, and milliseconds per call (mean)."""
    records: list[LayerTime] = []
    for _ in range(repeats):
        hook_grad_norms(model, x, y, profile=records)
    rows: dict[str, dict] = {}
    for record in records:
        row = rows.setdefault(record.layer, {"layer": record.layer, "rule": record.rule, "count": 0, "ms": 0.0})
        row["count"] += 1
        row["ms"] += 1e3 * record.seconds / repeats
    for row in rows.values():
        row["count"] //= repeats
    return sorted(rows.values(), key=lambda row: -row["ms"])


def measure(method: str, width: int, batch: int, repeats: int, device: str, profile: bool, queue) -> None:
    torch.manual_seed(0)
    model = models.build("resnet18", num_classes=NUM_CLASSES, width=width).to(device).eval()
    x = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    fn = METHODS[method]
    base = _memory_baseline(device)  # model and batch exist; everything the method allocates comes after
    with strict_fp32():
        try:
            fn(model, x, y)  # warm-up (and the import, for BackPACK)
        except ImportError:
            queue.put(None)
            return
        times = []
        for _ in range(repeats):
            model.zero_grad(set_to_none=True)
            times.append(seconds_of(lambda: fn(model, x, y), device))
    result = {"seconds": statistics.median(times), "peak_bytes": _peak(device) - base}
    if profile and method == OURS:
        result["profile"] = layer_profile(model, x, y, repeats)
    queue.put(result)


def run(method: str, width: int, batch: int, repeats: int, device: str, profile: bool) -> dict | None:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=measure, args=(method, width, batch, repeats, device, profile, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def print_profile(width: int, seconds: float, profile: list[dict]) -> None:
    """Where ours spends its time at this width: the rules per layer shape, and the rest of the call."""
    rules_ms = sum(row["ms"] for row in profile)
    print(f"\nours at width {width}, per layer shape (ms per call, mean; each layer timed with a sync):")
    print(f"  {'layer':34s} {'n':>2} {'rule':12s} {'ms':>7} {'share':>6}")
    for row in profile:
        print(f"  {row['layer']:34s} {row['count']:>2} {row['rule']:12s} {row['ms']:7.1f} {row['ms'] / rules_ms:6.1%}")
    print(f"  rules: {rules_ms:.1f} ms of {1e3 * seconds:.1f} ms per call; forward, input-gradient backward "
          f"and hooks: {1e3 * seconds - rules_ms:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=None, help="ResNet-18 widths (default: 16 on CPU, 64 on CUDA)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="time ours per layer shape and show the conv rules")
    parser.add_argument("--device", default="auto", help="auto (CUDA when there is a GPU), cpu, cuda, cuda:1, ...")
    args = parser.parse_args()
    device = pick_device(args.device)
    widths = args.widths or ([16] if device == "cpu" else [64])  # full width on CPU: --widths 64 (~4 min)
    rows = []
    for width in widths:
        results = {m: run(m, width, args.batch, args.repeats, device, args.profile) for m in METHODS}
        reference = results[PLAIN]
        for method, result in results.items():
            if result is None:
                rows.append({"width": width, "method": method, "status": "not installed"})
                continue
            rows.append({"width": width, "method": method, "examples_per_s": args.batch / result["seconds"],
                         "throughput_vs_plain": reference["seconds"] / result["seconds"],
                         "peak_mib": result["peak_bytes"] / 2**20,
                         "memory_vs_plain": result["peak_bytes"] / max(1, reference["peak_bytes"]),
                         **({"profile": result["profile"]} if "profile" in result else {})})
    machine = {**describe_machine(device), "batch": args.batch, "repeats": args.repeats}
    print(f"GraNd on CIFAR ResNet-18, batch {args.batch}, eval mode, {machine['device']}, "
          f"{machine['threads']} threads, torch {machine['torch']}")
    print(f"{'width':>5}  {'method':22s} {'examples/s':>10} {'vs plain':>8} {'peak MiB':>9} {'mem vs plain':>12}")
    for row in rows:
        if "status" in row:
            print(f"{row['width']:>5}  {row['method']:22s} {row['status']}")
        else:
            print(f"{row['width']:>5}  {row['method']:22s} {row['examples_per_s']:10.1f} {row['throughput_vs_plain']:7.2f}x "
                  f"{row['peak_mib']:9.1f} {row['memory_vs_plain']:11.2f}x")
    for row in rows:
        if "profile" in row:
            print_profile(row["width"], args.batch / row["examples_per_s"], row["profile"])
    print(f"wrote {write_json(__file__, {'machine': machine, 'rows': rows})}")


if __name__ == "__main__":
    main()
