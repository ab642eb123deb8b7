"""The score bank: a study's scores, the kept indices of its runs and the identity of its data in one file that
needs nothing but numpy to read.

The file is an ``.npz`` archive: ``header`` (a JSON text) describes the rest; ``labels`` are the scored
training set's labels; ``scores/<name>`` every array the preset's scoring took (the K-run means and each run's,
``[K, N]``); ``kept/<run label>`` the kept indices of each pruned run in the store, as positions in the scored
training set. npz rather than Parquet: numpy is already needed, arrays of any shape (runs, ragged kept lists) fit
as they are, float64 stays exact, and ``np.load(path)`` reads it without this package.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .data import Dataset
from .errors import UserError
from .experiment import load_dataset, scored_dataset, scores_config
from .presets import Preset
from .provenance import provenance
from .store import Store, atomic_write_bytes, config_key, npz_bytes, read_json, sha256
from .sweep import job_context, jobs

FORMAT = "datadiet-nb score bank"
FORMAT_VERSION = 1


def dataset_identity(dataset: Dataset) -> dict:
    """What a bank says about the data its scores are of, so that a reader can refuse other data: name, sizes,
    classes, and SHA-256 of the training labels (int64) and images (uint8, NCHW), in native order."""
    labels = np.ascontiguousarray(dataset.train_labels.numpy().astype(np.int64))
    images = np.ascontiguousarray(dataset.train_images.numpy())
    return {"name": dataset.name, "num_train": dataset.num_train, "num_test": len(dataset.test_labels),
            "classes": list(dataset.classes), "labels_sha256": sha256(labels.tobytes()),
            "images_sha256": sha256(images.tobytes())}


def _kept_in_scored_set(preset: Preset, dataset: Dataset, scored: Dataset, store: Store) -> tuple[dict, dict]:
    """(header entries, arrays) of every pruned run of the preset found in the store; indices are positions in
    the scored training set (a run on a class-balanced subset has its indices mapped through the subset)."""
    entries, arrays = {}, {}
    for job in jobs(preset, dataset):
        if job.kind != "run" or job.spec.sparsity == 0 or (record := store.load_run(job.key)) is None:
            continue
        _, trained_on = job_context(preset, dataset, job.size)
        kept = store.load_kept(job.key)
        if trained_on is not scored and trained_on.source_indices is not None:
            kept = trained_on.source_indices.numpy()[kept]
        arrays[f"kept/{job.label}"] = np.asarray(kept, dtype=np.int64)
        entries[job.label] = {"rule": job.spec.score, "sparsity": job.spec.sparsity, "seed": job.spec.seed,
                              "train_per_class": job.size or preset.train_per_class, "num_kept": int(len(kept)),
                              "run_key": job.key, "overall_accuracy": record["overall_accuracy"]}
    return entries, arrays


def export(preset: Preset, store: Store, out: Path, *, force: bool = False) -> dict:
    """Write the preset's score bank to ``out`` (refusing to replace a file unless ``force``); returns its header.
    The scores must be in the store already: exporting never trains."""
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} exists; choose another --out or pass --force to replace it")
    dataset = load_dataset(preset)
    scored = scored_dataset(preset, dataset)
    config = scores_config(preset, dataset)
    key = config_key(config)
    scores = store.load_scores(key, scored.num_train)
    if scores is None:
        raise UserError(f"no scores of {preset.name} in {store.root}: compute them first (datadiet-nb score "
                        f"--preset {preset.name} --store {store.root})")
    sidecar = read_json(store.scores_path(key).with_suffix(".json"))
    kept_entries, kept_arrays = _kept_in_scored_set(preset, dataset, scored, store)
    header = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "preset": preset.name, "dataset": dataset_identity(scored),
        "scores": {name: {"shape": list(array.shape), "epoch": _epoch(preset, name),
                          "mean_of_runs": not name.endswith("_runs") and f"{name}_runs" in scores}
                   for name, array in scores.items()},
        "num_runs": preset.scoring.num_runs, "scoring_seeds": list(preset.scoring_seeds()), "scores_key": key,
        "kept": kept_entries, "config": config, "full_preset": preset.to_dict(),
        "scores_provenance": sidecar.get("provenance"),
        "exported": {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **provenance()},
    }
    arrays = {"header": np.array(json.dumps(header, sort_keys=True)),
              "labels": scored.train_labels.numpy().astype(np.int64),
              **{f"scores/{name}": array for name, array in scores.items()}, **kept_arrays}
    atomic_write_bytes(out, npz_bytes(**arrays))
    return header


def _epoch(preset: Preset, name: str) -> int:
    """The scoring epoch an array was taken at: ``el2n_at3_runs`` at 3, ``el2n``/``el2n_runs`` at EL2N's epoch
    (forgetting: the epochs it was counted over)."""
    score, _, at = name.removesuffix("_runs").partition("_at")
    return int(at) if at else preset.scoring.epoch_of(score)


def read(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(header, arrays) of a score bank, with one clear error for a file that is not one (or of a newer format)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is not a score bank (.npz): {error}") from None
    if "header" not in arrays:
        raise UserError(f"{path} is an .npz without a header: not a datadiet-nb score bank")
    try:
        header = json.loads(str(arrays.pop("header")))
    except ValueError:
        raise UserError(f"{path}: its header is not JSON") from None
    if header.get("format") != FORMAT:
        raise UserError(f"{path}: not a datadiet-nb score bank (format {header.get('format')!r})")
    if header.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} is a score bank of format {header['format_version']}; this datadiet-nb reads "
                        f"format {FORMAT_VERSION} and older: upgrade it")
    return header, arrays
