"""Paper figures: every saved result of a run folder, re-rendered and exported without the model.

``mechcliff plot RUN_DIR`` (and :func:`plot_run`) reads only what a run left on disk — each result's
``result.json`` + ``tensors.safetensors`` (``probe.json`` + ``probe.safetensors`` for a probe) and ``results.json``
— and draws every figure again in a chosen :data:`mechcliff.plotting.STYLES` style. No model, tokenizer or
forward pass is involved (``transformers`` and ``transformer_lens`` are never imported), so a figure can be re-made
in seconds, long after the model is gone.

What a run folder can draw (:func:`available`):

* the run-level figures of the HTML report (:func:`mechcliff.report_run.run_figures`: ``cliff_curves``,
  ``cliff_curves_normalized``, ``ms_histogram``, ``attribution_heatmap``, ``probe_by_layer``, ``asr``) when the
  pipeline's stage results (``probe/``, ``trace/``, ``attribution/``, ``ablation/``) are all there;
* one figure per other saved result anywhere below the folder (sweeps, patching, Ships, selections, fine-tuning,
  ...), named by the result's ``KIND`` (``KIND-folder`` when a kind occurs more than once) and drawn by its
  ``plot()``.

How a new result type becomes plottable — nothing in this module changes:

1. subclass :class:`mechcliff.results.Result` in a module of the ``mechcliff`` package with a unique
   ``KIND = "my_kind"`` class attribute, and add ``"my_kind": "mechcliff.module:Class"`` to
   :data:`mechcliff.results.KINDS` (the module is imported only when a run folder holds that kind;
   ``tests/test_user_errors.py`` fails for a subclass missing from the table; a class defined outside the package
   is found once its module has been imported, through :data:`mechcliff.results.REGISTRY`);
2. give it ``plot(self) -> plotly.graph_objects.Figure`` callable without arguments, built from the saved fields
   only (use :mod:`mechcliff.plotting`'s functions or ``template=TEMPLATE``; :func:`mechcliff.plotting.apply_style`
   does fonts, sizes and tick legibility afterwards);
3. ``save()`` it anywhere inside a run folder. ``mechcliff plot RUN --kind my_kind`` then draws it, and
   ``mechcliff plot RUN --kind`` lists it;
4. add a small synthetic instance to ``FACTORIES`` in ``tests/test_figures.py`` (the test fails for a registered
   kind without one).

Static files (PDF / SVG / PNG) are exported with plotly + kaleido in one batch (one browser start for all
figures); kaleido drives a Chrome or Chromium binary, found by :func:`find_browser`. Without one, HTML is still
written and :data:`NO_BROWSER_HELP` says how to install a browser.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from mechcliff.errors import MechcliffError
from mechcliff.results import FORMAT_VERSION, KINDS, Result
from mechcliff.results import result_class as _result_class

__all__ = [
    "FORMATS",
    "NO_BROWSER_HELP",
    "ExportReport",
    "FigureSpec",
    "SavedResult",
    "available",
    "check_run_dir",
    "export",
    "find_browser",
    "find_results",
    "load_saved",
    "no_browser_message",
    "plot_run",
    "render",
    "result_class",
    "result_kinds",
    "select",
]

#: Output formats: static ones need a browser (kaleido); ``html`` never does.
FORMATS = ("pdf", "svg", "png", "html")
STATIC_FORMATS = ("pdf", "svg", "png")

#: The kind of :class:`mechcliff.probe.LinearProbe`; run folders written before the probe was a Result hold it as
#: ``probe.json`` + ``probe.safetensors`` (format :data:`PROBE_FORMAT_VERSION`), which still load.
PROBE_KIND = "linear_probe"
PROBE_FORMAT_VERSION = 1
#: Run-folder manifests (``manifest.json``) this mechcliff reads: the marker field -> the newest version it reads.
#: Any other ``mechcliff_*`` marker is accepted as a mechcliff folder of a kind added later.
MANIFEST_VERSIONS = {"mechcliff_run": 1, "mechcliff_repair_curve": 1}

#: The pipeline's stage folders whose results the run-level figures combine (see :mod:`mechcliff.pipeline`).
PIPELINE_STAGES: dict[str, str] = {
    "probe": PROBE_KIND,
    "trace": "refusal_trace",
    "attribution": "head_attribution",
    "ablation": "ablation",
}
#: Run-level figure -> the stage folders it is drawn from.
RUN_FIGURES: dict[str, tuple[str, ...]] = {
    "cliff_curves": ("trace",),
    "cliff_curves_normalized": ("trace",),
    "ms_histogram": ("trace",),
    "attribution_heatmap": ("attribution",),
    "probe_by_layer": ("probe",),
    "asr": ("ablation",),
}

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
NO_BROWSER_HELP = (
    "no Chrome/Chromium browser found for PDF/SVG/PNG export (looked at $BROWSER_PATH, /usr/bin/chromium, "
    + ", ".join(BROWSER_NAMES[:3])
    + " on PATH, and kaleido's own download). Fix: as root, `apt-get install -y chromium` (Debian/Ubuntu; "
    "or `make browser`); without root, `.venv/bin/kaleido_get_chrome` (or `plotly_get_chrome`) downloads Chrome into "
    "~/.local/share/choreographer (it still needs the system's shared libraries, e.g. libnss3); or set "
    "BROWSER_PATH=/path/to/chrome. HTML files were written instead."
)


def no_browser_message() -> str:
    """:data:`NO_BROWSER_HELP`, saying first when ``$BROWSER_PATH`` is set but is not an executable."""
    env = os.environ.get("BROWSER_PATH")
    if env and not (os.path.isfile(env) and os.access(env, os.X_OK)):
        return f"BROWSER_PATH={env} is not an executable file; " + NO_BROWSER_HELP
    return NO_BROWSER_HELP


_SKIP_DIRS = {"__pycache__", "node_modules"}


# --------------------------------------------------------------------------- discovery


def result_kinds() -> dict[str, str]:
    """Every result kind defined in the ``mechcliff`` package -> the module defining it (from
    :data:`mechcliff.results.KINDS`; nothing is imported)."""
    return {kind: spec.partition(":")[0] for kind, spec in sorted(KINDS.items())}


def result_class(kind: str) -> type[Result] | None:
    """The class of a saved result kind, importing the module that defines it if needed; None if unknown."""
    return _result_class(kind)


@dataclasses.dataclass
class SavedResult:
    """A saved result found in a run folder (not loaded yet)."""

    path: Path  # the result's folder
    rel: str  # its folder relative to the run folder ("." for the run folder itself)
    kind: str
    format_version: int

    def load(self) -> Any:
        return load_saved(self.path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MechcliffError(f"cannot read {path}: {exc}") from None


def _check_version(path: Path, found: Any, supported: int, what: str) -> int:
    try:
        version = int(found)
    except (TypeError, ValueError):
        raise MechcliffError(f"{path}: {what} version {found!r} is not an integer; the file is damaged") from None
    if version > supported:
        raise MechcliffError(
            f"{path} was written by a newer mechcliff ({what} version {version}; this mechcliff "
            f"{_version()} reads up to {supported}); upgrade mechcliff to plot it"
        )
    return version


def _version() -> str:
    from mechcliff.versions import __version__

    return __version__


def _saved_at(folder: Path, root: Path) -> SavedResult | None:
    rel = folder.relative_to(root).as_posix() or "."
    if (folder / "result.json").is_file():
        doc = _read_json(folder / "result.json")
        if not isinstance(doc, dict) or "kind" not in doc:
            raise MechcliffError(f"{folder / 'result.json'} is not a saved mechcliff result (no 'kind')")
        version = _check_version(folder / "result.json", doc.get("format_version", 0), FORMAT_VERSION, "result format")
        return SavedResult(folder, rel, str(doc["kind"]), version)
    if (folder / "probe.json").is_file():
        doc = _read_json(folder / "probe.json")
        if not isinstance(doc, dict) or doc.get("kind", PROBE_KIND) != PROBE_KIND:
            raise MechcliffError(f"{folder / 'probe.json'} is not a saved mechcliff probe")
        version = _check_version(folder / "probe.json", doc.get("format_version", 0), PROBE_FORMAT_VERSION,
                                 "probe format")
        return SavedResult(folder, rel, PROBE_KIND, version)
    return None


def check_run_dir(run_dir: str | Path) -> Path:
    """``run_dir`` as a Path, after checking it is a folder and, if it has a manifest, a mechcliff run's."""
    root = Path(run_dir)
    if not root.exists():
        raise MechcliffError(f"{root} does not exist; give a run folder written by `mechcliff run` (e.g. runs/demo)")
    if not root.is_dir():
        raise MechcliffError(f"{root} is not a folder; give a run folder written by `mechcliff run`")
    manifest = root / "manifest.json"
    if manifest.is_file():
        doc = _read_json(manifest)
        markers = [k for k in doc if str(k).startswith("mechcliff_")] if isinstance(doc, dict) else []
        if not markers:
            raise MechcliffError(f"{manifest} is not a mechcliff run manifest; {root} is not a mechcliff run folder")
        for key in markers:
            if key in MANIFEST_VERSIONS:
                _check_version(manifest, doc[key], MANIFEST_VERSIONS[key], "run manifest")
    return root


