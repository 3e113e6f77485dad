"""Registries: named entries of one kind (solvers, gradient engines, guidance methods, ...).

    SOLVERS = Registry("solver")
    SOLVERS.register("ddim", tableau)                 # a second "ddim" is refused ...
    SOLVERS.register("ddim", other, replace=True)     # ... unless replacing is asked for
    SOLVERS["ddim"]                                   # unknown names: one UnknownNameError

A registry is a read-only mapping from names to entries; :meth:`Registry.register` is the
only way in and :meth:`Registry.unregister` the only way out.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

__all__ = ["Registry", "UnknownNameError"]

T = TypeVar("T")


class UnknownNameError(ValueError, KeyError):
    """A name that is not in a registry: a ``ValueError`` (bad argument value) that is also a
    ``KeyError`` (a failed mapping lookup), with a message that lists the known names."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


class Registry(Mapping[str, T], Generic[T]):
    """Named entries of one ``kind``; a read-only :class:`~collections.abc.Mapping`."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T, *, replace: bool = False) -> T:
        """Add ``entry`` under ``name`` and return it.

        Raises ``ValueError`` when ``name`` is taken and ``replace`` is false, so that a
        user's entry never silently shadows a built-in one.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries and not replace:
            raise ValueError(
                f"a {self.kind} called {name!r} is already registered; "
                "pass replace=True to replace it"
            )
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> T:
        """Remove the entry ``name`` and return it (an unknown name raises as a lookup does)."""
        entry = self[name]
        del self._entries[name]
        return entry

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; known: {', '.join(self._entries)}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
