"""The package layout (issue 13): the allocator API at the top, checkpoint/, tracing/, cli/; every
module name used before the move still imports and is the moved module itself (Note [Moved modules])."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

import torchpool
from torchpool import _aliases

# Every old name, spelled out (not read from _aliases.MOVED, so a name dropped from the table fails here).
OLD_TO_NEW = {
    "torchpool.lazy": "torchpool.checkpoint.lazy",
    "torchpool.hf": "torchpool.checkpoint.hf",
    "torchpool.distributed": "torchpool.checkpoint.distributed",
    "torchpool._ranges": "torchpool.checkpoint._ranges",
    "torchpool.inspect": "torchpool.checkpoint.inspect",
    "torchpool.trace": "torchpool.tracing.trace",
    "torchpool.replay": "torchpool.tracing.replay",
    "torchpool.memviz": "torchpool.tracing.memviz",
    "torchpool.plots": "torchpool.tracing.plots",
    "torchpool.launch": "torchpool.cli.launch",
    "torchpool.top": "torchpool.cli.top",
    "torchpool.bench": "torchpool.cli.bench",
    "torchpool.demo": "torchpool.cli.demo",
    "torchpool.loader_demo": "torchpool.cli.loader_demo",
    "torchpool.fragmentation_demo": "torchpool.cli.fragmentation_demo",
    "torchpool.leak_demo": "torchpool.cli.leak_demo",
    "torchpool.workloads": "torchpool.cli.workloads",
}
# Names that did not move (the allocator API, and packages whose old name is the new package).
STAYED = ["torchpool.cuda", "torchpool.stats", "torchpool.memory", "torchpool.leaks", "torchpool.export",
          "torchpool.checkpoint", "torchpool.cli", "torchpool._config", "torchpool._install", "torchpool._build"]


def test_the_table_is_the_one_tested():
    assert {f"torchpool.{k}": f"torchpool.{v}" for k, v in _aliases.MOVED.items()} == OLD_TO_NEW


@pytest.mark.parametrize("old, new", sorted(OLD_TO_NEW.items()))
def test_old_name_is_the_moved_module(old, new):
    if old.endswith("plots"):
        pytest.importorskip("matplotlib")
    moved = importlib.import_module(new)
    assert importlib.import_module(old) is moved
    assert sys.modules[old] is moved
    assert getattr(torchpool, old.split(".", 1)[1]) is moved
    # The moved module keeps its own identity: name, spec and file are the new ones.
    assert moved.__name__ == new and moved.__spec__.name == new
    assert os.sep.join(new.split(".")[1:]) + ".py" in moved.__file__


@pytest.mark.parametrize("name", STAYED)
def test_names_that_stayed_import(name):
    assert importlib.import_module(name) is getattr(torchpool, name.split(".", 1)[1])


def test_checkpoint_package_is_the_reader_api():
    from torchpool.checkpoint import reader

    for name in reader.__all__:
        assert getattr(torchpool.checkpoint, name) is getattr(reader, name)
    assert torchpool.CheckpointError is reader.CheckpointError
    assert torchpool.open_checkpoint is reader.open_checkpoint


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_module"):
        torchpool.no_such_module  # noqa: B018
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("torchpool.no_such_module")


@pytest.mark.parametrize("stmt", [
    "import torchpool.lazy; import torchpool.checkpoint.lazy as m; assert torchpool.lazy is m",
    "from torchpool import trace, replay; import torchpool.tracing as t; assert (trace, replay) == (t.trace, t.replay)",
    "from torchpool.distributed import HFStorageReader; "
    "assert HFStorageReader.__module__ == 'torchpool.checkpoint.distributed'",
    "import torchpool; assert torchpool.top.__name__ == 'torchpool.cli.top'",
])
def test_old_imports_in_a_fresh_interpreter(stmt):
    """Each spelling first thing in a process (nothing imported the new module before)."""
    r = subprocess.run([sys.executable, "-W", "error::ImportWarning", "-c", stmt], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("module", ["torchpool.replay", "torchpool.tracing.replay"])
def test_python_m_old_and_new_name(module):
    """`python -m torchpool.replay` is how a replay measures in a fresh process; both names run it."""
    r = subprocess.run([sys.executable, "-m", module, "--probe", "torchpool"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_top_level_shows_the_parts():
    """The allocator API at the top; everything else in a subpackage (the old names have no files)."""
    root = os.path.dirname(torchpool.__file__)
    for old in OLD_TO_NEW:
        assert not os.path.exists(os.path.join(root, old.split(".", 1)[1] + ".py")), old
    for sub in ("checkpoint", "tracing", "cli"):
        assert os.path.isfile(os.path.join(root, sub, "__init__.py"))