def find_results(run_dir: str | Path) -> list[SavedResult]:
    """Every saved result (``result.json`` or ``probe.json``) in ``run_dir`` and below, in path order.

    ``figures/`` (exported files) and hidden folders are skipped. A result written by a newer mechcliff (a higher
    format version) raises :class:`MechcliffError`.
    """
    root = check_run_dir(run_dir)
    found: list[SavedResult] = []
    for folder, dirs, _files in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS
                         and not (here == root and d == "figures"))
        saved = _saved_at(here, root)
        if saved is not None:
            found.append(saved)
    return found


def load_saved(path: str | Path) -> Any:
    """Load a saved result folder of any kind (a :class:`~mechcliff.results.Result` or a probe), model-free."""
    path = Path(path)
    saved = _saved_at(path, path)
    if saved is None:
        raise MechcliffError(f"{path} is not a saved mechcliff result (no result.json or probe.json)")
    cls = result_class(saved.kind)
    if cls is None:
        raise MechcliffError(f"{path} holds a '{saved.kind}' result, a kind this mechcliff does not know "
                             f"(known: {', '.join(sorted(result_kinds()))}); it may come from a newer mechcliff")
    return cls.load(path)


# --------------------------------------------------------------------------- what a run folder can draw


@dataclasses.dataclass
class FigureSpec:
    """One drawable figure of a run folder: its file name, the result kind it draws and where that lives."""

    name: str
    kind: str
    sources: tuple[str, ...]  # result folders (relative to the run folder) it is drawn from
    source_kinds: tuple[str, ...]
    build: Callable[[], Any] = dataclasses.field(repr=False)
    note: str = ""
    bulk: bool | None = None  # drawn only when asked for (see _bulk); None: decided from the folder layout

    def matches(self, key: str) -> bool:
        return key in (self.name, self.kind) or key in self.source_kinds


