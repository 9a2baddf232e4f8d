"""Moved: the ``safety-layers`` and ``spectral`` commands (and the parsing of their ``--layers`` / ``--size`` flags,
formerly in :mod:`mechcliff.spectral`) live in :mod:`mechcliff.cli.cot`. This module re-exports their names for old
imports."""

from mechcliff.cli.cot import COMMANDS, _common, add_parsers, parse_layers, parse_size
from mechcliff.cli.cot import cmd_safety_layers as _safety_layers
from mechcliff.cli.cot import cmd_spectral as _spectral

__all__ = ["COMMANDS", "add_parsers", "parse_layers", "parse_size", "_common", "_safety_layers", "_spectral"]
