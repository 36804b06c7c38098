"""torchpool on CUDA: its caching allocator behind PyTorch's CUDAPluggableAllocator.

    import torchpool
    torchpool.install(device="cuda")          # first thing, before any CUDA tensor exists
    ...
    torchpool.memory_stats(device="cuda:0")   # torch.cuda.memory_stats() raises with a pluggable allocator

or at startup: ``TORCHPOOL_CONF="cuda=1" python train.py`` / ``torchpool run --conf cuda=1 train.py``.
For one region of a program only: ``with torch.cuda.use_mem_pool(torchpool.cuda.mempool()): ...``.

The allocator lives in libtorchpool_cuda.so (``library_path()``), which reaches the CUDA driver with
dlopen (``TORCHPOOL_CUDA_DRIVER`` names another driver library, e.g. the fake one of the tests).
What PyTorch's hooks cannot reach from Python is provided here: stats, snapshot, empty_cache,
reset_peak_stats and ``record_stream`` (see docs/reference/cuda.md: PyTorch's ``Tensor.record_stream`` does
nothing under a pluggable allocator; call ``torchpool.cuda.record_stream(tensor, stream)``).
"""

from __future__ import annotations

import ctypes
import json
import threading
from pathlib import Path

import torch

from . import _config
from ._build import _C

_LIB_NAME = "libtorchpool_cuda.so"
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_pluggable = None  # the CUDAPluggableAllocator once installed (kept alive: torch holds raw pointers)
_installed_options: dict | None = None

_WHAT_TO_DO = (
    "Install torchpool for CUDA at startup, before the first CUDA tensor or CUDA call: call "
    "torchpool.install(device='cuda') first thing in the program, run it as "
    "`torchpool run --conf cuda=1 script.py`, or set TORCHPOOL_CONF=cuda=1 and import torchpool first."
)


class CudaUnavailableError(RuntimeError):
    """torchpool cannot serve CUDA tensors in this process (no CUDA torch, no driver, too late)."""


class CudaGraphCaptureError(RuntimeError):
    """An allocation on a stream that is being captured into a CUDA graph (docs/reference/cuda.md, Note [Graph
    capture]): run graph capture without torchpool's CUDA allocator."""


# Note [Driver errors] (csrc/cuda/torchpool_cuda.cc): why an allocation failed.
_KIND_OOM, _KIND_DRIVER, _KIND_CAPTURE, _KIND_UNAVAILABLE = 1, 2, 3, 4


def library_path() -> str:
    """Path of libtorchpool_cuda.so (next to the extension, also in an editable install)."""
    for d in (Path(_C.__file__).parent, Path(__file__).parent):
        p = d / _LIB_NAME
        if p.exists():
            return str(p)
    raise FileNotFoundError(f"torchpool: {_LIB_NAME} is not installed next to {_C.__file__}; rebuild torchpool")


def _library() -> ctypes.CDLL:
    global _lib
    with _lock:
        if _lib is None:
            lib = ctypes.CDLL(library_path())
            vp, i, ll, cp = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_char_p
            sigs = {
                "torchpool_cuda_alloc": (vp, [ctypes.c_ssize_t, i, vp]),
                "torchpool_cuda_alloc_nothrow": (vp, [ctypes.c_ssize_t, i, vp, ctypes.POINTER(i)]),
                "torchpool_cuda_set_error_handler": (None, [vp]),
                "torchpool_cuda_free": (None, [vp, ctypes.c_size_t, i, vp]),
                "torchpool_cuda_configure": (i, [cp]),
                "torchpool_cuda_last_error": (cp, []),
                "torchpool_cuda_set_oom_handler": (None, [vp]),
                "torchpool_cuda_driver": (cp, []),
                "torchpool_cuda_has_allocator": (i, [i]),
                "torchpool_cuda_record_stream": (i, [vp, i, vp]),
                "torchpool_cuda_process_events": (ll, [i]),
                "torchpool_cuda_empty_cache": (ll, [i]),
                "torchpool_cuda_reset_peak_stats": (i, [i]),
                "torchpool_cuda_stats": (cp, [i]),
                "torchpool_cuda_snapshot": (cp, [i]),
                "torchpool_cuda_check": (cp, [i]),
                "torchpool_cuda_upstream_name": (cp, [i]),
                "torchpool_cuda_reset_for_tests": (i, []),
            }
            for name, (res, args) in sigs.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = res, args
            _lib = lib
        return _lib


