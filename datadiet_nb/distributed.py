"""One large run over several processes with torchrun: DistributedDataParallel training, evaluation and scoring.

    torchrun --nproc_per_node 4 -m datadiet_nb.distributed score --preset P
    torchrun --nproc_per_node 4 -m datadiet_nb.distributed train --preset P --score el2n --sparsity 0.5 --seed 0
    datadiet-nb train --nproc 4 ...        (the second, started for you on this machine)

Each rank trains on its own disjoint part of every pass (the global batch stays the recipe's). The
test set and the scored training set are cut into disjoint contiguous parts, one per rank: per-class
correct and total counts are summed over ranks, so every test image is counted exactly once (a
padded ``DistributedSampler`` would count some twice), and scores are gathered back in native order.
Rank 0 alone takes the job's claim and writes the store, under the same key as a one-process run;
gloo on CPUs, NCCL on GPUs. A run is not bit-identical to a one-process run: each rank draws other
batches and augmentations, and gradients are summed in another order.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import presets
from .backends import configure_determinism
from .data import Dataset
from .errors import UserError
from .experiment import (_read_scores_file, _scoring_run, compute_scores, keep_scoring_run, kept_indices,
                         load_dataset, run_checkpoint, run_config, run_record, score_array_names, scored_dataset,
                         scores_config, scores_wanted, scoring_run_file, scoring_run_key, seeded_model)
from .store import Store, config_key
from .train import Shard, predict, train

PROG = "datadiet_nb.distributed"


def init(device: str = "auto") -> tuple[Shard, torch.device]:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``): this rank and its
    device, this node's GPU number ``LOCAL_RANK`` with NCCL, or the CPU with gloo (``device="cpu"``, or no GPU)."""
    if "RANK" not in os.environ:
        raise UserError(f"start this with torchrun, e.g. torchrun --nproc_per_node 2 -m {PROG} ...")
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        configure_determinism()
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return Shard(dist.get_rank(), dist.get_world_size()), device


def check_sync_batchnorm(sync_batchnorm: bool, device: str) -> None:
    """SyncBatchNorm runs on GPUs only (NCCL); refuse it in one line where the ranks would use CPUs."""
    if sync_batchnorm and (device == "cpu" or not torch.cuda.is_available()):
        raise UserError("--sync-batchnorm needs GPUs; on CPUs each rank normalises with its own batch's statistics")


def part(num: int, shard: Shard) -> torch.Tensor:
    """This rank's indices of ``range(num)``: contiguous, disjoint, together covering every index once."""
    return torch.tensor_split(torch.arange(num), shard.world_size)[shard.rank]


def gather(local: np.ndarray, shard: Shard) -> np.ndarray:
    """Every rank's ``local`` array, concatenated in rank order (so parts from :func:`part` come back in order)."""
    everyone: list = [None] * shard.world_size
    dist.all_gather_object(everyone, local)
    return np.concatenate(everyone)


def class_counts(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, total) per class of this rank's part, summed over all ranks."""
    correct = torch.bincount(labels[predictions == labels], minlength=num_classes).to(device)
    total = torch.bincount(labels, minlength=num_classes).to(device)
    for counts in (correct, total):
        dist.all_reduce(counts)
    return correct.cpu(), total.cpu()


