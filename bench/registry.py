"""Name → factory registries for methods, architectures and datasets.

In the spirit of timm's and torchvision's model registries: a plugin registers itself with a decorator
(`@register_method("cll")`), and the engine looks it up by name. The engine never branches on a name.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Callable, Dict, TypeVar

T = TypeVar("T")


class UnknownNameError(ValueError):
    """An unknown method, architecture, dataset or suite name (reported as a one-line CLI error)."""


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, object] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj
        return deco

    def get(self, name: str):
        _load_plugins()
        if name not in self._entries:
            close = difflib.get_close_matches(name, self._entries, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{hint}; known: {', '.join(sorted(self._entries))}")
        return self._entries[name]

    def names(self):
        _load_plugins()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        _load_plugins()
        return name in self._entries


METHODS = Registry("method")
ARCHS = Registry("architecture")
DATASETS = Registry("dataset")

register_method = METHODS.register
register_arch = ARCHS.register
register_dataset = DATASETS.register

_PLUGIN_MODULES = ("methods", "bench.nn.archs", "bench.nn.families", "bench.data")
_loaded = False


def _load_plugins() -> None:
    """Import the packages whose modules register plugins (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _PLUGIN_MODULES:
        importlib.import_module(mod)