def _last_error() -> str:
    return _library().torchpool_cuda_last_error().decode()


class CudaAllocator:
    """torchpool's allocator of one CUDA device inside libtorchpool_cuda.so, with the methods of
    torchpool.Allocator that torchpool.memory_stats() and friends use."""

    def __init__(self, index: int):
        self.index = index
        self.device_name = f"cuda:{index}"

    def __repr__(self) -> str:
        return f"<torchpool.cuda.CudaAllocator {self.device_name} upstream={self.upstream_name}>"

    @property
    def upstream_name(self) -> str:
        return _library().torchpool_cuda_upstream_name(self.index).decode()

    # The library emits what Allocator.stats() / snapshot() return, as JSON (Note [One serializer]).
    def stats(self) -> dict:
        return self._json(_library().torchpool_cuda_stats(self.index))

    def snapshot(self) -> list[dict]:
        return self._json(_library().torchpool_cuda_snapshot(self.index))

    def _json(self, text: bytes | None):
        if text is None:
            raise RuntimeError(f"torchpool: no allocator for {self.device_name}")
        return json.loads(text)

    def empty_cache(self) -> int:
        """Returns the bytes released; blocks another stream may still use stay (docs/reference/cuda.md)."""
        return int(_library().torchpool_cuda_empty_cache(self.index))

    def reset_peak_stats(self) -> None:
        _library().torchpool_cuda_reset_peak_stats(self.index)

    def check(self) -> str:
        return _library().torchpool_cuda_check(self.index).decode()

    def process_events(self) -> int:
        """Releases freed blocks whose streams have passed them; returns how many still wait."""
        return int(_library().torchpool_cuda_process_events(self.index))

    def record_stream(self, ptr: int, stream: int) -> None:
        if _library().torchpool_cuda_record_stream(ctypes.c_void_p(ptr), self.index, ctypes.c_void_p(stream)) != 0:
            raise ValueError(f"torchpool: address {ptr:#x} is not a live torchpool block on {self.device_name}")

    # Raw access, for tests and tools that manage device memory themselves.  Through the entry point
    # that never throws (no C++ exception may cross ctypes): the failure's kind picks the exception.
    def allocate(self, nbytes: int, stream: int = 0) -> int:
        lib = _library()
        kind = ctypes.c_int(0)
        p = lib.torchpool_cuda_alloc_nothrow(nbytes, self.index, ctypes.c_void_p(stream), ctypes.byref(kind))
        if not p:
            msg = _last_error()
            if kind.value == _KIND_UNAVAILABLE:  # no driver: not an out-of-memory
                raise CudaUnavailableError(msg)
            if kind.value == _KIND_CAPTURE:
                raise CudaGraphCaptureError(msg)
            if kind.value == _KIND_DRIVER:
                raise RuntimeError(msg)
            raise torch.OutOfMemoryError(msg)
        return p

    def free(self, ptr: int, stream: int = 0) -> None:
        _library().torchpool_cuda_free(ctypes.c_void_p(ptr), 0, self.index, ctypes.c_void_p(stream))


def _index(device) -> int:
    dev = torch.device("cuda" if device is None else device)
    if dev.type != "cuda":
        raise ValueError(f"torchpool.cuda: {dev} is not a CUDA device")
    if dev.index is not None:
        return dev.index
    return torch.cuda.current_device() if _pluggable is not None else 0


def configure(**options) -> None:
    """Set allocator options (as install()) without swapping torch's allocator; before the first
    allocation.  For the MemPool route and for tests."""
    cfg = _config.normalize(options)
    # Options that apply only to the CPU (torchpool.options()'s devices) may come with cuda=1 in a
    # shared TORCHPOOL_CONF; the library checks the rest by the same schema (Note [One option schema]).
    conf = ",".join(f"{k}={v if isinstance(v, float) else int(v)}" for k, v in cfg.items()
                    if "cuda" in _config.OPTIONS[k]["devices"])
    if _library().torchpool_cuda_configure(conf.encode()) != 0:
        raise _config.ConfigError(_last_error())


