"""A real single-node Slurm (munge + slurmctld + slurmd) in a temporary folder, for the executor tests.

Everything it needs lives under one folder (config, key, sockets, state, logs); nothing in /etc is
touched, and every daemon it starts is stopped by its pid. See ``../shared/notes/slurm-single-node.md``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

DAEMONS = ("munged", "slurmctld", "slurmd")
PARTITION = "debug"
START_TIMEOUT_S = 60.0
MUNGE_KEY_BYTES = 1024

SLURM_CONF = """\
ClusterName=datadiet-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
MpiDefault=none
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SchedulerParameters=sched_interval=2,bf_interval=1
MinJobAge=300
NodeName={host} CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName={partition} Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


def missing_tools() -> list[str]:
    """The Slurm and munge programs this machine lacks (``apt-get install slurm-wlm munge`` provides them)."""
    return [tool for tool in (*DAEMONS, "sbatch", "squeue", "sinfo", "scontrol") if shutil.which(tool) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    total_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemTotal"))
    return int(total_kb / 1024 * 0.9)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def single_node_slurm(root: Path) -> Iterator[dict[str, str]]:
    """Start munge and Slurm under ``root``; yields the environment (``SLURM_CONF``) its commands need.

    Raises RuntimeError with the daemons' own words when they cannot start here.
    """
    root.mkdir(parents=True, exist_ok=True)
    for folder in ("state", "spool", "munge"):
        (root / folder).mkdir(exist_ok=True)
    os.chmod(root / "munge", 0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(MUNGE_KEY_BYTES))
    os.chmod(key, 0o400)
    munge_socket = root / "munge" / "munge.socket"
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, munge_socket=munge_socket, root=root, cpus=os.cpu_count(),
                                      memory=_memory_mb(), partition=PARTITION, ctld_port=_free_port(),
                                      slurmd_port=_free_port()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    pid_files = {"munged": root / "munge" / "munged.pid", "slurmctld": root / "slurmctld.pid",
                 "slurmd": root / "slurmd.pid"}
    try:
        _start(["munged", "--force", f"--key-file={key}", f"--socket={munge_socket}",
                f"--pid-file={pid_files['munged']}", f"--log-file={root / 'munge' / 'munged.log'}",
                f"--seed-file={root / 'munge' / 'munged.seed'}"], env, pid_files["munged"], root / "munge" / "munged.log")
        _start(["slurmctld"], env, pid_files["slurmctld"], root / "slurmctld.log")
        _start(["slurmd"], env, pid_files["slurmd"], root / "slurmd.log")
        _wait_for_idle_node(env, root)
        yield {"SLURM_CONF": str(conf)}
    finally:
        for name in reversed(DAEMONS):
            pid = _read_pid(pid_files[name])
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        _wait_gone([_read_pid(p) for p in pid_files.values()])


def _start(command: list[str], env: dict, pid_file: Path, log: Path) -> None:
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    deadline = time.monotonic() + START_TIMEOUT_S
    while _read_pid(pid_file) is None:
        if result.returncode != 0 or time.monotonic() > deadline:
            tail = log.read_text()[-400:] if log.is_file() else ""
            raise RuntimeError(f"{command[0]} did not start: {(result.stderr or tail).strip()}")
        time.sleep(0.1)


def _wait_for_idle_node(env: dict, root: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=10)
        if state.stdout.strip() == "idle":
            return
        time.sleep(0.5)
    raise RuntimeError(f"the Slurm node did not become idle: {(root / 'slurmd.log').read_text()[-400:]}")


def _wait_gone(pids: list[int | None], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    for pid in filter(None, pids):
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
