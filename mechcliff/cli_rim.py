"""Moved: the ``compare-modes``, ``refusal-heads``, ``neurons`` and ``ras`` commands live in :mod:`mechcliff.cli.rim`
(shared helpers in :mod:`mechcliff.cli.common`). This module re-exports their names for old imports."""

from mechcliff.cli.common import load as _load
from mechcliff.cli.common import log as _log
from mechcliff.cli.common import write_result as _write
from mechcliff.cli.common import write_summary as _summary
from mechcliff.cli.rim import COMMANDS, _common, _fmt, _gen, _prompts, add_parsers
from mechcliff.cli.rim import cmd_compare_modes as compare_modes_cmd
from mechcliff.cli.rim import cmd_neurons as neurons_cmd
from mechcliff.cli.rim import cmd_ras as ras_cmd
from mechcliff.cli.rim import cmd_refusal_heads as refusal_heads_cmd

__all__ = ["COMMANDS", "add_parsers", "compare_modes_cmd", "refusal_heads_cmd", "neurons_cmd", "ras_cmd",
           "_common", "_fmt", "_gen", "_load", "_log", "_prompts", "_summary", "_write"]
