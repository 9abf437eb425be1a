// The emulator's runtime (model in emu.h): fibers, block, cluster and warp barriers, launches over
// a small pool of OS threads, and the Python controls (bind_runtime).
#include <torch/extension.h>

#include "emu.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cfenv>
#include <cstdarg>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

// EMU_UCONTEXT forces the portable context switch (e.g. for sanitizers, which do not follow the
// hand-written one).
#if defined(__x86_64__) && !defined(EMU_UCONTEXT)
#define EMU_X86_64_SWITCH 1
#else
#define EMU_X86_64_SWITCH 0
#include <ucontext.h>
#endif

namespace emu {
namespace detail {
__thread ThreadView* current = nullptr;
}  // namespace detail

namespace {

using detail::BlockView;
using detail::KernelCall;
using detail::ThreadView;
using detail::WarpOp;

constexpr unsigned kMaxThreads = 1024;
constexpr unsigned kMaxWarps = kMaxThreads / 32;
constexpr unsigned kMaxClusterBlocks = 8;  // CUDA's portable cluster size
constexpr size_t kStackBytes = 64 * 1024;  // kernels use a few hundred bytes; printf a few KiB

// ---------------------------------------------------------------------------------------------
// Context switch

#if EMU_X86_64_SWITCH
// emu_switch_context(save, load): pushes the callee-saved registers and the SSE/x87 control words
// (the only state the System V ABI keeps across a call), stores rsp to *save, then pops the same
// from the stack `load` and returns into that context. No syscalls, unlike swapcontext.
extern "C" void emu_switch_context(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl emu_switch_context
    .hidden emu_switch_context
    .type emu_switch_context, @function
emu_switch_context:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch_context, .-emu_switch_context
)");

struct Context {
  void* sp = nullptr;
};

void switch_context(Context& from, Context& to) { emu_switch_context(&from.sp, to.sp); }

// A frame as emu_switch_context leaves it, whose `ret` enters `entry` as if called (rsp = 8 mod
// 16) with a null return address; the control words are this OS thread's (the launch's, see
// Worker::run_clusters). `stack + bytes` is 16-byte aligned.
void prepare_context(Context& context, char* stack, size_t bytes, void (*entry)()) {
  uint32_t mxcsr;
  uint16_t fpu_control;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpu_control));
  auto* frame = reinterpret_cast<uint64_t*>(stack + bytes) - 9;
  frame[0] = mxcsr | (uint64_t{fpu_control} << 32);
  std::fill(frame + 1, frame + 7, uint64_t{0});  // r15 r14 r13 r12 rbx rbp
  frame[7] = reinterpret_cast<uint64_t>(entry);
  frame[8] = 0;
  context.sp = frame;
}
#else
struct Context {
  ucontext_t uc;
};

void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

void prepare_context(Context& context, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&context.uc);  // takes this OS thread's floating-point environment
  context.uc.uc_stack.ss_sp = stack;
  context.uc.uc_stack.ss_size = bytes;
  context.uc.uc_link = nullptr;
  makecontext(&context.uc, entry, 0);
}
#endif

// ---------------------------------------------------------------------------------------------
// Messages

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  va_list args, again;
  va_start(args, fmt);
  va_copy(again, args);
  std::string text(static_cast<size_t>(std::max(0, vsnprintf(nullptr, 0, fmt, args))), '\0');
  vsnprintf(text.data(), text.size() + 1, fmt, again);
  va_end(again);
  va_end(args);
  return text;
}

std::string dims(dim3 d) { return format("(%u,%u,%u)", d.x, d.y, d.z); }

std::string site(const char* file, int line) {
  const char* slash = std::strrchr(file, '/');
  return format("%s:%d", slash ? slash + 1 : file, line);
}

bool same_site(const char* file_a, int line_a, const char* file_b, int line_b) {
  return line_a == line_b && (file_a == file_b || std::strcmp(file_a, file_b) == 0);
}

// "lanes 0-4,7" for the set bits of a warp mask.
std::string lanes_text(unsigned mask) {
  std::string text;
  for (unsigned lane = 0; lane < 32;) {
    if (!(mask >> lane & 1)) {
      ++lane;
      continue;
    }
    unsigned last = lane;
    while (last + 1 < 32 && (mask >> (last + 1) & 1)) ++last;
    text += text.empty() ? "" : ",";
    text += last == lane ? format("%u", lane) : format("%u-%u", lane, last);
    lane = last + 1;
  }
  return (__builtin_popcount(mask) == 1 ? "lane " : "lanes ") + text;
}

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::sync: return "__syncwarp";
    case WarpOp::shfl_xor: return "__shfl_xor_sync";
    case WarpOp::shfl_down: return "__shfl_down_sync";
    case WarpOp::shfl_idx: return "__shfl_sync";
  }
  return "?";
}

// The kernel's demangled symbol when the dynamic symbol table has it exactly (external linkage).
std::string kernel_name(const void* kernel) {
  Dl_info info{};
  if (dladdr(kernel, &info) && info.dli_sname && info.dli_saddr == kernel) {
    int status = 0;
    char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string name = status == 0 && demangled ? demangled : info.dli_sname;
    std::free(demangled);
    return name;
  }
  return format("kernel at %p", kernel);
}

