// fork() safety: every allocator lock is taken before fork and released after it, in parent and child.
//
// Note [Fork]
// -----------
// Problem: fork() copies only the calling thread.  A lock some other thread held at that moment
// (an arena, the owner map's node or overflow mutex, the trace ring, the router of installed allocators) stays locked
// in the child forever, and the child's first allocation through it hangs.  Measured before this
// existed: 7 of 200 forked children hung with two threads allocating (tests/test_fork_safety.py,
// arenas=1), 1 of 60 DataLoader(fork) epochs; after: 0 of 400 children, 0 of 8 DataLoader epochs.
// One more condition makes the child's state consistent, not only unlocked: a block enters and leaves
// the owner map under its arena's lock (CachingAllocator::try_allocate / free), so no fork and no
// check() sees a block allocated in an arena but missing from the owner map.
// Approach (glibc's malloc does the same for its arenas): one pthread_atfork handler, registered
// the first time a participant appears.  prepare() takes every lock in one fixed order, the lock
// order of the whole library:
//     outer participants by level (the torch glue's slot mutex, level 0; the Router, level 1)
//     -> the registry mutex -> every live CachingAllocator in creation order, and inside one:
//        caches_mu_ -> every thread cache's busy flag (Note [Thread caches]) -> pending_mu_ ->
//        arenas (index order) -> the owner map's mutexes -> uses_mu_ -> trace ring -> orphan_mu_.
// In the child, the caches of threads that fork did not copy give their idle blocks back.
// The owner map itself is read without locks (Note [Flat owner map], page_map.h) and written only
// under an arena's lock, so holding the arenas freezes it.
// parent() and child() release them in the reverse order; in the child the forking thread is the
// only thread and the owner of every lock, so unlocking is valid, and a Router also forgets the
// read sections of threads that do not exist there (Note [Router grace periods]).
// Every allocator instance registers itself in its constructor and leaves in its destructor, so
// retired allocators that still route frees are covered as well.  Upstream mutexes need no entry:
// an upstream is only entered with an arena lock held (or from a destructor, after the allocator
// left the registry).  The same order gives check() its consistent view (lock_all()).
// Limitation: a thread that is inside the upstream's mmap when fork() is called delays the fork
// until it returns (the prepare handler waits for the arena lock); nothing is ever lost.
#pragma once

namespace torchpool {

class ForkParticipant {
 public:
  virtual ~ForkParticipant() = default;
  virtual void fork_prepare() = 0;  // take every lock
  virtual void fork_parent() = 0;   // release them
  virtual void fork_child() = 0;    // release them (and reset per-thread state) in the child
};

namespace fork_safety {
// Allocators (level 2, ordered by registration). Called by CachingAllocator's constructor/destructor.
void add_allocator(ForkParticipant* p);
void remove_allocator(ForkParticipant* p);
// Runs fn() with the registry's mutex held if p is a live allocator now (Note [Thread caches]: a
// thread's exit finds its allocators this way); returns whether it ran.  fn takes allocator locks only.
bool with_live_allocator(ForkParticipant* p, void (*fn)(ForkParticipant*, void*), void* arg);
// Layers above the allocators whose locks are held while allocator locks are taken: lower level first.
void add_outer(ForkParticipant* p, int level);
void remove_outer(ForkParticipant* p);
}  // namespace fork_safety

}  // namespace torchpool
