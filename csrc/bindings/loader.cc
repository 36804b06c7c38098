// Bindings of the checkpoint loader: Shard (one validated, mapped safetensors file), StagingPool
// (bounded page-locked buffers over the host_pinned upstream), and the slice reader. The Python
// side (python/torchpool/checkpoint/reader.py) builds the user API on these.
//
// Errors: loader::CheckpointError becomes torchpool.checkpoint.CheckpointError (a ValueError) with
// .file, .tensor and .rule attributes; its message names all three.
#include <pybind11/functional.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "../loader/safetensors.h"
#include "../loader/shard.h"
#include "../loader/sigbus.h"
#include "../loader/staging.h"
#include "../upstreams/host_mmap.h"
#include "../upstreams/host_pinned.h"
#include "common.h"
#include "registry.h"

namespace py = pybind11;
using namespace torchpool;
using namespace torchpool::loader;

namespace {

py::dict header_dict(const Header& h) {
  py::dict d;
  d["path"] = h.path;
  d["file_size"] = h.file_size;
  d["header_len"] = h.header_len;
  d["data_start"] = h.data_start;
  py::dict md;
  for (const auto& [k, v] : h.metadata) md[py::str(k)] = v;
  d["metadata"] = md;
  py::list ts;
  for (const auto& e : h.tensors) {
    const DTypeInfo& info = dtype_info(e.dtype);
    py::object torch_name = info.torch_name ? py::object(py::str(info.torch_name)) : py::object(py::none());
    ts.append(py::make_tuple(e.name, info.name, torch_name, e.shape, h.data_start + e.begin, e.nbytes(), info.bits));
  }
  d["tensors"] = ts;  // (name, dtype, torch dtype name or None, shape, absolute offset, nbytes, bits)
  return d;
}

struct PyOp {
  std::shared_ptr<ShardFile> shard;
  uint64_t offset, len;
  uintptr_t dst;
  std::string name;
};

std::vector<ReadOp> to_ops(const std::vector<PyOp>& in) {
  std::vector<ReadOp> ops;
  ops.reserve(in.size());
  for (const PyOp& o : in) {
    if (o.offset > o.shard->map_len() || o.len > o.shard->map_len() - o.offset)
      throw CheckpointError(o.shard->path(), o.name, kRulePastEof, "read of [" + std::to_string(o.offset) + ", +" +
                                                                      std::to_string(o.len) + ") is outside the file");
    ops.push_back({o.shard.get(), o.offset, o.len, reinterpret_cast<uint8_t*>(o.dst), &o.name});
  }
  return ops;
}

std::vector<PyOp> parse_ops(const py::list& ops) {
  std::vector<PyOp> out;
  out.reserve(ops.size());
  for (auto item : ops) {
    auto t = item.cast<py::tuple>();
    out.push_back({t[0].cast<std::shared_ptr<ShardFile>>(), t[1].cast<uint64_t>(), t[2].cast<uint64_t>(),
                   t[3].cast<uintptr_t>(), t[4].cast<std::string>()});
  }
  return out;
}

struct PyStaging {
  std::shared_ptr<HostPinnedUpstream> pinned;  // null when another upstream serves the pool
  std::shared_ptr<Upstream> upstream;
  std::unique_ptr<StagingPool> pool;
};

}  // namespace

