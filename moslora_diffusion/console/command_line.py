"""Command-line parsing for every command (train_dreambooth.py, generate, evaluate, export, app.py, mole): errors as
one line, a "did you mean" for a mistyped or other tool's flag, and the defaults in --help."""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Iterable

_UNKNOWN = "unrecognized arguments: "


def _words(name: str) -> set[str]:
    return set(re.split(r"[-_]+", name.lstrip("-"))) - {""}


def closest_name(name: str, known: Iterable[str], cutoff: float = 0.75) -> str | None:
    """The known name a mistyped `name` most likely meant, or None.

    A name holding every word of the typo wins over a merely similar spelling: `--max_steps` means
    `--max_train_steps`, though `--max_timestep` is closer letter by letter. A one-word typo must name one such
    flag alone (`--prompt` could be any of three), else the closest spelling counts, as difflib measures it."""
    known = sorted(set(known))
    words = _words(name)
    holding = [k for k in known if words and words <= _words(k) and k != name]
    if len(holding) == 1 or (len(words) > 1 and holding):
        return max(holding, key=lambda k: difflib.SequenceMatcher(None, name, k).ratio())
    return next(iter(difflib.get_close_matches(name, known, n=1, cutoff=cutoff)), None)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to a flag's help when it has a default worth saying (not None, False or empty) and
    its help does not already speak of it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, argparse.SUPPRESS) or default == [] or default == ""
                or not action.option_strings):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {str(shown).replace('%', '%%')})"


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose errors (unknown flag, a word where a number goes...) are one `error: ...` line on stderr
    with exit status 2, like every other input error of the commands, instead of the usage text plus the error.

    An unknown flag gets "did you mean --x?": from `aliases` ({other tool's flag: ours}, e.g. kohya's names) or
    the closest of this parser's own flags."""

    aliases: dict[str, str] = {}

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {message}{self._suggestions(message)} (--help lists the options)\n")

    def _suggestions(self, message: str) -> str:
        if not message.startswith(_UNKNOWN):
            return ""
        known = [option for action in self._actions for option in action.option_strings if option.startswith("--")]
        hints = []
        for word in message[len(_UNKNOWN):].split():
            flag = word.split("=", 1)[0]
            if not flag.startswith("--"):
                continue
            alias = self.aliases.get(flag)
            match = alias if alias in known else closest_name(flag, known)
            if match:
                hints.append(f"{flag}: did you mean {match}?")
        return "; " + "; ".join(hints) if hints else ""
