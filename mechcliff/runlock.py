"""An exclusive lock on an output folder, so that two runs into one folder never both proceed.

The lock is a file ``FOLDER/.lock`` created with ``O_EXCL`` (atomic on local file systems), holding the holder's
pid, host and start time. It is removed when the holder exits normally or by an exception (``with`` block, plus an
``atexit`` hook for interpreter exits). A lock left by a process that died (same host, pid no longer alive) is
stale: it is taken over, and the caller is told.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable

from mechcliff.errors import MechcliffError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class FolderLock:
    """``with FolderLock(folder):`` holds ``folder/.lock``; a second holder gets a :class:`MechcliffError`."""

    def __init__(self, folder: str | os.PathLike[str], what: str = "run", log: Callable[[str], None] | None = None):
        self.path = Path(folder) / ".lock"
        self.what = what
        self.log = log or (lambda msg: None)
        self._held = False

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                pid, host = holder.get("pid"), holder.get("host")
                if isinstance(pid, int) and host == me["host"] and not _alive(pid):
                    self.log(f"removing a stale lock {self.path} (pid {pid} is no longer running)")
                    self.path.unlink(missing_ok=True)
                    continue
                if not holder:  # being written right now, or unreadable: someone holds it
                    holder = {"pid": "?", "host": "?", "started": "?"}
                raise MechcliffError(
                    f"{self.path.parent} is in use by another mechcliff {self.what} (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, since {holder.get('started')}); wait for it to finish or choose another "
                    f"--out (if no such process runs, remove {self.path})"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held = True
            atexit.register(self.release)
            return
        raise MechcliffError(f"cannot take the lock {self.path}")  # pragma: no cover - lost a race twice

    def release(self) -> None:
        if self._held:
            self._held = False
            if self._holder().get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
