// memcheck of global memory (model: memcheck.h; hook: emu.h's emu::global_access).
//
// Valid memory is a registry of byte ranges [lo, hi): the storages of the tensors a MemcheckScope
// names, and the CPU allocations made while a scope is active (a tracking c10::Allocator wraps the
// CPU allocator from the module's load on; it tracks only while a scope is active, and gives its
// tracked allocations 256-byte gaps on both sides, so that an overrun of one never lands in a
// neighbour). The registry changes only outside launches (host code allocates, kernels do not):
// each OS thread takes an immutable snapshot of it at its first access of a launch, and keeps the
// last few ranges it hit in a small thread-local cache (the fast path: a few compares, no lock).
//
// Cross-block races: every range has a shadow word per 2-byte granule (allocated at the range's
// first access, cleared at its first access in each launch), updated with a compare-and-swap:
//   bits 0      written in this launch (by `first`)
//   bits 1-31   first: the cluster (+1) that accessed the granule first in this launch (0: none)
//   bits 32-63  second: another cluster (+1) that read it (0: none), while nobody wrote it
// A conflict is two different clusters (a plain launch: blocks) of which at least one writes.
#include <torch/extension.h>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include "emu.h"
#include "memcheck.h"

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <unordered_map>
#include <vector>

void bind_memcheck_selftests(pybind11::module_& m);  // memcheck_selftest.cpp

namespace emu {
namespace {

std::atomic<bool> g_enabled{true};
std::atomic<int> g_scopes{0};                        // active MemcheckScopes, all threads
std::atomic<const char*> g_op{nullptr};              // the latest active scope's op (allocation labels)
std::atomic<bool> g_allocator_installed{false};      // else outputs are unknown: bounds/races off
std::atomic<uint64_t> g_checked_launches{0};         // launches whose accesses were bounds-checked

constexpr size_t kRedzone = 256;                     // bytes before and after a tracked allocation
constexpr uint64_t kMaxCluster = 0x7fffffffu;        // cluster + 1 fits in 31 bits
constexpr size_t kMappedShadowBytes = 256 * 1024;    // larger shadows: mmap, cleared by madvise

using detail::dims;
using detail::format;
using detail::site;

// ---------------------------------------------------------------------------------------------
// Ranges and their shadow

struct Range {
  uintptr_t lo = 0, hi = 0;  // [lo, hi)
  uintptr_t base = 0;        // lo rounded down to 2: granule g is [base + 2g, base + 2g + 2)
  size_t granules = 0;
  // Why the range is valid, newest last, one per registration (token, text); registry mutex.
  std::vector<std::pair<uint64_t, std::string>> labels;

  std::mutex reset_mutex;
  std::atomic<uint64_t> reset_serial{0};  // the launch the shadow was last cleared for
  std::atomic<uint64_t>* shadow = nullptr;
  bool mapped = false;

  Range(uintptr_t l, uintptr_t h) : lo(l), hi(h), base(l & ~uintptr_t{1}), granules((h - (l & ~uintptr_t{1}) + 1) / 2) {}
  Range(const Range&) = delete;
  Range& operator=(const Range&) = delete;
  ~Range() {
    if (!shadow) return;
    if (mapped) munmap(shadow, granules * sizeof(uint64_t));
    else std::free(shadow);
  }