class _RunFigures:
    """The run-level figures of a pipeline run folder, built once (all at a time) on first use."""

    def __init__(self, root: Path, stages: dict[str, SavedResult]):
        self.root = root
        self.stages = stages
        self._figs: dict[str, Any] | None = None
        self._loaded: dict[str, Any] = {}

    def load(self, stage: str) -> Any:
        if stage not in self._loaded:
            self._loaded[stage] = self.stages[stage].load()
        return self._loaded[stage]

    def has_ms(self) -> bool:
        import numpy as np

        return bool(np.isfinite(np.asarray(self.load("trace").stats.get("ms", []), dtype=float)).any())

    def figure(self, name: str) -> Any:
        if self._figs is None:
            from mechcliff.report_run import run_figures

            probe, trace, dpa, ablation = (self.load(s) for s in ("probe", "trace", "attribution", "ablation"))
            results = _read_json(self.root / "results.json") if (self.root / "results.json").is_file() else {}
            if not isinstance(results, dict):
                raise MechcliffError(f"{self.root / 'results.json'} is not a mechcliff results file")
            group = (results.get("attribution") or {}).get("group") or (dpa.groups[0] if dpa.groups else "attack")
            results = {**results, "attribution": {**(results.get("attribution") or {}), "group": group}}
            self._figs = run_figures(results, probe, trace, dpa, ablation, _ground_truth(results))
        if name not in self._figs:
            raise MechcliffError(f"the run in {self.root} has no '{name}' figure")
        return self._figs[name]


def _ground_truth(results: dict[str, Any]) -> Any:
    """The organism's planted heads from ``results.json`` (for the heatmap outline), without the organism module."""
    planted = (results.get("organism") or {}).get("planted_suppression_heads")
    if not planted:
        return None
    out = []
    for label in planted:
        m = re.fullmatch(r"L(\d+)H(\d+)", str(label))
        if m:
            out.append((int(m.group(1)), int(m.group(2))))
    return dataclasses.make_dataclass("GroundTruth", ["planted_suppression_heads"])(out) if out else None