def _check_cuda_available() -> None:
    if torch.version.cuda is None:
        raise CudaUnavailableError(
            f"torchpool: this torch ({torch.__version__}) is built without CUDA, so there is no CUDA "
            "allocator to replace. Install a CUDA build of torch; torchpool.install(device='cpu') serves "
            "host tensors.")
    driver = _library().torchpool_cuda_driver().decode()
    if driver.startswith("error: "):
        raise CudaUnavailableError(driver[len("error: "):])
    # Not torch.cuda.is_available(): without PYTORCH_NVML_BASED_CUDA_CHECK it calls cudaGetDeviceCount,
    # which runs cuInit, and a process that forks after cuInit leaves its children no usable CUDA.
    # device_count() asks NVML first; the driver itself is initialised at the first allocation
    # (Note [Reaching the driver]).
    if torch.cuda.device_count() <= 0:
        raise CudaUnavailableError("torchpool: torch finds no CUDA device (torch.cuda.device_count() is 0)")


def install(device="cuda", **options) -> CudaAllocator:
    """Make torchpool PyTorch's CUDA allocator (all devices) and return the allocator of `device`.

    Must run before CUDA is initialised; raises CudaUnavailableError saying what to do otherwise.
    Options as torchpool.install() (max_bytes, max_cached_bytes, expandable_segments, ...)."""
    global _pluggable, _installed_options
    idx = torch.device(device).index or 0
    if _pluggable is not None:
        if options and _config.normalize(options) != _installed_options:
            raise CudaUnavailableError("torchpool: the CUDA allocator is installed already and its options cannot "
                                       "change (one custom CUDA allocator per process)")
        return CudaAllocator(idx)
    _check_cuda_available()
    if torch.cuda.is_initialized():
        raise CudaUnavailableError(
            "torchpool: CUDA is already initialised in this process, and PyTorch cannot swap an allocator "
            f"that has been used. {_WHAT_TO_DO}")
    configure(**options)
    _library().torchpool_cuda_set_error_handler(ctypes.c_void_p(_C._cuda_error_handler()))
    alloc = torch.cuda.memory.CUDAPluggableAllocator(library_path(), "torchpool_cuda_alloc", "torchpool_cuda_free")
    try:
        torch.cuda.memory.change_current_allocator(alloc)
    except RuntimeError as e:
        raise CudaUnavailableError(f"torchpool: PyTorch refused the allocator swap ({e}). {_WHAT_TO_DO}") from e
    _pluggable = alloc
    _installed_options = _config.normalize(options)
    return CudaAllocator(idx)


def uninstall(device="cuda") -> None:
    """PyTorch cannot swap its CUDA allocator back once used: this raises when torchpool is installed."""
    if _pluggable is not None:
        raise RuntimeError("torchpool: the CUDA allocator cannot be uninstalled (PyTorch allows one custom CUDA "
                           "allocator per process and no swap after first use); use torchpool.cuda.mempool() "
                           "to scope torchpool to a region instead")


def allocator(device="cuda") -> CudaAllocator | None:
    """The torchpool allocator of `device` if libtorchpool_cuda.so has one (after install(), or after the
    first allocation through mempool()), else None."""
    idx = _index(device)
    if _lib is None and _pluggable is None:
        return None
    return CudaAllocator(idx) if _library().torchpool_cuda_has_allocator(idx) else None


def mempool(**options):
    """A torch.cuda.MemPool whose segments come from torchpool, for ``torch.cuda.use_mem_pool``.

    PyTorch's caching allocator stays in charge (and its memory_stats keep working); torchpool
    only provides that pool's memory.  Options as install(), before the first allocation."""
    _check_cuda_available()
    if options:
        configure(**options)
    _library().torchpool_cuda_set_error_handler(ctypes.c_void_p(_C._cuda_error_handler()))
    alloc = torch.cuda.memory.CUDAPluggableAllocator(library_path(), "torchpool_cuda_alloc", "torchpool_cuda_free")
    return torch.cuda.MemPool(alloc.allocator())


def record_stream(tensor: torch.Tensor, stream) -> None:
    """What ``tensor.record_stream(stream)`` does under PyTorch's own allocator: the tensor's memory
    is reused only after the work queued on `stream` by the time the tensor is freed has completed.
    (Under a pluggable allocator PyTorch's record_stream does nothing: docs/reference/cuda.md.)"""
    handle = stream.cuda_stream if hasattr(stream, "cuda_stream") else int(stream)
    alloc = allocator(tensor.device)
    if alloc is None:
        raise RuntimeError("torchpool: torchpool does not serve CUDA memory in this process")
    alloc.record_stream(tensor.untyped_storage().data_ptr(), handle)
