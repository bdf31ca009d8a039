"""One shape for every extension point (docs/extending.md): a named table that the code using an entry, config
validation and the CLI all read, so a name is written once. Imports nothing, so any floor may hold one.

Backbones (model/registry.py), mask strategies (model/masking.py), data sources (data/__init__.py), optimizers
(optimizers.py) and samplers (diffusion/solvers.py) are each one Registry.
"""
from __future__ import annotations

from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """name -> entry for one kind of extension point. Reads like a dict; entries are added with register()."""

    def __init__(self, kind: str):
        self.kind = kind  # what an entry is, for messages: "mask strategy", "data source", ...
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        """Add one entry under a new name. A name is registered once: a second registration would silently change
        what existing configs mean."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove an entry (tests that register one put the table back as they found it)."""
        del self._entries[name]

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {self.known()}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self):
        return self._entries.items()

    def values(self):
        return self._entries.values()

    def known(self) -> str:
        """The registered names, for an error message."""
        return ", ".join(self._entries)
