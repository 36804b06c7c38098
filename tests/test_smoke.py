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
