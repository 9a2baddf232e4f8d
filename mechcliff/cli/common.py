"""What the command modules share: progress messages, the model flag and loading, comma-separated number flags, and
writing a command's outputs (saved result, HTML page, ``summary.json``) and printing where they went.

Every command module of :mod:`mechcliff.cli` follows one pattern: ``add_parsers(sub)`` adds its subcommands to the
``mechcliff`` parser, thin ``cmd_*`` handlers call the public API and print, and ``COMMANDS`` maps each command name
to its handler. Heavy modules (torch, transformers, the analyses) are imported inside the handlers, so that
``mechcliff --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from mechcliff.errors import MechcliffError

#: A command: parsed arguments in, exit status out.
Handler = Callable[[argparse.Namespace], int]

MODEL_HELP = "'organism' (default), 'smollm2-135m-instruct', a local HF folder, a .gguf file or a hub id"


def log(msg: str) -> None:
    """A progress message, on stderr (stdout holds the results)."""
    print(msg, file=sys.stderr)


def add_model_flag(p: argparse.ArgumentParser) -> None:
    """``--model SPEC`` (default ``organism``), as the analysis commands take it."""
    p.add_argument("--model", default="organism", help=MODEL_HELP)


def parse_device_map(text: str) -> Any:
    """``--device-map``: ``auto`` (or another name / a device), or a JSON object (module -> device, or device ->
    memory budget)."""
    text = text.strip()
    if not text.startswith("{"):
        return text
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("a device map is 'auto', a device or a JSON object")
    return value


#: The placement flags of every command that loads a model: flag -> (dest, type, help).
PLACEMENT_FLAGS: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "--device": ("device", str, "torch device of the model: cpu (default), cuda, cuda:1, mps ..."),
    "--dtype": ("dtype", str, "dtype of the weights: float32 (default), bfloat16 or float16"),
    "--device-map": ("device_map", parse_device_map, "place the model on several devices or offload it "
                     "(accelerate): auto, or JSON: {\"model.layers.3\": \"disk\", ...} or {\"0\": \"20GiB\", "
                     "\"cpu\": \"64GiB\"}"),
}


def add_placement_flags(p: argparse.ArgumentParser) -> None:
    """``--device``, ``--dtype``, ``--device-map`` (those ``p`` does not have yet)."""
    for flag, (dest, kind, text) in PLACEMENT_FLAGS.items():
        if flag not in p._option_string_actions:
            p.add_argument(flag, dest=dest, type=kind, default=None, help=text)


def placement(args: argparse.Namespace) -> dict[str, Any]:
    """The placement flags given on the command line, as keyword arguments of
    :func:`mechcliff.model.loading.default_placement`."""
    return {dest: getattr(args, dest, None) for dest, _, _ in PLACEMENT_FLAGS.values()}


def load(spec: str, **kwargs: Any) -> Any:
    """:func:`~mechcliff.model.loading.load_model`, saying so on stderr first."""
    from mechcliff.model.loading import load_model

    log(f"loading model '{spec}' ...")
    return load_model(spec, **kwargs)


def numbers(text: str, kind: type, flag: str) -> list:
    """A comma-separated list of numbers of type ``kind`` given to ``flag``; a one-line error otherwise."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise MechcliffError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise MechcliffError(f"{flag} is empty")
    return values


def write_result(out: Path, name: str, result: Any, title: str, sections: list[tuple[str, Any]],
                 notes: list[str] | None = None) -> tuple[Path, Path]:
    """Save ``result`` to ``out/name`` and write the page ``out/name.html`` (its summary table and ``sections``)."""
    from mechcliff.report import write_report

    rdir = result.save(out / name)
    html = out / f"{name}.html"
    write_report(html, title=title, summary_rows=result.summary_rows(), sections=sections, notes=notes)
    return rdir, html


def write_summary(out: Path, doc: dict[str, Any]) -> Path:
    """Write ``out/summary.json`` (atomically; NaN is not allowed, numpy values become plain JSON)."""
    from mechcliff.files import atomic_write_text
    from mechcliff.results import _jsonable

    path = out / "summary.json"
    atomic_write_text(path, json.dumps(_jsonable(doc), indent=1, allow_nan=False))
    return path


def done(paths: list[tuple[str, Path]], t0: float) -> int:
    """Print ``label: path`` for every output and the time since ``t0``; the exit status 0."""
    for label, p in paths:
        print(f"{label}: {p.resolve()}")
    print(f"done in {time.time() - t0:.1f} s")
    return 0