// ---------------------------------------------------------------------------------------------
// Launch state shared by the OS threads that run its clusters

struct Failure {
  enum class Kind { none, index, usage, exception } kind = Kind::none;
  std::string message;
  std::exception_ptr exception;
};

struct Launch {
  KernelCall call;
  dim3 grid, block;
  size_t smem_bytes = 0;
  unsigned threads = 0;         // per block
  unsigned cluster_blocks = 1;  // a plain launch runs in clusters of one block
  uint64_t clusters = 0;
  std::fenv_t fenv;  // the launching thread's rounding mode, FTZ/DAZ: every block runs with it

  // Clusters are handed out in increasing order; a failed cluster stops the clusters after it.
  // Every cluster before the lowest failed one was handed out, so the error reported (the lowest
  // failed cluster's) is the same whatever the number of OS threads.
  std::atomic<uint64_t> next_cluster{0};
  std::atomic<uint64_t> lowest_failed{UINT64_MAX};
  std::mutex failure_mutex;
  Failure failure;

  void record(uint64_t failed_cluster, Failure&& failed) {
    std::lock_guard<std::mutex> lock(failure_mutex);
    if (failed_cluster < lowest_failed.load()) {
      lowest_failed.store(failed_cluster);
      failure = std::move(failed);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Fibers and the cluster scheduler of one OS thread

class Worker;

struct Fiber : ThreadView {
  Context context;
  char* stack = nullptr;  // lowest usable byte; a guard page below
  size_t stack_bytes = 0;
  unsigned index = 0;     // linear thread index in the block: warp index * 32 + lane
  enum class State : uint8_t { ready, at_block_barrier, at_cluster_barrier, at_warp_barrier, done } state =
      State::ready;
  // The barrier it waits at (error messages, warp agreement checks).
  const char* wait_file = "";
  int wait_line = 0;
  WarpOp op = WarpOp::sync;
  unsigned op_bytes = 0;
  unsigned wait_mask = 0;
  unsigned source_lane = 0;  // shuffles: the lane whose value this lane receives
  alignas(16) unsigned char value[16];
  alignas(16) unsigned char result[16];
};

struct Warp {
  unsigned lanes = 0;    // lanes that exist (the last warp of a block may be partial)
  unsigned waiting = 0;  // lanes at a warp barrier
  unsigned exited = 0;
};

// One block of the running cluster: what its fibers see (BlockView) and its own barriers.
struct Block : BlockView {
  Worker* worker = nullptr;
  Fiber* fibers = nullptr;  // its threads, by linear index
  Warp warps[kMaxWarps];
  unsigned arrived = 0;  // threads at __syncthreads
  const char* barrier_file = "";
  int barrier_line = 0;
  unsigned exited = 0;
};

[[noreturn]] void fiber_main();

class Worker {
 public:
  Worker() = default;
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // Stacks and shared memory for a launch, allocated before its clusters run (and kept for later
  // launches) so that running clusters never throws.
  void reserve(const Launch& launch) {
    const unsigned fibers = launch.cluster_blocks * launch.threads;
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    if (fibers_.size() < fibers) fibers_.resize(fibers);  // moves only the stack bookkeeping
    for (; stacks_ < fibers; ++stacks_) {
      void* memory = mmap(nullptr, page + kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (memory == MAP_FAILED) throw std::runtime_error("emu: out of memory for fiber stacks");
      mprotect(memory, page, PROT_NONE);  // a stack overflow faults instead of corrupting a neighbour
      Fiber& fiber = fibers_[stacks_];
      fiber.stack = static_cast<char*>(memory) + page;
      // Stack tops staggered by cache lines: at equal page offsets, the fibers' hot frames would
      // all compete for the same few L1 sets (this made barriers ~1.6x slower).
      fiber.stack_bytes = kStackBytes - (stacks_ % 64) * 64;
    }
    const size_t bytes = launch.cluster_blocks * smem_stride(launch.smem_bytes);
    if (bytes > smem_capacity_) {
      smem_.reset(static_cast<unsigned char*>(std::aligned_alloc(64, bytes)));
      if (!smem_) throw std::runtime_error("emu: out of memory for shared memory");
      smem_capacity_ = bytes;
    }
  }

  // Runs clusters of `launch` until none is left (or one failed); adds this thread's traffic.
  void run_clusters(Launch& launch, std::atomic<uint64_t>& read_total, std::atomic<uint64_t>& write_total) {
    launch_ = &launch;
    threads_ = launch.threads;
    cluster_blocks_ = launch.cluster_blocks;
    cluster_threads_ = cluster_blocks_ * threads_;
    for (unsigned rank = 0; rank < cluster_blocks_; ++rank) {
      Block& block = blocks_[rank];
      block.worker = this;
      block.block_dim = launch.block;
      block.grid_dim = launch.grid;
      block.smem_bytes = launch.smem_bytes;
      block.smem_stride = smem_stride(launch.smem_bytes);
      block.dynamic_smem = smem_.get() + rank * block.smem_stride;
      block.cluster_rank = rank;
      block.cluster_blocks = cluster_blocks_;
      block.read_bytes = block.write_bytes = 0;
      block.fibers = fibers_.data() + rank * threads_;
      for (unsigned w = 0; w < kMaxWarps; ++w) {
        const unsigned first = w * 32;
        block.warps[w].lanes = first >= threads_ ? 0u : threads_ - first >= 32 ? ~0u : (1u << (threads_ - first)) - 1;
      }
      for (unsigned i = 0; i < threads_; ++i) {
        Fiber& fiber = block.fibers[i];
        fiber.thread_idx = dim3(i % launch.block.x, i / launch.block.x % launch.block.y,
                                i / launch.block.x / launch.block.y);
        fiber.block = &block;
        fiber.index = i;
      }
    }
    std::fenv_t own_fenv;
    std::fegetenv(&own_fenv);
    std::fesetenv(&launch.fenv);
    for (;;) {
      const uint64_t cluster = launch.next_cluster.fetch_add(1);
      if (cluster >= launch.clusters || cluster > launch.lowest_failed.load()) break;
      run_cluster(cluster);
    }
    std::fesetenv(&own_fenv);
    for (unsigned rank = 0; rank < cluster_blocks_; ++rank) {
      read_total += blocks_[rank].read_bytes;
      write_total += blocks_[rank].write_bytes;
    }
    launch_ = nullptr;
  }

  const KernelCall& call() const { return launch_->call; }

  // --- called by the running fiber ---

  void sync_block(const char* file, int line) {
    Fiber& me = running();
    Block& block = block_of(me);
    if (block.exited > 0)
      fail(Failure::Kind::usage, [&] {
        return format("__syncthreads() at %s can never complete: %u of the block's %u threads have exited (%u arrived)",
                      site(file, line).c_str(), block.exited, threads_, block.arrived + 1);
      });
    if (block.arrived == 0) {
      block.barrier_file = file;
      block.barrier_line = line;
    } else if (!same_site(block.barrier_file, block.barrier_line, file, line)) {
      fail(Failure::Kind::usage, [&] {
        return format("threads reached different __syncthreads() calls: %u at %s, %s at %s", block.arrived,
                      site(block.barrier_file, block.barrier_line).c_str(), describe(me).c_str(),
                      site(file, line).c_str());
      });
    }
    if (++block.arrived == threads_) {  // every other thread waits here: release them, continue
      block.arrived = 0;
      for (unsigned i = 0; i < threads_; ++i)
        if (i != me.index) make_ready(block.fibers[i]);
      return;
    }
    wait(me, Fiber::State::at_block_barrier, file, line);
  }

  // The cluster barrier counts arrivals at any cluster_sync() call: the GPU has one barrier per
  // cluster (barrier.cluster), not one per call site. `file`, `line` name it in messages.
  void sync_cluster(const char* file, int line) {
    Fiber& me = running();
    if (cluster_exited_ > 0)
      fail(Failure::Kind::usage, [&] {
        return format("cluster_sync() at %s can never complete: %u of the cluster's %u threads have exited "
                      "(%u arrived)",
                      site(file, line).c_str(), cluster_exited_, cluster_threads_, cluster_arrived_ + 1);
      });
    if (cluster_arrived_ == 0) {
      cluster_barrier_file_ = file;
      cluster_barrier_line_ = line;
    }
    if (++cluster_arrived_ == cluster_threads_) {
      cluster_arrived_ = 0;
      for (unsigned i = 0; i < cluster_threads_; ++i)
        if (&fibers_[i] != &me) make_ready(fibers_[i]);
      return;
    }
    wait(me, Fiber::State::at_cluster_barrier, file, line);
  }

  // A warp barrier over `mask`; a shuffle also exchanges values. The exchange happens when the
  // last lane arrives: it writes every lane's `result` from the sources' `value`. A lane's result
  // is written only by the release of a barrier it waits at and read as soon as it resumes, before
  // it can arrive anywhere again, so one barrier per shuffle suffices whatever the masks.
  void warp_op(WarpOp op, unsigned mask, int lane_arg, int width, void* data, unsigned bytes, const char* file,
               int line) {
    Fiber& me = running();
    Block& block = block_of(me);
    const unsigned lane = me.index & 31, bit = 1u << lane, warp_index = me.index / 32;
    Fiber* const warp_fibers = block.fibers + (me.index & ~31u);
    Warp& warp = block.warps[warp_index];
    const char* name = op_name(op);
    if (!(mask & bit))
      fail(Failure::Kind::usage, [&] {
        return format("%s(mask 0x%08x) at %s: the mask does not include the calling %s", name, mask,
                      site(file, line).c_str(), describe(me).c_str());
      });
    if (mask & ~warp.lanes)
      fail(Failure::Kind::usage, [&] {
        return format("%s(mask 0x%08x) at %s by %s: the mask names %s, which do not exist (warp %u has %d threads)",
                      name, mask, site(file, line).c_str(), describe(me).c_str(),
                      lanes_text(mask & ~warp.lanes).c_str(), warp_index, __builtin_popcount(warp.lanes));
      });
    if (mask & warp.exited)
      fail(Failure::Kind::usage, [&] {
        return format("%s(mask 0x%08x) at %s by %s: the mask names %s of warp %u, which exited", name, mask,
                      site(file, line).c_str(), describe(me).c_str(), lanes_text(mask & warp.exited).c_str(),
                      warp_index);
      });
    if (op != WarpOp::sync) {
      if (width < 1 || width > 32 || (width & (width - 1)))
        fail(Failure::Kind::usage, [&] {
          return format("%s at %s by %s: width %d is not a power of two in [1, 32]", name, site(file, line).c_str(),
                        describe(me).c_str(), width);
        });
      me.source_lane = source_lane(op, lane, lane_arg, static_cast<unsigned>(width));
      std::memcpy(me.value, data, sizeof(me.value));
    }
    me.op = op;
    me.op_bytes = bytes;
    me.wait_mask = mask;
    me.wait_file = file;
    me.wait_line = line;
    warp.waiting |= bit;
    if ((warp.waiting & mask) == mask && group_arrived(warp_fibers, mask)) {
      release_warp(warp, warp_fibers, mask, me);
    } else {
      me.state = Fiber::State::at_warp_barrier;
      switch_away(me);
    }
    if (op != WarpOp::sync) std::memcpy(data, me.result, sizeof(me.result));
  }

  // An address that cluster_smem cannot map (see emu::cluster_smem).
  [[noreturn]] void bad_cluster_smem(const void* address, unsigned rank) {
    const Block& block = block_of(running());
    if (rank >= cluster_blocks_)
      fail(Failure::Kind::usage, [&] {
        return format("cluster_smem(%p, rank %u): the cluster has %u blocks", address, rank, cluster_blocks_);
      });
    fail(Failure::Kind::usage, [&] {
      return format("cluster_smem(%p, rank %u): the address is not inside the calling block's %zu bytes of "
                    "dynamic shared memory (byte offset %lld)",
                    address, rank, block.smem_bytes,
                    static_cast<long long>(reinterpret_cast<uintptr_t>(address) -
                                           reinterpret_cast<uintptr_t>(block.dynamic_smem)));
    });
  }

  [[noreturn]] void index_error(long long value, long long classes, long long ignore_index) {
    fail(
        Failure::Kind::index,
        [&] {
          return format("smoothce.cross_entropy: target value %lld is out of bounds: expected class indices in "
                        "[0, %lld) or ignore_index (%lld)",
                        value, classes, ignore_index);
        },
        /*with_context=*/false);
  }

  // The kernel returned (or threw: `error`) in the running fiber.
  [[noreturn]] void exit_running(std::exception_ptr error) {
    Fiber& me = running();
    Block& block = block_of(me);
    if (error) fail(Failure::Kind::exception, [] { return std::string(); }, false, std::move(error));
    me.state = Fiber::State::done;
    ++block.exited;
    ++cluster_exited_;
    Warp& warp = block.warps[me.index / 32];
    const unsigned bit = 1u << (me.index & 31);
    warp.exited |= bit;
    if (block.arrived > 0)
      fail(Failure::Kind::usage, [&] {
        return format("%s exited while %u of the block's %u threads wait at __syncthreads() (%s)",
                      describe(me).c_str(), block.arrived, threads_,
                      site(block.barrier_file, block.barrier_line).c_str());
      });
    if (cluster_arrived_ > 0)
      fail(Failure::Kind::usage, [&] {
        return format("%s exited while %u of the cluster's %u threads wait at cluster_sync() (%s)",
                      describe(me).c_str(), cluster_arrived_, cluster_threads_,
                      site(cluster_barrier_file_, cluster_barrier_line_).c_str());
      });
    for (unsigned lanes = warp.waiting; lanes; lanes &= lanes - 1) {
      const Fiber& other = block.fibers[(me.index & ~31u) + __builtin_ctz(lanes)];
      if (other.wait_mask & bit)
        fail(Failure::Kind::usage, [&] {
          return format("%s exited while %s waits at %s(mask 0x%08x) (%s), which names it", describe(me).c_str(),
                        describe(other).c_str(), op_name(other.op), other.wait_mask,
                        site(other.wait_file, other.wait_line).c_str());
        });
    }
    // A block's shared memory ends with it: later reads by its cluster see the fill (emu.h).
    if (block.exited == threads_ && cluster_blocks_ > 1 && block.smem_bytes)
      std::memset(block.dynamic_smem, 0xFF, block.smem_bytes);
    switch_away(me);
    __builtin_unreachable();
  }

 private:
  static constexpr unsigned kReady = kMaxClusterBlocks * kMaxThreads;

  // Shared memory buffers of a cluster's blocks are this far apart (cache-line aligned).
  static size_t smem_stride(size_t smem_bytes) { return (smem_bytes + 63) / 64 * 64; }

  Fiber& running() const { return *static_cast<Fiber*>(detail::current); }
  static Block& block_of(const Fiber& fiber) { return *static_cast<Block*>(fiber.block); }

  void make_ready(Fiber& fiber) {
    fiber.state = Fiber::State::ready;
    ready_[(ready_head_ + ready_count_++) % kReady] = &fiber;
  }

  void wait(Fiber& me, Fiber::State state, const char* file, int line) {
    me.state = state;
    me.wait_file = file;
    me.wait_line = line;
    switch_away(me);
  }

  // Leaves the running fiber (waiting or done) for the next ready one, or for the scheduler when
  // none is ready (the cluster finished, or is deadlocked). Whoever resumes a fiber sets `current`.
  void switch_away(Fiber& me) {
    Fiber* next = pop_ready();
    detail::current = next;
    switch_context(me.context, next ? next->context : scheduler_);
  }

  Fiber* pop_ready() {
    if (ready_count_ == 0) return nullptr;
    Fiber* next = ready_[ready_head_];
    ready_head_ = (ready_head_ + 1) % kReady;
    --ready_count_;
    return next;
  }

  // Stops the cluster from the running fiber, which is never resumed: no C++ exception crosses a
  // context switch. The fiber's frames are abandoned (kernels hold only trivial locals), so the
  // message is built by `message()` inside this call, leaving no temporary behind.
  template <typename Message>
  [[noreturn]] void fail(Failure::Kind kind, Message message, bool with_context = true,
                         std::exception_ptr exception = nullptr) {
    Fiber& me = running();
    failure_.kind = kind;
    failure_.message = with_context ? block_context(block_of(me)) + ": " + message() : message();
    failure_.exception = std::move(exception);
    detail::current = nullptr;
    switch_context(me.context, scheduler_);
    __builtin_unreachable();
  }

  static unsigned source_lane(WarpOp op, unsigned lane, int lane_arg, unsigned width) {
    // PTX shfl.sync: segments of `width` lanes; an out-of-range source gives the lane its own value
    // (xor may read an earlier segment, as CUDA documents).
    const unsigned first = lane & ~(width - 1), last = first + width - 1, arg = static_cast<unsigned>(lane_arg);
    unsigned source = lane;
    switch (op) {
      case WarpOp::shfl_xor: source = lane ^ (arg & 31); break;
      case WarpOp::shfl_down: source = lane + (arg & 31); break;
      case WarpOp::shfl_idx: source = first | (arg & (width - 1)); break;
      case WarpOp::sync: break;
    }
    return source <= last ? source : lane;
  }

  static bool group_arrived(const Fiber* warp_fibers, unsigned mask) {
    for (unsigned lanes = mask; lanes; lanes &= lanes - 1)
      if (warp_fibers[__builtin_ctz(lanes)].wait_mask != mask) return false;
    return true;
  }

  void release_warp(Warp& warp, Fiber* warp_fibers, unsigned mask, Fiber& me) {
    for (unsigned lanes = mask; lanes; lanes &= lanes - 1) {
      const Fiber& other = warp_fibers[__builtin_ctz(lanes)];
      if (other.op != me.op || other.op_bytes != me.op_bytes)
        fail(Failure::Kind::usage, [&] {
          return format("warp %u, mask 0x%08x: %s calls %s on %u bytes (%s) while %s calls %s on %u bytes (%s)",
                        me.index / 32, mask, describe(me).c_str(), op_name(me.op), me.op_bytes,
                        site(me.wait_file, me.wait_line).c_str(), describe(other).c_str(), op_name(other.op),
                        other.op_bytes, site(other.wait_file, other.wait_line).c_str());
        });
    }
    if (me.op != WarpOp::sync) {
      for (unsigned lanes = mask; lanes; lanes &= lanes - 1) {
        Fiber& receiver = warp_fibers[__builtin_ctz(lanes)];
        if (mask >> receiver.source_lane & 1)
          std::memcpy(receiver.result, warp_fibers[receiver.source_lane].value, sizeof(receiver.result));
        else  // a source outside the mask is undefined on a GPU: poison it
          std::memset(receiver.result, 0xFF, sizeof(receiver.result));
      }
    }
    warp.waiting &= ~mask;
    for (unsigned lanes = mask & ~(1u << (me.index & 31)); lanes; lanes &= lanes - 1)
      make_ready(warp_fibers[__builtin_ctz(lanes)]);
  }

  void run_cluster(uint64_t cluster) {
    const dim3 grid = launch_->grid;
    for (unsigned rank = 0; rank < cluster_blocks_; ++rank) {
      Block& block = blocks_[rank];
      // A cluster is consecutive along x, and grid.x is a multiple of its size: one y, z.
      const uint64_t linear = cluster * cluster_blocks_ + rank;
      block.block_idx = dim3(static_cast<unsigned>(linear % grid.x), static_cast<unsigned>(linear / grid.x % grid.y),
                             static_cast<unsigned>(linear / grid.x / grid.y));
      if (block.smem_bytes) std::memset(block.dynamic_smem, 0xFF, block.smem_bytes);
      block.arrived = block.exited = 0;
      for (unsigned w = 0; w < kMaxWarps; ++w) block.warps[w].waiting = block.warps[w].exited = 0;
    }
    cluster_arrived_ = cluster_exited_ = 0;
    failure_ = Failure();
    ready_head_ = ready_count_ = 0;
    for (unsigned i = 0; i < cluster_threads_; ++i) {  // rank 0's threads first, in index order
      prepare_context(fibers_[i].context, fibers_[i].stack, fibers_[i].stack_bytes, fiber_main);
      make_ready(fibers_[i]);
    }
    Fiber* first = pop_ready();
    detail::current = first;
    switch_context(scheduler_, first->context);
    // Back here: every fiber exited, one failed, or none can run.
    if (failure_.kind == Failure::Kind::none && cluster_exited_ != cluster_threads_) {
      failure_.kind = Failure::Kind::usage;
      failure_.message = cluster_context() + ": " + deadlock_text();
    }
    if (failure_.kind != Failure::Kind::none) launch_->record(cluster, std::move(failure_));
  }

  std::string deadlock_text() const {
    // Group the waiting threads by barrier, in thread order (rank by rank). Block and warp
    // barriers name their block in a cluster of several.
    std::vector<std::pair<std::string, unsigned>> groups;
    for (unsigned i = 0; i < cluster_threads_; ++i) {
      const Fiber& fiber = fibers_[i];
      const std::string in_block =
          cluster_blocks_ > 1 ? " in block " + dims(block_of(fiber).block_idx) : std::string();
      std::string where;
      if (fiber.state == Fiber::State::at_block_barrier)
        where = "__syncthreads()" + in_block + " (" + site(fiber.wait_file, fiber.wait_line) + ")";
      else if (fiber.state == Fiber::State::at_cluster_barrier)
        where = "cluster_sync() (" + site(fiber.wait_file, fiber.wait_line) + ")";
      else if (fiber.state == Fiber::State::at_warp_barrier)
        where = format("%s(mask 0x%08x) in warp %u", op_name(fiber.op), fiber.wait_mask, fiber.index / 32) +
                in_block + " (" + site(fiber.wait_file, fiber.wait_line) + ")";
      else
        continue;
      auto group = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == where; });
      if (group == groups.end()) groups.emplace_back(where, 1);
      else ++group->second;
    }
    std::string text = "deadlock: no thread can run;";
    for (const auto& [where, count] : groups) text += format(" %u wait at ", count) + where + ";";
    return text + format(" %u of %u exited", cluster_exited_, cluster_threads_);
  }

  std::string describe(const Fiber& fiber) const {
    return format("thread %s (warp %u, lane %u)", dims(fiber.thread_idx).c_str(), fiber.index / 32, fiber.index % 32);
  }

  std::string launch_text() const {
    return " of grid " + dims(launch_->grid) + ", blockDim " + dims(launch_->block);
  }

  std::string block_context(const Block& block) const {
    const std::string rank =
        cluster_blocks_ > 1 ? format(" (rank %u of a cluster of %u)", block.cluster_rank, cluster_blocks_) : "";
    return "emu: " + kernel_name(launch_->call.kernel) + ", block " + dims(block.block_idx) + rank + launch_text();
  }

  std::string cluster_context() const {
    if (cluster_blocks_ == 1) return block_context(blocks_[0]);
    return "emu: " + kernel_name(launch_->call.kernel) + ", cluster of blocks " + dims(blocks_[0].block_idx) + "-" +
           dims(blocks_[cluster_blocks_ - 1].block_idx) + launch_text();
  }

  std::vector<Fiber> fibers_;  // the running cluster's threads, rank by rank
  unsigned stacks_ = 0;        // fibers with a stack
  struct FreeDeleter {
    void operator()(unsigned char* p) const { std::free(p); }
  };
  std::unique_ptr<unsigned char, FreeDeleter> smem_;  // the blocks' dynamic shared memory, by rank
  size_t smem_capacity_ = 0;

  Launch* launch_ = nullptr;
  unsigned threads_ = 0;  // per block
  unsigned cluster_blocks_ = 1, cluster_threads_ = 0;
  Block blocks_[kMaxClusterBlocks];
  Context scheduler_;
  Fiber* ready_[kReady];  // ring buffer of runnable fibers
  unsigned ready_head_ = 0, ready_count_ = 0;
  unsigned cluster_arrived_ = 0;  // threads at cluster_sync
  const char* cluster_barrier_file_ = "";
  int cluster_barrier_line_ = 0;
  unsigned cluster_exited_ = 0;
  Failure failure_;
};

Worker& running_worker(const char* what) {
  if (!detail::current) detail::outside_kernel(what);
  return *static_cast<Block*>(detail::current->block)->worker;
}

void fiber_main() {
  Worker& worker = *static_cast<Block*>(detail::current->block)->worker;
  std::exception_ptr error;
  try {
    worker.call().run(worker.call().call);
  } catch (...) {  // recorded outside the handler: no fiber switch while an exception is being handled
    error = std::current_exception();
  }
  worker.exit_running(std::move(error));
}

// ---------------------------------------------------------------------------------------------
// The runtime: configuration, counters, and the OS threads that run blocks

class Runtime {
 public:
  void launch(const KernelCall& call, dim3 grid, dim3 block, size_t smem_bytes, unsigned cluster_blocks) {
    if (detail::current) throw std::runtime_error("emu: a kernel cannot launch kernels");
    validate(call, grid, block, smem_bytes, cluster_blocks);
    std::lock_guard<std::mutex> launch_lock(launch_mutex_);
    Launch state;
    state.call = call;
    state.grid = grid;
    state.block = block;
    state.smem_bytes = smem_bytes;
    state.threads = block.x * block.y * block.z;
    state.cluster_blocks = cluster_blocks;
    state.clusters = uint64_t{grid.x} * grid.y * grid.z / cluster_blocks;
    std::fegetenv(&state.fenv);
    const unsigned helpers = static_cast<unsigned>(std::min<uint64_t>(workers() - 1, state.clusters - 1));
    caller_.reserve(state);
    start_helpers(helpers, state);
    ++launch_count_;
    last_grid_ = grid;
    last_block_ = block;
    last_smem_ = smem_bytes;
    last_cluster_blocks_ = cluster_blocks;

    if (helpers > 0) {
      std::lock_guard<std::mutex> lock(pool_mutex_);
      active_ = &state;
      active_helpers_ = helpers;
      ++generation_;
    }
    if (helpers > 0) wake_.notify_all();
    caller_.run_clusters(state, read_bytes_, write_bytes_);
    if (helpers > 0) {
      std::unique_lock<std::mutex> lock(pool_mutex_);
      active_ = nullptr;  // helpers that wake up late do not join
      done_.wait(lock, [&] { return joined_ == 0; });
    }

    const Failure& failure = state.failure;
    if (failure.kind == Failure::Kind::index) TORCH_CHECK_INDEX(false, failure.message);
    if (failure.kind == Failure::Kind::usage) throw std::runtime_error(failure.message);
    if (failure.kind == Failure::Kind::exception) std::rethrow_exception(failure.exception);
  }

  Config config() {
    std::lock_guard<std::mutex> lock(launch_mutex_);
    return config_;
  }

  void set_config(const Config& config) {
    if (config.workers > 64) throw std::invalid_argument("emu: at most 64 workers");
    std::lock_guard<std::mutex> lock(launch_mutex_);
    config_ = config;
  }

  unsigned workers() const {
    return config_.workers ? config_.workers : std::clamp(std::thread::hardware_concurrency(), 1u, 4u);
  }

  unsigned effective_workers() {
    std::lock_guard<std::mutex> lock(launch_mutex_);
    return workers();
  }

  Traffic traffic() const { return {read_bytes_.load(), write_bytes_.load()}; }
  void reset_traffic() {
    read_bytes_ = 0;
    write_bytes_ = 0;
  }
  void count_outside(uint64_t bytes, bool write) { (write ? write_bytes_ : read_bytes_) += bytes; }

  uint64_t launch_count() const { return launch_count_.load(); }

  std::tuple<std::tuple<unsigned, unsigned, unsigned>, std::tuple<unsigned, unsigned, unsigned>, size_t> last_launch() {
    std::lock_guard<std::mutex> lock(launch_mutex_);
    return {{last_grid_.x, last_grid_.y, last_grid_.z}, {last_block_.x, last_block_.y, last_block_.z}, last_smem_};
  }

  unsigned last_cluster_blocks() {
    std::lock_guard<std::mutex> lock(launch_mutex_);
    return last_cluster_blocks_;
  }

 private:
  void validate(const KernelCall& call, dim3 grid, dim3 block, size_t smem_bytes, unsigned cluster_blocks) {
    auto reject = [&](const std::string& why) {
      const std::string clusters = cluster_blocks != 1 ? format(", clusters of %u blocks", cluster_blocks) : "";
      throw std::runtime_error("emu: invalid launch of " + kernel_name(call.kernel) + " with grid " + dims(grid) +
                               ", block " + dims(block) + clusters +
                               format(", %zu bytes of shared memory: ", smem_bytes) + why);
    };
    if (!block.x || !block.y || !block.z) reject("a block dimension is 0");
    if (block.x > 1024 || block.y > 1024 || block.z > 64) reject("blockDim is limited to (1024, 1024, 64)");
    if (uint64_t{block.x} * block.y * block.z > kMaxThreads) reject("more than 1024 threads per block");
    if (!grid.x || !grid.y || !grid.z) reject("a grid dimension is 0");
    if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) reject("gridDim is limited to (2^31-1, 65535, 65535)");
    const size_t limit = config().max_dynamic_smem;
    if (smem_bytes > limit) reject(format("more dynamic shared memory than the %zu bytes allowed", limit));
    if (cluster_blocks < 1 || cluster_blocks > kMaxClusterBlocks)
      reject(format("a cluster has 1 to %u blocks", kMaxClusterBlocks));
    if (grid.x % cluster_blocks) reject("gridDim.x is not a multiple of the cluster size");
  }

  struct Helper {
    Worker worker;
    std::thread thread;
  };

  // Helper threads (created on first need, detached, never destroyed: the runtime outlives the
  // interpreter's teardown) get their stacks and shared memory here, while they are idle.
  void start_helpers(unsigned count, const Launch& launch) {
    while (helpers_.size() < count) {
      helpers_.push_back(std::make_unique<Helper>());
      Helper& helper = *helpers_.back();
      const unsigned index = static_cast<unsigned>(helpers_.size() - 1);
      helper.thread = std::thread([this, &helper, index] { helper_loop(helper.worker, index); });
      helper.thread.detach();
    }
    for (unsigned i = 0; i < count; ++i) helpers_[i]->worker.reserve(launch);
  }

  void helper_loop(Worker& worker, unsigned index) {
    uint64_t seen = 0;
    for (;;) {
      Launch* launch;
      {
        std::unique_lock<std::mutex> lock(pool_mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (!active_ || index >= active_helpers_) continue;
        launch = active_;
        ++joined_;
      }
      worker.run_clusters(*launch, read_bytes_, write_bytes_);
      std::lock_guard<std::mutex> lock(pool_mutex_);
      if (--joined_ == 0) done_.notify_all();
    }
  }

  std::mutex launch_mutex_;  // one launch at a time; guards the configuration and the caller's worker
  Config config_;
  Worker caller_;  // runs blocks on the launching thread
  std::vector<std::unique_ptr<Helper>> helpers_;

  std::mutex pool_mutex_;  // the handover of a launch to the helpers
  std::condition_variable wake_, done_;
  uint64_t generation_ = 0;  // bumped for every launch the helpers may join
  Launch* active_ = nullptr;
  unsigned active_helpers_ = 0;  // helpers with a lower index may join the active launch
  unsigned joined_ = 0;

  std::atomic<uint64_t> read_bytes_{0}, write_bytes_{0}, launch_count_{0};
  dim3 last_grid_{0, 0, 0}, last_block_{0, 0, 0};
  size_t last_smem_ = 0;
  unsigned last_cluster_blocks_ = 0;
};

Runtime& runtime() {
  static Runtime* instance = new Runtime;  // never destroyed: detached helper threads use it
  return *instance;
}

}  // namespace

Traffic traffic() { return runtime().traffic(); }
void reset_traffic() { runtime().reset_traffic(); }
Config config() { return runtime().config(); }
void set_config(const Config& config) { runtime().set_config(config); }

void index_error(long long value, long long classes, long long ignore_index) {
  if (!detail::current)
    TORCH_CHECK_INDEX(false, "smoothce.cross_entropy: target value ", value,
                      " is out of bounds: expected class indices in [0, ", classes, ") or ignore_index (",
                      ignore_index, ")");
  running_worker("index_error").index_error(value, classes, ignore_index);
}

namespace detail {

void outside_kernel(const char* what) { throw std::logic_error(std::string("emu: ") + what + " used outside a kernel"); }

void syncthreads(const char* file, int line) { running_worker("__syncthreads").sync_block(file, line); }

void cluster_sync(const char* file, int line) { running_worker("cluster_sync").sync_cluster(file, line); }

void bad_cluster_smem(const void* address, unsigned rank) {
  running_worker("cluster_smem").bad_cluster_smem(address, rank);
}

void warp_op(WarpOp op, unsigned mask, int lane_arg, int width, void* data, unsigned bytes, const char* file,
             int line) {
  running_worker(op_name(op)).warp_op(op, mask, lane_arg, width, data, bytes, file, line);
}

void count_outside_kernel(uint64_t bytes, bool write) { runtime().count_outside(bytes, write); }

void launch(const KernelCall& call, dim3 grid, dim3 block, size_t smem_bytes, unsigned cluster_blocks) {
  runtime().launch(call, grid, block, smem_bytes, cluster_blocks);
}

}  // namespace detail
}  // namespace emu

