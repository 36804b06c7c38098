// A message that names the file (and tensor) before a SIGBUS kills the process.
//
// Note [SIGBUS message]
// ---------------------
// Rationale: views handed out by ck[name], an "mmap" load and lazily loaded models read a
// MAP_PRIVATE mapping of the file (Note [Mapping protection] in shard.h).  When another process
// truncates the file afterwards, touching a page past the new end raises SIGBUS; no reader of a
// mapping can turn that into an exception (the faulting instruction may be anywhere in torch), and
// the bare "Bus error" said nothing about which file.  Approach: every ShardFile registers its mapping
// in a fixed table of slots (atomics, no allocation, no lock); the first ShardFile installs, once per
// process, a SIGBUS handler (SA_SIGINFO | SA_ONSTACK) that looks the fault address si_addr up in the
// table and, when it falls in a registered mapping, writes with write(2) alone
//   torchpool: SIGBUS at /x/model.safetensors file offset 8192 (tensor 'w'): the file is shorter than when it was opened ...
// (the tensor found by binary search over the shard's offset-sorted index, read-only after
// construction; when several threads fault at once, the first writes and hands its signal on, and the
// others wait up to 5 s for the process to end rather than enter the next handler at the same time:
// faulthandler, entered by two threads at once, interleaves its dumps and can crash with SIGSEGV).
// The handler then restores the action it replaced and returns: the faulting
// instruction runs again and the previous handler gets the fault (faulthandler, when it was enabled
// before the first checkpoint was opened, e.g. by pytest or -X faulthandler, prints the Python
// traceback; the default kills the process with SIGBUS, so the exit status is unchanged).  A SIGBUS sent
// by kill/raise is re-raised to the previous action.  Limitations: the handler is one-shot and is
// installed only once (re-installing over a later faulthandler would loop between the two); when
// faulthandler is enabled after the first checkpoint opens, it runs first and the message is not
// written.  The table has kSigbusSlots slots; further mappings are simply not named.  A fault in a
// mapping whose ShardFile is being destroyed by another thread at that moment could read freed
// memory (the faulting thread holds no reference to it, which is already a bug of the caller).
// TORCHPOOL_SIGBUS_HANDLER=0 in the environment leaves SIGBUS alone.  The owned-memory alternative
// for files that may change under a running process is open_checkpoint(copy=True).
#pragma once

#include <cstddef>

namespace torchpool::loader {

class ShardFile;

inline constexpr size_t kSigbusSlots = 4096;

// Adds/removes a mapping of `shard` (its map_base(), map_len(), path and tensors must stay valid until
// unregister_mapping). Installs the handler on the first call.
void register_mapping(const ShardFile* shard);
void unregister_mapping(const ShardFile* shard);
// Whether this process's handler is installed (and not yet handed back after a SIGBUS).
bool sigbus_handler_installed();

}  // namespace torchpool::loader
