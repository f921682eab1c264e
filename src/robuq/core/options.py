"""Options of a job, declared once on its config dataclass: default, help text and choices.

The command line is generated from these declarations (``robuq.cli.flags``), so a default or a help
text exists in one place and cannot drift between the library and the CLI.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from robuq.core.errors import RobuqError

_MISSING = dataclasses.MISSING


def option(
    default: Any = _MISSING,
    help: str = "",
    *,
    choices: Sequence[Any] | None = None,
    factory: Callable[[], Any] | None = None,
    positional: bool = False,
    cli: bool = True,
) -> Any:
    """A dataclass field with what a person needs to set it: ``help`` (required), ``choices``; a
    ``factory`` for mutable or nested-config defaults; ``positional`` for the CLI's bare argument;
    ``cli=False`` for a field the command line must not offer (set by the program itself)."""
    if not help:
        raise RobuqError("every option needs a help text")
    metadata = {
        "help": help,
        "choices": tuple(choices) if choices is not None else None,
        "positional": positional,
        "cli": cli,
    }
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_known_fields(data: Any, known: type | Sequence[str], what: str) -> dict[str, Any]:
    """``data`` as a dict, if it is a mapping whose keys are all ``known`` (a dataclass's fields, or names);
    else a ValueError naming ``what`` and the unknown keys (a file's typo must not be dropped silently)."""
    names = {f.name for f in dataclasses.fields(known)} if isinstance(known, type) else set(known)
    if not isinstance(data, Mapping):
        raise RobuqError(f"{what} must be an object of named fields, not {type(data).__name__}")
    unknown = sorted(map(str, set(data) - names))
    if unknown:
        raise RobuqError(f"unknown {what} fields: {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    return dict(data)


def check_choice(config: object, name: str) -> None:
    """Raise ValueError if ``config.name`` is not one of the field's declared choices."""
    field = next(f for f in dataclasses.fields(config) if f.name == name)
    choices = field.metadata.get("choices")
    value = getattr(config, name)
    if choices and value not in choices:
        raise RobuqError(f"{name} must be one of {', '.join(map(str, choices))}, not {value!r}")


def with_default(base: type, name: str, default: Any) -> Any:
    """``base``'s option ``name`` with another default, for a job whose sensible default differs (its help
    and choices stay the ones declared on ``base``)."""
    field = next(f for f in dataclasses.fields(base) if f.name == name)
    return dataclasses.field(default=default, metadata=field.metadata)


_SIMPLE_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "None": (type(None),)}


def check_field_types(instance: object, what: str) -> None:
    """A ValueError naming ``what`` and the field if a dataclass field annotated with simple types (str, int,
    float, bool, None and unions of them) holds another type: values read from a file are checked here, not
    by a TypeError deep inside the code that uses them. Fields of other annotations are left alone."""
    for field in dataclasses.fields(instance):
        names = [n.strip() for n in str(field.type).split("|")]
        if not all(n in _SIMPLE_TYPES for n in names):
            continue
        value = getattr(instance, field.name)
        allowed = tuple(t for n in names for t in _SIMPLE_TYPES[n])
        wrong_bool = isinstance(value, bool) and bool not in allowed
        if wrong_bool or not isinstance(value, allowed):
            raise RobuqError(f"{what}: {field.name} must be {' or '.join(names)}, not {value!r}")
