"""absl flags generated from the config dataclasses: one flag per field, its help the field's
comment in `echo_jax/config.py`, so an entry point can never drift from the config."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import typing
from collections.abc import Sequence
from typing import Any

from absl import flags

_FIELD = re.compile(r"^\s+(\w+): [^=]+= .*?(?:#\s*(.*))?$")
_COMMENT = re.compile(r"^\s+#\s?(.*)$")


@functools.cache
def field_help(cls: type) -> dict[str, str]:
    """Each field's comment: the one on its line, else the comment lines just above it."""
    out: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        comment, field = _COMMENT.match(line), _FIELD.match(line)
        if comment:
            above.append(comment.group(1).strip())
        elif field:
            out[field.group(1)] = (field.group(2) or " ".join(above)).strip() or field.group(1)
            above = []
        else:
            above = []
    return out


def define_flags(
    cls: type,
    choices: dict[str, Sequence[str]] | None = None,
    skip: Sequence[str] = (),
    flag_values: flags.FlagValues = flags.FLAGS,
) -> tuple[str, ...]:
    """Defines a flag per field of `cls` (defaults from the dataclass); fields in `choices` are
    enums. Returns the names defined."""
    choices = choices or {}
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    names = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default, kind, doc = f.default, hints[f.name], helps.get(f.name, f.name)
        if f.name in choices:
            flags.DEFINE_enum(f.name, default, list(choices[f.name]), doc, flag_values=flag_values)
        elif kind is bool:
            flags.DEFINE_bool(f.name, default, doc, flag_values=flag_values)
        elif kind is int:
            flags.DEFINE_integer(f.name, default, doc, flag_values=flag_values)
        elif kind is float:
            flags.DEFINE_float(f.name, default, doc, flag_values=flag_values)
        elif kind is str:
            flags.DEFINE_string(f.name, default, doc, flag_values=flag_values)
        else:
            flags.DEFINE_list(f.name, list(default), doc, flag_values=flag_values)
        names.append(f.name)
    return tuple(names)


def from_flags(cls: type, names: Sequence[str], flag_values=flags.FLAGS, **fixed: Any):
    """An instance of `cls` from the flags `names` (tuples for list flags), plus `fixed`."""
    hints = typing.get_type_hints(cls)
    values = {}
    for name in names:
        value = flag_values[name].value
        values[name] = tuple(value) if typing.get_origin(hints[name]) is tuple else value
    return cls(**values, **fixed)
