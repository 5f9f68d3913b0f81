"""One process per lock file: the pair writers' `out_dir` (one lock per rank) and a training's `run_dir`.

The lock file names its owner's host, pid, process start time and SLURM job; it is made with os.link (atomic,
also on NFS), so it is never seen without its content. A lock whose owner is a dead process on this host, or
an earlier run of this SLURM job (a requeued job may start on another node), is stale and taken over with one
warning; a live owner, or one on another host of another job (which cannot be checked from here), is one
ConfigError naming the lock and its owner.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import sys
import tempfile
import uuid
from pathlib import Path

from surf_train.common.dist_env import slurm_job_id
from surf_train.common.errors import ConfigError

log = logging.getLogger(__name__)


def _start_time(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (Linux); tells a live process from a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(owner: dict) -> bool:
    """Whether the process a lock names still runs; only answerable on its own host (else: assume it does)."""
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        pass
    started = owner.get("started")
    return started is None or _start_time(owner["pid"]) in (None, started)


class DirLock:
    """`path` held by this process while in use; `busy` says what the owner does ("run_dir x is being trained").

    `what` names the directory's setting in errors (out_dir, run_dir)."""

    def __init__(self, path: str | os.PathLike, busy: str, what: str = "out_dir"):
        self.path, self.dir, self.busy, self.what = Path(path), Path(path).parent, busy, what
        self.me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": _start_time(os.getpid()),
            "slurm_job": slurm_job_id(),
            "token": uuid.uuid4().hex,
            "argv": sys.argv,
        }

    def _owner(self) -> dict | None:
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _stale(self, owner: dict) -> str | None:
        """Why the owner of the lock is gone (for the warning), or None while it may still run."""
        if (
            owner.get("host") != self.me["host"]
            and owner.get("slurm_job")
            and owner["slurm_job"] == self.me["slurm_job"]
        ):
            return f"an earlier run of SLURM job {owner['slurm_job']}, requeued"
        return None if _alive(owner) else "no longer running"

    def acquire(self) -> DirLock:
        if self.dir.exists() and not self.dir.is_dir():
            raise ConfigError(f"{self.what}={self.dir} is an existing file, not a directory")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{self.what}={self.dir}: cannot create the directory ({e.strerror})") from None
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{self.me['token'][:8]}.tmp")
        tmp.write_text(json.dumps(self.me))
        try:
            # processes of one host decide about stale locks one at a time (a host-local flock): two of
            # them must not both remove a stale lock and then one the other's new lock
            digest = hashlib.sha1(str(self.path.resolve()).encode()).hexdigest()[:16]
            with open(Path(tempfile.gettempdir()) / f"surf-lock-{digest}.guard", "a") as g:
                fcntl.flock(g, fcntl.LOCK_EX)
                for _ in range(3):
                    try:
                        os.link(tmp, self.path)
                        return self
                    except FileExistsError:
                        pass
                    owner = self._owner()
                    if owner is None:  # released meanwhile
                        continue
                    self._take_over(owner)
                raise ConfigError(f"{self.path}: could not take the lock (it keeps changing hands)")
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over(self, owner: dict) -> None:
        """Remove a stale lock with one warning; a live (or unreadable) one is one ConfigError."""
        if not owner:
            raise ConfigError(f"{self.path}: unreadable lock file; if no other process uses {self.dir}, delete it")
        why = self._stale(owner)
        if why is None:
            raise ConfigError(
                f"{self.path}: {self.busy} by pid {owner['pid']} on {owner.get('host')}; wait for it to finish "
                f"(or, if that process is gone, delete the lock file)"
            )
        log.warning(
            "%s: taking over the stale lock of pid %s on %s (%s)", self.path, owner["pid"], owner.get("host"), why
        )
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        owner = self._owner()
        if owner and owner.get("token") == self.me["token"]:
            self.path.unlink()
        else:
            log.warning("%s: the lock is no longer this process's; left as it is", self.path)

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