def _plot_saved(saved: SavedResult) -> Callable[[], Any]:
    def build() -> Any:
        result = saved.load()
        if not callable(getattr(result, "plot", None)):
            raise MechcliffError(f"'{saved.kind}' results have no plot() method")
        return result.plot()

    return build


def available(run_dir: str | Path) -> dict[str, FigureSpec]:
    """Every figure ``run_dir`` can draw, by name (the file name of the exported figure), in drawing order.

    Raises :class:`MechcliffError` when ``run_dir`` is not a run folder (no saved results), a result is from a
    newer mechcliff, or a manifest is not a mechcliff one. Results of a kind this mechcliff does not know are left
    out, with a note in the spec list (``FigureSpec.note``) under the name ``unknown:<folder>``.
    """
    root = Path(run_dir)
    saved = find_results(root)
    if not saved:
        raise MechcliffError(
            f"{root} is not a mechcliff run folder: no saved results (result.json / probe.json) in it or below; "
            "give the folder written by `mechcliff run --out DIR`"
        )
    specs: dict[str, FigureSpec] = {}
    runs = _child_runs(root, saved)
    for child in runs:  # a folder of run folders: each run's figures, named "<run>/<figure>"
        child_specs = available(root / child)
        for name, spec in child_specs.items():
            full = f"{_slug(child)}/{name}"
            specs[full] = dataclasses.replace(spec, name=full, sources=tuple(f"{child}/{r}" for r in spec.sources),
                                              bulk=_bulk(spec, child_specs))
    saved = [s for s in saved if not any(s.rel == c or s.rel.startswith(c + "/") for c in runs)]
    by_rel = {s.rel: s for s in saved}
    stages = {stage: by_rel[stage] for stage, kind in PIPELINE_STAGES.items()
              if stage in by_rel and by_rel[stage].kind == kind}
    used: set[str] = set()
    if len(stages) == len(PIPELINE_STAGES):
        run = _RunFigures(root, stages)
        for name, sources in RUN_FIGURES.items():
            if name == "ms_histogram" and not run.has_ms():
                continue
            kinds = tuple(PIPELINE_STAGES[s] for s in sources)
            specs[name] = FigureSpec(name, kinds[0], sources, kinds, functools.partial(run.figure, name))
        used = set(stages)
    rest = [s for s in saved if s.rel not in used]
    counts: dict[str, int] = {}
    for s in rest:
        counts[s.kind] = counts.get(s.kind, 0) + 1
    for s in rest:
        if result_class(s.kind) is None:
            specs[f"unknown:{s.rel}"] = FigureSpec(
                f"unknown:{s.rel}", s.kind, (s.rel,), (s.kind,), _plot_saved(s),
                note=f"skipped: '{s.kind}' is not a result kind this mechcliff knows (newer mechcliff?)")
            continue
        name = s.kind if counts[s.kind] == 1 else f"{s.kind}-{_slug(s.rel)}"
        specs[name] = FigureSpec(name, s.kind, (s.rel,), (s.kind,), _plot_saved(s))
    return specs


def _child_runs(root: Path, saved: list[SavedResult]) -> list[str]:
    """Sub-folders of ``root`` (itself no run folder: no manifest) that are run folders (a mechcliff manifest):
    ``mechcliff plot PARENT`` draws each of them. Nested runs inside a run are that run's business."""
    if (root / "manifest.json").is_file():
        return []
    runs: list[str] = []
    for rel in sorted({s.rel for s in saved}):
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):
            cand = "/".join(parts[:i])
            if cand != "." and (root / cand / "manifest.json").is_file():
                if cand not in runs:
                    runs.append(cand)
                break
    return runs


def _bulk(spec: FigureSpec, specs: dict[str, FigureSpec]) -> bool:
    """A per-point sub-result (e.g. each selection and fine-tune of a repair curve): nested two or more folders
    deep and one of several of its kind. Drawn only when its kind is asked for, not by default."""
    if spec.bulk is not None:
        return spec.bulk
    same = sum(1 for s in specs.values() if s.kind == spec.kind)
    return len(spec.sources) == 1 and spec.sources[0].count("/") >= 1 and same > 1


