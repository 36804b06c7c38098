"""Allocation traces: record, import, replay against allocators, export, plot.

    trace.py     record_trace, the .tptrace format and the importers (RMM logs, PyTorch snapshots)
    replay.py    replay a trace against torchpool's modes, the PyTorch policy emulation and system
                 allocators (the C++ engine in csrc/replay); `python -m torchpool.tracing.replay`
                 is the fresh process one measurement runs in
    memviz.py    dump_snapshot: the pickle pytorch.org/memory_viz reads
    plots.py     the live/reserved timelines and segment maps of `torchpool bench fragmentation --plot`

Old names (``torchpool.trace``, ``torchpool.replay``, ...) are the same modules (Note [Moved modules]).
"""
