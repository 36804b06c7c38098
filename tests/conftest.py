import os
import subprocess
import sys

import pytest


def run_python(code: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter (allocator swaps are process-wide)."""
    full_env = dict(os.environ)
    full_env.pop("TORCHPOOL_CONF", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=timeout)


@pytest.fixture
def python_subprocess():
    return run_python