def _slug(rel: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", rel).strip("-") or "root"


def select(specs: dict[str, FigureSpec], kinds: Iterable[str] | None, run_dir: str | Path = "") -> dict[str, FigureSpec]:
    """The drawable specs matching ``kinds`` (figure names or result kinds); all drawable ones for None."""
    drawable = {n: s for n, s in specs.items() if not s.note}
    if not kinds:
        return {n: s for n, s in drawable.items() if not _bulk(s, drawable)}
    out: dict[str, FigureSpec] = {}
    for key in kinds:
        hits = {n: s for n, s in drawable.items() if s.matches(key)}
        if not hits:
            known = sorted(result_kinds())
            why = (f"this run folder holds no '{key}' result" if key in known
                   else f"'{key}' is neither a figure of this run folder nor a result kind")
            raise MechcliffError(
                f"unknown kind {key!r} for {run_dir}: {why}; it can draw: {', '.join(drawable) or 'nothing'} "
                "(`mechcliff plot RUN_DIR --kind` lists them)"
            )
        out.update(hits)
    return {n: out[n] for n in drawable if n in out}


# --------------------------------------------------------------------------- rendering


def render(run_dir: str | Path, kinds: Iterable[str] | None = None, *, style: Any = "paper",
           columns: int | None = None) -> dict[str, Any]:
    """The figures of ``run_dir`` (all, or those named by ``kinds``), restyled with
    :func:`mechcliff.plotting.apply_style` (``style=None`` keeps them as their ``plot()`` made them)."""
    from mechcliff.plotting import apply_style

    specs = select(available(run_dir), kinds, run_dir)
    figs = {}
    for name, spec in specs.items():
        fig = spec.build()
        figs[name] = fig if style is None else apply_style(fig, style, columns=columns)
    return figs


# --------------------------------------------------------------------------- export


def find_browser() -> str | None:
    """The Chrome / Chromium binary kaleido will use: ``$BROWSER_PATH``, ``/usr/bin/chromium``, then chromium,
    chromium-browser, google-chrome, google-chrome-stable, chrome on PATH, then kaleido's own download
    (``kaleido_get_chrome``). None if there is none (or ``$BROWSER_PATH`` is set but not an executable)."""
    env = os.environ.get("BROWSER_PATH")
    if env:
        return env if os.path.isfile(env) and os.access(env, os.X_OK) else None
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    for name in BROWSER_NAMES:
        path = shutil.which(name)
        if path:
            return path
    try:  # a browser downloaded by kaleido_get_chrome / plotly_get_chrome into choreographer's folder
        from choreographer.browsers.chromium import Chromium

        local = Chromium.find_browser(skip_local=False, skip_typical=True)
        if local and os.access(local, os.X_OK):
            return str(local)
    except Exception:  # noqa: BLE001 - best effort; no browser is reported below
        pass
    return None


@dataclasses.dataclass
class ExportReport:
    """What :func:`export` wrote."""

    out_dir: Path
    files: dict[str, list[Path]]  # figure name -> files written
    browser: str | None
    missing_browser: bool  # static formats were asked for but no browser was found (HTML written instead)
    seconds: float
    errors: dict[str, str] = dataclasses.field(default_factory=dict)  # figure name -> why it was not drawn

    @property
    def n_files(self) -> int:
        return sum(len(v) for v in self.files.values())


def parse_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    out = tuple(dict.fromkeys(f.strip().lower().lstrip(".") for f in items if f.strip()))
    bad = [f for f in out if f not in FORMATS]
    if bad or not out:
        raise MechcliffError(f"unknown format(s) {', '.join(bad) or '(none given)'}; formats: {', '.join(FORMATS)}")
    return out


def _write_html(fig: Any, path: Path) -> None:
    from mechcliff.files import atomic_write_text

    bundle = path.parent / "plotly.min.js"
    if not bundle.exists():  # shared by every HTML file of the folder: offline, without 4 MB per figure
        from plotly.offline import get_plotlyjs

        atomic_write_text(bundle, get_plotlyjs())
    atomic_write_text(path, fig.to_html(include_plotlyjs="directory", full_html=True, include_mathjax=False,
                                        config={"displaylogo": False}))


_MAGIC = {"pdf": b"%PDF", "png": b"\x89PNG\r\n\x1a\n", "svg": b"<svg"}


def _write_static(jobs: list[tuple[Any, Path, str, float]], browser: str) -> None:
    """Export ``(fig, path, format, scale)`` jobs in one kaleido batch (one browser), each file atomically."""
    import plotly.io as pio

    if not jobs:
        return
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=jobs[0][1].parent))
    old = os.environ.get("BROWSER_PATH")
    os.environ["BROWSER_PATH"] = browser
    try:
        tmp_paths = [tmp / f"{i}.{fmt}" for i, (_, _, fmt, _) in enumerate(jobs)]
        try:
            pio.write_images(
                [fig for fig, _, _, _ in jobs], tmp_paths, format=[fmt for _, _, fmt, _ in jobs],
                scale=[scale for *_, scale in jobs], width=[int(fig.layout.width) for fig, *_ in jobs],
                height=[int(fig.layout.height) for fig, *_ in jobs],
            )
        except Exception as exc:  # kaleido / browser failures: say which browser and how to check it
            raise MechcliffError(
                f"static export with the browser {browser} failed ({type(exc).__name__}: {str(exc).strip()[:300]}); "
                f"check that `{browser} --headless=new --version` runs, or point BROWSER_PATH at another "
                "Chrome/Chromium"
            ) from None
        for (_, path, fmt, _), t in zip(jobs, tmp_paths):
            head = t.read_bytes()[:256] if t.exists() else b""
            if not head or (_MAGIC[fmt] not in head):
                raise MechcliffError(f"static export wrote no valid {fmt.upper()} for {path.name} (browser {browser})")
            os.replace(t, path)
    finally:
        if old is None:
            os.environ.pop("BROWSER_PATH", None)
        else:
            os.environ["BROWSER_PATH"] = old
        shutil.rmtree(tmp, ignore_errors=True)


