// OwnerMap: address -> (Block*, arena) for the live blocks of one CachingAllocator, found by address
// arithmetic and read without any lock.
//
// Note [Flat owner map]
// ---------------------
// Rationale: every free(), owns(), block_size() and record_stream() must find the block behind a
// pointer.  A sharded std::unordered_map cost a shard mutex and a node allocation per operation
// (issue 12: about a third of a replayed operation).  Approach (tcmalloc's PageMap, mimalloc's
// segment map): every block address is a multiple of 64 bytes (the block alignment is a power of
// two >= 64 and upstream ranges are page aligned), so the address indexes a radix tree of four
// levels (any 64-bit address) whose leaves hold one packed word per grain: the Block* in the low 48
// bits and the arena in the high 16.  Two trees: page-aligned addresses (large blocks) in one with a
// 4 KiB grain (a leaf page covers 2 MiB), other multiples of 64 (size-class blocks) in one with a
// 64-byte grain (a leaf page covers 32 KiB).  Nodes are mapped from the kernel on first use
// (anonymous memory: only pages that hold an entry become resident) and are installed with one
// compare-and-swap (a mutex only records the new node for the destructor, once per node), so
// writers of different arenas do not meet on a lock; nodes stay until the map is destroyed, as
// tcmalloc's do.  A destroyed map hands its all-zero nodes to the next one (page_map_detail): the
// replay benchmark makes an allocator per pass, and mapping and faulting fresh nodes cost it up to
// 40 % of a short trace's time.
// Readers (find) are four dependent acquire loads.  Writers (insert, take) run under the lock of the
// arena that owns the block, so an entry is written by one thread at a time; take() is an exchange,
// so two racing frees of one pointer cannot both win.  A reader relies on an entry only for a
// pointer that is live for it (the pointer a caller frees or queries was allocated before, in an
// order the program established), which is what makes the lock-free read sufficient.
// Fallback: an address that is not a multiple of 64 or a Block* above 2^48 (none on Linux x86-64
// or arm64 with 48-bit user space) goes to a small mutex-guarded overflow table, read only while it
// is non-empty, so the map is correct for any address and pointer.
#pragma once

#include <sys/mman.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <new>
#include <unordered_map>
#include <utility>
#include <vector>

namespace torchpool {

struct Block;

namespace page_map_detail {
// Spare all-zero nodes of destroyed maps, process-wide and lock-free (an exchange takes a slot's
// node whole, so there is no ABA and nothing for fork to hold): a program or a benchmark that makes
// allocators one after another reuses the nodes' pages instead of mapping and faulting them again.
// At most kSpareSlots nodes of each size are kept (a replayed training step needs about 30); only
// their touched pages are resident.
inline constexpr size_t kSpareSlots = 64;
inline constexpr size_t kSpareSizes[] = {size_t{16} << 10, size_t{128} << 10, size_t{256} << 10};
inline std::atomic<void*> g_spare[3][kSpareSlots];

inline int spare_class(size_t bytes) {
  for (int i = 0; i < 3; ++i)
    if (kSpareSizes[i] == bytes) return i;
  return -1;
}
inline void* take_node(size_t bytes) {  // an all-zero node of `bytes`, or null
  if (const int c = spare_class(bytes); c >= 0)
    for (auto& slot : g_spare[c])
      if (slot.load(std::memory_order_relaxed))
        if (void* p = slot.exchange(nullptr, std::memory_order_acquire)) return p;
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}
inline void give_node(void* p, size_t bytes, bool zero) {  // zero: every word of p is 0
  if (const int c = spare_class(bytes); zero && c >= 0)
    for (auto& slot : g_spare[c]) {
      void* expected = nullptr;
      if (slot.compare_exchange_strong(expected, p, std::memory_order_release, std::memory_order_relaxed)) return;
    }
  ::munmap(p, bytes);
}
}  // namespace page_map_detail

// A radix tree of packed words, one per (1 << kGrainShift)-byte grain of the 64-bit address space.
template <unsigned kGrainShift, unsigned kLeafBits, unsigned kL2Bits, unsigned kL1Bits>
class RadixWords {
 public:
  static constexpr unsigned kRootBits = 64 - kGrainShift - kLeafBits - kL2Bits - kL1Bits;
  static constexpr uintptr_t kGrainMask = (uintptr_t{1} << kGrainShift) - 1;

