"""How every command ends: a one-line `error: ...` and an exit status, the traceback only with --debug."""

from .exits import DEBUG_ENV, add_debug_flag, debug_requested, one_line, run_command

__all__ = ["DEBUG_ENV", "add_debug_flag", "debug_requested", "one_line", "run_command"]
