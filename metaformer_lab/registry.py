"""Name -> class registries for the ablation axes, and the error every bad choice raises.

Each axis (token mixer, normalization, activation, model preset) is one `Registry`. Adding a choice is one
decorated class in that axis's module; nothing else looks names up.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad setting: names the key, the value it got and what would have been valid."""

    def __init__(self, key: str, value: Any, expected: str | Iterable[str]) -> None:
        if not isinstance(expected, str):
            expected = "valid choices: " + ", ".join(expected)
        self.key, self.value, self.expected = key, value, expected
        super().__init__(f"{key}={value!r}: {expected}")


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    """"did you mean X? " for the choice closest to a mistyped `word`, or "" where none is close."""
    found = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"did you mean {found[0]}? " if found else ""


class Registry(Generic[T]):
    """Maps the names a user types (`pooling`, `layernorm`) to the classes that implement them."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.key}: {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def get(self, name: str, key: str | None = None) -> T:
        """The entry called `name`; `key` names the setting in the error (defaults to the axis)."""
        if name not in self._entries:
            raise ConfigError(key or self.key, name, did_you_mean(name, self.names()) + "valid choices: "
                              + ", ".join(self.names()))  # fmt: skip
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)
