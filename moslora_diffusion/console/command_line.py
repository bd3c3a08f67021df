"""Command-line parsing for every command (train_dreambooth.py, generate, evaluate, export, app.py, mole): errors as
one line, a "did you mean" for a mistyped or other tool's flag, and the defaults in --help."""

from __future__ import annotations

import argparse
import difflib

_UNKNOWN = "unrecognized arguments: "


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
            match = alias if alias in known else next(iter(difflib.get_close_matches(flag, known, n=1, cutoff=0.75)),
                                                      None)
            if match:
                hints.append(f"{flag}: did you mean {match}?")
        return "; " + "; ".join(hints) if hints else ""
