"""A tiny name -> builder registry with errors that list the valid names."""
from __future__ import annotations

from typing import Callable, Dict, List

__all__ = ["Registry"]


class Registry:
    def __init__(self, what: str):
        self.what = what
        self._items: Dict[str, Callable] = {}

    def register(self, name: str = None):
        def wrap(obj):
            key = name or obj.__name__
            if key in self._items:
                raise KeyError(f"{self.what}: {key!r} registered twice")
            self._items[key] = obj
            return obj

        return wrap

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def get(self, name: str) -> Callable:
        if name not in self._items:
            raise ValueError(f"{self.what}: unknown name {name!r}; valid: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> List[str]:
        return sorted(self._items)
