"""The package versions in use, and whether they are the ones the test suite passed with.

The lock (``mechcliff/resources/constraints.txt``; the repository's ``constraints.txt`` points at it) pins every
package of the environment the whole suite passed in; ``make setup`` and CI install from it. A user's own
environment may differ: :func:`environment_report` says how, and every run manifest and ``mechcliff check`` carry
it, so a number measured with untested versions is never mistaken for a tested one.
"""

from __future__ import annotations

import importlib.metadata as md
import platform
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

#: mechcliff's own version (pyproject.toml's ``version``; ``mechcliff.__version__`` is this).
__version__ = "0.1.0"

LOCK = Path(__file__).resolve().parent / "resources" / "constraints.txt"
# mechcliff's direct dependencies (pyproject.toml), reported by name in every manifest.
DIRECT = ("torch", "transformer-lens", "transformers", "numpy", "scikit-learn", "plotly", "safetensors", "jaxtyping",
          "tqdm", "pandas", "gguf", "peft", "kaleido")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _public(version: str) -> str:
    """``2.13.0+cpu`` -> ``2.13.0``: a local build tag is not another release."""
    return version.split("+", 1)[0]


@lru_cache(maxsize=1)
def tested_versions() -> dict[str, str]:
    """``{package: version}`` from the lock (empty when the lock is not shipped)."""
    if not LOCK.exists():
        return {}
    out = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[_norm(name.split("[", 1)[0])] = version.strip().split(";", 1)[0].strip()
    return out


def installed_versions() -> dict[str, str]:
    """Python, mechcliff and its direct dependencies, as installed."""
    out = {"python": platform.python_version()}
    for pkg in ("mechcliff", *DIRECT):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def untested() -> dict[str, dict[str, str]]:
    """Installed packages whose version differs from the lock: ``{name: {"installed": v, "tested": v}}``."""
    tested = tested_versions()
    out = {}
    for dist in md.distributions():
        name = _norm(dist.metadata["Name"] or "")
        if name in tested and _public(dist.version) != _public(tested[name]):
            out[name] = {"installed": dist.version, "tested": tested[name]}
    return dict(sorted(out.items()))


def environment_report() -> dict[str, Any]:
    """For manifests: the versions in use, whether all of them are the tested ones, and those that are not."""
    diff = untested()
    return {"versions": installed_versions(), "tested": bool(tested_versions()) and not diff, "untested": diff,
            "lock": str(LOCK) if LOCK.exists() else None}


def untested_summary(limit: int = 6) -> str:
    """One line naming the packages that differ from the lock ("" when all are the tested ones)."""
    if not tested_versions():
        return "the tested-versions lock is not installed with this copy of mechcliff"
    diff = untested()
    if not diff:
        return ""
    first = sorted(diff.items(), key=lambda kv: (kv[0] not in DIRECT, kv[0]))[:limit]
    more = f" and {len(diff) - limit} more" if len(diff) > limit else ""
    items = ", ".join(f"{n} {v['installed']} (tested: {v['tested']})" for n, v in first)
    return f"untested package versions: {items}{more}"


def manifest_environment() -> dict[str, Any]:
    """For run manifests: whether every installed package is the tested (locked) version, and those that are not."""
    diff = untested()
    return {"tested_versions": bool(tested_versions()) and not diff, "untested": diff}
