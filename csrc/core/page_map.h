// OwnerMap: address -> (Block*, arena) for the live blocks of one CachingAllocator, found by address
// arithmetic and read without any lock.
//
// Note [Flat owner map]
// ---------------------
// Rationale: every free(), owns(), block_size() and record_stream() must find the block behind a
// pointer.  A sharded std::unordered_map cost a shard mutex and a node allocation per operation
// (issue 12: about a third of a replayed operation).  Approach (tcmalloc's PageMap, mimalloc's
// segment map): every block address is a multiple of 64 bytes (the block alignment is a power of
// two >= 64 and upstream ranges are page aligned), so addr / 64 indexes a radix tree of four levels
// (14 + 14 + 15 + 15 bits: any 64-bit address) whose leaves hold one packed word per 64-byte grain:
// the Block* in the low 48 bits and the arena in the high 16.  Nodes are mapped from the kernel on
// first use (anonymous memory: only pages that hold an entry become resident; a leaf covers 2 MiB of
// address space with 256 KiB of address space, about 4 KiB resident per block start that lies far
// from others) and are installed with one compare-and-swap, so writers of different arenas never
// meet on a lock; they stay until the map is destroyed, as tcmalloc's do.
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

namespace torchpool {

struct Block;

class OwnerMap {
 public:
  static constexpr unsigned kGrainShift = 6;
  static constexpr unsigned kLeafBits = 15, kL2Bits = 15, kL1Bits = 14, kRootBits = 14;
  static_assert(kGrainShift + kLeafBits + kL2Bits + kL1Bits + kRootBits == 64, "the tree covers every address");
  static constexpr uint64_t kPtrMask = (uint64_t{1} << 48) - 1;

  struct Entry {
    Block* block = nullptr;  // null: not a live block here
    uint32_t arena = 0;
  };

  OwnerMap() : root_(static_cast<void**>(map_node(sizeof(void*) << kRootBits))) {}
  ~OwnerMap() {
    for (size_t i = 0; i < (size_t{1} << kRootBits); ++i) {
      auto** l1 = static_cast<void**>(root_[i]);
      if (!l1) continue;
      for (size_t j = 0; j < (size_t{1} << kL1Bits); ++j) {
        auto** l2 = static_cast<void**>(l1[j]);
        if (!l2) continue;
        for (size_t k = 0; k < (size_t{1} << kL2Bits); ++k)
          if (l2[k]) ::munmap(l2[k], sizeof(uint64_t) << kLeafBits);
        ::munmap(l2, sizeof(void*) << kL2Bits);
      }
      ::munmap(l1, sizeof(void*) << kL1Bits);
    }
    ::munmap(root_, sizeof(void*) << kRootBits);
  }
  OwnerMap(const OwnerMap&) = delete;
  OwnerMap& operator=(const OwnerMap&) = delete;

  // Note [Fork]: the overflow table's mutex is the map's only lock.
  void lock() const { overflow_mu_.lock(); }
  void unlock() const { overflow_mu_.unlock(); }

  // Lock-free.  {nullptr, 0} when addr is not a live block.
  Entry find(uintptr_t addr) const {
    if (addr & kGrainMask) return find_overflow(addr);
    const uint64_t* leaf = leaf_of(addr, false);
    const uint64_t w = leaf ? __atomic_load_n(&leaf[leaf_index(addr)], __ATOMIC_ACQUIRE) : 0;
    if (w) return unpack(w);
    return overflow_n_.load(std::memory_order_acquire) ? find_overflow(addr) : Entry{};
  }

  // addr must not be live here.  Returns false only when the kernel refuses memory for a node.
  bool insert(uintptr_t addr, Block* b, uint32_t arena) {
    const auto bp = reinterpret_cast<uint64_t>(b);
    if ((addr & kGrainMask) || (bp & ~kPtrMask) || arena > 0xFFFF) return insert_overflow(addr, b, arena);
    uint64_t* leaf = leaf_of(addr, true);
    if (!leaf) return false;
    __atomic_store_n(&leaf[leaf_index(addr)], bp | (uint64_t{arena} << 48), __ATOMIC_RELEASE);
    return true;
  }

  // Removes addr's entry if it belongs to `arena`; returns the entry removed ({} if none was).
  Entry take(uintptr_t addr, uint32_t arena) {
    uint64_t* leaf = (addr & kGrainMask) ? nullptr : leaf_of(addr, false);
    if (leaf) {
      uint64_t* slot = &leaf[leaf_index(addr)];
      uint64_t w = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
      // Only a racing double free of one pointer can see another arena's entry here; leave it.
      while (w && unpack(w).arena == arena)
        if (__atomic_compare_exchange_n(slot, &w, 0, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) return unpack(w);
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
  static constexpr uintptr_t kGrainMask = (uintptr_t{1} << kGrainShift) - 1;

  static Entry unpack(uint64_t w) {
    return Entry{reinterpret_cast<Block*>(w & kPtrMask), static_cast<uint32_t>(w >> 48)};
  }
  static size_t leaf_index(uintptr_t addr) { return (addr >> kGrainShift) & ((size_t{1} << kLeafBits) - 1); }

  static void* map_node(size_t bytes) {
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      if (bytes == (sizeof(void*) << kRootBits)) throw std::bad_alloc();  // the constructor: nothing to fall back on
      return nullptr;
    }
    return p;
  }

  // The child of slot (a node of `bytes`), made and installed when `make`; null if absent.
  static void* child(void** slot, size_t bytes, bool make) {
    void* c = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
    if (c || !make) return c;
    void* fresh = map_node(bytes);
    if (!fresh) return nullptr;
    if (__atomic_compare_exchange_n(slot, &c, fresh, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) return fresh;
    ::munmap(fresh, bytes);  // another writer installed one first
    return c;
  }

  uint64_t* leaf_of(uintptr_t addr, bool make) const {
    const uint64_t key = addr >> kGrainShift;
    const size_t i0 = key >> (kLeafBits + kL2Bits + kL1Bits);
    const size_t i1 = (key >> (kLeafBits + kL2Bits)) & ((size_t{1} << kL1Bits) - 1);
    const size_t i2 = (key >> kLeafBits) & ((size_t{1} << kL2Bits) - 1);
    auto** l1 = static_cast<void**>(child(&root_[i0], sizeof(void*) << kL1Bits, make));
    if (!l1) return nullptr;
    auto** l2 = static_cast<void**>(child(&l1[i1], sizeof(void*) << kL2Bits, make));
    if (!l2) return nullptr;
    return static_cast<uint64_t*>(child(&l2[i2], sizeof(uint64_t) << kLeafBits, make));
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

  void** root_;  // nodes are written only by child()'s compare-and-swap
  mutable std::mutex overflow_mu_;
  std::unordered_map<uintptr_t, Entry> overflow_;
  std::atomic<size_t> overflow_n_{0};
};

}  // namespace torchpool
