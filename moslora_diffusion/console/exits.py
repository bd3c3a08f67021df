"""The one way our commands (train_dreambooth.py, app.py, python -m moslora_diffusion.{generate,export,tiny})
turn a failure into what a user reads.

- Bad input and refusals (every error class of ours is a ValueError; files, disks, permissions and the hub
  raise OSError; a missing optional package ImportError): `error: <message>` on one line, exit status 2.
- Out of memory: one line with what to change, exit status 1.
- Ctrl-C: `interrupted` (or what the interruption says, e.g. how to resume), exit status 130 (the shell's
  convention for SIGINT), or the interruption's own `exit_status` (a trainer stopped by SIGTERM: 143).
- An error class with an `exit_status` attribute: `error: <message>` with that status.
- Anything else is a bug: one line naming the exception, exit status 1, and how to see the traceback.
- Our own warnings (raised from a file of this package) print as `warning: <message>` on one line, not as Python's
  `path:line: UserWarning: ...` with a source line under it; other libraries' warnings are left as they are.
`--debug` on any command (or MOSLORA_DEBUG=1) lets the exception through with its full traceback.
Imports nothing from the package, so every layer's command can use it.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from .allocator import tune_allocator

DEBUG_FLAG = "--debug"
DEBUG_ENV = "MOSLORA_DEBUG"
INPUT_ERROR, FAILURE, INTERRUPTED = 2, 1, 130
_DEBUG_HINT = f"run again with {DEBUG_FLAG} (or {DEBUG_ENV}=1) for the traceback"
PACKAGE_DIR = str(Path(__file__).resolve().parents[1])


def _format_warning(message, category, filename, lineno, line=None, _python=warnings.formatwarning) -> str:
    if str(filename).startswith(PACKAGE_DIR):
        return f"warning: {one_line(message if isinstance(message, Warning) else Warning(message))}\n"
    return _python(message, category, filename, lineno, line)


def add_debug_flag(parser) -> None:
    """Lists --debug in a command's --help (run_command takes it off the arguments before parsing)."""
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help=f"show the full traceback of an error (also: {DEBUG_ENV}=1)")


def debug_requested(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(err: BaseException) -> str:
    """The exception's message on one line (library messages often span several)."""
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"  # torch's, without torch


def _report(err: BaseException) -> tuple[str, int]:
    if isinstance(err, KeyboardInterrupt):  # a message, when there is one, says what was saved and how to resume
        return (one_line(err) if str(err) else "interrupted"), getattr(err, "exit_status", INTERRUPTED)
    if _is_out_of_memory(err):
        return (f"error: out of memory ({one_line(err)[:300]}); use a smaller batch or resolution, or half "
                "precision (training: --gradient_checkpointing, --mixed_precision fp16 or bf16)"), FAILURE
    if isinstance(err, (ValueError, OSError, ImportError)):
        return f"error: {one_line(err)}", INPUT_ERROR
    if getattr(err, "exit_status", None) is not None:  # an outcome of ours with its own status (a diverged run)
        return f"error: {one_line(err)}", err.exit_status
    return f"error: unexpected {type(err).__name__}: {one_line(err)[:500]} (a bug; {_DEBUG_HINT})", FAILURE


def run_command(body: Callable[[list[str]], object], argv: list[str] | None = None) -> int:
    """Applies the process's allocator settings (console/allocator.py), then runs body(argv), argv without
    --debug; returns 0 when it returns.

    On an exception prints one line to stderr and raises SystemExit with the status above; with --debug or
    MOSLORA_DEBUG=1 the exception propagates unchanged (Python prints the traceback). SystemExit (argparse's
    usage errors, exit status 2) passes through.
    """
    tune_allocator()  # before the command does anything: the process's own allocator settings (allocator.py)
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    python_format = warnings.formatwarning
    if not debug:
        warnings.formatwarning = _format_warning
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    try:
        body(argv)
    except (Exception, KeyboardInterrupt) as err:
        if debug:
            raise
        message, status = _report(err)
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(status) from None
    finally:
        warnings.formatwarning = python_format
    return 0
