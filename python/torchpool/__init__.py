"""torchpool: control of tensor memory for PyTorch.

    import torchpool
    torchpool.install()                 # torchpool now serves every CPU tensor
    torchpool.memory_stats()            # torch.cuda.memory_stats()-style counters + fragmentation

or at startup: ``TORCHPOOL_CONF="cpu=1" python train.py`` or ``torchpool run train.py``.
"""

from __future__ import annotations

import torch  # noqa: F401  (loads libc10.so, which the extension links)

from ._build import _C  # noqa: E402  (checks the torch version the extension was built with)
from ._config import ConfigError  # noqa: E402
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
    "ConfigError",
    "allocator",
    "empty_cache",
    "format_report",
    "install",
    "installed",
    "is_installed",
    "memory_snapshot",
    "memory_stats",
    "reset_peak_stats",
    "uninstall",
]

from ._install import _install_from_environment  # noqa: E402

_install_from_environment()
