"""Named registries: the single way built-ins and plugins make vocabularies, embeddings, models,
metrics and splits available.

A registry maps a name to a factory. Registering a name twice is an error that names both
origins, so two plugins can never silently shadow each other or a built-in.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from runner.errors import InfraError

T = TypeVar("T")


class RegistryError(InfraError, ValueError):
    """Unknown name or duplicate registration (exit 2: the plan or the plugins must change)."""


class ParamError(RegistryError):
    """A component's plan parameters (e.g. `model.params`) do not fit its factory."""


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    factory: Callable[..., T]
    origin: str  # "module:qualname (file:line)" of the factory, for messages and `infra plugins list`
    source_file: str


def _origin(obj: Any) -> tuple[str, str]:
    module = getattr(obj, "__module__", "?")
    qualname = getattr(obj, "__qualname__", repr(obj))
    try:
        source_file = inspect.getsourcefile(obj) or "?"
        line = inspect.getsourcelines(obj)[1]
    except (TypeError, OSError):
        source_file, line = "?", 0
    return f"{module}:{qualname} ({source_file}:{line})", source_file


class Registry(Generic[T]):
    """Name → factory map for one kind of component (e.g. 'model')."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, factory: Callable[..., T] | None = None):
        """Register `factory` under `name`; usable directly or as a decorator (`@registry.register("x")`)."""

        def add(obj: Callable[..., T]) -> Callable[..., T]:
            origin, source_file = _origin(obj)
            existing = self._entries.get(name)
            if existing is not None:
                raise RegistryError(
                    f"{self.kind} {name!r} is registered twice: by {existing.origin} and by {origin}; rename one of them"
                )
            self._entries[name] = Entry(name, obj, origin, source_file)
            return obj

        return add(factory) if factory is not None else add

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._entries[name].factory
        except KeyError:
            import difflib

            known = ", ".join(sorted(self._entries)) or "none"
            close = difflib.get_close_matches(name, list(self._entries), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise RegistryError(f"unknown {self.kind} {name!r}; {hint}registered: {known}") from None

    def check_params(self, name: str, params: dict[str, Any], key: str, fixed: tuple[str, ...] = ()) -> None:
        """Raise ParamError naming `key` when `params` has a name the factory does not take.

        `fixed` are the arguments the runner itself passes (e.g. seq_len); a factory taking
        **kwargs accepts anything.
        """
        try:
            sig = inspect.signature(self.get(name))
        except (TypeError, ValueError):  # builtins without a signature: let the call decide
            return
        accepted = [
            p.name
            for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in fixed and p.name != "self"
        ]
        if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            return
        unknown = [k for k in params if k not in accepted]
        if unknown:
            raise ParamError(
                f"{key}: {self.kind} {name!r} has no parameter {', '.join(map(repr, unknown))}; "
                f"it takes: {', '.join(accepted) or 'none'}"
            )

    def create(self, name: str, **params: Any) -> T:
        return self.get(name)(**params)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def unregister(self, name: str) -> None:
        """Remove an entry (tests and plugin reloads only)."""
        self._entries.pop(name, None)
