#include "fork.h"

#include <pthread.h>

#include <algorithm>
#include <mutex>
#include <utility>
#include <vector>

namespace torchpool::fork_safety {
namespace {

struct Registry {
  std::mutex outer_mu;  // guards `outer`; taken first in prepare (Note [Fork])
  std::vector<std::pair<int, ForkParticipant*>> outer;
  std::mutex mu;        // guards `allocators`
  std::vector<ForkParticipant*> allocators;
};

Registry& registry() {
  static auto* r = new Registry();  // immortal: allocators may be destroyed during exit
  return *r;
}

void prepare() {
  Registry& r = registry();
  r.outer_mu.lock();
  for (auto& [level, p] : r.outer) p->fork_prepare();
  r.mu.lock();
  for (ForkParticipant* p : r.allocators) p->fork_prepare();
}

void parent() {
  Registry& r = registry();
  for (auto it = r.allocators.rbegin(); it != r.allocators.rend(); ++it) (*it)->fork_parent();
  r.mu.unlock();
  for (auto it = r.outer.rbegin(); it != r.outer.rend(); ++it) it->second->fork_parent();
  r.outer_mu.unlock();
}

void child() {
  Registry& r = registry();
  for (auto it = r.allocators.rbegin(); it != r.allocators.rend(); ++it) (*it)->fork_child();
  r.mu.unlock();
  for (auto it = r.outer.rbegin(); it != r.outer.rend(); ++it) it->second->fork_child();
  r.outer_mu.unlock();
}

void ensure_handlers() {
  static std::once_flag once;
  std::call_once(once, [] { pthread_atfork(&prepare, &parent, &child); });
}

}  // namespace

void add_allocator(ForkParticipant* p) {
  ensure_handlers();
  Registry& r = registry();
  std::lock_guard<std::mutex> g(r.mu);
  r.allocators.push_back(p);
}

void remove_allocator(ForkParticipant* p) {
  Registry& r = registry();
  std::lock_guard<std::mutex> g(r.mu);
  r.allocators.erase(std::remove(r.allocators.begin(), r.allocators.end(), p), r.allocators.end());
}

bool with_live_allocator(ForkParticipant* p, void (*fn)(ForkParticipant*, void*), void* arg) {
  Registry& r = registry();
  std::lock_guard<std::mutex> g(r.mu);
  if (std::find(r.allocators.begin(), r.allocators.end(), p) == r.allocators.end()) return false;
  fn(p, arg);
  return true;
}

void add_outer(ForkParticipant* p, int level) {
  ensure_handlers();
  Registry& r = registry();
  std::lock_guard<std::mutex> g(r.outer_mu);
  r.outer.emplace_back(level, p);
  std::stable_sort(r.outer.begin(), r.outer.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
}

void remove_outer(ForkParticipant* p) {
  Registry& r = registry();
  std::lock_guard<std::mutex> g(r.outer_mu);
  r.outer.erase(std::remove_if(r.outer.begin(), r.outer.end(), [p](const auto& e) { return e.second == p; }), r.outer.end());
}

}  // namespace torchpool::fork_safety
