"""Running a function once a module of torch's has been imported, without importing it here.

The op layer registers things with parts of torch that cost more import time than normkernels
itself (DTensor's sharding rules: about half a second; inductor's lowerings: about 1.8 s), and
that only users of those parts need: at once if the module is already imported, else right after
it first runs. Python has no post-import hook; a finder placed first on ``sys.meta_path`` finds
the module as the other finders would, has its loader run it, then calls the function and leaves
``sys.meta_path``.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Callable


def call_after_import(name: str, function: Callable[[ModuleType], None]) -> None:
    """Calls ``function(module)`` once the module called ``name`` is imported."""
    module = sys.modules.get(name)
    if module is not None:
        function(module)
    else:
        sys.meta_path.insert(0, _AfterImport(name, function))


class _AfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, function: Callable[[ModuleType], None]):
        self.name = name
        self.function = function
        self.searching = False

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name or self.searching:
            return None
        self.searching = True  # the search below asks this finder too
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self.searching = False
        loader = None if spec is None else spec.loader
        if loader is None or isinstance(loader, type) or not hasattr(loader, "exec_module"):
            return None  # left to the other finders, without the call
        # the source file's loader is an object of this spec's own (not a class shared by every
        # builtin or frozen module), so its exec_module can be wrapped
        run_module = loader.exec_module

        def exec_module(module):
            run_module(module)
            if self in sys.meta_path:  # (the import system no longer walks it for this module)
                sys.meta_path.remove(self)
            self.function(module)

        loader.exec_module = exec_module
        return spec
