"""Command-line flags derived from a config dataclass: one `--name` per field, with its help, default and
choices, so a command's flags and its config cannot drift apart.

argparse only collects the text typed for each flag; the values are then read and checked by the same
machinery as config files and keyword arguments (config/fields.py), so a wrong value or an unknown flag
gets the same one-sentence error as in `smolalign train` (with the closest valid key).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar

from smolalign.config.fields import FlagText, Settings, parse_override_args

S = TypeVar("S", bound=Settings)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[Settings]) -> None:
    """A flag per field of `cls` (an argument for fields marked `positional`); fields left off the command line
    stay out of the parsed namespace, so the dataclass's defaults apply."""
    hints = typing.get_type_hints(cls)
    # `--flag false` turns off what a config file turned on; where the command takes a positional argument, a
    # bool flag takes no value instead (it would swallow the positional one that follows it).
    has_positional = any(field.metadata.get("positional") for field in dataclasses.fields(cls))
    for field in dataclasses.fields(cls):
        annotation = hints[field.name]
        help = _help_text(field, annotation)
        if field.metadata.get("positional"):
            has_default = field.default is not dataclasses.MISSING
            # No SUPPRESS default here: argparse passes an omitted optional positional's default through
            # `type` (Python 3.11), which would make it the text '==SUPPRESS=='. None means: not given.
            parser.add_argument(field.name, nargs="?" if has_default else None, default=None, type=FlagText,
                                help=help)
        elif annotation is bool and has_positional:
            parser.add_argument(f"--{field.name}", action="store_const", const=FlagText("true"),
                                default=argparse.SUPPRESS, help=help)
        elif annotation is bool:
            parser.add_argument(f"--{field.name}", nargs="?", const=FlagText("true"), default=argparse.SUPPRESS,
                                type=FlagText, metavar="{true,false}", help=help)
        else:
            parser.add_argument(f"--{field.name}", default=argparse.SUPPRESS, type=FlagText, help=help,
                                metavar=field.metadata.get("metavar") or _metavar(annotation))


def given_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The values of `cls`'s fields that the command line gave (flags left off stay out of the namespace)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}


def config_from_args(cls: type[S], args: argparse.Namespace, rest: list[str]) -> S:
    """The validated config of the flags argparse parsed (`args`) and those it did not know (`rest`):
    an unknown flag is refused with the closest valid one."""
    return cls.from_values({**given_values(cls, args), **parse_override_args(rest)})


def _help_text(field: dataclasses.Field, annotation: Any) -> str:
    default = field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
    if default is dataclasses.MISSING:
        return field.metadata["help"] + ("" if field.metadata.get("positional") else " (required)")
    if default is None or default is False or field.metadata.get("from_run"):
        return field.metadata["help"]
    shown = ",".join(map(str, default)) if isinstance(default, list) else default
    return f"{field.metadata['help']} (default: {shown})"


def _metavar(annotation: Any) -> str | None:
    """`{a,b,c}` for a choice of names, `{a,b,c}[,...]` for a list of them; None: argparse's own."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "{" + ",".join(args) + "}"
    if origin is list:
        return f"{_metavar(args[0]) or 'A'}[,...]"
    if origin in (typing.Union, types.UnionType):
        return next(filter(None, (_metavar(option) for option in args if option is not type(None))), None)
    return None
