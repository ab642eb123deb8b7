"""Content-addressed, atomic, self-checking persistence of a study under one store directory.

Layout of a store::

    scores/<key>.npz, scores/<key>.json     scores and their config (+ sha256 of the .npz, written last)
    runs/<key>.json, runs/<key>.kept.npy    a finished run's record (+ its checksum) and kept indices
    failed/<key>.json                       why a run or a scoring job failed (e.g. diverged)
    claims/<key>.claim                      who is computing what right now (see :mod:`.claims`)
    checkpoints/                            training checkpoints and finished scoring runs of unfinished jobs
    corrupt/                                files that failed their checks, moved aside
    events.log                              one line per started / finished / failed / corrupt job

A key is a hash of everything that determines the artefact, so a changed config never finds an
old file. Every file is written to a temporary file in its folder, fsynced and renamed; one left by a
writer killed mid-write is deleted by the next holder of its key's claim.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np

from .claims import Claim, claim_timeout, is_stale, read_claim, try_claim
from .errors import UserError

KEY_LENGTH = 16
WAIT_POLL_S = 2.0  # how often a process waiting for another's job looks again

log = logging.getLogger("datadiet_nb")


def config_key(config: dict) -> str:
    """A stable short hash of a JSON-able config (key order does not matter)."""
    return hashlib.sha256(_canonical(config)).hexdigest()[:KEY_LENGTH]


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers see old or new, never half.

    Any OS error (folder not writable, disk full) leaves the previous file untouched and becomes a
    one-line :class:`UserError` naming the path.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        reason = os.strerror(error.errno) if error.errno else str(error)
        kept = " (the previous file is unchanged)" if path.exists() else ""
        raise UserError(f"cannot write {path}: {reason}{kept}") from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(folder: Path) -> None:
    """Fail now, in one line, if ``folder`` cannot be created or written (not hours later, at the first result)."""
    probe = Path(folder) / f".write-test-{socket.gethostname()}-{os.getpid()}"
    atomic_write_bytes(probe, b"")
    probe.unlink()


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, default=str) + "\n").encode())


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def write_arrays(path: Path, **arrays: np.ndarray) -> None:
    atomic_write_bytes(path, npz_bytes(**arrays))


def write_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def as_stored(record: dict) -> dict:
    """The record as JSON gives it back (tuples as lists, numpy scalars as numbers)."""
    return json.loads(json.dumps(record, default=str))


def record_checksum(record: dict) -> str:
    """sha256 of a record's canonical JSON without its own ``checksum`` field: any edit changes it."""
    return sha256(_canonical({k: v for k, v in record.items() if k != "checksum"}))


class Corrupt(Exception):
    """A stored file failed a check (internal: the store moves it aside and reports it)."""


