"""Shell blocks of the docs checked against the real argument parsers (tests/test_docs.py).

Each command a block runs is split off (`\\` continuations joined, `&&`, `;`, `|` split, env assignments and
comments dropped). The project's commands (`python train_dreambooth.py`, `python app.py`,
`python -m moslora_diffusion.X` and `benchmarks.X`, the installed `moslora-*` scripts, `accelerate launch` /
`torchrun` of a script) are run exactly as Python would run them (runpy) up to their first `parse_args` call,
which hands over the parser instead of parsing: so the parser is the command's own, however it is built, and
nothing else of the command runs. The block's arguments are then parsed with it: an unknown flag, a refused
value or a missing required flag is a problem. `bash scripts/x.sh` must name an existing file. `...` in a
command stands for flags left out (required flags are then not required). Other commands are not checked.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import re
import runpy
import shlex
import sys
import warnings
from pathlib import Path

import tomllib
from docs_markdown import Block

SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh"}
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_OPERATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;"}
_REDIRECT = re.compile(r"^\d*(>>?|<)&?$")
_OURS = ("moslora_diffusion", "benchmarks")
_PYTHONS = re.compile(r"^(?:.*/)?python(?:3(?:\.\d+)?)?$")


class _ParserReached(BaseException):  # not an Exception: the commands' own `except Exception` must not catch it
    def __init__(self, parser: argparse.ArgumentParser, args):
        super().__init__("parser reached")
        self.parser, self.given = parser, args


def shell_commands(block: Block) -> list[tuple[int, list[str]]]:
    """(line offset in the block, argv) of every simple command; raises ValueError on unbalanced quotes."""
    lines = block.text.splitlines()
    if block.lang == "console":  # a transcript: only `$ ` lines are commands
        lines = [line[2:] if line.startswith("$ ") else "" for line in lines]
    commands, i = [], 0
    while i < len(lines):
        start, joined = i, lines[i]
        while joined.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            joined = joined.rstrip()[:-1] + " " + lines[i]
        i += 1
        lexer = shlex.shlex(joined, posix=True, punctuation_chars=";&|()<>")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        tokens, current, skip_next = list(lexer), [], False
        for token in tokens + [";"]:
            if skip_next:
                skip_next = False
            elif token in _OPERATORS:
                if current:
                    commands.append((start, current))
                current = []
            elif _REDIRECT.match(token):
                skip_next = True
                if current and current[-1].isdigit():  # `2> file`: the lexer splits the descriptor off
                    current.pop()
            else:
                current.append(token)
    return commands


def _console_scripts(repo: Path) -> dict[str, str]:
    project = tomllib.loads((repo / "pyproject.toml").read_text(encoding="utf-8")).get("project", {})
    return dict(project.get("scripts", {}))


def _target(argv: list[str], repo: Path) -> tuple[str, str, list[str]] | None:
    """(kind, what, arguments) of a command of ours: kind `module`, `script`, `entry` or `shell`; None otherwise."""
    while argv and _ASSIGNMENT.match(argv[0]):
        argv = argv[1:]
    if not argv:
        return None
    head, rest = argv[0], argv[1:]
    if head in ("accelerate", "torchrun"):
        scripts = [k for k, arg in enumerate(rest) if arg.endswith(".py")]
        return ("script", rest[scripts[0]], rest[scripts[0] + 1:]) if scripts else None
    if head in ("bash", "sh"):
        scripts = [arg for arg in rest if not arg.startswith("-")]
        return ("shell", scripts[0], []) if scripts else None
    if head in _console_scripts(repo):
        return "entry", _console_scripts(repo)[head], rest
    if not _PYTHONS.match(head):
        return None
    while rest and rest[0].startswith("-") and rest[0] not in ("-m", "-c"):
        rest = rest[1:]
    if not rest or rest[0] == "-c":
        return None
    if rest[0] == "-m":
        if len(rest) < 2 or not rest[1].startswith(_OURS):
            return None
        return "module", rest[1], rest[2:]
    return ("script", rest[0], rest[1:]) if rest[0].endswith(".py") else None


def _without_config(args: list[str]) -> list[str]:
    """The arguments less `--config FILE` (read before the parser by some commands; the file need not exist
    here) and `...`."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--config":
            skip = True
        elif not arg.startswith("--config=") and arg != "...":
            out.append(arg)
    return out