  RadixWords() : root_(static_cast<void**>(page_map_detail::take_node(sizeof(void*) << kRootBits))) {
    if (!root_) throw std::bad_alloc();
  }
  ~RadixWords() {
    // Inner nodes hold only pointers to recorded children: clearing each child's parent slot leaves
    // them all-zero.  Leaves are all-zero when the owner said every entry was taken (set_clean).
    for (const Node& n : nodes_) *n.parent_slot = nullptr;
    for (const Node& n : nodes_) page_map_detail::give_node(n.p, n.bytes, !n.leaf || clean_);
    page_map_detail::give_node(root_, sizeof(void*) << kRootBits, true);
  }
  // Every entry has been taken (no live block is left): the leaves can be reused by another map.
  void set_clean() { clean_ = true; }
  RadixWords(const RadixWords&) = delete;
  RadixWords& operator=(const RadixWords&) = delete;

  // The word's slot for addr (a multiple of the grain); null when absent and !make, or when the
  // kernel refuses memory for a node.
  uint64_t* slot(uintptr_t addr, bool make) const {
    const uint64_t key = addr >> kGrainShift;
    const size_t i0 = key >> (kLeafBits + kL2Bits + kL1Bits);
    const size_t i1 = (key >> (kLeafBits + kL2Bits)) & ((size_t{1} << kL1Bits) - 1);
    const size_t i2 = (key >> kLeafBits) & ((size_t{1} << kL2Bits) - 1);
    auto** l1 = static_cast<void**>(child(&root_[i0], sizeof(void*) << kL1Bits, make, false));
    if (!l1) return nullptr;
    auto** l2 = static_cast<void**>(child(&l1[i1], sizeof(void*) << kL2Bits, make, false));
    if (!l2) return nullptr;
    auto* leaf = static_cast<uint64_t*>(child(&l2[i2], sizeof(uint64_t) << kLeafBits, make, true));
    return leaf ? &leaf[key & ((uint64_t{1} << kLeafBits) - 1)] : nullptr;
  }

 private:
  // The child of slot (a node of `bytes`), made and installed when `make`; null if absent.
  void* child(void** slot, size_t bytes, bool make, bool leaf) const {
    void* c = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
    if (c || !make) return c;
    void* fresh = page_map_detail::take_node(bytes);
    if (!fresh) return nullptr;
    std::lock_guard<std::mutex> g(nodes_mu_);  // rare: once per node
    if (!__atomic_compare_exchange_n(slot, &c, fresh, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
      page_map_detail::give_node(fresh, bytes, true);  // another writer installed one first
      return c;
    }
    nodes_.push_back(Node{fresh, bytes, slot, leaf});
    return fresh;
  }

 public:
  // Note [Fork]: node creation's mutex (held only around the install of a new node).
  void lock() const { nodes_mu_.lock(); }
  void unlock() const { nodes_mu_.unlock(); }

 private:
  void** root_;  // nodes are written only by child()'s compare-and-swap
  // Every node below the root, for the destructor (walking the tree would fault in every page of
  // the inner nodes).
  struct Node {
    void* p;
    size_t bytes;
    void** parent_slot;
    bool leaf;
  };
  mutable std::mutex nodes_mu_;
  mutable std::vector<Node> nodes_;
  bool clean_ = false;
};

class OwnerMap {
 public:
  static constexpr uint64_t kPtrMask = (uint64_t{1} << 48) - 1;

  struct Entry {
    Block* block = nullptr;  // null: not a live block here
    uint32_t arena = 0;
  };

  OwnerMap() = default;
  OwnerMap(const OwnerMap&) = delete;
  OwnerMap& operator=(const OwnerMap&) = delete;

  // Every entry has been taken: the destructor may hand the leaves to the next map.
  void set_clean() {
    fine_.set_clean();
    coarse_.set_clean();
  }

