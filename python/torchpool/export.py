"""Export torchpool's statistics to TensorBoard and Prometheus while the program runs.

    with torchpool.monitor(interval_s=1.0, tensorboard="runs/mem", prometheus_port=9464):
        train()
    mon = torchpool.monitor(tensorboard="runs/mem").start(); ...; mon.stop()

TensorBoard: a background thread samples torchpool.memory_stats() of every device torchpool serves
every `interval_s` seconds (and once at start and stop) into scalars tagged
``torchpool/<device>/<stat>`` through torch.utils.tensorboard (package `tensorboard`).
Prometheus: an HTTP endpoint (package `prometheus-client`) on `prometheus_addr`:`prometheus_port`
(127.0.0.1 unless told otherwise; port 0 picks a free one: `mon.prometheus_port`) answers each scrape
with the current values, in the conventional form: gauges in base units with the unit as suffix
(``torchpool_allocated_bytes{device="cpu"}``, ``torchpool_utilization_ratio``), counters ending in
``_total`` (``torchpool_ooms_total``).  Both packages are optional; a missing one is named in the error.
"""

from __future__ import annotations

import threading
import time

# (key in memory_stats, TensorBoard stat name, Prometheus metric name, help)
GAUGES = [
    ("allocated_bytes.all.current", "allocated_bytes", "torchpool_allocated_bytes", "bytes in allocated blocks"),
    ("allocated_bytes.all.peak", "allocated_bytes_peak", "torchpool_allocated_bytes_peak", "peak of allocated bytes"),
    ("reserved_bytes.all.current", "reserved_bytes", "torchpool_reserved_bytes", "bytes in segments held from the OS / driver"),
    ("reserved_bytes.all.peak", "reserved_bytes_peak", "torchpool_reserved_bytes_peak", "peak of reserved bytes"),
    ("active_bytes.all.current", "active_bytes", "torchpool_active_bytes", "bytes in blocks not reusable yet"),
    ("requested_bytes.all.current", "requested_bytes", "torchpool_requested_bytes", "bytes the callers asked for"),
    ("cached_bytes", "cached_bytes", "torchpool_cached_bytes", "reserved minus allocated bytes"),
    ("internal_waste_bytes", "internal_waste_bytes", "torchpool_internal_waste_bytes", "allocated minus requested bytes"),
    ("largest_free_block", "largest_free_block_bytes", "torchpool_largest_free_block_bytes", "largest free block"),
    ("allocation.all.current", "allocated_blocks", "torchpool_allocated_blocks", "number of allocated blocks"),
    ("segment.all.current", "segments", "torchpool_segments", "number of segments"),
    ("utilization", "utilization", "torchpool_utilization_ratio", "allocated / reserved bytes"),
    ("external_fragmentation", "external_fragmentation", "torchpool_external_fragmentation_ratio",
     "1 - largest free block / free bytes"),
]
COUNTERS = [
    ("num_ooms", "ooms", "torchpool_ooms", "allocations that failed for lack of memory"),
    ("num_alloc_retries", "alloc_retries", "torchpool_alloc_retries", "allocations that freed the cache and retried"),
    ("num_upstream_maps", "upstream_maps", "torchpool_upstream_maps", "segments mapped from the OS / driver"),
    ("num_upstream_unmaps", "upstream_unmaps", "torchpool_upstream_unmaps", "segments returned to the OS / driver"),
    ("allocated_bytes.all.allocated", "allocated_bytes_cumulative", "torchpool_allocated_bytes_cumulative",
     "bytes allocated since the start"),
]


def _devices() -> list[str]:
    from ._install import allocator

    out = []
    if allocator("cpu") is not None:
        out.append("cpu")
    try:
        import torch

        if torch.cuda.is_available():
            out += [f"cuda:{i}" for i in range(torch.cuda.device_count()) if allocator(f"cuda:{i}") is not None]
    except Exception:  # noqa: BLE001 - no CUDA support in this torch
        pass
    return out


def _stats(devices) -> dict[str, dict]:
    from ._install import memory_stats

    out = {}
    for d in devices or _devices():
        try:
            out[d] = memory_stats(d)
        except RuntimeError:  # not served by torchpool (any more)
            continue
    return out


class monitor:
    """Sample torchpool's statistics into TensorBoard and/or serve them to Prometheus (module doc)."""

    def __init__(self, interval_s: float = 1.0, tensorboard: str | None = None, prometheus_port: int | None = None,
                 prometheus_addr: str = "127.0.0.1", devices: list[str] | None = None):
        if tensorboard is None and prometheus_port is None:
            raise ValueError("torchpool.monitor: give tensorboard=LOGDIR and/or prometheus_port=PORT")
        if not interval_s > 0:
            raise ValueError(f"torchpool.monitor: interval_s must be positive, not {interval_s!r}")
        self.interval_s = float(interval_s)
        self.logdir = tensorboard
        self.prometheus_port = prometheus_port
        self.prometheus_addr = prometheus_addr
        self.devices = devices
        self.samples = 0
        self._writer = None
        self._server = None
        self._thread = None
        self._stop = threading.Event()
        if tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError:
                raise ImportError("torchpool.monitor(tensorboard=...) needs the package `tensorboard` "
                                  "(pip install tensorboard)") from None
        if prometheus_port is not None:
            try:
                import prometheus_client  # noqa: F401
            except ImportError:
                raise ImportError("torchpool.monitor(prometheus_port=...) needs the package `prometheus-client` "
                                  "(pip install prometheus-client)") from None

    # ---- lifecycle ----
    def start(self) -> "monitor":
        if self._thread is not None or self._server is not None:
            raise RuntimeError("torchpool.monitor: already started")
        self._stop.clear()
        if self.logdir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.logdir))
            self.sample()
            self._thread = threading.Thread(target=self._run, name="torchpool-monitor", daemon=True)
            self._thread.start()
        if self.prometheus_port is not None:
            from prometheus_client import CollectorRegistry, start_http_server

            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Collector(self.devices))
            self._server, _ = start_http_server(int(self.prometheus_port), addr=self.prometheus_addr, registry=registry)
            self.prometheus_port = self._server.server_address[1]
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._writer is not None:
            self.sample()
            self._writer.close()
            self._writer = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "monitor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- TensorBoard ----
    def sample(self) -> None:
        """Write one sample of every stat now (the thread calls this every interval_s)."""
        w = self._writer
        if w is None:
            return
        now = time.time()
        for dev, s in _stats(self.devices).items():
            for key, name, _, _ in GAUGES + COUNTERS:
                if key in s:
                    w.add_scalar(f"torchpool/{dev}/{name}", s[key], global_step=self.samples, walltime=now)
        self.samples += 1
        w.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()


class _Collector:
    """prometheus_client custom collector: reads the statistics at each scrape."""

    def __init__(self, devices):
        self.devices = devices

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = _stats(self.devices)
        for key, _, metric, help_text in GAUGES:
            fam = GaugeMetricFamily(metric, help_text, labels=["device"])
            for dev, s in stats.items():
                if key in s:
                    fam.add_metric([dev], float(s[key]))
            yield fam
        for key, _, metric, help_text in COUNTERS:
            fam = CounterMetricFamily(metric, help_text, labels=["device"])  # exposed as <metric>_total
            for dev, s in stats.items():
                if key in s:
                    fam.add_metric([dev], float(s[key]))
            yield fam
