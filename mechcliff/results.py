"""Results are data: dataclasses saved as a folder of ``result.json`` + ``tensors.safetensors`` (no pickle).

Every result class in mechcliff derives from :class:`Result`. Fields holding numpy arrays go to safetensors;
everything else must be JSON-serialisable and goes to ``result.json`` with the result kind and format version.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from mechcliff.errors import MechcliffError

FORMAT_VERSION = 1
T = TypeVar("T", bound="Result")
REGISTRY: dict[str, type["Result"]] = {}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return None if v != v else v
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


@dataclasses.dataclass
class Result:
    """Base class: ``save(dir)``, ``load(dir)``, ``to_dict()`` and an HTML repr for Jupyter."""

    KIND: ClassVar[str] = "result"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        REGISTRY[cls.KIND] = cls

    def _split(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta: dict[str, Any] = {}
        arrays: dict[str, np.ndarray] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray):
                arrays[f.name] = np.ascontiguousarray(v)
            else:
                meta[f.name] = _jsonable(v)
        return meta, arrays

    def save(self, path: str | Path) -> Path:
        """Write ``path/result.json`` and ``path/tensors.safetensors`` (each atomically); return ``path``."""
        from safetensors.numpy import save as st_save

        from mechcliff.data import atomic_write_bytes, atomic_write_text

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta, arrays = self._split()
        doc = {"kind": self.KIND, "format_version": FORMAT_VERSION, "fields": meta, "arrays": sorted(arrays)}
        atomic_write_bytes(path / "tensors.safetensors", st_save(arrays) if arrays else st_save({"_": np.zeros(1)}))
        atomic_write_text(path / "result.json", json.dumps(doc, indent=1, allow_nan=False))
        return path

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        """Load a result saved by :meth:`save`; checks the kind and the format version."""
        from safetensors.numpy import load_file

        path = Path(path)
        meta_file = path / "result.json"
        if not meta_file.exists():
            raise MechcliffError(f"{path} is not a saved mechcliff result (no result.json)")
        doc = json.loads(meta_file.read_text())
        kind = doc.get("kind")
        target = REGISTRY.get(kind, cls) if cls is Result else cls
        if cls is not Result and kind != cls.KIND:
            raise MechcliffError(f"{path} holds a '{kind}' result, not a '{cls.KIND}'")
        if int(doc.get("format_version", 0)) > FORMAT_VERSION:
            raise MechcliffError(
                f"{path} was written by a newer mechcliff (format {doc['format_version']} > {FORMAT_VERSION}); upgrade"
            )
        arrays = load_file(str(path / "tensors.safetensors")) if doc.get("arrays") else {}
        kwargs = dict(doc["fields"])
        for name in doc.get("arrays", []):
            kwargs[name] = arrays[name]
        return target(**kwargs)  # type: ignore[return-value]

    def summary_rows(self) -> list[tuple[str, str]]:
        """Key/value rows for reports and the Jupyter repr (subclasses override)."""
        meta, arrays = self._split()
        rows = [(k, str(v)[:80]) for k, v in meta.items() if not isinstance(v, (dict, list))]
        rows += [(k, f"array {tuple(a.shape)}") for k, a in arrays.items()]
        return rows

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v}" for k, v in self.summary_rows())
        return f"{type(self).__name__}({body})"

    def _repr_html_(self) -> str:
        from mechcliff.report import html_table

        return f"<b>{type(self).__name__}</b>" + html_table(["field", "value"], [list(r) for r in self.summary_rows()])