class Store:
    """A results directory (default ``runs/``): scores, run records and failures found by config key."""

    def __init__(self, root: str | os.PathLike = "runs", *, claim_timeout: float | None = None):
        self.root = Path(root)
        self.claim_timeout = claim_timeout

    # --- paths -------------------------------------------------------------------------------
    def scores_path(self, key: str) -> Path:
        return self.root / "scores" / f"{key}.npz"

    def run_path(self, key: str) -> Path:
        return self.root / "runs" / f"{key}.json"

    def kept_path(self, key: str) -> Path:
        return self.root / "runs" / f"{key}.kept.npy"

    def failure_path(self, key: str) -> Path:
        return self.root / "failed" / f"{key}.json"

    def claim_path(self, key: str) -> Path:
        return self.root / "claims" / f"{key}.claim"

    def checkpoint_path(self, name: str) -> Path:
        return self.root / "checkpoints" / name

    def remove_partial_writes(self, key: str) -> None:
        """Delete the temporary files a writer of ``key`` killed mid-write left behind (``.<name>.<random>.tmp``).

        Only for the holder of ``key``'s claim: nobody else writes that key's files (``<key>.<ext>`` and
        ``<key>-epoch<e>.<ext>``), so none is in use. A key that extends this one (a scoring run's
        ``<key>-seed<s>``) has its own claim and is left alone.
        """
        for folder in ("runs", "scores", "checkpoints", "validation", "failed"):
            for pattern in (f".{key}.*.tmp", f".{key}-epoch*.tmp"):
                for partial in (self.root / folder).glob(pattern):
                    partial.unlink(missing_ok=True)

    # --- integrity ---------------------------------------------------------------------------
    def quarantine(self, paths: list[Path], reason: str) -> None:
        """Move files that failed a check into ``corrupt/`` (never delete: a human may want them) and say so."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        moved = []
        for path in paths:
            target = self.root / "corrupt" / f"{stamp}-{os.getpid()}-{path.name}"
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
                moved.append(target)
            except FileNotFoundError:
                pass  # already moved by another process
        if moved:
            log.warning("%s: %s; moved to %s, it will be recomputed", paths[0], reason, moved[0].parent)
            self.log_event("corrupt", paths[0].stem, reason)

    def log_event(self, event: str, key: str, what: str = "") -> None:
        """Append one line to ``events.log`` (an audit trail of who computed what, and when)."""
        line = (f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} {socket.gethostname()} "
                f"{os.getpid()} {event} {key} {what}".rstrip() + "\n")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(self.root / "events.log", "a") as f:
                f.write(line)
        except OSError as error:
            log.warning("cannot append to %s: %s", self.root / "events.log", os.strerror(error.errno or 0))

    # --- scores ------------------------------------------------------------------------------
    def save_scores(self, key: str, config: dict, arrays: dict[str, np.ndarray]) -> None:
        data = npz_bytes(**arrays)
        atomic_write_bytes(self.scores_path(key), data)
        write_json(self.scores_path(key).with_suffix(".json"),  # written last: it marks the scores complete
                   {**config, "sha256": sha256(data), "shapes": {k: list(v.shape) for k, v in arrays.items()}})

    def load_scores(self, key: str, num_train: int | None = None) -> dict[str, np.ndarray] | None:
        """The stored scores, or None when absent or corrupt (then moved aside, so they are recomputed)."""
        path, sidecar = self.scores_path(key), self.scores_path(key).with_suffix(".json")
        if not sidecar.is_file():
            return None
        try:
            arrays = check_scores(path, sidecar, num_train)
        except Corrupt as error:
            self.quarantine([path, sidecar], str(error))
            return None
        return arrays

    # --- run records -------------------------------------------------------------------------
    def save_run(self, key: str, record: dict, kept: np.ndarray) -> dict:
        """Write kept indices, then the record (last: a record means the run is complete); returns it as stored."""
        write_npy(self.kept_path(key), kept)
        record = as_stored({**record, "kept_sha256": sha256(self.kept_path(key).read_bytes())})
        record["checksum"] = record_checksum(record)
        write_json(self.run_path(key), record)
        return record

    def load_run(self, key: str) -> dict | None:
        """A finished run's record, or None when absent or corrupt (then moved aside, so the run is redone)."""
        path = self.run_path(key)
        if not path.is_file():
            return None
        try:
            return check_record(path, self.kept_path(key))
        except Corrupt as error:
            self.quarantine([path, self.kept_path(key)], str(error))
            return None

    def has_run(self, key: str) -> bool:
        return self.load_run(key) is not None

    def load_kept(self, key: str) -> np.ndarray:
        return np.load(self.kept_path(key))

    def records(self) -> Iterator[dict]:
        """Every finished, intact run record in the store, in key order."""
        for path in sorted((self.root / "runs").glob("*.json")):
            record = self.load_run(path.stem)
            if record is not None:
                yield record

    # --- failures ----------------------------------------------------------------------------
    def save_failure(self, key: str, info: dict) -> None:
        write_json(self.failure_path(key), {**info, "key": key,
                                            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})

    def load_failure(self, key: str) -> dict | None:
        path = self.failure_path(key)
        try:
            return read_json(path)
        except FileNotFoundError:
            return None
        except ValueError:
            return {"key": key, "message": f"unreadable failure record {path}"}

    def clear_failure(self, key: str) -> None:
        """Forget a failure so the job is tried again (the old note is kept beside, renamed)."""
        path = self.failure_path(key)
        if path.is_file():
            os.replace(path, path.with_name(f"{key}.retried-{int(time.time())}"))

    # --- claims ------------------------------------------------------------------------------
    def try_claim(self, key: str) -> Claim | None:
        return try_claim(self.claim_path(key), self.claim_timeout)

    def claim_holder(self, key: str) -> dict | None:
        return read_claim(self.claim_path(key))

    def claim_is_stale(self, holder: dict) -> bool:
        return is_stale(holder, claim_timeout() if self.claim_timeout is None else self.claim_timeout)


def check_scores(path: Path, sidecar: Path, num_train: int | None) -> dict[str, np.ndarray]:
    """Load scores and verify checksum, completeness, length and finiteness; raises :class:`Corrupt`."""
    try:
        meta = read_json(sidecar)
        data = path.read_bytes()
    except FileNotFoundError:
        raise Corrupt("scores file missing beside its config") from None
    except ValueError:
        raise Corrupt("unreadable config (not JSON)") from None
    if meta.get("sha256") != sha256(data):
        raise Corrupt("checksum mismatch (truncated or edited)")
    try:
        with np.load(io.BytesIO(data)) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as error:
        raise Corrupt(f"unreadable ({error})") from None
    for name in ("el2n", "grand"):
        if name not in arrays:
            raise Corrupt(f"no {name} array")
        if num_train is not None and arrays[name].shape != (num_train,):
            raise Corrupt(f"{name} holds {arrays[name].shape} scores for {num_train} training examples")
    bad = [name for name, array in arrays.items() if not np.all(np.isfinite(array))]
    if bad:
        raise Corrupt(f"non-finite values (NaN/inf) in {bad[0]}")
    return arrays


def check_record(path: Path, kept_path: Path) -> dict:
    """Load a run record and verify its checksum and its kept-index file; raises :class:`Corrupt`."""
    try:
        record = read_json(path)
    except ValueError:
        raise Corrupt("not valid JSON (truncated or edited)") from None
    if not isinstance(record, dict) or record.get("checksum") != record_checksum(record):
        raise Corrupt("checksum mismatch (edited by hand?)")
    try:
        kept = kept_path.read_bytes()
    except FileNotFoundError:
        raise Corrupt(f"its kept-index file {kept_path.name} is missing") from None
    if record.get("kept_sha256") != sha256(kept):
        raise Corrupt(f"its kept-index file {kept_path.name} fails its checksum")
    return record
