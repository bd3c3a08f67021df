"""Number ranges: every number a user gives is finite and where it may lie, checked before anything loads.

Each entry point (train flags and config files, the generate and export commands, the app's
requests, the Python API) declares its numeric inputs once, as a table {name: Range}, and checks them
with one call to `number_problems` before anything is loaded or written. A value must be a finite
number inside its range: nan and inf are always refused (`--learning_rate inf` must never train).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

# The adapter scale s of y = W x + s * (alpha / r) * B M A x: the range of the app's slider, and the same limit
# for the commands' PATH:SCALE and the Python API, so no entry point accepts what another refuses.
# -1 subtracts what the adapter learned; 2 doubles it.
SCALE_MIN, SCALE_MAX = -1.0, 2.0
MAX_SEED = 2**32 - 1  # numpy (and accelerate's set_seed) take 32-bit seeds


@dataclass(frozen=True)
class Range:
    """Where one number may lie. Bounds are inclusive unless open_*; None: unbounded on that side.

    integer: a whole number (2.0 counts); multiple_of: divisible by it; optional: None is allowed
    (a setting not given); label: how messages name the value (default: the caller's label).
    """

    lower: float | None = None
    upper: float | None = None
    open_lower: bool = False
    open_upper: bool = False
    integer: bool = False
    multiple_of: int | None = None
    optional: bool = False
    label: str | None = None

    def bounds(self) -> str:
        """'> 0', '>= 0', 'between 1 and 150', 'in [0, 1)', or '' when unbounded."""
        lo, hi = _text(self.lower), _text(self.upper)
        if lo is not None and hi is not None:
            if not (self.open_lower or self.open_upper):
                return f"between {lo} and {hi}"
            return f"in {'(' if self.open_lower else '['}{lo}, {hi}{')' if self.open_upper else ']'}"
        if lo is not None:
            return f"{'>' if self.open_lower else '>='} {lo}"
        if hi is not None:
            return f"{'<' if self.open_upper else '<='} {hi}"
        return ""

    def _inside(self, x: float) -> bool:
        lo, hi = self.lower, self.upper
        return ((lo is None or (x > lo if self.open_lower else x >= lo))
                and (hi is None or (x < hi if self.open_upper else x <= hi))
                and (self.multiple_of is None or x % self.multiple_of == 0))

    def problem(self, label: str, value) -> str | None:
        """What is wrong with `value` in one sentence, or None when it is allowed."""
        label = self.label or label
        if value is None and self.optional:
            return None
        number = as_number(value)
        kind = "a whole number" if self.integer else "a number"
        if number is None:
            return f"{label} must be {kind}, got {value!r}"
        bounds = self.bounds()
        if isinstance(number, float) and not math.isfinite(number):
            return f"{label} must be a finite number{' ' + bounds if bounds else ''}, got {value}"
        if self.integer and number != int(number):
            return f"{label} must be a whole number, got {value!r}"
        if not self._inside(number):
            multiple = f"a multiple of {self.multiple_of} " if self.multiple_of else ""
            return f"{label} must be {multiple}{bounds}".rstrip() + f", got {value!r}"
        return None

    def clean(self, value):
        """An allowed value as int (integer ranges) or float; None stays None."""
        if value is None:
            return None
        number = as_number(value)
        return int(number) if self.integer else float(number)


def _text(bound: float | None) -> str | None:
    return None if bound is None else str(bound) if isinstance(bound, int) else f"{bound:g}"


def as_number(value) -> int | float | None:
    """An int or float from a number, a numeric string (a widget or command line) or a 0-d array;
    None for anything else (bools included: True is no rank)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return value
    try:
        return float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, AttributeError):
        return None


def number_problems(values: Mapping[str, object], table: Mapping[str, Range], label: str = "{}") -> list[str]:
    """One sentence per value of `values` outside its Range in `table` (every name of the table is read).

    label: how a name appears in messages, e.g. "--{}" for command-line flags.
    """
    found = (rng.problem(label.format(name), values[name]) for name, rng in table.items())
    return [problem for problem in found if problem]


def check_number(label: str, value, rng: Range, error: type[Exception] = ValueError):
    """The cleaned value (int or float) when it lies in `rng`; raises `error` naming the problem otherwise."""
    problem = rng.problem(label, value)
    if problem:
        raise error(problem)
    return rng.clean(value)


SCALE = Range(SCALE_MIN, SCALE_MAX)
