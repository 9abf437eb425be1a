// The emulator's runtime (model in emu.h): fibers, block and warp barriers, launches over a small
// pool of OS threads, and the Python controls (bind_runtime).
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
// Worker::run_blocks). `stack + bytes` is 16-byte aligned.
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
// Launch state shared by the OS threads that run its blocks

struct Failure {
  enum class Kind { none, index, usage, exception } kind = Kind::none;
  std::string message;
  std::exception_ptr exception;
};

struct Launch {
  KernelCall call;
  dim3 grid, block;
  size_t smem_bytes = 0;
  unsigned threads = 0;  // per block
  uint64_t blocks = 0;
  std::fenv_t fenv;  // the launching thread's rounding mode, FTZ/DAZ: every block runs with it

  // Blocks are handed out in increasing order; a failed block stops the blocks after it. Every
  // block before the lowest failed one was handed out, so the error reported (the lowest failed
  // block's) is the same whatever the number of OS threads.
  std::atomic<uint64_t> next_block{0};
  std::atomic<uint64_t> lowest_failed{UINT64_MAX};
  std::mutex failure_mutex;
  Failure failure;

  void record(uint64_t failed_block, Failure&& failed) {
    std::lock_guard<std::mutex> lock(failure_mutex);
    if (failed_block < lowest_failed.load()) {
      lowest_failed.store(failed_block);
      failure = std::move(failed);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Fibers and the block scheduler of one OS thread

struct Fiber : ThreadView {
  Context context;
  char* stack = nullptr;  // lowest usable byte; a guard page below
  size_t stack_bytes = 0;
  unsigned index = 0;     // linear thread index in the block: warp index * 32 + lane
  enum class State : uint8_t { ready, at_block_barrier, at_warp_barrier, done } state = State::ready;
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

[[noreturn]] void fiber_main();

class Worker : public BlockView {
 public:
  Worker() : fibers_(new Fiber[kMaxThreads]) {}
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // Stacks and shared memory for a launch, allocated before its blocks run (and kept for later
  // launches) so that running blocks never throws.
  void reserve(unsigned threads, size_t smem_bytes) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    for (; stacks_ < threads; ++stacks_) {
      void* memory = mmap(nullptr, page + kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (memory == MAP_FAILED) throw std::runtime_error("emu: out of memory for fiber stacks");
      mprotect(memory, page, PROT_NONE);  // a stack overflow faults instead of corrupting a neighbour
      Fiber& fiber = fibers_[stacks_];
      fiber.stack = static_cast<char*>(memory) + page;
      // Stack tops staggered by cache lines: at equal page offsets, the fibers' hot frames would
      // all compete for the same few L1 sets (this made barriers ~1.6x slower).
      fiber.stack_bytes = kStackBytes - (stacks_ % 64) * 64;
      fiber.index = stacks_;
    }
    if (smem_bytes > smem_capacity_) {
      const size_t capacity = (smem_bytes + 63) / 64 * 64;
      smem_.reset(static_cast<unsigned char*>(std::aligned_alloc(64, capacity)));
      if (!smem_) throw std::runtime_error("emu: out of memory for shared memory");
      smem_capacity_ = capacity;
    }
  }

  // Runs blocks of `launch` until none is left (or one failed); adds this thread's traffic.
  void run_blocks(Launch& launch, std::atomic<uint64_t>& read_total, std::atomic<uint64_t>& write_total) {
    launch_ = &launch;
    block_dim = launch.block;
    grid_dim = launch.grid;
    dynamic_smem = smem_.get();
    read_bytes = write_bytes = 0;
    threads_ = launch.threads;
    for (unsigned w = 0; w < kMaxWarps; ++w) {
      const unsigned first = w * 32;
      warps_[w].lanes = first >= threads_ ? 0u : threads_ - first >= 32 ? ~0u : (1u << (threads_ - first)) - 1;
    }
    std::fenv_t own_fenv;
    std::fegetenv(&own_fenv);
    std::fesetenv(&launch.fenv);
    for (;;) {
      const uint64_t block = launch.next_block.fetch_add(1);
      if (block >= launch.blocks || block > launch.lowest_failed.load()) break;
      run_block(block);
    }
    std::fesetenv(&own_fenv);
    read_total += read_bytes;
    write_total += write_bytes;
    launch_ = nullptr;
  }

  const KernelCall& call() const { return launch_->call; }

  // --- called by the running fiber ---

  void sync_block(const char* file, int line) {
    Fiber& me = running();
    if (exited_ > 0)
      fail(Failure::Kind::usage, [&] {
        return format("__syncthreads() at %s can never complete: %u of the block's %u threads have exited (%u arrived)",
                      site(file, line).c_str(), exited_, threads_, arrived_ + 1);
      });
    if (arrived_ == 0) {
      barrier_file_ = file;
      barrier_line_ = line;
    } else if (!same_site(barrier_file_, barrier_line_, file, line)) {
      fail(Failure::Kind::usage, [&] {
        return format("threads reached different __syncthreads() calls: %u at %s, %s at %s", arrived_,
                      site(barrier_file_, barrier_line_).c_str(), describe(me).c_str(), site(file, line).c_str());
      });
    }
    if (++arrived_ == threads_) {  // every other thread waits here: release them, continue
      arrived_ = 0;
      for (unsigned i = 0; i < threads_; ++i)
        if (i != me.index) make_ready(fibers_[i]);
      return;
    }
    me.state = Fiber::State::at_block_barrier;
    me.wait_file = file;
    me.wait_line = line;
    switch_away(me);
  }

  // A warp barrier over `mask`; a shuffle also exchanges values. The exchange happens when the
  // last lane arrives: it writes every lane's `result` from the sources' `value`. A lane's result
  // is written only by the release of a barrier it waits at and read as soon as it resumes, before
  // it can arrive anywhere again, so one barrier per shuffle suffices whatever the masks.
  void warp_op(WarpOp op, unsigned mask, int lane_arg, int width, void* data, unsigned bytes, const char* file,
               int line) {
    Fiber& me = running();
    const unsigned lane = me.index & 31, bit = 1u << lane, base = me.index & ~31u, warp_index = me.index / 32;
    Warp& warp = warps_[warp_index];
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
    if ((warp.waiting & mask) == mask && group_arrived(base, mask)) {
      release_warp(warp, base, mask, me);
    } else {
      me.state = Fiber::State::at_warp_barrier;
      switch_away(me);
    }
    if (op != WarpOp::sync) std::memcpy(data, me.result, sizeof(me.result));
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
    if (error) fail(Failure::Kind::exception, [] { return std::string(); }, false, std::move(error));
    me.state = Fiber::State::done;
    ++exited_;
    Warp& warp = warps_[me.index / 32];
    const unsigned bit = 1u << (me.index & 31);
    warp.exited |= bit;
    if (arrived_ > 0)
      fail(Failure::Kind::usage, [&] {
        return format("%s exited while %u of the block's %u threads wait at __syncthreads() (%s)",
                      describe(me).c_str(), arrived_, threads_, site(barrier_file_, barrier_line_).c_str());
      });
    for (unsigned lanes = warp.waiting; lanes; lanes &= lanes - 1) {
      const Fiber& other = fibers_[(me.index & ~31u) + __builtin_ctz(lanes)];
      if (other.wait_mask & bit)
        fail(Failure::Kind::usage, [&] {
          return format("%s exited while %s waits at %s(mask 0x%08x) (%s), which names it", describe(me).c_str(),
                        describe(other).c_str(), op_name(other.op), other.wait_mask,
                        site(other.wait_file, other.wait_line).c_str());
        });
    }
    switch_away(me);
    __builtin_unreachable();
  }

 private:
  Fiber& running() const { return *static_cast<Fiber*>(detail::current); }

  void make_ready(Fiber& fiber) {
    fiber.state = Fiber::State::ready;
    ready_[(ready_head_ + ready_count_++) % kMaxThreads] = &fiber;
  }

  // Leaves the running fiber (waiting or done) for the next ready one, or for the scheduler when
  // none is ready (the block finished, or is deadlocked). Whoever resumes a fiber sets `current`.
  void switch_away(Fiber& me) {
    Fiber* next = pop_ready();
    detail::current = next;
    switch_context(me.context, next ? next->context : scheduler_);
  }

  Fiber* pop_ready() {
    if (ready_count_ == 0) return nullptr;
    Fiber* next = ready_[ready_head_];
    ready_head_ = (ready_head_ + 1) % kMaxThreads;
    --ready_count_;
    return next;
  }

  // Stops the block from the running fiber, which is never resumed: no C++ exception crosses a
  // context switch. The fiber's frames are abandoned (kernels hold only trivial locals), so the
  // message is built by `message()` inside this call, leaving no temporary behind.
  template <typename Message>
  [[noreturn]] void fail(Failure::Kind kind, Message message, bool with_context = true,
                         std::exception_ptr exception = nullptr) {
    failure_.kind = kind;
    failure_.message = with_context ? context_text() + ": " + message() : message();
    failure_.exception = std::move(exception);
    Fiber& me = running();
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

  bool group_arrived(unsigned base, unsigned mask) const {
    for (unsigned lanes = mask; lanes; lanes &= lanes - 1)
      if (fibers_[base + __builtin_ctz(lanes)].wait_mask != mask) return false;
    return true;
  }

  void release_warp(Warp& warp, unsigned base, unsigned mask, Fiber& me) {
    for (unsigned lanes = mask; lanes; lanes &= lanes - 1) {
      const Fiber& other = fibers_[base + __builtin_ctz(lanes)];
      if (other.op != me.op || other.op_bytes != me.op_bytes)
        fail(Failure::Kind::usage, [&] {
          return format("warp %u, mask 0x%08x: %s calls %s on %u bytes (%s) while %s calls %s on %u bytes (%s)",
                        base / 32, mask, describe(me).c_str(), op_name(me.op), me.op_bytes,
                        site(me.wait_file, me.wait_line).c_str(), describe(other).c_str(), op_name(other.op),
                        other.op_bytes, site(other.wait_file, other.wait_line).c_str());
        });
    }
    if (me.op != WarpOp::sync) {
      for (unsigned lanes = mask; lanes; lanes &= lanes - 1) {
        Fiber& receiver = fibers_[base + __builtin_ctz(lanes)];
        if (mask >> receiver.source_lane & 1)
          std::memcpy(receiver.result, fibers_[base + receiver.source_lane].value, sizeof(receiver.result));
        else  // a source outside the mask is undefined on a GPU: poison it
          std::memset(receiver.result, 0xFF, sizeof(receiver.result));
      }
    }
    warp.waiting &= ~mask;
    for (unsigned lanes = mask & ~(1u << (me.index & 31)); lanes; lanes &= lanes - 1)
      make_ready(fibers_[base + __builtin_ctz(lanes)]);
  }

  void run_block(uint64_t block) {
    block_idx = dim3(static_cast<unsigned>(block % grid_dim.x),
                     static_cast<unsigned>(block / grid_dim.x % grid_dim.y),
                     static_cast<unsigned>(block / grid_dim.x / grid_dim.y));
    if (launch_->smem_bytes) std::memset(dynamic_smem, 0xFF, launch_->smem_bytes);
    arrived_ = exited_ = 0;
    failure_ = Failure();
    for (unsigned w = 0; w < kMaxWarps; ++w) warps_[w].waiting = warps_[w].exited = 0;
    ready_head_ = ready_count_ = 0;
    for (unsigned i = 0; i < threads_; ++i) {
      Fiber& fiber = fibers_[i];
      fiber.thread_idx = dim3(i % block_dim.x, i / block_dim.x % block_dim.y, i / block_dim.x / block_dim.y);
      fiber.block = this;
      prepare_context(fiber.context, fiber.stack, fiber.stack_bytes, fiber_main);
      make_ready(fiber);
    }
    Fiber* first = pop_ready();
    detail::current = first;
    switch_context(scheduler_, first->context);
    // Back here: every fiber exited, one failed, or none can run.
    if (failure_.kind == Failure::Kind::none && exited_ != threads_) {
      failure_.kind = Failure::Kind::usage;
      failure_.message = context_text() + ": " + deadlock_text();
    }
    if (failure_.kind != Failure::Kind::none) launch_->record(block, std::move(failure_));
  }

  std::string deadlock_text() const {
    // Group the waiting threads by barrier, in thread order.
    std::vector<std::pair<std::string, unsigned>> groups;
    for (unsigned i = 0; i < threads_; ++i) {
      const Fiber& fiber = fibers_[i];
      std::string where;
      if (fiber.state == Fiber::State::at_block_barrier)
        where = "__syncthreads() (" + site(fiber.wait_file, fiber.wait_line) + ")";
      else if (fiber.state == Fiber::State::at_warp_barrier)
        where = format("%s(mask 0x%08x) in warp %u (%s)", op_name(fiber.op), fiber.wait_mask, i / 32,
                       site(fiber.wait_file, fiber.wait_line).c_str());
      else
        continue;
      auto group = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == where; });
      if (group == groups.end()) groups.emplace_back(where, 1);
      else ++group->second;
    }
    std::string text = "deadlock: no thread can run;";
    for (const auto& [where, count] : groups) text += format(" %u wait at ", count) + where + ";";
    return text + format(" %u of %u exited", exited_, threads_);
  }

  std::string describe(const Fiber& fiber) const {
    return format("thread %s (warp %u, lane %u)", dims(fiber.thread_idx).c_str(), fiber.index / 32, fiber.index % 32);
  }

  std::string context_text() const {
    return "emu: " + kernel_name(launch_->call.kernel) + ", block " + dims(block_idx) + " of grid " + dims(grid_dim) +
           ", blockDim " + dims(block_dim);
  }

  std::unique_ptr<Fiber[]> fibers_;
  unsigned stacks_ = 0;  // fibers with a stack
  struct FreeDeleter {
    void operator()(unsigned char* p) const { std::free(p); }
  };
  std::unique_ptr<unsigned char, FreeDeleter> smem_;
  size_t smem_capacity_ = 0;

  Launch* launch_ = nullptr;
  unsigned threads_ = 0;
  Context scheduler_;
  Fiber* ready_[kMaxThreads];  // ring buffer of runnable fibers
  unsigned ready_head_ = 0, ready_count_ = 0;
  Warp warps_[kMaxWarps];
  unsigned arrived_ = 0;  // threads at __syncthreads
  const char* barrier_file_ = "";
  int barrier_line_ = 0;
  unsigned exited_ = 0;
  Failure failure_;
};

Worker& running_worker(const char* what) {
  if (!detail::current) detail::outside_kernel(what);
  return *static_cast<Worker*>(detail::current->block);
}

void fiber_main() {
  Worker& worker = *static_cast<Worker*>(detail::current->block);
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
  void launch(const KernelCall& call, dim3 grid, dim3 block, size_t smem_bytes) {
    if (detail::current) throw std::runtime_error("emu: a kernel cannot launch kernels");
    validate(call, grid, block, smem_bytes);
    std::lock_guard<std::mutex> launch_lock(launch_mutex_);
    Launch state;
    state.call = call;
    state.grid = grid;
    state.block = block;
    state.smem_bytes = smem_bytes;
    state.threads = block.x * block.y * block.z;
    state.blocks = uint64_t{grid.x} * grid.y * grid.z;
    std::fegetenv(&state.fenv);
    const unsigned helpers = static_cast<unsigned>(std::min<uint64_t>(workers() - 1, state.blocks - 1));
    caller_.reserve(state.threads, smem_bytes);
    start_helpers(helpers, state.threads, smem_bytes);
    ++launch_count_;
    last_grid_ = grid;
    last_block_ = block;
    last_smem_ = smem_bytes;

    if (helpers > 0) {
      std::lock_guard<std::mutex> lock(pool_mutex_);
      active_ = &state;
      active_helpers_ = helpers;
      ++generation_;
    }
    if (helpers > 0) wake_.notify_all();
    caller_.run_blocks(state, read_bytes_, write_bytes_);
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

 private:
  void validate(const KernelCall& call, dim3 grid, dim3 block, size_t smem_bytes) {
    auto reject = [&](const std::string& why) {
      throw std::runtime_error("emu: invalid launch of " + kernel_name(call.kernel) + " with grid " + dims(grid) +
                               ", block " + dims(block) + format(", %zu bytes of shared memory: ", smem_bytes) +
                               why);
    };
    if (!block.x || !block.y || !block.z) reject("a block dimension is 0");
    if (block.x > 1024 || block.y > 1024 || block.z > 64) reject("blockDim is limited to (1024, 1024, 64)");
    if (uint64_t{block.x} * block.y * block.z > kMaxThreads) reject("more than 1024 threads per block");
    if (!grid.x || !grid.y || !grid.z) reject("a grid dimension is 0");
    if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) reject("gridDim is limited to (2^31-1, 65535, 65535)");
    const size_t limit = config().max_dynamic_smem;
    if (smem_bytes > limit) reject(format("more dynamic shared memory than the %zu bytes allowed", limit));
  }

  struct Helper {
    Worker worker;
    std::thread thread;
  };

  // Helper threads (created on first need, detached, never destroyed: the runtime outlives the
  // interpreter's teardown) get their stacks and shared memory here, while they are idle.
  void start_helpers(unsigned count, unsigned threads, size_t smem_bytes) {
    while (helpers_.size() < count) {
      helpers_.push_back(std::make_unique<Helper>());
      Helper& helper = *helpers_.back();
      const unsigned index = static_cast<unsigned>(helpers_.size() - 1);
      helper.thread = std::thread([this, &helper, index] { helper_loop(helper.worker, index); });
      helper.thread.detach();
    }
    for (unsigned i = 0; i < count; ++i) helpers_[i]->worker.reserve(threads, smem_bytes);
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
      worker.run_blocks(*launch, read_bytes_, write_bytes_);
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

void warp_op(WarpOp op, unsigned mask, int lane_arg, int width, void* data, unsigned bytes, const char* file,
             int line) {
  running_worker(op_name(op)).warp_op(op, mask, lane_arg, width, data, bytes, file, line);
}

void count_outside_kernel(uint64_t bytes, bool write) { runtime().count_outside(bytes, write); }

void launch(const KernelCall& call, dim3 grid, dim3 block, size_t smem_bytes) {
  runtime().launch(call, grid, block, smem_bytes);
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
}
