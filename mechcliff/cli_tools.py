"""Moved: the ``patch``, ``sweep`` and ``ships`` commands live in :mod:`mechcliff.cli.tools` (shared helpers in
:mod:`mechcliff.cli.common`). This module re-exports their names for old imports."""

from mechcliff.cli.common import done as _done
from mechcliff.cli.common import log as _log
from mechcliff.cli.common import numbers as _numbers
from mechcliff.cli.tools import COMMANDS, add_parsers
from mechcliff.cli.tools import RunFolder as _RunFolder
from mechcliff.cli.tools import _outputs as _write
from mechcliff.cli.tools import cmd_patch as patch_cmd
from mechcliff.cli.tools import cmd_ships as ships_cmd
from mechcliff.cli.tools import cmd_sweep as sweep_cmd

__all__ = ["COMMANDS", "add_parsers", "patch_cmd", "sweep_cmd", "ships_cmd",
           "_RunFolder", "_done", "_log", "_numbers", "_write"]
