"""Registries by name (timm's ``register_model`` / ``create_model`` pattern).

Architectures, rules, datasets and experiment settings each live in a :class:`Registry`.
Lookup of an unknown name fails loudly with the list of known names and a close match, so a typo
on the command line becomes one actionable error; tests enumerate a registry to cover every entry.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from creditaudit.errors import UserError

T = TypeVar("T")


class UnknownNameError(UserError, KeyError):
    """An unknown registry name (a :class:`~creditaudit.errors.UserError`). ``str()`` is the full,
    user-facing message."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return self.args[0]


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    summary: str


class Registry(Generic[T]):
    """A name -> object map with one-line summaries, filled by the ``register`` decorator."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, summary: str = "") -> Callable[[T], T]:
        def deco(obj: T) -> T:
            self.add(name, obj, summary)
            return obj

        return deco

    def add(self, name: str, obj: T, summary: str = "") -> None:
        if name in self._entries and self._entries[name].obj is not obj:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        if not summary:
            doc = getattr(obj, "__doc__", None) or ""
            summary = doc.strip().splitlines()[0] if doc.strip() else ""
        self._entries[name] = Entry(name, obj, summary)

    def get(self, name: str) -> T:
        try:
            return self._entries[name].obj
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        known = ", ".join(sorted(self._entries)) or "(none)"
        close = difflib.get_close_matches(name, list(self._entries), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Known {self.kind}s: {known} (see `creditaudit list`)."

    def names(self) -> list[str]:
        return sorted(self._entries)

    def in_order(self) -> list[str]:
        """Names in the order they were registered (a study's declaration order)."""
        return list(self._entries)

    def summary(self, name: str) -> str:
        try:
            return self._entries[name].summary
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def entries(self) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
