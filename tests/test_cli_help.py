"""Every command's --help renders (a stray '%' in a help string crashes argparse only when help is shown)."""

from __future__ import annotations

import pytest

from mechcliff.cli import _parser, main


def _commands() -> list[str]:
    sub = next(a for a in _parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted(sub.choices)


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("run", "plot", "select", "repair", "repair-curve"):
        assert cmd in out


@pytest.mark.parametrize("command", _commands())
def test_command_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: mechcliff " + command in capsys.readouterr().out
