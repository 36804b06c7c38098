import torch

import torchpool


def test_extension_matches_loaded_torch():
    assert torchpool._C.built_with_torch == torch.__version__


def test_fake_allocator_round_trip():
    a = torchpool.Allocator("fake")
    p = a.allocate(100)
    assert a.block_size(p) == (128, 100)
    a.free(p)
    assert a.check() == ""


def test_version_names_torchpool_and_the_torch_it_was_built_against():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "torchpool", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"torchpool {torchpool.__version__} (built against torch {torch.__version__})"
    from importlib.metadata import version

    assert version("torchpool") == torchpool.__version__  # one source of the version
