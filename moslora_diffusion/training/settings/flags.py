"""Settings as a frozen dataclass whose fields are the flags of a command: parsing, config files, type checks.

Every field declared with `flag(default, help, choices, group)` becomes `--<name>` (booleans also get
`--no-<name>`, so the command line can switch off what a config file switched on). `--config run.yaml`
(or .toml / .json) may hold any flag; flags given on the command line override the file, and the file overrides
a preset (`--preset NAME`, a TOML file of flags shipped in training/settings/presets/). The DreamBooth
trainer (config.py: TrainConfig) and the MoLE gate trainer (a subclass of it) share this machinery, so
the two commands parse, check and record their settings the same way.
"""

from __future__ import annotations

import argparse
import functools
import typing
from collections.abc import Callable
from dataclasses import field, fields
from pathlib import Path

from ...console import OneLineErrorParser, add_debug_flag
from ...console.command_line import closest_name


class ConfigError(ValueError):
    """A setting is missing, out of range or inconsistent with another one."""


def flag(default, help: str, choices: tuple | None = None, group: str = "training"):
    return field(default=default, metadata={"help": help, "choices": choices, "group": group})


@functools.cache
def field_types(cls: type) -> dict[str, tuple[type, bool]]:
    """{name: (base type, optional)} from the annotations of the settings class `cls`."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        if typing.get_origin(hint) is typing.ClassVar:
            continue
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next(a for a in args if a is not type(None)) if args else hint
        out[name] = (base, optional)
    return out


def check_types(config) -> None:
    """ConfigError for a value of the wrong type; an int where a float goes (1 in a YAML file) becomes float."""
    for name, (base, optional) in field_types(type(config)).items():
        value = getattr(config, name)
        if value is None and optional:
            continue
        ok = isinstance(value, base) and not (base is not bool and isinstance(value, bool))
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(config, name, float(value))  # 1 in a YAML file means 1.0
            ok = True
        if not ok:
            raise ConfigError(f"--{name} must be {base.__name__}, got {value!r}")


def check_not_empty(config) -> None:
    """ConfigError for an empty text (or list item): never a setting, and an empty path would silently mean
    the current folder. Run after the required settings are checked (they have their own messages)."""
    for name, (base, _) in field_types(type(config)).items():
        value = getattr(config, name)
        if value is None:
            continue
        if (base is str and not value.strip()) or (base is tuple and not all(str(v).strip() for v in value)):
            raise ConfigError(f"--{name} is empty; give a value, or leave the flag out")


def check_choices(config) -> None:
    for f in fields(config):
        choices = f.metadata.get("choices")
        if choices and getattr(config, f.name) is not None and getattr(config, f.name) not in choices:
            raise ConfigError(f"--{f.name} must be one of {list(choices)}, got {getattr(config, f.name)!r}")


def _flag_fields(cls: type) -> list:
    """The fields that are flags of this command (a subclass may hide some of its parent's)."""
    hidden = getattr(cls, "HIDDEN_FLAGS", frozenset())
    return [f for f in fields(cls) if f.name not in hidden]


# kohya sd-scripts' names of the same settings: an unknown one is answered "did you mean" ours.
KOHYA_ALIASES = {"--network_dim": "--rank", "--network_alpha": "--lora_alpha", "--train_data_dir":
                 "--instance_data_dir", "--reg_data_dir": "--class_data_dir", "--max_train_epochs":
                 "--num_train_epochs", "--save_every_n_steps": "--checkpointing_steps"}


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog=prog, description=description, formatter_class=argparse.HelpFormatter)
    parser.aliases = KOHYA_ALIASES  # (each help text says its default itself)
    parser.add_argument("--config", help="YAML or TOML file with any of the flags below (flags given here win)")
    add_debug_flag(parser)  # for --help; the command runner takes --debug off before parsing
    groups: dict[str, argparse._ArgumentGroup] = {}
    types = field_types(cls)
    for f in _flag_fields(cls):
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        base, _ = types[f.name]
        help_text = meta["help"] + ("" if f.default in (None, False) else f" (default: {f.default})")
        help_text = help_text.replace("%", "%%")  # argparse %-formats help: "30% faster" would break --help
        if base is bool:
            group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default,
                               help=help_text)
        elif base is tuple:  # a list of values: --experts a b c
            group.add_argument(f"--{f.name}", nargs="+", type=str, default=f.default, help=help_text)
        else:
            group.add_argument(f"--{f.name}", type=base, default=f.default, choices=meta["choices"], help=help_text)
    return parser


