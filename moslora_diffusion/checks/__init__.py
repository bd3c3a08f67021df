"""Checks of what users give every entry point (commands, config files, the app, the Python API): number
ranges (ranges.py) and one-line command-line errors (command_line.py). Imports nothing from the package:
the bottom layer, usable by every other one."""

from .command_line import OneLineErrorParser
from .ranges import MAX_SEED, SCALE, SCALE_MAX, SCALE_MIN, Range, as_number, check_number, number_problems

__all__ = ["MAX_SEED", "SCALE", "SCALE_MAX", "SCALE_MIN", "OneLineErrorParser", "Range", "as_number", "check_number",
           "number_problems"]
