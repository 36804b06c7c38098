"""A leak detector for training loops: which lines allocated the memory that keeps growing.

    det = torchpool.LeakDetector()          # torchpool must be installed (torchpool.install())
    for batch in loader:
        train_step(batch)
        det.step()                          # once per iteration
    print(det.report())                     # or det.leaks(): [Leak(stack, live_bytes, growth_per_step, count)]

How it works: allocations are sampled by bytes with their Python stacks (Note [Sampled allocation
stacks], csrc/bindings/monitor.cc; default one sample per 256 KiB allocated, every allocation of at
least that size).  At each step() the detector records, per allocation site (stack), the estimated
bytes still alive that were allocated *before* the step that just ended.  Note [What grows]: a site
leaks when such survivors were allocated in at least `min_steps` distinct steps of the last `window`
steps and its surviving bytes grew over the window.  Memory made once (parameters, optimizer state
made in step 1, a cache that fills in the first steps) has survivors from one or a few early steps
only; per-step temporaries and gradients never survive a step.  A deque of the last k outputs is
bounded: its surviving bytes stop growing.

When the leaked blocks are saved tensors of an autograd graph that a live tensor holds (the classic
``total = total + loss``), Leak.kept_by names the variable and the line that chains the graphs, and
the leaked sites are the forward lines whose activations the graph keeps.
"""

from __future__ import annotations

import dis
import gc
import linecache
import os
import sys
from collections import deque
from dataclasses import dataclass, field

import torch

from ._build import _C
from .stats import fmt_bytes, format_table

DEFAULT_SAMPLE_BYTES = 256 << 10

_SKIP_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch,)) + (os.path.dirname(__file__) + os.sep,)


@dataclass
class Leak:
    stack: list[str]            # "path:line in function", innermost last
    live_bytes: int             # estimated bytes alive now that this site allocated
    growth_per_step: int        # estimated bytes per step (least squares over the window)
    count: int                  # estimated live blocks
    steps: int = 0              # distinct steps (in the window) whose blocks are still alive
    kept_by: str | None = None  # what keeps them alive, when the detector can tell
    stack_id: int = field(default=-1, repr=False)

    @property
    def site(self) -> str:
        """The innermost frame outside torch and torchpool: the line to look at."""
        for s in reversed(self.stack):
            if not _in_skipped(s):
                return s
        return self.stack[-1] if self.stack else "<no Python frame>"


