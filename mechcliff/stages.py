"""Resumable stages and the manifest of an experiment folder, shared by the pipeline (:mod:`mechcliff.pipeline`)
and the repair curve (:mod:`mechcliff.repair_curve`).

A finished stage leaves ``stages/<name>.done`` holding the key of what it was computed from (a hash of the options
and inputs it depends on). :meth:`Stages.run` loads a stage whose marker holds the current key and computes it
otherwise; saved results that do not load (truncated, corrupted) are recomputed, saying so. The manifest
(``manifest.json``) says what the folder is, with which configuration, versions and model it was made, and how
far it got (``status``); :func:`write_manifest` writes it the same way for every kind of folder.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mechcliff.data import Prompt, content_hash
from mechcliff.files import atomic_write_text
from mechcliff.versions import installed_versions, manifest_environment

if TYPE_CHECKING:
    from mechcliff.model.handle import ModelHandle

T = TypeVar("T")


class Stages:
    """The stage markers of one folder (``folder/stages/<name>.done``) and the seconds each stage took."""

    def __init__(self, folder: str | Path, log: Callable[[str], None]):
        self.dir = Path(folder) / "stages"
        self.log = log
        self.seconds: dict[str, float] = {}

    def done(self, name: str, key: str) -> bool:
        """Whether stage ``name`` finished with ``key``."""
        marker = self.dir / f"{name}.done"
        return marker.exists() and marker.read_text().strip() == key

    def finish(self, name: str, key: str, seconds: float) -> None:
        atomic_write_text(self.dir / f"{name}.done", key + "\n")
        self.seconds[name] = round(seconds, 2)

    def any_done(self) -> bool:
        return any(self.dir.glob("*.done"))

    def run(self, name: str, key: str, compute: Callable[[], None], load: Callable[[], T],
            legacy: Callable[[], bool] | None = None) -> T:
        """``load()`` the results of stage ``name`` if it finished with ``key``, else ``compute()`` (which saves
        them), mark it finished and ``load()``.

        ``legacy``: for folders written before stages had markers, whether the stage's saved results are there
        (then they are loaded and the stage is marked)."""
        finished = self.done(name, key)
        if not finished and legacy is not None and not (self.dir / f"{name}.done").exists() and legacy():
            finished = True
            self.finish(name, key, 0.0)
        if finished:
            try:
                return load()
            except Exception as exc:  # noqa: BLE001 - any unreadable file: JSON, safetensors, JSONL
                self.log(f"[{name}] saved results do not load ({type(exc).__name__}: {str(exc)[:120]}); recomputing")
        t = time.time()
        compute()
        self.finish(name, key, time.time() - t)
        return load()


def write_manifest(folder: str | Path, marker: str, *, status: str, config: Mapping[str, Any],
                   prompts: Mapping[str, Sequence[Prompt]], handle: "ModelHandle | None",
                   seconds: float | None = None, **fields: Any) -> dict[str, Any]:
    """Write ``folder/manifest.json``: the kind of folder (``marker``, format 1), ``status``, when it was created and
    updated, the command, the configuration, the package versions and environment, the prompts (count and content
    hash per group), the model (or the one recorded before, when this process has not loaded it), then ``fields``."""
    path = Path(folder) / "manifest.json"
    try:
        old = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        old = {}
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    manifest: dict[str, Any] = {
        marker: 1, "status": status, "created": old.get("created", now), "updated": now,
        "command": " ".join(sys.argv), "config": dict(config), "versions": installed_versions(),
        "environment": manifest_environment(),
        "prompts": {g: {"n": len(p), "hash": content_hash([x.text for x in p])} for g, p in prompts.items()},
        "model": handle.describe() if handle is not None else old.get("model"),
        **fields,
    }
    if seconds is not None:
        manifest["total_seconds"] = round(seconds, 2)
    atomic_write_text(path, json.dumps(manifest, indent=1, default=str))
    return manifest