def load_config_file(path: str | Path, cls: type) -> dict:
    """The flags in a YAML or TOML file, checked against the known names."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"--config {path} is a folder; give the settings file (.yaml, .toml or .json)")
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path} is not a YAML/TOML/JSON settings file (it is not text)") from None
    except OSError as err:
        raise ConfigError(f"--config {path} cannot be read: {err.strerror or err}") from None
    try:
        if path.suffix.lower() == ".toml":
            values = _toml().loads(text)
        elif path.suffix.lower() in (".yaml", ".yml", ".json"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"--config {path}: expected a .yaml, .yml, .toml or .json file")
    except ConfigError:
        raise
    except Exception as err:  # yaml and tomllib raise their own error types
        raise ConfigError(f"--config {path} cannot be parsed: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path} must hold a mapping of flag names to values")
    if "moslora_diffusion_version" in values and isinstance(values.get("config"), dict):
        # a run folder's training_config.json: it said "unknown setting 'config'"
        raise ConfigError(f"--config {path} is a training run's record, not a settings file: to continue that run "
                          "pass --output_dir <its folder> --resume_from_checkpoint latest; to reuse its settings, "
                          "copy the ones you want from its \"config\" part into a .yaml or .toml file")
    values = {str(k).lstrip("-").replace("-", "_"): v for k, v in values.items()}
    known = {f.name for f in _flag_fields(cls)}
    for key in values:
        if key not in known:
            hint = closest_name(key, known, cutoff=0.6)
            raise ConfigError(f"--config {path}: unknown setting {key!r}"
                              + (f" (did you mean {hint!r}?)" if hint else ""))
    types = field_types(cls)
    for key, value in values.items():  # argparse would report a bad value as "argument --key", not as the file's
        _check_file_value(path, key, value, types[key][0])
    # A list in the file for a list flag: kept as a tuple, as the command line gives it.
    return {k: tuple(v) if types[k][0] is tuple and isinstance(v, list) else v for k, v in values.items()}


def _toml():
    """tomllib (Python 3.11+), else the tomli package it came from (a dependency on 3.10)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib


def _check_file_value(path: Path, key: str, value, kind: type) -> None:
    """ConfigError naming the file and the setting for a value of the wrong kind (a word where a number goes)."""
    if value is None:
        return
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"--config {path}: {key} is {value!r}; give true or false")
    if kind in (int, float) and not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number is None or (kind is int and not number.is_integer()):
            what = "a whole number" if kind is int else "a number"
            raise ConfigError(f"--config {path}: {key} is {value!r}; give {what}")


def flag_values(argv: list[str] | None, cls: type, prog: str, description: str,
                load_preset: Callable[[str, type], dict] | None = None) -> tuple[dict, dict, dict, set[str]]:
    """(every flag's value, the values the preset set, {setting: the --config file that set it} for the ones the
    command line left to the file, the names the user gave on the command line or in the config file) from the
    command line, an optional --config file and an optional preset (`--preset NAME`, or `preset = NAME` in the
    config file, read with `load_preset`).
    Precedence: command line > config file > preset > the field defaults."""
    pre = OneLineErrorParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--preset")
    known, _ = pre.parse_known_args(argv)
    parser = build_parser(cls, prog, description)
    from_file = load_config_file(known.config, cls) if known.config else {}
    preset = known.preset or from_file.get("preset")
    from_preset = load_preset(preset, cls) if preset and load_preset else {}
    parser.set_defaults(**{**from_preset, **from_file})
    values = vars(parser.parse_args(argv))
    values.pop("config")
    values.pop("debug")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    on_command_line = _named_on_command_line(argv, cls, prog, description)
    from_file_only = {k: known.config for k in from_file if k not in on_command_line}
    return values, from_preset, from_file_only, set(from_file) | on_command_line


def _named_on_command_line(argv: list[str] | None, cls: type, prog: str, description: str) -> set[str]:
    """The flags `argv` gives, as argparse reads them (`--rank=8`, `--no-center_crop`, an abbreviation): the same
    parser with every default suppressed, so only what the command line set comes back."""
    parser = build_parser(cls, prog, description)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"config", "debug"}


def parse_flags(argv: list[str] | None, cls: type, prog: str, description: str):
    """Command line (plus an optional --config file) -> a validated instance of `cls`; says where the outputs go
    when --output_dir was left to its default (default_output_note)."""
    values, from_preset, from_file, given = flag_values(argv, cls, prog, description)
    try:
        config = cls(**values)
    except ConfigError as err:
        raise ConfigError(str(err) + from_file_note(str(err), from_file)) from None
    note = default_output_note(config, given | set(from_preset))
    if note:
        print(note)
    return config


def from_file_note(message: str, from_file: dict[str, str]) -> str:
    """" (--x: set in --config FILE)" for the settings an error message names that the config file set (the
    message names the flag, and the user looked for it on the command line)."""
    named = [key for key in from_file if f"--{key}" in message]
    return f" ({', '.join(f'--{k}' for k in named)}: set in --config {from_file[named[0]]})" if named else ""


def default_output_note(config, given: set[str]) -> str | None:
    """"Output: /abs/path (--output_dir's default; ...)" when the user set no --output_dir: the run's files went to a
    folder named nowhere on the command line, and users looked for them."""
    if "output_dir" in given or not hasattr(config, "output_dir"):
        return None
    where = Path(config.output_dir).expanduser().resolve()
    return f"Output: {where} (--output_dir's default; give --output_dir to choose the folder)"
