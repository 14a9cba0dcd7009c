"""Policies found by name: one small registry for the routing policies and the engine policies alike.

A policy class has a unique ``name`` and declares in ``needs`` the constructor arguments only its host can give
(a seed, the benchmark-only true lengths); ``make`` hands it those, plus the options a cluster file sets, and
turns a missing need, an unknown name or a bad option into one clear ``ValueError``.
"""

from __future__ import annotations

from typing import Generic, Mapping, TypeVar

T = TypeVar("T")


class PolicyRegistry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind                       # "routing" or "engine", for messages
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        name = getattr(cls, "name", "")
        if not name or name in self._classes:
            raise ValueError(f"{self.kind} policy needs a unique name, got {name!r}")
        self._classes[name] = cls
        return cls

    def names(self) -> list[str]:
        return sorted(self._classes)

    def make(self, name: str, supplied: Mapping[str, object], why: Mapping[str, str] | None = None,
             **options: object) -> T:
        """The policy called ``name``: what it ``needs`` from ``supplied`` (``why[need]`` explains a missing
        one), and ``options``."""
        try:
            cls = self._classes[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} policy {name!r}; known: {', '.join(self.names())}") from None
        for need in getattr(cls, "needs", ()):
            if supplied.get(need) is None:
                raise ValueError(f"{self.kind} policy {name!r} needs {need}: {(why or {}).get(need, 'not given')}")
            options[need] = supplied[need]
        try:
            return cls(**options)
        except TypeError as e:
            raise ValueError(f"{self.kind} policy {name!r}: bad options {sorted(options)}: {e}") from None