def export(figs: dict[str, Any], out_dir: str | Path, formats: str | Sequence[str] = ("pdf", "png"), *,
           style: Any = "paper", browser: str | None = None) -> ExportReport:
    """Write each figure of ``figs`` (name -> figure, already styled, e.g. by :func:`render`) as
    ``out_dir/<name>.<format>``. PDF and SVG are at the layout size (1 px = 1/96 in), PNG at the style's
    ``png_scale`` (300 dpi for ``paper``). Static formats go through kaleido in one batch; without a browser
    (``browser=None`` looks one up with :func:`find_browser`) the figures are written as HTML instead and
    ``missing_browser`` is set (the message to show is :func:`no_browser_message`)."""
    from mechcliff.plotting import get_style

    t0 = time.perf_counter()
    fmts = parse_formats(formats)
    st = get_style(style)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MechcliffError(f"cannot create the output folder {out}: {exc.strerror or exc}") from None
    static = [f for f in fmts if f in STATIC_FORMATS]
    browser = browser or (find_browser() if static else None)
    missing = bool(static) and browser is None
    html_wanted = "html" in fmts or missing
    files: dict[str, list[Path]] = {name: [] for name in figs}
    for name in figs:  # names of a folder of runs are "<run>/<figure>": one subfolder per run
        (out / name).parent.mkdir(parents=True, exist_ok=True)
    for name, fig in figs.items():
        if html_wanted:
            path = out / f"{name}.html"
            _write_html(fig, path)
            files[name].append(path)
    if static and browser is not None:
        named = [(name, (fig, out / f"{name}.{fmt}", fmt, st.png_scale if fmt == "png" else 1.0))
                 for name, fig in figs.items() for fmt in static]
        _write_static([job for _, job in named], browser)
        for name, (_, path, _, _) in named:
            files[name].append(path)
    for name in files:
        order = {f: i for i, f in enumerate(fmts)}
        files[name].sort(key=lambda p: order.get(p.suffix.lstrip("."), len(order)))
    return ExportReport(out, files, browser, missing, time.perf_counter() - t0)


def plot_run(run_dir: str | Path, kinds: Iterable[str] | None = None, *, formats: str | Sequence[str] = ("pdf", "png"),
             style: Any = "paper", out: str | Path | None = None, columns: int | None = None) -> ExportReport:
    """Re-render the figures of ``run_dir`` (all, or ``kinds``) from its saved results and export them to ``out``
    (default ``run_dir/figures/<style>``): what ``mechcliff plot`` does."""
    from mechcliff.plotting import apply_style, get_style

    t0 = time.perf_counter()
    st = get_style(style)
    fmts = parse_formats(formats)
    specs = select(available(run_dir), kinds, run_dir)
    figs: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name, spec in specs.items():
        try:
            figs[name] = apply_style(spec.build(), st, columns=columns)
        except MechcliffError as exc:
            errors[name] = str(exc)
        except Exception as exc:  # noqa: BLE001 - one broken result must not stop the other figures
            errors[name] = f"{type(exc).__name__}: {exc}"
    out_dir = Path(out) if out is not None else Path(run_dir) / "figures" / st.name
    report = export(figs, out_dir, fmts, style=st)
    report.errors = errors
    report.seconds = time.perf_counter() - t0
    return report
