"""Checks of the numbers users give every entry point (commands, config files, the app, the Python API): one
range table per entry point (ranges.py). Imports nothing from the package: the bottom layer, usable by every
other one. How commands report what fails these checks is console/."""

from .ranges import MAX_SEED, SCALE, SCALE_MAX, SCALE_MIN, Range, as_number, check_number, number_problems

__all__ = ["MAX_SEED", "SCALE", "SCALE_MAX", "SCALE_MIN", "Range", "as_number", "check_number", "number_problems"]
