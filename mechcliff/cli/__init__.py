"""The ``mechcliff`` command line: the same code as the Python API.

User errors (bad input, missing files) end in one line ``mechcliff: error: ...`` and exit status 2, without a
traceback; set ``MECHCLIFF_DEBUG=1`` to see the traceback.

One module per group of commands, each written the same way (``add_parsers(sub)`` adds its subcommands, thin
``cmd_*`` handlers call the public API and print, ``COMMANDS`` maps names to handlers); what they share is in
:mod:`mechcliff.cli.common`:

=================================  ==========================================================================
module                             commands
=================================  ==========================================================================
:mod:`mechcliff.cli.run`           ``run`` (the whole pipeline)
:mod:`mechcliff.cli.judge`         ``judge``, ``agree``
:mod:`mechcliff.cli.check`         ``check`` (conformance report of a model)
:mod:`mechcliff.cli.repair`        ``select``, ``repair``, ``repair-curve`` (Cliff-as-a-Judge)
:mod:`mechcliff.cli.plot`          ``plot`` (re-render figures, no model)
:mod:`mechcliff.cli.organism`      ``organism-train``
:mod:`mechcliff.cli.rim`           ``compare-modes``, ``refusal-heads``, ``neurons``, ``ras`` (arXiv 2509.00544)
:mod:`mechcliff.cli.cot`           ``safety-layers``, ``spectral`` (arXiv 2602.04856)
:mod:`mechcliff.cli.tools`         ``patch``, ``sweep``, ``ships`` (on a finished run folder)
:mod:`mechcliff.cli.rollouts`      ``import-rollouts`` (rollouts generated elsewhere, for ``run --rollouts``)
=================================  ==========================================================================

Nothing outside this package imports it: the command line sits on top of the library.
"""

from __future__ import annotations

import argparse
import os
import sys

from mechcliff.cli import check, cot, export, judge, organism, plot, repair, rim, rollouts, run, tools
from mechcliff.cli.common import Handler, add_placement_flags, placement
from mechcliff.cli.cot import parse_layers, parse_size
from mechcliff.cli.run import RUN_FLAGS
from mechcliff.errors import MechcliffError
from mechcliff.fmt import fmt

__all__ = ["main", "NO_MODEL_COMMANDS", "RUN_FLAGS", "fmt", "parse_layers", "parse_size"]

#: The command modules, in the order their commands are listed by ``mechcliff --help``.
GROUPS = (run, judge, check, repair, plot, organism, rim, cot, tools, export, rollouts)

# Commands that never load a model (no --no-check); every other command loads one through load_model.
NO_MODEL_COMMANDS = ("agree", "select", "plot", "import-rollouts")


def _version_line() -> str:
    from mechcliff.versions import installed_versions

    v = installed_versions()
    return (f"mechcliff {v['mechcliff']} (transformer-lens {v['transformer-lens']}, transformers {v['transformers']}, "
            f"torch {v['torch']}, python {v['python']})")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mechcliff",
        description="Mechanistic interpretability of the refusal cliff in reasoning language models.",
    )
    p.add_argument("--version", action="version", version=_version_line())
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for group in GROUPS:
        group.add_parsers(sub)
    for name, command in sub.choices.items():
        if name not in NO_MODEL_COMMANDS:
            command.add_argument("--no-check", action="store_true",
                                 help="load the model even if a conformance check fails (recorded in the manifest)")
            add_placement_flags(command)  # --device, --dtype, --device-map (run has them already)
    return p


def _commands() -> dict[str, Handler]:
    return {name: handler for group in GROUPS for name, handler in group.COMMANDS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    no_check = getattr(args, "no_check", False)
    before = os.environ.get("MECHCLIFF_NO_CHECK")
    if no_check:
        os.environ["MECHCLIFF_NO_CHECK"] = "1"  # every load_model of this command skips the conformance check
    try:
        given = {k: v for k, v in placement(args).items() if v is not None}
        if not given:
            return _commands()[args.command](args)
        from mechcliff.model.loading import default_placement

        with default_placement(**given):  # --device / --dtype / --device-map reach every load_model of the command
            return _commands()[args.command](args)
    except MechcliffError as exc:
        if os.environ.get("MECHCLIFF_DEBUG"):
            raise
        print(f"mechcliff: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mechcliff: interrupted; finished stages are kept, re-run the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`mechcliff plot --kind | head`): stop quietly, as cat does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush does not fail again
        return 0
    finally:
        if no_check:  # main() may be called in-process (tests, notebooks): leave the environment as it was
            if before is None:
                os.environ.pop("MECHCLIFF_NO_CHECK", None)
            else:
                os.environ["MECHCLIFF_NO_CHECK"] = before
