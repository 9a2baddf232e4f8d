"""Results are data: dataclasses saved as a folder of ``result.json`` + ``tensors.safetensors`` (no pickle).

Every result class in mechcliff derives from :class:`Result`. Fields holding numpy arrays go to safetensors;
everything else must be JSON-serialisable and goes to ``result.json`` with the result kind and format version.

:meth:`Result.load` loads any saved result, whatever its kind, in a fresh interpreter: :data:`KINDS` names the
class of every kind the package defines, and the module is imported only when a folder of that kind is loaded.
A new result class adds one line to :data:`KINDS` (``tests/test_user_errors.py`` fails for a ``Result``
subclass of the package that is missing from it). :class:`mechcliff.probe.LinearProbe` is a ``Result`` too; its
folders written before it was one (``probe.json`` + ``probe.safetensors``) still load, with either class.
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

#: Every result kind of the package -> ``"module:Class"`` (imported lazily, by :func:`result_class`).
KINDS: dict[str, str] = {
    "ablation": "mechcliff.asr:AblationResult",
    "ablation_sweep": "mechcliff.sweep:AblationSweepResult",
    "critical_neurons": "mechcliff.neurons:CriticalNeurons",
    "finetune": "mechcliff.repair:FinetuneResult",
    "head_attribution": "mechcliff.attribution:HeadAttribution",
    "head_patching": "mechcliff.patching:PatchingResult",
    "linear_probe": "mechcliff.probe:LinearProbe",
    "mode_comparison": "mechcliff.modes:ModeComparison",
    "neuron_ablation": "mechcliff.neurons:NeuronAblation",
    "position_patching": "mechcliff.patching:PositionPatchingResult",
    "ras_series": "mechcliff.neurons:RASSeries",
    "refusal_heads": "mechcliff.refusal_heads:RefusalHeads",
    "refusal_trace": "mechcliff.trace:RefusalTrace",
    "repair_curve": "mechcliff.repair_curve:RepairCurve",
    "safety_layers": "mechcliff.safety_layers:SafetyLayers",
    "sahara": "mechcliff.ships:SaharaResult",
    "selection": "mechcliff.selection:Selection",
    "ships": "mechcliff.ships:HeadImportance",
    "spectral_head_metrics": "mechcliff.spectral.metrics:SpectralHeadMetrics",
}

#: Result classes by kind, filled as classes are defined (each class that sets its own ``KIND``). It also holds
#: classes defined outside the package, which :data:`KINDS` cannot name; for the package's kinds, KINDS decides.
REGISTRY: dict[str, type["Result"]] = {}


def result_class(kind: str) -> type["Result"] | None:
    """The class of result kind ``kind``, importing its module if needed; None for a kind nobody defines."""
    import importlib

    spec = KINDS.get(kind)
    if spec is None:
        return REGISTRY.get(kind)
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise MechcliffError(f"cannot load '{kind}' results: importing {module} failed: {exc}") from None


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


#: Width of a result's one-line repr, and how many of its summary rows it shows.
REPR_WIDTH, REPR_ROWS = 280, 6


def _clip(value: Any, width: int) -> str:
    """``str(value)`` on one line, cut to ``width`` characters (ending in "…" when cut)."""
    text = " ".join(str(value).split())
    return text if len(text) <= width else text[:width - 1] + "…"


def _required(cls: type, name: str) -> bool:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


@dataclasses.dataclass
class Result:
    """Base class: ``save(dir)``, ``load(dir)``, ``to_dict()``, a one-line repr and an HTML repr for Jupyter."""

    KIND: ClassVar[str] = "result"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "KIND" in cls.__dict__:  # a subclass that inherits its parent's KIND does not take the parent's place
            REGISTRY[cls.KIND] = cls
        if "__repr__" not in cls.__dict__:
            # The short repr below, not the field-by-field one of @dataclass (which prints whole arrays): this runs
            # before the decorator, and @dataclass leaves a __repr__ the class body (or this) already defines.
            cls.__repr__ = Result.__repr__  # type: ignore[method-assign]

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

        from mechcliff.files import atomic_write_bytes, atomic_write_text

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta, arrays = self._split()
        doc = {"kind": self.KIND, "format_version": FORMAT_VERSION, "fields": meta, "arrays": sorted(arrays)}
        atomic_write_bytes(path / "tensors.safetensors", st_save(arrays) if arrays else st_save({"_": np.zeros(1)}))
        atomic_write_text(path / "result.json", json.dumps(doc, indent=1, allow_nan=False))
        return path

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        """Load a result saved by :meth:`save`; checks the kind and the format version.

        ``Result.load(path)`` returns the saved kind's class (see :data:`KINDS`), importing its module if needed;
        ``SomeResult.load(path)`` also checks that the folder holds a ``SomeResult``.
        """
        from safetensors.numpy import load_file

        path = Path(path)
        meta_file = path / "result.json"
        if not meta_file.exists():
            if (path / "probe.json").exists() and cls is Result:
                # a probe saved before LinearProbe was a Result (probe.json + probe.safetensors)
                return result_class("linear_probe").load(path)  # type: ignore[union-attr,return-value]
            raise MechcliffError(f"{path} is not a saved mechcliff result (no result.json)")
        try:
            doc = json.loads(meta_file.read_text())
            kind, fields = doc["kind"], dict(doc["fields"])
        except (ValueError, KeyError, TypeError) as exc:
            raise MechcliffError(f"{meta_file} is damaged ({type(exc).__name__}: {exc})") from None
        if cls is not Result and kind != cls.KIND:
            raise MechcliffError(f"{path} holds a '{kind}' result, not a '{cls.KIND}'")
        if int(doc.get("format_version", 0)) > FORMAT_VERSION:
            raise MechcliffError(
                f"{path} was written by a newer mechcliff (format {doc['format_version']} > {FORMAT_VERSION}); upgrade"
            )
        target = result_class(kind) if cls is Result else cls
        if target is None:
            known = ", ".join(sorted(set(KINDS) | set(REGISTRY)))
            raise MechcliffError(f"{path} holds a '{kind}' result, a kind this mechcliff does not know (known kinds: "
                                 f"{known}); it may come from a newer mechcliff, or its class is defined in a module "
                                 "that is not imported yet")
        arrays = load_file(str(path / "tensors.safetensors")) if doc.get("arrays") else {}
        kwargs = fields
        for name in doc.get("arrays", []):
            kwargs[name] = arrays[name]
        try:
            return target(**kwargs)  # type: ignore[return-value]
        except TypeError as exc:
            names = {f.name for f in dataclasses.fields(target)} if dataclasses.is_dataclass(target) else set()
            extra, missing = sorted(set(kwargs) - names), sorted(n for n in names - set(kwargs)
                                                                 if _required(target, n))
            detail = (f"unknown fields {extra}" if extra else "") + ("; " if extra and missing else "") + \
                (f"missing fields {missing}" if missing else "")
            raise MechcliffError(f"{path}: the saved '{kind}' result does not fit {target.__name__} "
                                 f"({detail or exc}); it was written by another version of mechcliff") from None

    def summary_rows(self) -> list[tuple[str, str]]:
        """Key/value rows for reports and the Jupyter repr (subclasses override)."""
        meta, arrays = self._split()
        rows = [(k, str(v)[:80]) for k, v in meta.items() if not isinstance(v, (dict, list))]
        rows += [(k, f"array {tuple(a.shape)}") for k, a in arrays.items()]
        return rows

    def __repr__(self) -> str:
        """One line of at most :data:`REPR_WIDTH` characters: class, kind, the first :meth:`summary_rows` and the
        shapes of the array fields, e.g. ``HeadAttribution[head_attribution](examples=120, probe layer=3, ...;
        per_example 120×4×4, mlp 120×4, ...)``. The full view is :meth:`summary_rows` (the Jupyter table)."""
        rows: list[tuple[str, str]] = []
        for rows_of in (type(self).summary_rows, Result.summary_rows):
            try:  # a repr must not raise (e.g. on a half-built result): fall back to the generic rows, then none
                rows = rows_of(self)
                break
            except Exception:
                continue
        items = [f"{k}={_clip(v, 48)}" for k, v in rows if str(v) and not str(v).startswith("array (")][:REPR_ROWS]
        arrays = [f"{f.name} {'×'.join(map(str, v.shape)) or 'scalar'}" for f in dataclasses.fields(self)
                  if isinstance(v := getattr(self, f.name, None), np.ndarray)]
        if len(arrays) > 4:
            arrays = arrays[:4] + [f"+{len(arrays) - 4} more"]
        head = f"{type(self).__name__}[{self.KIND}]("
        tail = ("; " + ", ".join(arrays) if arrays else "") + ")"
        body = ", ".join(items)
        room = REPR_WIDTH - len(head) - len(tail)
        if len(body) > room:
            body = body[:max(0, room - 1)].rstrip(", ") + "…"
        return _clip(head + body + tail, REPR_WIDTH)

    def _repr_html_(self) -> str:
        from mechcliff.fmt import html_table

        return f"<b>{type(self).__name__}</b>" + html_table(["field", "value"], [list(r) for r in self.summary_rows()])
