"""Content-addressed, atomic persistence of scores and run records under one store directory.

Layout: ``<store>/scores/<key>.npz`` (+ ``.json`` config) and ``<store>/runs/<key>.json``
(+ ``<key>.kept.npy``). A key is a hash of everything that determines the artefact, so a
changed config never finds an old file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import UserError

KEY_LENGTH = 16


def config_key(config: dict) -> str:
    """A stable short hash of a JSON-able config (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers see old or new, never half."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise UserError(f"cannot write to {path.parent}: {error.strerror or error}") from None
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, default=str) + "\n").encode())


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def write_arrays(path: Path, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def write_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


class Store:
    """A results directory (default ``runs/``): scores and run records found by config key."""

    def __init__(self, root: str | os.PathLike = "runs"):
        self.root = Path(root)

    def scores_path(self, key: str) -> Path:
        return self.root / "scores" / f"{key}.npz"

    def run_path(self, key: str) -> Path:
        return self.root / "runs" / f"{key}.json"

    def kept_path(self, key: str) -> Path:
        return self.root / "runs" / f"{key}.kept.npy"

    def save_scores(self, key: str, config: dict, arrays: dict[str, np.ndarray]) -> None:
        write_arrays(self.scores_path(key), **arrays)
        write_json(self.scores_path(key).with_suffix(".json"), config)

    def load_scores(self, key: str) -> dict[str, np.ndarray] | None:
        path = self.scores_path(key)
        return read_arrays(path) if path.is_file() and path.with_suffix(".json").is_file() else None

    def save_run(self, key: str, record: dict, kept: np.ndarray) -> None:
        write_npy(self.kept_path(key), kept)
        write_json(self.run_path(key), record)  # written last: a record means the run is complete

    def has_run(self, key: str) -> bool:
        return self.run_path(key).is_file()

    def load_run(self, key: str) -> dict:
        return read_json(self.run_path(key))

    def load_kept(self, key: str) -> np.ndarray:
        return np.load(self.kept_path(key))

    def records(self) -> Iterator[dict]:
        """Every complete run record in the store, in key order."""
        for path in sorted((self.root / "runs").glob("*.json")):
            yield read_json(path)