void bind_runtime(pybind11::module_& m) {
  m.def("traffic", [] {
    const emu::Traffic t = emu::traffic();
    return std::make_tuple(t.read_bytes, t.write_bytes);
  }, "(read_bytes, write_bytes) of global memory counted by the kernels since the last reset_traffic()");
  m.def("reset_traffic", &emu::reset_traffic);
  m.def("max_dynamic_smem", [] { return emu::config().max_dynamic_smem; });
  m.def("set_max_dynamic_smem", [](size_t bytes) {
    emu::Config config = emu::config();
    config.max_dynamic_smem = bytes;
    emu::set_config(config);
  }, "The dynamic shared memory a launch may ask for (bytes per block); larger launches raise");
  m.def("workers", [] { return emu::runtime().effective_workers(); }, "OS threads that run a launch's blocks");
  m.def("set_workers", [](unsigned workers) {
    emu::Config config = emu::config();
    config.workers = workers;
    emu::set_config(config);
  }, "OS threads that run a launch's blocks; 0: min(hardware threads, 4)");
  m.def("launch_count", [] { return emu::runtime().launch_count(); }, "kernel launches so far");
  m.def("last_launch", [] { return emu::runtime().last_launch(); }, "((grid), (block), smem_bytes) of the last launch");
  m.def("last_cluster_blocks", [] { return emu::runtime().last_cluster_blocks(); },
        "blocks per cluster of the last launch (1: a plain launch)");
}
