"""Claim files: which process is computing which store entry, so sweeps sharing a store never run anything twice.

A claim is a small JSON file created atomically: a complete temporary file is hard-linked to the
claim's name, which fails when the claim exists (on local disks and on NFS alike). Its owner
refreshes the claim's modification time from a background thread. A claim is stale when its owner
is gone (same host, process no longer alive) or has not refreshed it for ``timeout`` seconds (any
host); a stale claim is broken under a short-lived lock, so that exactly one process takes over.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

CLAIM_TIMEOUT_ENV = "DATADIET_CLAIM_TIMEOUT"
DEFAULT_CLAIM_TIMEOUT_S = 600.0  # a claim not refreshed for this long belongs to a lost process
HEARTBEATS_PER_TIMEOUT = 6
BREAK_LOCK_TIMEOUT_S = 60.0  # breaking a claim takes milliseconds; an older break lock is itself stale


def claim_timeout() -> float:
    """Seconds after which an unrefreshed claim is stale: ``$DATADIET_CLAIM_TIMEOUT`` or 600."""
    return float(os.environ.get(CLAIM_TIMEOUT_ENV) or DEFAULT_CLAIM_TIMEOUT_S)


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def read_claim(path: Path) -> dict | None:
    """The claim's owner (host, pid, token, created) and its age in seconds; None when there is no claim."""
    try:
        age = time.time() - path.stat().st_mtime
        info = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        info = {}  # unreadable: judged by its age alone
    return {**info, "age": age}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def is_stale(info: dict, timeout: float) -> bool:
    """A claim whose owner process died on this host, or that nobody refreshed within ``timeout``."""
    if info["age"] > timeout:
        return True
    same_host = info.get("host") == socket.gethostname()
    return same_host and isinstance(info.get("pid"), int) and info["pid"] != os.getpid() and not _alive(info["pid"])


@dataclass
class Claim:
    """A held claim; refreshed in the background until :meth:`release`."""

    path: Path
    token: str
    timeout: float
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name=f"claim {self.path.name}")
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.timeout / HEARTBEATS_PER_TIMEOUT):
            if self.held():
                try:
                    os.utime(self.path)
                except OSError:
                    pass

    def held(self) -> bool:
        info = read_claim(self.path)
        return info is not None and info.get("token") == self.token

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.held():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _create(path: Path, content: bytes) -> bool:
    """Create ``path`` with ``content`` if it does not exist, atomically; False if it exists."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(content)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _break_if_stale(path: Path, timeout: float) -> None:
    """Remove the claim at ``path`` if it is (still) stale, under a lock so only one process breaks it."""
    lock = path.with_name(path.name + ".break")
    if not _create(lock, json.dumps(_owner()).encode()):
        info = read_claim(lock)
        if info is not None and info["age"] > BREAK_LOCK_TIMEOUT_S:
            lock.unlink(missing_ok=True)
        return
    try:
        info = read_claim(path)  # judged again under the lock: another process may have taken over
        if info is not None and is_stale(info, timeout):
            path.unlink(missing_ok=True)
    finally:
        lock.unlink(missing_ok=True)


def try_claim(path: Path, timeout: float | None = None) -> Claim | None:
    """Claim ``path`` for this process, breaking a stale claim; None when another live process holds it."""
    timeout = claim_timeout() if timeout is None else timeout
    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    content = json.dumps({**_owner(), "token": token, "created": time.time()}).encode()
    for _ in range(2):
        if _create(path, content):
            return Claim(path, token, timeout)
        info = read_claim(path)
        if info is not None and not is_stale(info, timeout):
            return None
        _break_if_stale(path, timeout)
    return None
