"""Every command's --help renders (a stray '%' in a help string crashes argparse only when help is shown)."""

from __future__ import annotations

import pytest

from mechcliff.cli import _parser, main

pytestmark = pytest.mark.unit


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


def test_every_option_of_every_command_has_help():
    import argparse

    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {a.option_strings or a.dest}" for name, sp in sub.choices.items() for a in sp._actions
               if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not missing, missing


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("mechcliff 0.") and "transformers" in out and "transformer-lens" in out


def test_run_flags_and_print_config(capsys):
    import json

    assert main(["run", "--print-config", "--gamma", "0.5", "--top-k", "2", "--mode", "scale_q", "--batch-size", "4",
                 "--max-think-tokens", "12", "--probe-layer", "2", "--n-per-group", "5"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["ablation_gamma"], cfg["ablation_top_k"], cfg["ablation_mode"], cfg["batch_size"],
            cfg["max_think_tokens"], cfg["probe_layer"], cfg["n_per_group"]) == (0.5, 2, "scale_q", 4, 12, 2, 5)
    assert cfg["model"] == "organism" and cfg["ablation_top_k"] == 2  # the organism's default (3) overridden


@pytest.mark.parametrize("argv, flag", [(["--batch-size", "0"], "--batch-size"), (["--mode", "sideways"], "--mode"),
                                        (["--n-per-group", "0"], "--n-per-group"),
                                        (["--mode", "zero", "--gamma", "0.5"], "--gamma")])
def test_run_flag_errors_name_the_flag(argv, flag, capsys):
    assert main(["run", "--print-config", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mechcliff: error:") and flag in err and "option '" not in err, err


def test_run_needs_out_unless_printing_the_config(capsys):
    assert main(["run"]) == 2
    assert "needs --out DIR" in capsys.readouterr().err


def test_same_option_names_across_commands():
    """--n-per-group and --harmful / --harmless wherever a command takes them (older spellings still work)."""
    import argparse

    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, sp in sub.choices.items():
        opts = {o for a in sp._actions for o in a.option_strings}
        for a in sp._actions:
            if (a.help or "").startswith("use at most"):  # "use at most N prompts per group"
                assert "--n-per-group" in a.option_strings, (name, a.option_strings)
        if "--safe" in opts or "--unsafe" in opts:
            assert {"--harmless", "--harmful"} <= opts, name