TORCHPOOL_BINDINGS(30, loader) {
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const CheckpointError& e) {
      py::object cls = py::module_::import("torchpool.checkpoint").attr("CheckpointError");
      py::object err = cls(e.what());
      err.attr("file") = e.file();
      err.attr("tensor") = e.tensor();
      err.attr("rule") = e.rule();
      PyErr_SetObject(cls.ptr(), err.ptr());
    }
  });

  m.attr("max_header_bytes") = kMaxHeaderBytes;
  m.attr("max_header_depth") = kMaxHeaderDepth;
  m.def("sigbus_handler_installed", &sigbus_handler_installed,
        "Whether the SIGBUS handler that names a truncated checkpoint file is installed (Note [SIGBUS message])");
  m.def("safetensors_dtypes", [] {
    py::list out;
    for (size_t i = 0; i < static_cast<size_t>(DType::kCount); ++i) {
      const DTypeInfo& d = dtype_info(static_cast<DType>(i));
      out.append(py::make_tuple(d.name, d.bits, d.torch_name ? py::object(py::str(d.torch_name)) : py::object(py::none())));
    }
    return out;
  }, "[(safetensors name, bits per element, torch dtype name or None)]");
  m.def("validate_bytes", [](const std::string& path, py::bytes data) {
    std::string_view v = data;
    Header h = header_from_bytes(path, v);
    return header_dict(h);
  }, py::arg("path"), py::arg("data"), "Parse and validate a whole safetensors file given as bytes");
  m.def("slice_runs", [](const std::vector<uint64_t>& shape, size_t elem, uint64_t base, const std::vector<uint64_t>& start,
                         const std::vector<uint64_t>& stop) {
    py::list out;
    for (const Run& r : slice_runs(shape, elem, base, start, stop)) out.append(py::make_tuple(r.offset, r.len, r.dst_offset));
    return out;
  });

  m.def("read_slices", [](const py::list& items, unsigned threads) {
    // items: [(shard, name, elem_bytes, shape, start, stop, dst)]: every run of every slice in one
    // parallel read, so the readers never drain between tensors.
    struct Item {
      std::shared_ptr<ShardFile> shard;
      std::string name;
      size_t elem;
      std::vector<uint64_t> shape, start, stop;
      uintptr_t dst;
    };
    std::vector<Item> in;
    in.reserve(items.size());
    for (auto it : items) {
      auto t = it.cast<py::tuple>();
      in.push_back({t[0].cast<std::shared_ptr<ShardFile>>(), t[1].cast<std::string>(), t[2].cast<size_t>(),
                    t[3].cast<std::vector<uint64_t>>(), t[4].cast<std::vector<uint64_t>>(), t[5].cast<std::vector<uint64_t>>(),
                    t[6].cast<uintptr_t>()});
    }
    py::gil_scoped_release nogil;
    std::vector<ReadOp> ops;
    uint64_t total = 0;
    for (const Item& x : in) {
      const TensorEntry* e = x.shard->header().find(x.name);
      if (!e) throw CheckpointError(x.shard->path(), x.name, "no-such-tensor", "the shard has no tensor of this name");
      uint64_t n = x.elem;
      for (uint64_t d : x.shape) n *= d;
      if (n != e->nbytes()) throw CheckpointError(x.shard->path(), x.name, kRuleSizeMismatch, "slice shape does not cover the tensor");
      for (const Run& r : slice_runs(x.shape, x.elem, x.shard->file_offset(*e), x.start, x.stop)) {
        ops.push_back({x.shard.get(), r.offset, r.len, reinterpret_cast<uint8_t*>(x.dst) + r.dst_offset, &e->name});
        total += r.len;
      }
    }
    parallel_pread(ops, threads);
    return total;
  }, py::arg("items"), py::arg("threads") = 8);

  m.def("read_direct", [](const py::list& ops_in, unsigned threads, size_t chunk_bytes) {
    // ops: [(shard, file_offset, nbytes, dst_address, tensor_name)], each pread straight into its
    // destination by `threads` threads in chunks (no staging buffer, no copy).
    std::vector<PyOp> in = parse_ops(ops_in);
    std::vector<ReadOp> ops = to_ops(in);
    py::gil_scoped_release nogil;
    parallel_pread(ops, threads, chunk_bytes == 0 ? (8u << 20) : chunk_bytes);
  }, py::arg("ops"), py::arg("threads") = 8, py::arg("chunk_bytes") = 8u << 20);
  m.def("populate", [](const py::list& ops_in, unsigned threads, bool prefetch, size_t chunk_bytes) {
    // ops: [(shard, file_offset, nbytes, 0, tensor_name)]: Note [Cold mapping] in csrc/loader/shard.h.
    std::vector<PyOp> in = parse_ops(ops_in);
    std::vector<ReadOp> ops = to_ops(in);
    py::gil_scoped_release nogil;
    populate_ranges(ops, threads, prefetch, chunk_bytes == 0 ? (8u << 20) : chunk_bytes);
  }, py::arg("ops"), py::arg("threads") = 8, py::arg("prefetch") = true, py::arg("chunk_bytes") = 8u << 20);

  py::class_<ShardFile, std::shared_ptr<ShardFile>>(m, "Shard", py::buffer_protocol(), R"doc(
One safetensors file, validated and mapped privately (Note [Mapping protection] in csrc/loader/shard.h).
The buffer protocol exposes the whole mapping; memoryviews and tensors over it keep it alive.)doc")
      .def(py::init([](const std::string& path) {
             py::gil_scoped_release nogil;
             return std::make_shared<ShardFile>(path);
           }), py::arg("path"))
      .def_buffer([](ShardFile& s) {
        return py::buffer_info(s.map_base(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(s.map_len())}, {1}, /*readonly=*/false);
      })
      .def_property_readonly("path", &ShardFile::path)
      .def_property_readonly("file_size", &ShardFile::map_len)
      .def_property_readonly("address", [](const ShardFile& s) { return reinterpret_cast<uintptr_t>(s.map_base()); })
      .def("header", [](const ShardFile& s) { return header_dict(s.header()); })
      .def("resident_fraction", [](const ShardFile& s, uint64_t off, uint64_t len) {
             py::gil_scoped_release nogil;
             return s.resident_fraction(off, len);
           })
      .def("prefetch", &ShardFile::prefetch)
      .def("drop_mapped", &ShardFile::drop_mapped)
      .def("populate", [](const ShardFile& s, uint64_t off, uint64_t len, unsigned threads) {
             py::gil_scoped_release nogil;
             s.populate(off, len, threads);
           }, py::arg("offset"), py::arg("len"), py::arg("threads") = 8)
      .def_property_readonly("bytes_read", &ShardFile::bytes_read)
      .def_property_readonly("preads", &ShardFile::preads)
      .def("reset_counters", &ShardFile::reset_counters)
      .def("read_slice", [](std::shared_ptr<ShardFile> s, const std::string& name, size_t elem_bytes,
                            const std::vector<uint64_t>& shape, const std::vector<uint64_t>& start,
                            const std::vector<uint64_t>& stop, uintptr_t dst, unsigned threads) {
             const TensorEntry* e = s->header().find(name);
             if (!e) throw CheckpointError(s->path(), name, "no-such-tensor", "the shard has no tensor of this name");
             uint64_t total = elem_bytes;
             for (uint64_t d : shape) total *= d;
             if (total != e->nbytes()) throw CheckpointError(s->path(), name, kRuleSizeMismatch, "slice shape does not cover the tensor");
             py::gil_scoped_release nogil;
             std::vector<Run> runs = slice_runs(shape, elem_bytes, s->file_offset(*e), start, stop);
             std::vector<ReadOp> ops;
             ops.reserve(runs.size());
             for (const Run& r : runs) ops.push_back({s.get(), r.offset, r.len, reinterpret_cast<uint8_t*>(dst) + r.dst_offset, &e->name});
             parallel_pread(ops, threads);
             uint64_t n = 0;
             for (const Run& r : runs) n += r.len;
             return n;
           }, py::arg("name"), py::arg("elem_bytes"), py::arg("shape"), py::arg("start"), py::arg("stop"), py::arg("dst"),
           py::arg("threads") = 8, "pread only the bytes of the slice [start, stop) into dst (C-contiguous)")
      .def("read_into", [](std::shared_ptr<ShardFile> s, uint64_t offset, uint64_t len, uintptr_t dst, const std::string& name,
                           unsigned threads) {
             std::vector<PyOp> in{{s, offset, len, dst, name}};
             std::vector<ReadOp> ops = to_ops(in);
             py::gil_scoped_release nogil;
             parallel_pread(ops, threads);
           }, py::arg("offset"), py::arg("len"), py::arg("dst"), py::arg("name") = "", py::arg("threads") = 8);

  py::class_<PyStaging>(m, "StagingPool", R"doc(
A bounded pool of page-locked staging buffers (Note [Staging overlap] in csrc/loader/staging.h).
upstream="host_pinned" locks them with mlock where permitted (stats say when it was refused);
"host" is plain anonymous memory.)doc")
      .def(py::init([](size_t staging_bytes, size_t chunk_bytes, const std::string& upstream, bool lock) {
             auto s = std::make_unique<PyStaging>();
             if (upstream == "host_pinned") {
               HostPinnedOptions o;
               o.lock = lock;
               s->pinned = std::make_shared<HostPinnedUpstream>(o);
               s->upstream = s->pinned;
             } else if (upstream == "host") {
               s->upstream = std::make_shared<HostMmapUpstream>(HostMmapOptions{false});
             } else {
               throw py::value_error("torchpool: unknown staging upstream '" + upstream + "'");
             }
             if (staging_bytes == 0) throw py::value_error("torchpool: staging_bytes must be > 0");
             s->pool = std::make_unique<StagingPool>(s->upstream, staging_bytes, chunk_bytes);
             return s;
           }), py::arg("staging_bytes") = 64u << 20, py::arg("chunk_bytes") = 8u << 20, py::arg("upstream") = "host_pinned",
           py::arg("lock") = true)
      .def("read", [](PyStaging& s, const py::list& ops_in, unsigned readers, bool copy_on_readers) {
             std::vector<PyOp> in = parse_ops(ops_in);
             std::vector<ReadOp> ops = to_ops(in);
             py::gil_scoped_release nogil;
             s.pool->run(ops, readers, &StagingPool::copy_to_dst, copy_on_readers);
           }, py::arg("ops"), py::arg("readers") = 8, py::arg("copy_on_readers") = true,
           "ops: [(shard, file_offset, nbytes, dst_address, tensor_name)]; staged, then memcpy'd to dst")
      .def("read_with", [](PyStaging& s, const py::list& ops_in, unsigned readers, py::function consume) {
             std::vector<PyOp> in = parse_ops(ops_in);
             std::vector<ReadOp> ops = to_ops(in);
             const ReadOp* first = ops.data();
             py::gil_scoped_release nogil;
             s.pool->run(ops, readers, [&](const StagedChunk& c) {
               py::gil_scoped_acquire gil;
               // A memoryview of the staging buffer, valid only during the call.
               py::memoryview mv = py::memoryview::from_memory(const_cast<uint8_t*>(c.data), static_cast<py::ssize_t>(c.len));
               consume(static_cast<size_t>(c.op - first), c.op_offset, mv);
               mv.attr("release")();
             });
           }, py::arg("ops"), py::arg("readers"), py::arg("consume"),
           "Like read(), but calls consume(op_index, offset_in_op, memoryview) with each staged chunk (device copies)")
      .def("stats", [](const PyStaging& s) {
             StagingStats st = s.pool->stats();
             py::dict d;
             d["bytes_staged"] = st.bytes_staged;
             d["chunks"] = st.chunks;
             d["waits"] = st.waits;
             d["reuses"] = st.reuses;
             d["buffers"] = st.buffers;
             d["buffer_bytes"] = st.buffer_bytes;
             d["max_buffers"] = st.max_buffers;
             d["chunk_bytes"] = st.chunk_bytes;
             d["runs"] = st.runs;
             d["upstream"] = std::string(s.upstream->name());
             if (s.pinned) {
               HostPinnedStats p = s.pinned->stats();
               d["mapped_bytes"] = p.mapped_bytes;
               d["locked_bytes"] = p.locked_bytes;
               d["lock_failures"] = p.lock_failures;
               d["lock_errno"] = p.last_errno;
               d["pinned"] = p.mapped_bytes > 0 && p.locked_bytes == p.mapped_bytes;
             } else {
               d["pinned"] = false;
             }
             return d;
           })
      .def("release_buffers", [](PyStaging& s) { s.pool->release_buffers(); });
}
