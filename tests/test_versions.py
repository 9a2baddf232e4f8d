"""The lock and the version report: what the suite passed with, and whether the installed versions are those."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mechcliff import versions

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


def test_the_lock_pins_every_direct_dependency_and_is_what_make_and_ci_read():
    tested = versions.tested_versions()
    for pkg in versions.DIRECT:
        assert re.fullmatch(r"\d+(\.\d+)*", tested[pkg]), (pkg, tested.get(pkg))
    assert tested["torch"] == "2.13.0"  # the local CPU wheel, without pip freeze's "+cpu"
    assert (ROOT / "constraints.txt").resolve() == versions.LOCK
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_the_lock_agrees_with_the_pyproject_ranges():
    """A lock outside the ranges users install from would test something users can't get."""
    from packaging.requirements import Requirement

    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        pytest.skip("tomllib needs Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    tested = versions.tested_versions()
    for line in project["dependencies"] + project["optional-dependencies"]["test"]:
        req = Requirement(line)
        name = versions._norm(req.name)
        assert name in tested, f"{name} is not in the lock"
        assert req.specifier.contains(tested[name], prereleases=True), (name, str(req.specifier), tested[name])


def test_untested_lists_only_packages_that_differ(monkeypatch):
    import importlib.metadata as md

    real = dict(versions.tested_versions())
    monkeypatch.setattr(versions, "tested_versions", lambda: {**real, "numpy": "0.0.1"})
    diff = versions.untested()
    assert diff["numpy"] == {"installed": md.version("numpy"), "tested": "0.0.1"}
    assert "numpy" in versions.untested_summary() and "(tested: 0.0.1)" in versions.untested_summary()
    report = versions.environment_report()
    assert report["tested"] is False and "numpy" in report["untested"]


def test_local_build_tags_are_not_other_releases():
    assert versions._public("2.13.0+cpu") == versions._public("2.13.0")


def test_environment_report_names_the_versions_in_use():
    report = versions.environment_report()
    assert set(versions.DIRECT) <= set(report["versions"]) and report["versions"]["python"]
    assert report["lock"] == str(versions.LOCK)
    assert report["tested"] == (not versions.untested())


@pytest.mark.unit
def test_the_package_version_is_written_once_and_matches_pyproject():
    import re
    from pathlib import Path

    import mechcliff
    from mechcliff.versions import __version__

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert mechcliff.__version__ == __version__ == re.search(r'(?m)^version = "([^"]+)"', pyproject).group(1)
