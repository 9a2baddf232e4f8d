"""Files written safely: atomic writes (a temp file in the same folder, fsync, ``os.replace``).

A foundation module: results, run folders, rollouts and manifests are all written through here, so a crash or a
full disk never leaves a half-written file where a finished one is expected.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mechcliff.errors import MechcliffError

__all__ = ["atomic_write_bytes", "atomic_write_text"]


def _new_file_mode() -> int:
    """Permission bits a normally created file would get (0o666 minus the umask)."""
    umask = None
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    umask = int(line.split()[1], 8)
                    break
    except (OSError, ValueError):
        pass
    if umask is None:
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, os.replace.

    Parent directories are created. On failure the temp file is removed and the target untouched.
    """
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        mode = p.stat().st_mode & 0o777 if p.exists() else _new_file_mode()
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    except OSError as e:
        raise MechcliffError(f"{p}: cannot write file: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, p)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise MechcliffError(f"{p}: cannot write file: {e.strerror or e}") from None
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (see atomic_write_bytes)."""
    atomic_write_bytes(path, text.encode(encoding))