  // The shadow, cleared for launch `serial` (by the first of the launch's threads to get here).
  void prepare(uint64_t serial) {
    if (reset_serial.load(std::memory_order_acquire) == serial) return;
    std::lock_guard<std::mutex> lock(reset_mutex);
    if (reset_serial.load(std::memory_order_relaxed) == serial) return;
    const size_t bytes = granules * sizeof(uint64_t);
    if (!shadow) {
      void* memory;
      if (bytes >= kMappedShadowBytes) {
        memory = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (memory == MAP_FAILED) throw std::bad_alloc();
        mapped = true;
      } else {
        memory = std::calloc(granules, sizeof(uint64_t));
        if (!memory) throw std::bad_alloc();
      }
      shadow = static_cast<std::atomic<uint64_t>*>(memory);
    } else if (mapped) {
      madvise(shadow, bytes, MADV_DONTNEED);  // private anonymous pages read back as zeros
    } else {
      std::memset(static_cast<void*>(shadow), 0, bytes);
    }
    reset_serial.store(serial, std::memory_order_release);
  }
};

struct Snapshot {
  std::vector<std::shared_ptr<Range>> ranges;  // by lo, then by hi descending
  std::vector<uintptr_t> max_hi;               // max hi of ranges[0..i]
};

// The range that holds [p, p + bytes) (the outermost, when registered ranges nest), or null.
Range* find(const Snapshot& s, uintptr_t p, size_t bytes) {
  const uintptr_t end = p + bytes;
  size_t i = static_cast<size_t>(
      std::upper_bound(s.ranges.begin(), s.ranges.end(), p,
                       [](uintptr_t value, const std::shared_ptr<Range>& r) { return value < r->lo; }) -
      s.ranges.begin());
  Range* found = nullptr;
  while (i-- > 0 && s.max_hi[i] >= end)
    if (s.ranges[i]->hi >= end) found = s.ranges[i].get();
  return found;
}

class Registry {
 public:
  // Registers [lo, hi) once more; returns the range and the token that unregisters it.
  std::pair<Range*, uint64_t> add(uintptr_t lo, uintptr_t hi, std::string label) {
    std::lock_guard<std::mutex> lock(mutex_);
    return add_locked(lo, hi, std::move(label));
  }

  void remove(Range* range, uint64_t token) {
    std::shared_ptr<Range> last;  // destroyed after the lock (frees the shadow)
    std::lock_guard<std::mutex> lock(mutex_);
    remove_locked(range, token, last);
  }

  // A tracked allocation: `original` (the wrapped allocator's) is kept until untrack().
  void track(void* data, size_t bytes, c10::DataPtr&& original, std::string label) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto lo = reinterpret_cast<uintptr_t>(data);
    const auto [range, token] = add_locked(lo, lo + bytes, std::move(label));
    allocations_.emplace(data, Allocation{std::move(original), range, token});
  }

  // Unregisters a tracked allocation; returns its original DataPtr (freeing on destruction), or an
  // empty one when `data` is not tracked.
  c10::DataPtr untrack(void* data, bool* found) {
    c10::DataPtr original;
    std::shared_ptr<Range> last;
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = allocations_.find(data);
    *found = it != allocations_.end();
    if (!*found) return original;
    original = std::move(it->second.original);
    remove_locked(it->second.range, it->second.token, last);
    allocations_.erase(it);
    return original;  // (the lock is released before `original` and `last` go)
  }

