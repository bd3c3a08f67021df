"""How every command talks to its user: argparse errors as one line (command_line.py), and how a command ends,
a one-line `error: ...` and an exit status, the traceback only with --debug (exits.py), and the process's glibc
malloc settings, applied first by run_command (allocator.py). Imports nothing from the package: the bottom
layer, usable by every command."""

from .command_line import OneLineErrorParser
from .exits import DEBUG_ENV, add_debug_flag, debug_requested, one_line, run_command

__all__ = ["DEBUG_ENV", "OneLineErrorParser", "add_debug_flag", "debug_requested", "one_line", "run_command"]
