"""Building config dataclasses from plain values: YAML mappings, keyword arguments, `--key value` flags.

Every value is coerced to its field's annotated type (`int`, `float`, `bool`, `str`, a `Literal` of
names, a list, a nested section, or `X | None`); text typed on the command line is read as the field
needs it. Unknown keys and values of the wrong type are errors that name the key and the closest valid
one; nothing is dropped silently. `Settings` is the base of every command's config: `from_values`
builds and validates one, the same way for the CLI and the Python API.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, ClassVar, Literal, TypeVar

import yaml

from smolalign.errors import UserError

S = TypeVar("S", bound="Settings")


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A config field with its help text; `metadata` marks how commands treat it (see its readers)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **metadata})
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def required(help: str, **metadata: Any) -> Any:
    """A config field without a default: a command cannot run without it."""
    return dataclasses.field(metadata={"help": help, **metadata})


class Settings:
    """What every command's config dataclass shares: built from values, validated, written as a dict."""

    command: ClassVar[str]  # the command it configures, for `smolalign COMMAND --help` in messages

    @classmethod
    def from_values(cls: type[S], values: dict[str, Any]) -> S:
        """A validated config from keyword values (Python values, or FlagText from a command line)."""
        config = build_dataclass(cls, values, where="config", command=cls.command)
        config.validate()
        return config

    def validate(self) -> None:
        """Reject values and combinations that cannot work, with the reason (one sentence)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def require_at_least(config: Any, minimum: int, *keys: str) -> None:
    """Each of `keys` is >= `minimum`, or null where its field allows it."""
    for key in keys:
        value = getattr(config, key)
        if value is None:
            continue
        null = " or null" if type(None) in typing.get_args(typing.get_type_hints(type(config))[key]) else ""
        require(value >= minimum, f"'{key}' must be >= {minimum}{null}, not {value}.")


# -- command-line text ----------------------------------------------------------------------------


class FlagText(str):
    """A value typed on the command line. Text keys keep it verbatim; other keys read it as YAML."""


def parse_override_args(args: list[str]) -> dict[str, Any]:
    """Turn `--key value`, `--key=value` and bare `--flag` (true) into {key: value}; `--key=` is null."""
    overrides: dict[str, Any] = {}
    index = 0
    while index < len(args):
        token = args[index]
        if not token.startswith("--") or token == "--":
            raise UserError(f"unexpected argument '{token}'; options look like --key value.")
        key, has_value, value = token[2:].partition("=")
        if not has_value:
            next_is_value = index + 1 < len(args) and not args[index + 1].startswith("--")
            value = FlagText(args[index + 1]) if next_is_value else True
            index += 1 if next_is_value else 0
        overrides[key.replace("-", "_")] = None if value == "" else FlagText(value) if isinstance(value, str) else value
        index += 1
    return overrides


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """`{"lora.r": 8}` -> `{"lora": {"r": 8}}`, so flags can reach nested settings."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        head, dot, rest = key.partition(".")
        if dot:
            section = nested.setdefault(head, {})
            if not isinstance(section, dict):
                raise UserError(f"'{head}' is set both as a value and as a section.")
            section[rest] = value
        else:
            nested[key] = value
    return nested


# -- building and coercing ------------------------------------------------------------------------


def build_dataclass(cls: type, values: dict[str, Any], *, where: str, command: str) -> Any:
    """Instantiate `cls` from a mapping, coercing each value to its field's annotated type. `where` is
    "config" for a whole config, else the dotted name of a section (`lora`)."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    known = [f.name for f in fields]
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise UserError(unknown_key_message(key, known, where, command=command))
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where != "config" else key, command)
    for f in fields:
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise UserError(f"missing '{f.name}': {f.metadata['help']}")
    return cls(**kwargs)


def unknown_key_message(key: str, known: list[str], where: str, *, command: str = "train") -> str:
    place = "" if where == "config" else f" in '{where}'"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'?" if close else f"run `smolalign {command} --help` for the list of keys."
    return f"unknown config key '{key}'{place}; {hint}"


def _coerce(value: Any, annotation: Any, key: str, command: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if isinstance(value, FlagText):
        value = _from_flag(value, annotation, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if isinstance(value, str) and "," in value and any(typing.get_origin(o) is list for o in options):
            options.sort(key=lambda o: typing.get_origin(o) is not list)  # "a,b" is a list where one is allowed
        errors = []
        for option_type in options:
            try:
                return _coerce(value, option_type, key, command)
            except UserError as error:
                errors.append(error)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1, cutoff=0.7)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"'{key}' must be one of {', '.join(map(str, args))}, not '{value}'{hint}.")
        return value
    if origin is list:
        items = [item.strip() for item in value.split(",")] if isinstance(value, str) else value
        if args[0] in (int, float) and isinstance(items, (int, float)) and not isinstance(items, bool):
            items = [items]  # one number where a list of numbers is taken
        if not isinstance(items, list):
            raise UserError(f"'{key}' must be a list, not {value!r}.")
        return [_coerce(item, args[0], key, command) for item in items]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"'{key}' must be a mapping such as {{name: value}}, not {value!r}.")
        return {str(name): _coerce(item, args[1], f"{key}.{name}", command) for name, item in value.items()}
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise UserError(f"'{key}' must be a mapping of settings, not {value!r}.")
        return build_dataclass(annotation, value, where=key, command=command)
    return _coerce_scalar(value, annotation, key)


def _from_flag(value: FlagText, annotation: Any, key: str) -> Any:
    """Command-line text as the key needs it: verbatim for text keys, YAML for numbers, lists, sections."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (
        annotation,
    )
    if type(None) in options and value.lower() in ("null", "none", "~"):
        return None
    takes_text = any(o is str or typing.get_origin(o) is Literal for o in options)
    takes_list = any(typing.get_origin(o) is list for o in options)
    if takes_text or (takes_list and not value.lstrip().startswith("[")):
        return str(value)
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        raise UserError(f"cannot read the value {str(value)!r} given for '{key}'.") from None


def _coerce_scalar(value: Any, annotation: type, key: str) -> Any:
    if value is None:
        raise UserError(f"'{key}' needs a value of type {annotation.__name__}, not null.")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "1e-6" as a string
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise UserError(f"'{key}' must be of type {annotation.__name__}, not {value!r}.")