  std::shared_ptr<const Snapshot> snapshot() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!snapshot_) {
      auto s = std::make_shared<Snapshot>();
      s->ranges.reserve(ranges_.size());
      for (const auto& entry : ranges_) s->ranges.push_back(entry.second);
      std::stable_sort(s->ranges.begin(), s->ranges.end(), [](const auto& a, const auto& b) {
        return a->lo != b->lo ? a->lo < b->lo : a->hi > b->hi;
      });
      uintptr_t max_hi = 0;
      for (const auto& r : s->ranges) s->max_hi.push_back(max_hi = std::max(max_hi, r->hi));
      snapshot_ = std::move(s);
    }
    return snapshot_;
  }

  // "<label> [lo, hi) (n bytes)"
  std::string describe(const Range& r) {
    std::lock_guard<std::mutex> lock(mutex_);
    const std::string label = r.labels.empty() ? std::string("a range no longer registered") : r.labels.back().second;
    return label + format(" [0x%" PRIxPTR ", 0x%" PRIxPTR ") of %zu bytes", r.lo, r.hi, static_cast<size_t>(r.hi - r.lo));
  }

  std::vector<std::tuple<uintptr_t, uintptr_t, std::string>> list() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<std::tuple<uintptr_t, uintptr_t, std::string>> out;
    for (const auto& [key, r] : ranges_) out.emplace_back(r->lo, r->hi, r->labels.empty() ? "" : r->labels.back().second);
    return out;
  }

 private:
  struct Allocation {
    c10::DataPtr original;
    Range* range;
    uint64_t token;
  };

  std::pair<Range*, uint64_t> add_locked(uintptr_t lo, uintptr_t hi, std::string label) {
    std::shared_ptr<Range>& slot = ranges_[{lo, hi}];
    if (!slot) {
      slot = std::make_shared<Range>(lo, hi);
      snapshot_.reset();
    }
    const uint64_t token = next_token_++;
    slot->labels.emplace_back(token, std::move(label));
    return {slot.get(), token};
  }

  void remove_locked(Range* range, uint64_t token, std::shared_ptr<Range>& last) {
    const auto it = ranges_.find({range->lo, range->hi});
    if (it == ranges_.end()) return;
    auto& labels = it->second->labels;
    labels.erase(std::remove_if(labels.begin(), labels.end(), [&](const auto& l) { return l.first == token; }),
                 labels.end());
    if (labels.empty()) {
      last = std::move(it->second);
      ranges_.erase(it);
      snapshot_.reset();
    }
  }

  std::mutex mutex_;
  std::map<std::pair<uintptr_t, uintptr_t>, std::shared_ptr<Range>> ranges_;
  std::unordered_map<void*, Allocation> allocations_;
  uint64_t next_token_ = 1;
  std::shared_ptr<const Snapshot> snapshot_;  // null: rebuilt at the next request
};

Registry& registry() {
  static Registry* instance = new Registry;  // never destroyed: tensors outlive static destruction
  return *instance;
}

// ---------------------------------------------------------------------------------------------
// The tracking allocator

bool tracking() {
  return g_scopes.load(std::memory_order_relaxed) > 0 && g_enabled.load(std::memory_order_relaxed);
}

class TrackingAllocator final : public c10::Allocator {
 public:
  explicit TrackingAllocator(c10::Allocator* wrapped) : wrapped_(wrapped) {}

  c10::DataPtr allocate(size_t bytes) override {
    if (bytes == 0 || !tracking()) return wrapped_->allocate(bytes);
    // The tensor starts kRedzone bytes into a larger allocation (still 64-byte aligned).
    c10::DataPtr original = wrapped_->allocate(bytes + 2 * kRedzone);
    if (!original.get()) return original;
    void* data = static_cast<char*>(original.get()) + kRedzone;
    const char* op = g_op.load(std::memory_order_relaxed);
    registry().track(data, bytes, std::move(original),
                     format("a %zu-byte allocation made during %s", bytes, op ? op : "an emulated op"));
    return c10::DataPtr(data, data, &release, original_device());
  }

  c10::DeleterFnPtr raw_deleter() const override { return wrapped_->raw_deleter() ? &raw_release : nullptr; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    wrapped_->copy_data(dest, src, count);
  }

  static TrackingAllocator* instance;

 private:
  static c10::Device original_device() { return c10::Device(c10::DeviceType::CPU); }

  static void release(void* data) {
    bool found = false;
    c10::DataPtr original = registry().untrack(data, &found);  // freed here, after the registry's lock
    (void)original;
  }

  // (raw_deallocate: a tracked allocation, or one of the wrapped allocator's)
  static void raw_release(void* data) {
    bool found = false;
    c10::DataPtr original = registry().untrack(data, &found);
    if (!found) instance->wrapped_->raw_deleter()(data);
  }

  c10::Allocator* wrapped_;
};

TrackingAllocator* TrackingAllocator::instance = nullptr;

void install_allocator() {
  static std::once_flag once;
  std::call_once(once, [] {
    c10::Allocator* current = c10::GetAllocator(c10::DeviceType::CPU);
    TrackingAllocator::instance = new TrackingAllocator(current);  // never destroyed
    c10::SetAllocator(c10::DeviceType::CPU, TrackingAllocator::instance, /*priority=*/1);
    g_allocator_installed = c10::GetAllocator(c10::DeviceType::CPU) == TrackingAllocator::instance;
  });
}