def evaluate(model: nn.Module, dataset: Dataset, shard: Shard, device: torch.device,
             batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(test predictions in native order, per-class accuracy from counts summed over ranks), each image once."""
    mine = part(len(dataset.test_labels), shard)
    predictions = predict(model, dataset.test_images[mine], dataset, batch_size=batch_size, device=device)
    correct, total = class_counts(predictions, dataset.test_labels[mine], dataset.num_classes, device)
    return gather(predictions.numpy(), shard), (correct.double() / total.clamp(min=1)).numpy()


def sharded_scores(score: Callable[..., torch.Tensor], model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                   shard: Shard, *, batch_size: int) -> np.ndarray:
    """A per-example score of every input, each rank scoring its part; in native order on every rank."""
    mine = part(len(labels), shard)
    return gather(score(model, inputs[mine], labels[mine], batch_size=batch_size).double().numpy(), shard)


def _agree(decision, shard: Shard):
    """Rank 0's ``decision`` on every rank (e.g. whether it holds the job's claim)."""
    box = [decision if shard.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _claim(store: Store, key: str, what: str, shard: Shard):
    """Rank 0 claims ``key`` (and logs the start); every rank stops with one line if another process holds it."""
    claim = store.try_claim(key) if shard.rank == 0 else None
    if not _agree(claim is not None, shard):
        raise UserError(f"{what} is being computed by another process; run this again once it is done")
    if claim is not None:
        store.remove_partial_writes(key)
        store.log_event("start", key, f"{what} on {shard.world_size} processes")
    return claim


def _done(store: Store, key: str, what: str, shard: Shard) -> None:
    if shard.rank == 0:
        store.log_event("done", key, what)


def train_run(preset: presets.Preset, score: str, sparsity: float, seed: int, store: Store, shard: Shard,
              device: torch.device, *, sync_batchnorm: bool = False, progress: bool = False) -> dict | None:
    """One run of the preset trained with DistributedDataParallel; rank 0 stores and returns its record."""
    dataset = load_dataset(preset)
    config = run_config(preset, dataset, score, sparsity, seed)
    key = config_key(config)
    found = _agree(store.load_run(key) if shard.rank == 0 else None, shard)
    if found is not None:
        return found if shard.rank == 0 else None
    if "scores_key" in config and _agree(shard.rank == 0 and store.load_scores(config["scores_key"]) is None, shard):
        raise UserError(f"the preset's scores are not in {store.root}; compute them first: "
                        f"torchrun --nproc_per_node {shard.world_size} -m {PROG} score --preset {preset.name}")
    claim = _claim(store, key, f"run {score} s={sparsity:g} seed={seed}", shard)
    try:
        started = time.perf_counter()
        kept = _agree(kept_indices(preset, dataset, score, sparsity, seed, store) if shard.rank == 0 else None, shard)
        model = seeded_model(preset, dataset, seed)
        if sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        checkpoint = run_checkpoint(store, key, shard)
        fit = train(model, dataset, preset.recipe, seed=seed, indices=torch.from_numpy(kept), device=device,
                    progress=progress and shard.rank == 0, checkpoint=checkpoint,
                    checkpoint_every=preset.checkpoint_epochs, shard=shard)
        predictions, class_accuracy = evaluate(model, dataset, shard, device, preset.recipe.eval_batch_size)
        record = None
        if shard.rank == 0:
            record = run_record(preset, dataset, config, key, store, kept, fit, predictions, device, started,
                                distributed={"world_size": shard.world_size, "backend": dist.get_backend(),
                                             "sync_batchnorm": sync_batchnorm,
                                             "class_accuracy_from_counts": class_accuracy.tolist()})
            record = store.save_run(key, record, kept)
            _done(store, key, f"run {score} s={sparsity:g} seed={seed}", shard)
        dist.barrier()  # the record is stored before any rank deletes its checkpoint
        checkpoint.unlink(missing_ok=True)
        return record
    finally:
        if claim is not None:
            claim.release()


def score(preset: presets.Preset, store: Store, shard: Shard, device: torch.device, *,
          sync_batchnorm: bool = False, progress: bool = False) -> dict[str, np.ndarray] | None:
    """The preset's K scoring runs, each trained with DistributedDataParallel and scored in parts; rank 0 then
    averages them into the store (as :func:`~datadiet_nb.experiment.compute_scores` would) and returns them."""
    dataset = load_dataset(preset)
    scored = scored_dataset(preset, dataset)
    key = config_key(scores_config(preset, dataset))
    names = score_array_names(preset)
    if _agree(shard.rank == 0 and store.load_scores(key, scored.num_train) is not None, shard):
        return compute_scores(preset, dataset, store) if shard.rank == 0 else None
    for seed in preset.scoring_seeds():
        finished = scoring_run_file(store, key, seed)
        if _agree(shard.rank == 0 and _read_scores_file(finished, names, scored.num_train) is not None, shard):
            continue
        run_key = scoring_run_key(key, seed)
        claim = _claim(store, run_key, f"scoring run {seed}", shard)
        try:
            arrays = _scoring_run(preset, scored, store, run_key, seed, scores_wanted(preset), device, progress,
                                  shard=shard, sync_batchnorm=sync_batchnorm,
                                  measure=lambda fn, *args, **kw: sharded_scores(fn, *args, shard, **kw))
            if shard.rank == 0:
                keep_scoring_run(preset, store, key, seed, arrays)
                _done(store, run_key, f"scoring run {seed}", shard)
            dist.barrier()  # stored before any rank deletes its checkpoint
            run_checkpoint(store, run_key, shard).unlink(missing_ok=True)
        finally:
            if claim is not None:
                claim.release()
    return compute_scores(preset, dataset, store) if shard.rank == 0 else None  # every run is there: only averages


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"torchrun ... -m {PROG}", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("score", "train"):
        sub = commands.add_parser(name)
        sub.add_argument("--preset", default="digits")
        sub.add_argument("--store", default="runs")
        sub.add_argument("--set", action="append", metavar="KEY=VALUE")
        sub.add_argument("--sync-batchnorm", action="store_true", help="BatchNorm statistics over all ranks")
        sub.add_argument("--quiet", action="store_true")
        if name == "train":
            sub.add_argument("--score", default="el2n", choices=presets.PRUNING_SCORES)
            sub.add_argument("--sparsity", type=float, required=True)
            sub.add_argument("--offset", type=float, default=None)
            sub.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        assignments = list(args.set or [])
        if getattr(args, "offset", None) is not None:
            assignments.append(f"offset={args.offset}")
        if args.command == "train":
            assignments.append(f"sparsities={args.sparsity}")
        preset = presets.with_overrides(presets.get(args.preset), assignments)
        if args.command == "train":
            preset = presets.with_rule(preset, args.score)
        check_sync_batchnorm(args.sync_batchnorm, preset.device)
        shard, device = init(preset.device)
        store = Store(args.store)
        try:
            if args.command == "score":
                score(preset, store, shard, device, sync_batchnorm=args.sync_batchnorm, progress=not args.quiet)
                if shard.rank == 0:
                    print(f"{preset.name}: scores of {preset.scoring.num_runs} runs on {shard.world_size} processes "
                          f"in {store.root}")
            else:
                record = train_run(preset, args.score, args.sparsity, args.seed, store, shard, device,
                                   sync_batchnorm=args.sync_batchnorm, progress=not args.quiet)
                if record is not None:
                    print(f"{record['score']} sparsity {record['sparsity']:g} seed {record['seed']} on "
                          f"{shard.world_size} processes: test accuracy {record['overall_accuracy']:.4f}, std of "
                          f"class accuracy {record['bias']['std']:.4f}  (record {store.run_path(record['key'])})")
        finally:
            dist.destroy_process_group()
    except UserError as error:
        if os.environ.get("RANK", "0") == "0":  # every rank stops; one says why
            print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
