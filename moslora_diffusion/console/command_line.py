"""Command-line errors as one line, for every command (train_dreambooth.py, generate, export, app.py)."""

from __future__ import annotations

import argparse


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose errors (unknown flag, a word where a number goes...) are one `error: ...` line on stderr
    with exit status 2, like every other input error of the commands, instead of the usage text plus the error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (--help lists the options)\n")