// ---------------------------------------------------------------------------------------------
// Per-thread state of the running launch (OS thread: a launch's blocks on it run one at a time, and
// a fiber is never switched inside global_access)

constexpr int kCached = 4;

struct CachedRange {
  uintptr_t lo, hi, base;
  std::atomic<uint64_t>* shadow;
};

struct Fast {
  uint64_t serial;  // the launch this state is for (0: none yet)
  bool checking;    // bounds and races in this launch
  unsigned next;    // the cache slot to replace next
  CachedRange cache[kCached];
};

__thread Fast tl_fast;                                       // zero-initialised, no TLS wrapper
thread_local std::shared_ptr<const Snapshot> tl_snapshot;    // slow path only
thread_local std::string tl_message;  // a failure's text: sanitizer_failure never returns, nothing unwinds

void begin_launch(uint64_t serial) {
  Fast& f = tl_fast;
  f.serial = serial;
  f.next = 0;
  for (CachedRange& c : f.cache) c = CachedRange{0, 0, 0, nullptr};
  f.checking = g_scopes.load(std::memory_order_acquire) > 0 && g_allocator_installed.load(std::memory_order_relaxed);
  if (f.checking) {
    tl_snapshot = registry().snapshot();
  } else {
    tl_snapshot.reset();
  }
}

const char* access_kind(bool write) { return write ? "write" : "read"; }

// "block (x,y,z)" for a plain launch; "cluster k (blocks (..)-(..))" for a cluster launch.
std::string cluster_text(uint64_t cluster) {
  const dim3 grid = gridDim;
  const uint64_t size = cluster_blocks();
  auto block_at = [&](uint64_t linear) {
    return dims(dim3(static_cast<unsigned>(linear % grid.x), static_cast<unsigned>(linear / grid.x % grid.y),
                     static_cast<unsigned>(linear / grid.x / grid.y)));
  };
  if (size == 1) return "block " + block_at(cluster);
  return format("cluster %" PRIu64 " (blocks ", cluster) + block_at(cluster * size) + "-" +
         block_at(cluster * size + size - 1) + ")";
}

std::string access_text(const char* what, const void* ptr, size_t bytes, bool write, const char* file, int line) {
  return format("%s global %s of %zu bytes at %p (%s)", what, access_kind(write), bytes, ptr, site(file, line).c_str());
}

// "byte offset N of <range>" when [p, p + 1) is inside a registered range.
std::string where_in_tensor(uintptr_t p) {
  const std::shared_ptr<const Snapshot> s = registry().snapshot();
  Range* r = find(*s, p, 1);
  if (!r) return std::string();
  return format("byte offset %" PRIuPTR " of ", p - r->lo) + registry().describe(*r);
}

std::string misaligned_text(const void* ptr, size_t bytes, size_t align, bool write, const char* file, int line) {
  std::string text = access_text("misaligned", ptr, bytes, write, file, line) +
                     format(": the address must be a multiple of %zu", align);
  if (g_scopes.load(std::memory_order_relaxed) > 0) {  // (inside an op: say which tensor)
    const std::string where = where_in_tensor(reinterpret_cast<uintptr_t>(ptr));
    if (!where.empty()) text += " (it is at " + where + ")";
  }
  return text;
}

std::string out_of_bounds_text(const void* ptr, size_t bytes, bool write, const char* file, int line) {
  const auto p = reinterpret_cast<uintptr_t>(ptr);
  std::string text = access_text("out-of-bounds", ptr, bytes, write, file, line) + ": not inside any live tensor";
  const Snapshot& s = *tl_snapshot;
  if (s.ranges.empty()) return text + " (none is registered)";
  // The nearest range: the fewest bytes the access lies outside it.
  const Range* nearest = nullptr;
  uintptr_t best = UINTPTR_MAX;
  for (const auto& r : s.ranges) {
    const uintptr_t outside = p >= r->lo ? (p + bytes > r->hi ? p + bytes - r->hi : 0) : r->lo - p;
    if (outside < best) {
      best = outside;
      nearest = r.get();
    }
  }
  text += "; the nearest is " + registry().describe(*nearest) + ": ";
  if (p >= nearest->lo)
    text += format("the access is at byte offset %" PRIuPTR ", %" PRIuPTR " bytes beyond its end", p - nearest->lo,
                   p + bytes - nearest->hi);
  else
    text += format("the access starts %" PRIuPTR " bytes before it", nearest->lo - p);
  return text;
}

