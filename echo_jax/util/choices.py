"""Settings chosen by name: the error every layer raises for a bad setting, and the one
lookup every dispatch on a name goes through."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar


class ConfigError(ValueError):
    """A setting, or a combination of settings, that cannot make a meaningful run."""


_V = TypeVar("_V")


def pick(name: str, value: str, options: Mapping[str, _V]) -> _V:
    """options[value], or a ConfigError naming the setting and its choices: every dispatch on
    a setting's name goes through here, so an unknown name fails instead of falling through."""
    if value not in options:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(options)}")
    return options[value]
