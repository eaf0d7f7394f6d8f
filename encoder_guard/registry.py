"""One small registry type for every family (datasets, backbones, SSL methods, importers, ...).

Modelled on timm's ``_registry``: a name→object map filled by a decorator, and a lookup whose error
lists the valid names, so a typo on the command line is answered with the choices.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from encoder_guard.errors import EncoderGuardError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named family of objects.

    >>> BACKBONES: Registry[Callable] = Registry("backbone")
    >>> @BACKBONES.register("tiny")
    ... def tiny(): ...
    >>> BACKBONES.get("tiny") is tiny
    True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise EncoderGuardError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(self._entries))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