std::string race_text(const void* ptr, size_t bytes, bool write, const char* file, int line, const Range& range,
                      uint64_t other, bool other_wrote, bool several) {
  const auto p = reinterpret_cast<uintptr_t>(ptr);
  const std::string me = cluster_text(detail::cluster_index());
  return format("cross-block race on global memory: %s %ss %zu bytes at %p (%s), byte offset %" PRIuPTR " of ",
                me.c_str(), access_kind(write), bytes, ptr, site(file, line).c_str(), p - range.lo) +
         registry().describe(range) + "; " + cluster_text(other) + (several ? " (among others)" : "") +
         (other_wrote ? " wrote" : " read") + " it earlier in the same launch (blocks of one launch are not ordered)";
}

[[noreturn]] __attribute__((noinline)) void fail_misaligned(const void* ptr, size_t bytes, size_t align, bool write,
                                                             const char* file, int line) {
  tl_message = misaligned_text(ptr, bytes, align, write, file, line);
  detail::sanitizer_failure(tl_message);
}

[[noreturn]] __attribute__((noinline)) void fail_out_of_bounds(const void* ptr, size_t bytes, bool write,
                                                                const char* file, int line) {
  tl_message = out_of_bounds_text(ptr, bytes, write, file, line);
  detail::sanitizer_failure(tl_message);
}

[[noreturn]] __attribute__((noinline)) void fail_race(const void* ptr, size_t bytes, bool write, const char* file,
                                                       int line, const Range* range, uint64_t other, bool other_wrote,
                                                       bool several) {
  tl_message = race_text(ptr, bytes, write, file, line, *range, other, other_wrote, several);
  detail::sanitizer_failure(tl_message);
}

// The cache slot now holding the range of [p, p + bytes) (cleared for this launch); fails when no
// live tensor holds the access.
__attribute__((noinline)) CachedRange& lookup(uintptr_t p, size_t bytes, bool write, const char* file, int line,
                                              Range** found_range) {
  Fast& f = tl_fast;
  Range* r = find(*tl_snapshot, p, bytes);
  if (!r) {  // (a registration after this thread's first access of the launch: none expected)
    tl_snapshot = registry().snapshot();
    r = find(*tl_snapshot, p, bytes);
  }
  if (!r) fail_out_of_bounds(reinterpret_cast<const void*>(p), bytes, write, file, line);
  r->prepare(f.serial);
  CachedRange& slot = f.cache[f.next];
  f.next = (f.next + 1) % kCached;
  slot = CachedRange{r->lo, r->hi, r->base, r->shadow};
  *found_range = r;
  return slot;
}

// The Range of a cache slot (failure messages only).
Range* range_of(const CachedRange& c) {
  return find(*tl_snapshot, c.lo, c.hi - c.lo);
}

}  // namespace

bool memcheck_enabled() { return g_enabled.load(std::memory_order_relaxed); }
void set_memcheck(bool on) { g_enabled.store(on); }

