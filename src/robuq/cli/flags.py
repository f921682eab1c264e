"""Command-line options generated from a job's config dataclass (``robuq.core.options``): one flag per
field, nested configs flattened, defaults and help texts taken from the dataclass itself."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Collection
from typing import Any


def _scalar_type(annotation: Any) -> type:
    """int for ``int`` or ``int | None`` (and so on); str for anything else."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return args[0] if args[0] in (int, float, str) else str


def _dest(path: str) -> str:
    return path.replace(".", "__")


def add_config_arguments(
    parser: argparse.ArgumentParser, cls: type, skip: Collection[str] = (), defaults: Any = None, _prefix: str = ""
) -> None:
    """Add a flag for every field of ``cls`` (``--global-batch-size`` for ``global_batch_size``), recursing
    into nested config fields; ``skip`` names fields (dotted for nested ones) the command sets itself."""
    defaults = defaults if defaults is not None else cls()
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        path = _prefix + field.name
        value = getattr(defaults, field.name)
        if path in skip or not field.metadata.get("cli", True):
            continue
        if dataclasses.is_dataclass(value):
            add_config_arguments(parser, type(value), skip, value, path + ".")
            continue
        text = field.metadata.get("help")
        if not text:
            raise TypeError(f"{cls.__name__}.{field.name} has no help text: declare it with robuq.core.options.option")
        choices = field.metadata.get("choices")
        if field.metadata.get("positional"):
            parser.add_argument(_dest(path), nargs="?", default=value, help=text)
        elif isinstance(value, bool):
            parser.add_argument(
                "--" + field.name.replace("_", "-"),
                dest=_dest(path),
                action=argparse.BooleanOptionalAction,
                default=value,
                help=text,
            )
        else:
            parser.add_argument(
                "--" + field.name.replace("_", "-"),
                dest=_dest(path),
                type=_scalar_type(hints[field.name]),
                default=value,
                choices=choices,
                metavar=None if choices else field.name.upper(),
                help=text if value is None or "default" in text else f"{text} (default: %(default)s)",
            )


def config_from_args(args: argparse.Namespace, cls: type, defaults: Any = None, _prefix: str = "") -> Any:
    """The ``cls`` instance the parsed flags describe (fields without a flag keep their defaults)."""
    defaults = defaults if defaults is not None else cls()
    values = vars(args)
    changes = {}
    for field in dataclasses.fields(cls):
        path = _prefix + field.name
        current = getattr(defaults, field.name)
        if dataclasses.is_dataclass(current):
            changes[field.name] = config_from_args(args, type(current), current, path + ".")
        elif _dest(path) in values:
            changes[field.name] = values[_dest(path)]
    return dataclasses.replace(defaults, **changes)
