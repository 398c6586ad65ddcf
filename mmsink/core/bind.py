"""Methods bound on one model instance, undone exactly: ``remove()`` restores what the instance had
(its own attribute, or none, so the class's method shows again)."""

from __future__ import annotations

import types


class Bound:
    def __init__(self, obj, name: str, make):
        """Bind ``make(previous)`` as ``obj.name``; ``previous`` is what ``obj.name`` was (bound)."""
        self.obj, self.name = obj, name
        self.had, self.old = name in obj.__dict__, obj.__dict__.get(name)
        fn = make(getattr(obj, name))
        obj.__dict__[name] = types.MethodType(fn, obj)

    def remove(self) -> None:
        if self.had:
            self.obj.__dict__[self.name] = self.old
        else:
            self.obj.__dict__.pop(self.name, None)
