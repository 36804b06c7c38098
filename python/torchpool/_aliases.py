"""The names modules had before they moved into the checkpoint/, tracing/ and cli/ subpackages.

``import torchpool.lazy``, ``from torchpool import trace``, ``torchpool.replay`` after ``import
torchpool`` and ``python -m torchpool.replay`` keep working, and each gives the moved module itself
(``torchpool.lazy is torchpool.checkpoint.lazy``), never a copy: one set of globals, classes and
state, whichever name a program uses.

Note [Moved modules]
--------------------
An import system finder (appended to ``sys.meta_path`` by ``torchpool/__init__.py``, so it is asked
only after the normal finders found no file of that name) answers for the old names in ``MOVED``.
Its loader imports the new module and puts it in ``sys.modules`` under the old name; the import
system then hands out what ``sys.modules`` holds (the same mechanism a shim module
``sys.modules[__name__] = ...`` uses, without a file per old name). The new module's ``__spec__``
and ``__name__`` stay its own, so its relative imports, pickles and ``logging`` names are unchanged.
``python -m OLD`` asks the loader for code to run as ``__main__``: that code runs the new module
as ``__main__`` through ``runpy`` (its relative imports need its real package).
``torchpool.__getattr__`` turns ``torchpool.OLD`` into the same import.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

# old name (torchpool.X) -> new name (torchpool.Y): every module that moved.
MOVED = {
    "lazy": "checkpoint.lazy",
    "hf": "checkpoint.hf",
    "distributed": "checkpoint.distributed",
    "_ranges": "checkpoint._ranges",
    "inspect": "checkpoint.inspect",
    "trace": "tracing.trace",
    "replay": "tracing.replay",
    "memviz": "tracing.memviz",
    "plots": "tracing.plots",
    "launch": "cli.launch",
    "top": "cli.top",
    "bench": "cli.bench",
    "demo": "cli.demo",
    "loader_demo": "cli.loader_demo",
    "fragmentation_demo": "cli.fragmentation_demo",
    "leak_demo": "cli.leak_demo",
    "workloads": "cli.workloads",
}

_PACKAGE = __name__.rpartition(".")[0]
_TARGETS = {f"{_PACKAGE}.{old}": f"{_PACKAGE}.{new}" for old, new in MOVED.items()}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Note [Moved modules]: finder and loader for the old names."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _TARGETS:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, origin=f"alias of {_TARGETS[fullname]}")

    def create_module(self, spec):
        return None  # a placeholder the import system makes; exec_module replaces it in sys.modules

    def exec_module(self, module):
        sys.modules[module.__name__] = importlib.import_module(_TARGETS[module.__name__])

    def get_code(self, fullname):  # python -m OLD
        source = f"import runpy\nrunpy.run_module({_TARGETS[fullname]!r}, run_name='__main__', alter_sys=True)\n"
        return compile(source, f"<{fullname}: alias of {_TARGETS[fullname]}>", "exec")


FINDER = _MovedModules()


def install() -> None:
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(FINDER)