class LeakDetector:
    """Sample live allocations with their stacks and report the sites whose live bytes keep growing.

    sample_bytes: mean bytes between samples (allocations at least this large are always sampled);
    smaller samples more and costs more (bench/bench_leaks.py).  window: steps looked at; min_steps:
    distinct steps whose allocations must survive for a site to count as leaking; min_growth_bytes:
    ignore slower growth.  Only one detector runs at a time in a process."""

    def __init__(self, sample_bytes: int = DEFAULT_SAMPLE_BYTES, window: int = 10, min_steps: int = 3,
                 min_growth_bytes: int = 0, device: str = "cpu", start: bool = True):
        if torch.device(device).type != "cpu":
            raise ValueError(f"torchpool.LeakDetector: device {device!r}: only the CPU allocator is observed")
        if window < 2 or min_steps < 2 or min_steps > window:
            raise ValueError("torchpool.LeakDetector: need window >= min_steps >= 2")
        self.sample_bytes = int(sample_bytes)
        self.window = int(window)
        self.min_steps = int(min_steps)
        self.min_growth_bytes = int(min_growth_bytes)
        self._snaps: deque = deque(maxlen=self.window + 1)
        self._graph_sizes: dict = {}
        self._graph_growing: set = set()
        self._steps = 0
        self._running = False
        if start:
            self.start()

    # ---- lifecycle ----
    def start(self) -> "LeakDetector":
        from ._install import allocator

        if allocator("cpu") is None:
            raise RuntimeError("torchpool.LeakDetector: torchpool is not installed; call torchpool.install() first")
        _C.monitor.sampler_start(self.sample_bytes)
        self._running = True
        return self

    def stop(self) -> None:
        if self._running:
            _C.monitor.sampler_stop()
            self._running = False

    def __enter__(self) -> "LeakDetector":
        return self if self._running else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self):
        try:
            self.stop()
        except Exception:  # noqa: BLE001 - interpreter exit
            pass

    # ---- per step ----
    def step(self) -> None:
        """Call once per iteration (at the same point of each)."""
        if not self._running:
            raise RuntimeError("torchpool.LeakDetector.step(): the detector is stopped")
        live = _C.monitor.sampler_live()
        now = _C.monitor.sampler_step() - 1  # the step whose allocations just ended
        sites: dict[int, list] = {}
        for stack, birth, nbytes, count, _blocks in live:
            s = sites.setdefault(stack, [0.0, 0.0, 0.0, set()])  # survivor bytes, all bytes, all count, births
            s[1] += nbytes
            s[2] += count
            if birth < now:
                s[0] += nbytes
                s[3].add(birth)
        self._snaps.append((now, sites))
        self._steps += 1
        if self._steps % 2 == 0:  # a graph walk costs ~1 us per node: every other step is enough
            self._note_graphs(sys._getframe(1))

    def _note_graphs(self, frame) -> None:
        """Note [Autograd graph leaks], the part torchpool's memory cannot show: when backward() has
        freed each step's saved tensors, `total = total + loss` still chains every step's graph
        nodes (heap memory, not tensors).  The caller's variables that hold a graph are counted each
        other step (up to 20000 nodes); a graph that grew at each of the last min_steps counts is reported."""
        for name, v in list(frame.f_locals.items()):
            if isinstance(v, torch.Tensor) and v.grad_fn is not None:
                key = (frame.f_code, name)
                hist = self._graph_sizes.setdefault(key, deque(maxlen=self.min_steps + 1))
                hist.append((self._steps, _count_nodes(v.grad_fn, limit=20000)))

    # ---- results ----
    def leaks(self) -> list[Leak]:
        """The growing sites, fastest growth first; [] on a loop whose memory does not grow."""
        if len(self._snaps) < self.min_steps + 1:
            return []
        now, last = self._snaps[-1]
        out = []
        for sid, (surv, all_bytes, all_count, births) in last.items():
            recent = {b for b in births if b > now - self.window - 1}
            if len(recent) < self.min_steps:
                continue
            series = [(t, snap[sid][0] if sid in snap else 0.0) for t, snap in self._snaps]
            ys = [y for _, y in series]
            if ys[-1] <= ys[0] or ys[-1] <= max(ys[: max(1, len(ys) // 2)]):
                continue
            growth = _slope(series)
            if growth <= 0 or growth < self.min_growth_bytes:
                continue
            out.append(Leak(stack=list(_C.monitor.sampler_stack(sid)), live_bytes=int(all_bytes),
                            growth_per_step=int(growth), count=int(round(all_count)), steps=len(recent), stack_id=sid))
        out.sort(key=lambda lk: -lk.growth_per_step)
        if out:
            _explain_graphs(out)
        explained = {lk.kept_by for lk in out if lk.kept_by}
        for (code, name), hist in self._graph_sizes.items():
            if len(hist) < self.min_steps + 1 or self._steps - hist[-1][0] > 1:
                continue
            sizes = [n for _, n in hist]
            if all(b > a for a, b in zip(sizes, sizes[1:])):
                self._graph_growing.add((code, name))
            elif (code, name) not in self._graph_growing or not all(b >= a for a, b in zip(sizes, sizes[1:])):
                self._graph_growing.discard((code, name))  # a graph past the walk's limit keeps its verdict
                continue
            if any(f"`{name}`" in why for why in explained):
                continue  # already named as what keeps a growing site's tensors
            line = _assignment_line(code, name)
            where = f"{code.co_filename}:{line or code.co_firstlineno} in {code.co_name}"
            src = linecache.getline(code.co_filename, line).strip() if line else ""
            out.append(Leak(stack=[where], live_bytes=0, growth_per_step=0, count=sizes[-1], steps=len(sizes) - 1,
                            kept_by=(f"the autograd graph of `{name}` ({where}{': `' + src + '`' if src else ''}), "
                                     f"which links every step's graph ({sizes[-1]} nodes, +{(sizes[-1] - sizes[0]) // max(1, hist[-1][0] - hist[0][0])} "
                                     f"per step; their saved tensors were freed by backward, the nodes stay); accumulate "
                                     f"`{name} += loss.item()` (or `loss.detach()`) instead")))
        return out

    def report(self, max_frames: int = 6) -> str:
        leaks = self.leaks()
        samples, no_stack, live = _C.monitor.sampler_counts()
        head = (f"torchpool leak detector: {self._steps} steps observed, window {self.window}, "
                f"sampling 1 per {fmt_bytes(self.sample_bytes)} ({samples} samples, {live} live)")
        if not leaks:
            return head + "\nno leaks: no allocation site's surviving memory grew over the window"
        rows = [[i + 1, f"+{fmt_bytes(lk.growth_per_step)}" if lk.live_bytes else "graph",
                 fmt_bytes(lk.live_bytes) if lk.live_bytes else "-", lk.count, lk.steps, lk.site]
                for i, lk in enumerate(leaks)]
        out = [head, f"{len(leaks)} growing allocation site(s):",
               format_table(["#", "growth/step", "live", "blocks", "steps", "allocated at"], rows)]
        graphs = {}
        for i, lk in enumerate(leaks):
            if lk.kept_by:
                graphs.setdefault(lk.kept_by, []).append(i + 1)
        for why, ids in graphs.items():
            if any(leaks[i - 1].live_bytes for i in ids):
                out.append(f"\nkept alive by {why}; sites {', '.join(map(str, ids))} are the forward lines whose "
                           "activations that graph keeps")
            else:
                out.append(f"\n#{ids[0]}: a growing autograd graph: {why}")
        for i, lk in enumerate(leaks):
            if not lk.live_bytes:
                continue
            frames = [s for s in lk.stack if not _in_skipped(s)][-max_frames:] or lk.stack[-max_frames:]
            out.append(f"\n#{i + 1} stack (innermost last):")
            out += [f"    {s}" + _source(s) for s in frames]
        return "\n".join(out)


# ---- helpers ----

def _slope(series: list[tuple[int, float]]) -> float:
    n = len(series)
    mx = sum(t for t, _ in series) / n
    my = sum(y for _, y in series) / n
    den = sum((t - mx) ** 2 for t, _ in series)
    return sum((t - mx) * (y - my) for t, y in series) / den if den else 0.0


def _split(s: str) -> tuple[str, int]:
    loc = s.split(" in ", 1)[0]
    path, _, line = loc.rpartition(":")
    return path, int(line) if line.isdigit() else 0


def _in_skipped(s: str) -> bool:
    """A frame inside torch or torchpool (whose demos count as user code)."""
    path = _split(s)[0]
    return path.startswith(_SKIP_DIRS) and not path.endswith("_demo.py")


def _source(s: str) -> str:
    path, line = _split(s)
    text = linecache.getline(path, line).strip()
    return f"    `{text}`" if text else ""


def _count_nodes(root, limit: int = 100_000) -> int:
    seen, todo = set(), [root]
    while todo and len(seen) < limit:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        todo.extend(fn for fn, _ in node.next_functions)
    return len(seen)


def _saved_ptrs(node) -> list[int]:
    ptrs = []
    for name in dir(node):
        if not name.startswith("_saved_"):
            continue
        try:
            v = getattr(node, name)
        except Exception:  # noqa: BLE001 - freed by backward, or not a tensor
            continue
        for t in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(t, torch.Tensor):
                try:
                    ptrs.append(t.untyped_storage().data_ptr())
                except Exception:  # noqa: BLE001
                    pass
    return ptrs


def _graph_holds(root, wanted: set[int], limit: int = 20000) -> set[int]:
    """The addresses of `wanted` that are saved tensors somewhere in root's autograd graph."""
    found, seen, todo = set(), set(), [root]
    while todo and len(seen) < limit:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        found.update(p for p in _saved_ptrs(node) if p in wanted)
        todo.extend(fn for fn, _ in getattr(node, "next_functions", ()))
    return found


def _named_tensors():
    """(name, tensor, frame) for tensors with an autograd graph bound to a variable of a live frame."""
    for frame in sys._current_frames().values():
        f = frame
        while f is not None:
            for name, v in list(f.f_locals.items()):
                if isinstance(v, torch.Tensor) and v.grad_fn is not None:
                    yield name, v, f
            f = f.f_back


def _assignment_line(code, name: str) -> int | None:
    """The line that stores `name` from an expression that also reads it (total = total + loss), else
    the last line that stores it."""
    stores, loads = {}, set()
    for ins in dis.get_instructions(code):
        line = ins.positions.lineno if ins.positions else None
        if ins.argval == name and line is not None:
            if ins.opname.startswith("STORE"):
                stores[line] = True
            elif ins.opname.startswith("LOAD"):
                loads.add(line)
    both = [ln for ln in stores if ln in loads]
    return max(both) if both else (max(stores) if stores else None)


def _explain_graphs(leaks: list[Leak]) -> None:
    """Note [Autograd graph leaks]: the leaked blocks of each site are looked up among the saved
    tensors of the autograd graphs that live variables hold; a graph that holds blocks of a leaking
    site allocated in several steps links those steps' graphs (each step's loss added to a live
    tensor).  The variable is named with the line that stores it from itself."""
    owner: dict[int, Leak] = {}
    for lk in leaks:
        for addr, _size, _birth in _C.monitor.sampler_addresses(lk.stack_id):
            owner[addr] = lk
    if not owner:
        return
    wanted = set(owner)
    seen_roots = set()
    candidates = list(_named_tensors())
    for name, t, frame in candidates:
        root = t.grad_fn
        if id(root) in seen_roots:
            continue
        seen_roots.add(id(root))
        held = _graph_holds(root, wanted)
        if not held:
            continue
        code = frame.f_code
        line = _assignment_line(code, name)
        where = f"{code.co_filename}:{line} in {code.co_name}" if line else f"{code.co_filename} in {code.co_name}"
        src = linecache.getline(code.co_filename, line).strip() if line else ""
        why = (f"the autograd graph of `{name}` ({where}{': `' + src + '`' if src else ''}), which links every "
               f"step's graph; accumulate `{name} += loss.item()` (or `loss.detach()`) instead")
        for addr in held:
            if owner[addr].kept_by is None:
                owner[addr].kept_by = why
        wanted -= held
        if not wanted:
            return
    # Graphs no variable names (held in a container, a closure, ...): found through the collector.
    if wanted:
        for obj in gc.get_objects():
            if issubclass(type(obj), torch.Tensor) and obj.grad_fn is not None and id(obj.grad_fn) not in seen_roots:
                seen_roots.add(id(obj.grad_fn))
                held = _graph_holds(obj.grad_fn, wanted)
                for addr in held:
                    if owner[addr].kept_by is None:
                        owner[addr].kept_by = (f"an autograd graph held by a live tensor (grad_fn "
                                               f"{type(obj.grad_fn).__name__}) that no variable names")
                wanted -= held
                if not wanted:
                    return
