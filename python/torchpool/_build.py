"""Load the native extension and check that it was built against the torch that is loaded."""

from __future__ import annotations

import torch

_REBUILD = (
    "Rebuild torchpool against the torch in this environment: "
    "pip install --no-build-isolation --force-reinstall --no-deps <torchpool source>"
)

try:
    from . import _C
except ImportError as e:  # undefined symbols when the torch ABI differs, or a missing build
    raise ImportError(
        f"torchpool: the native extension failed to load with torch {torch.__version__}: {e}. {_REBUILD}"
    ) from e

if _C.built_with_torch != torch.__version__:
    raise ImportError(
        f"torchpool: the extension was built against torch {_C.built_with_torch} but torch "
        f"{torch.__version__} is loaded. {_REBUILD}"
    )