void global_access(const void* ptr, size_t bytes, size_t align, bool write, const char* file, int line) {
  if (!g_enabled.load(std::memory_order_relaxed)) return;
  const auto p = reinterpret_cast<uintptr_t>(ptr);
  if (__builtin_expect((p & (align - 1)) != 0, 0)) fail_misaligned(ptr, bytes, align, write, file, line);
  Fast& f = tl_fast;
  const uint64_t serial = detail::launch_serial();
  if (__builtin_expect(f.serial != serial, 0)) {
    begin_launch(serial);
    if (f.checking) g_checked_launches.fetch_add(1, std::memory_order_relaxed);
  }
  if (!f.checking) return;

  // Bounds: a cached range, else the snapshot.
  const uintptr_t end = p + bytes;
  CachedRange* hit = nullptr;
  for (CachedRange& c : f.cache)
    if (p >= c.lo && end <= c.hi) {
      hit = &c;
      break;
    }
  if (__builtin_expect(hit == nullptr, 0)) {
    Range* unused;
    hit = &lookup(p, bytes, write, file, line, &unused);
  }

  // Races between clusters.
  const uint64_t me = detail::cluster_index() + 1;
  if (__builtin_expect(me > kMaxCluster, 0)) return;  // (not representable: unchecked)
  const size_t first_granule = (p - hit->base) >> 1, last_granule = (end - 1 - hit->base) >> 1;
  for (size_t g = first_granule; g <= last_granule; ++g) {
    std::atomic<uint64_t>& word = hit->shadow[g];
    uint64_t e = word.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t first = (e >> 1) & kMaxCluster, second = e >> 32, written = e & 1;
      uint64_t desired;
      if (first == 0) {
        desired = (me << 1) | (write ? 1 : 0);
      } else if (first == me) {
        if (second != 0) {  // other clusters read it (and nobody wrote it)
          if (write) fail_race(ptr, bytes, write, file, line, range_of(*hit), second - 1, false, false);
          break;
        }
        if (!write || written) break;
        desired = e | 1;
      } else {
        if (written) fail_race(ptr, bytes, write, file, line, range_of(*hit), first - 1, true, false);
        if (write) fail_race(ptr, bytes, write, file, line, range_of(*hit), first - 1, false, second != 0);
        if (second != 0) break;  // several readers already
        desired = e | (me << 32);
      }
      if (word.compare_exchange_weak(e, desired, std::memory_order_relaxed)) break;
    }
  }
}

MemcheckScope::MemcheckScope(const char* op, std::initializer_list<Arg> args) {
  if (!memcheck_enabled()) return;
  active_ = true;
  for (const Arg& arg : args) {
    if (!arg.tensor || !arg.tensor->has_storage()) continue;
    const c10::Storage& storage = arg.tensor->storage();
    const auto lo = reinterpret_cast<uintptr_t>(storage.data());
    const size_t bytes = storage.nbytes();
    if (lo == 0 || bytes == 0) continue;
    storages_.push_back(storage);
    const auto [range, token] = registry().add(lo, lo + bytes, format("`%s` (argument of %s)", arg.name, op));
    registrations_.emplace_back(range, token);
  }
  previous_op_ = g_op.exchange(op);
  g_scopes.fetch_add(1);
}

MemcheckScope::~MemcheckScope() {
  if (!active_) return;
  g_scopes.fetch_sub(1);
  g_op.store(previous_op_);
  for (const auto& [range, token] : registrations_) registry().remove(static_cast<Range*>(range), token);
  storages_.clear();  // (may free tracked memory: after the registry's lock)
}

}  // namespace emu

void bind_memcheck(pybind11::module_& m) {
  emu::install_allocator();
  m.def("memcheck", &emu::memcheck_enabled,
        "Whether global-memory accesses are checked (alignment; inside ops also bounds and cross-block races)");
  m.def("set_memcheck", &emu::set_memcheck, "Turns the global-memory checks on (default) or off",
        pybind11::arg("on"));
  m.def("memcheck_info", [] {
    pybind11::dict d;
    d["enabled"] = emu::memcheck_enabled();
    d["allocator_installed"] = emu::g_allocator_installed.load();
    d["active_scopes"] = emu::g_scopes.load();
    d["checked_launches"] = emu::g_checked_launches.load();
    return d;
  }, "State of memcheck: enabled, allocator_installed (outputs are tracked: bounds and races can be checked), "
     "active_scopes, checked_launches (launches whose accesses were bounds-checked, counted once per OS thread "
     "that ran blocks of them)");
  m.def("memcheck_ranges", [] { return emu::registry().list(); },
        "The registered valid ranges: (lo, hi, label) for each, lo < hi, by address");
  bind_memcheck_selftests(m);
}
