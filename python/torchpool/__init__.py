"""torchpool: control of tensor memory for PyTorch.

    import torchpool
    torchpool.install()                 # torchpool now serves every CPU tensor
    torchpool.memory_stats()            # torch.cuda.memory_stats()-style counters + fragmentation

or at startup: ``TORCHPOOL_CONF="cpu=1" python train.py`` or ``torchpool run train.py``.
"""

from __future__ import annotations

import torch  # noqa: F401  (loads libc10.so, which the extension links)

from . import _aliases  # noqa: E402

_aliases.install()  # torchpool.lazy, torchpool.trace, ... name the modules that moved (Note [Moved modules])

from ._build import _C  # noqa: E402  (checks the torch version the extension was built with)
from ._config import ConfigError, options  # noqa: E402
from ._install import (  # noqa: E402
    allocator,
    empty_cache,
    install,
    installed,
    is_installed,
    memory_snapshot,
    memory_stats,
    reset_peak_stats,
    uninstall,
)
from .stats import format_report  # noqa: E402

Allocator = _C.Allocator
__version__ = "0.1.0"

__all__ = [
    "Allocator",
    "CheckpointError",
    "load_lazily",
    "load_into",
    "init_empty_weights",
    "from_pretrained",
    "open_checkpoint",
    "record_trace",
    "ConfigError",
    "allocator",
    "dump_snapshot",
    "empty_cache",
    "format_report",
    "install",
    "installed",
    "is_installed",
    "memory_snapshot",
    "memory_stats",
    "options",
    "reset_peak_stats",
    "uninstall",
]

# Components that live in their own modules, imported on first use (keeps `import torchpool` fast).
_LAZY = {
    "open_checkpoint": "checkpoint.reader",
    "CheckpointError": "checkpoint.reader",
    "load_lazily": "checkpoint.lazy",
    "load_into": "checkpoint.lazy",
    "init_empty_weights": "checkpoint.lazy",
    "from_pretrained": "checkpoint.hf",
    "record_trace": "tracing.trace",
    "dump_snapshot": "tracing.memviz",
    "LeakDetector": "leaks",
    "Leak": "leaks",
    "memory_allocated": "memory",
    "max_memory_allocated": "memory",
    "memory_reserved": "memory",
    "max_memory_reserved": "memory",
    "memory_summary": "memory",
    "monitor": "export",
    "report_to_tracemalloc": "memory",
    "TRACEMALLOC_DOMAIN": "memory",
}
# Submodules that `torchpool.NAME` imports on first use, the old names of moved ones included
# (Note [Moved modules] in _aliases.py).
_SUBMODULES = {"checkpoint", "tracing", "cli", "cuda", "stats", "memory", "leaks", "export", *_aliases.MOVED}


def __getattr__(name: str):
    import importlib

    module = _LAZY.get(name)
    if module is not None:
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'torchpool' has no attribute {name!r}")


from ._install import _install_from_environment  # noqa: E402

_install_from_environment()