def capture_parser(kind: str, what: str, args: list[str], repo: Path) -> tuple[argparse.ArgumentParser, int]:
    """Runs the command as Python would, up to its first parse_args call, and returns that parser and how many
    leading arguments the command consumed itself (a subcommand: `mole train`).

    Raises RuntimeError (with what the command printed) when it ends before reaching a parser."""
    original = argparse.ArgumentParser.parse_args

    def hand_over(self, args=None, namespace=None):
        raise _ParserReached(self, args)

    stderr, saved_argv = io.StringIO(), sys.argv
    argv = _without_config(args)
    argparse.ArgumentParser.parse_args = hand_over
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kind == "module":
                sys.argv = [what, *argv]
                runpy.run_module(what, run_name="__main__", alter_sys=True)
            elif kind == "script":
                sys.argv = [str(repo / what), *argv]
                runpy.run_path(str(repo / what), run_name="__main__")
            else:
                module, _, function = what.partition(":")
                sys.argv = [module, *argv]
                getattr(__import__(module, fromlist=[function]), function)(argv)
    except _ParserReached as reached:
        given = list(reached.given) if reached.given is not None else argv
        consumed = len(argv) - len(given) if 0 < len(given) <= len(argv) and argv[len(argv) - len(given):] == given \
            else 0
        return reached.parser, consumed
    except SystemExit as stop:
        raise RuntimeError(f"it exited (status {stop.code}) before reaching its argument parser: "
                           f"{stderr.getvalue().strip()[-300:]}") from None
    except ImportError:
        raise
    except Exception as err:  # a command that fails before its parser is a problem of the block, not a crash
        raise RuntimeError(f"it raised {type(err).__name__} before reaching its argument parser: {err}") from None
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv = saved_argv
    raise RuntimeError("it never called parse_args")


def parse_problem(parser: argparse.ArgumentParser, args: list[str]) -> str | None:
    """What the parser says of these arguments, or None when it takes them. `...` (and `--help`, which would
    print and exit) lifts `required`."""
    if {"...", "--help", "-h"} & set(args):
        for action in parser._actions:
            action.required = False
            if not action.option_strings and action.nargs is None:
                action.nargs = "?"
    args = [arg for arg in args if arg not in ("...", "--help", "-h")]  # --help would print and exit
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            _, extras = parser.parse_known_args(args)
    except SystemExit:
        message = stderr.getvalue().strip().splitlines()
        return message[-1] if message else "the parser refused the arguments"
    unknown = [arg for arg in extras if arg.startswith("-")]
    if unknown or extras:
        known = [s for action in parser._actions for s in action.option_strings]
        hints = []
        for arg in unknown or extras:
            close = difflib.get_close_matches(arg, known, 1, 0.75)
            hints.append(f"{arg} (did you mean {close[0]}?)" if close else arg)
        return ("unknown flag " if unknown else "unexpected argument ") + ", ".join(hints)
    return None


def _show(argv: list[str]) -> str:
    text = " ".join(shlex.quote(arg) for arg in argv)
    return text if len(text) <= 90 else text[:87] + "..."


def command_problems(block: Block, repo: Path) -> list[str]:
    """One line per problem of a shell block: `<file>:<line>: <command>: <what is wrong>`."""
    try:
        commands = shell_commands(block)
    except ValueError as err:
        return [f"{block.where()}: the block cannot be split into commands: {err}"]
    problems = []
    for offset, argv in commands:
        target = _target(argv, repo)
        if target is None:
            continue
        kind, what, args = target
        where = f"{block.where(offset)}: `{_show(argv)}`"
        if kind in ("shell", "script") and not (repo / what).is_file():
            problems.append(f"{where}: {what} does not exist")
            continue
        if kind == "shell":
            continue
        try:
            parser, consumed = capture_parser(kind, what, args, repo)
        except (RuntimeError, ImportError) as err:
            problems.append(f"{where}: {what}: {err}")
            continue
        problem = parse_problem(parser, args[consumed:])
        if problem:
            problems.append(f"{where}: {problem}")
    return problems