  // Note [Fork]: the trees' node mutexes, then the overflow table's.
  void lock() const {
    fine_.lock();
    coarse_.lock();
    overflow_mu_.lock();
  }
  void unlock() const {
    overflow_mu_.unlock();
    coarse_.unlock();
    fine_.unlock();
  }

  // Lock-free.  {nullptr, 0} when addr is not a live block.
  Entry find(uintptr_t addr) const {
    const uint64_t* s = home(addr, false);
    const uint64_t w = s ? __atomic_load_n(s, __ATOMIC_ACQUIRE) : 0;
    if (w) return unpack(w);
    return overflow_n_.load(std::memory_order_acquire) ? find_overflow(addr) : Entry{};
  }

  // addr must not be live here.  Returns false only when the kernel refuses memory for a node.
  bool insert(uintptr_t addr, Block* b, uint32_t arena) {
    const auto bp = reinterpret_cast<uint64_t>(b);
    if ((addr & Fine::kGrainMask) || (bp & ~kPtrMask) || arena > 0xFFFF) return insert_overflow(addr, b, arena);
    uint64_t* s = home(addr, true);
    if (!s) return false;
    __atomic_store_n(s, bp | (uint64_t{arena} << 48), __ATOMIC_RELEASE);
    return true;
  }

  // Removes addr's entry if it belongs to `arena`; returns the entry removed ({} if none was).
  Entry take(uintptr_t addr, uint32_t arena) {
    if (uint64_t* s = home(addr, false)) {
      uint64_t w = __atomic_load_n(s, __ATOMIC_ACQUIRE);
      // Only a racing double free of one pointer can see another arena's entry here; leave it.
      while (w && unpack(w).arena == arena)
        if (__atomic_compare_exchange_n(s, &w, 0, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) return unpack(w);
      if (w) return {};
    }
    if (!overflow_n_.load(std::memory_order_acquire)) return {};
    std::lock_guard<std::mutex> g(overflow_mu_);
    auto it = overflow_.find(addr);
    if (it == overflow_.end() || it->second.arena != arena) return {};
    Entry e = it->second;
    overflow_.erase(it);
    overflow_n_.store(overflow_.size(), std::memory_order_release);
    return e;
  }

 private:
  // Page-aligned addresses (every large block's, on page-aligned segments) live in the coarse tree:
  // one word per 4 KiB, so a leaf page covers 2 MiB and a program of large tensors touches few
  // pages of map (a 64-byte grain faulted a 4 KiB page of map per 32 KiB of address space: ~1100
  // page faults per pass of the gpt_train replay).  Other multiples of 64 live in the fine tree.
  using Fine = RadixWords<6, 15, 15, 14>;
  using Coarse = RadixWords<12, 15, 15, 11>;

  uint64_t* home(uintptr_t addr, bool make) const {
    if ((addr & Coarse::kGrainMask) == 0) return coarse_.slot(addr, make);
    if ((addr & Fine::kGrainMask) == 0) return fine_.slot(addr, make);
    return nullptr;
  }
  static Entry unpack(uint64_t w) {
    return Entry{reinterpret_cast<Block*>(w & kPtrMask), static_cast<uint32_t>(w >> 48)};
  }

  Entry find_overflow(uintptr_t addr) const {
    if (!overflow_n_.load(std::memory_order_acquire)) return {};
    std::lock_guard<std::mutex> g(overflow_mu_);
    auto it = overflow_.find(addr);
    return it == overflow_.end() ? Entry{} : it->second;
  }
  bool insert_overflow(uintptr_t addr, Block* b, uint32_t arena) {
    std::lock_guard<std::mutex> g(overflow_mu_);
    overflow_[addr] = Entry{b, arena};
    overflow_n_.store(overflow_.size(), std::memory_order_release);
    return true;
  }

  Fine fine_;
  Coarse coarse_;
  mutable std::mutex overflow_mu_;
  std::unordered_map<uintptr_t, Entry> overflow_;
  std::atomic<size_t> overflow_n_{0};
};

}  // namespace torchpool
