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
#include <random>
#include <map>
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
}  // namespace detail

namespace {

using detail::BlockView;
using detail::dims;
using detail::format;
using detail::site;
using detail::KernelCall;
using detail::ThreadView;
using detail::WarpOp;

constexpr unsigned kMaxThreads = 1024;
constexpr unsigned kMaxWarps = kMaxThreads / 32;
constexpr unsigned kMaxClusterBlocks = 8;  // CUDA's portable cluster size
constexpr size_t kStackBytes = 64 * 1024;  // kernels use a few hundred bytes; printf a few KiB
constexpr size_t kStaticArenaBytes = kDefaultSmemBytes;  // static shared memory per block (a GPU's limit)

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
    for (size_t at; (at = name.find("[abi:emu_launch_bounds_")) != std::string::npos;)
      name.erase(at, name.find(']', at) + 1 - at);
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
  uint64_t serial = 0;  // detail::launch_serial()
  Config config;        // the configuration at launch time
  // Whether the kernel opted in (FuncAttributes): if not, static + dynamic ≤ kDefaultSmemBytes (checked
  // as its blocks allocate static shared memory; validate() checked the dynamic size against the limit).
  bool opted_in = false;

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
  uint32_t sync_serial = 0;  // racecheck: the serial of the block's last __syncthreads release
  // Static shared memory (emu::static_smem): the sites allocated so far, after the dynamic part.
  struct StaticSite {
    const char* file;
    int line;
    size_t bytes, offset;
  };
  static constexpr unsigned kMaxStaticSites = 16;
  StaticSite static_sites[kMaxStaticSites];
  unsigned static_count = 0;
  size_t static_used = 0;
  unsigned char* static_base = nullptr;
};

// racecheck's record of one byte of shared memory: the last write and the reads since, each with the
// serial (Worker::serial_) at which it happened. Records older than the cluster are stale.
struct ShadowByte {
  uint32_t write_serial = 0, read_serial = 0;
  uint16_t writer = 0;       // thread index in the cluster (rank · threads + index)
  uint16_t reader_warp = 0;  // warp index in the cluster of the readers (when one warp)
  uint32_t reader_lanes = 0;
  uint8_t reader_rank = 0;
  uint8_t several_warps = 0, several_blocks = 0;
  int32_t write_line = 0, read_line = 0;
  const char* write_file = nullptr;
  const char* read_file = nullptr;
  uint16_t last_reader = 0;
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
      shadow_.clear();
    }
    if (launch.config.racecheck && shadow_.size() < smem_capacity_) {
      shadow_.assign(smem_capacity_, ShadowByte{});
      serial_ = 1;  // every record is stale
    }
    if (launch.config.racecheck && warp_syncs_.empty())
      warp_syncs_.assign(size_t{kMaxClusterBlocks} * kMaxWarps * 32 * 32, 0);
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
      block.static_base = block.dynamic_smem + (launch.smem_bytes + 15) / 16 * 16;
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
      block.sync_serial = next_serial();
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
      cluster_sync_serial_ = next_serial();
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

  // emu::static_smem for the running fiber's block.
  void* static_smem(size_t bytes, size_t align, const char* file, int line) {
    Block& block = block_of(running());
    for (unsigned i = 0; i < block.static_count; ++i) {
      const Block::StaticSite& site = block.static_sites[i];
      if (site.line == line && site.bytes == bytes && (site.file == file || std::strcmp(site.file, file) == 0))
        return block.static_base + site.offset;
    }
    if (block.static_count == Block::kMaxStaticSites)
      fail(Failure::Kind::usage, [&] { return format("more than %u static shared arrays", Block::kMaxStaticSites); });
    const size_t boundary = std::max<size_t>(align, 16);
    const size_t offset = (block.static_used + boundary - 1) / boundary * boundary;
    const size_t used = offset + bytes;
    const Launch& launch = *launch_;
    const size_t dynamic = launch.smem_bytes;
    std::string refused;
    if (used > kStaticArenaBytes || used + dynamic > launch.config.max_dynamic_smem)
      refused = format("static (%zu) + dynamic (%zu) shared memory exceed the device's %zu bytes per block", used,
                       dynamic, launch.config.max_dynamic_smem);
    else if (!launch.opted_in && used + dynamic > kDefaultSmemBytes)
      refused = format("static (%zu) + dynamic (%zu) shared memory exceed the %zu bytes a kernel may use without "
                       "opting in (cudaFuncAttributeMaxDynamicSharedMemorySize)",
                       used, dynamic, kDefaultSmemBytes);
    note_static_smem(launch.call.kernel, used);
    if (!refused.empty())
      fail(Failure::Kind::usage, [&] {
        return "launch refused: " + refused + format(" (static shared array of %zu bytes at %s)", bytes,
                                                     site(file, line).c_str());
      });
    block.static_sites[block.static_count++] = {file, line, bytes, offset};
    block.static_used = used;
    std::memset(block.static_base + offset, 0xFF, bytes);  // undefined on a GPU: NaNs, not zeros
    return block.static_base + offset;
  }

  // emu::shared_access: bounds and alignment, then racecheck (see ShadowByte).
  void shared_access(const void* ptr, size_t bytes, size_t align, bool write, const char* file, int line) {
    const Fiber& me = running();
    const auto address = reinterpret_cast<uintptr_t>(ptr);
    const char* what = write ? "write" : "read";
    if (address % align != 0)
      fail(Failure::Kind::usage, [&] {
        return format("misaligned shared-memory %s of %zu bytes at %p (%s): the address must be a multiple of %zu",
                      what, bytes, ptr, site(file, line).c_str(), align);
      });
    const uintptr_t offset = address - reinterpret_cast<uintptr_t>(smem_.get());
    const size_t stride = blocks_[0].smem_stride;
    const unsigned rank = offset < cluster_blocks_ * stride ? static_cast<unsigned>(offset / stride) : cluster_blocks_;
    const size_t in_block = offset - size_t{rank} * stride;
    const bool inside =
        rank < cluster_blocks_ &&
        (in_block + bytes <= blocks_[rank].smem_bytes ||
         (in_block >= static_cast<size_t>(blocks_[rank].static_base - blocks_[rank].dynamic_smem) &&
          in_block + bytes <= static_cast<size_t>(blocks_[rank].static_base - blocks_[rank].dynamic_smem) +
                                  blocks_[rank].static_used));
    if (!inside)
      fail(Failure::Kind::usage, [&] {
        return format("shared-memory %s of %zu bytes at %p (%s) outside the cluster's shared memory (dynamic: %zu "
                      "bytes per block, static: the arrays allocated so far)",
                      what, bytes, ptr, site(file, line).c_str(), blocks_[0].smem_bytes);
      });
    if (blocks_[rank].exited == threads_)
      fail(Failure::Kind::usage, [&] {
        return format("shared-memory %s of %zu bytes at %p (%s) in block %s, which has exited (its shared memory "
                      "ended with it: a missing cluster_sync before the exit?)",
                      what, bytes, ptr, site(file, line).c_str(), dims(blocks_[rank].block_idx).c_str());
      });
    if (!launch_->config.racecheck) return;
    const unsigned me_id = static_cast<unsigned>(&me - fibers_.data());
    for (size_t b = 0; b < bytes; ++b) {
      ShadowByte& e = shadow_[offset + b];
      if (e.write_serial >= start_serial_ && e.writer != me_id && !ordered(e.writer, e.write_serial, me_id))
        race(write ? "write after write" : "read after write", offset + b, me_id, file, line, e.writer, e.write_file,
             e.write_line, "wrote");
      if (write) {
        if (e.read_serial >= start_serial_ && !reads_ordered(e, me_id))
          race("write after read", offset + b, me_id, file, line, e.last_reader, e.read_file, e.read_line,
               e.several_warps || e.several_blocks || __builtin_popcount(e.reader_lanes) > 1 ? "read (among others)"
                                                                                             : "read");
        e.writer = static_cast<uint16_t>(me_id);
        e.write_serial = serial_;
        e.write_file = file;
        e.write_line = line;
        e.read_serial = 0;
      } else {
        const unsigned my_rank = me_id / threads_, lane = (me_id % threads_) % 32;
        const uint16_t warp_id = static_cast<uint16_t>(my_rank * kMaxWarps + (me_id % threads_) / 32);
        if (e.read_serial < start_serial_ || reads_ordered(e, me_id)) {
          e.reader_warp = warp_id;
          e.reader_lanes = 1u << lane;
          e.reader_rank = static_cast<uint8_t>(my_rank);
          e.several_warps = e.several_blocks = 0;
        } else {
          if (e.reader_warp != warp_id) e.several_warps = 1;
          if (e.reader_rank != my_rank) e.several_blocks = 1;
          e.reader_lanes |= 1u << lane;
        }
        e.last_reader = static_cast<uint16_t>(me_id);
        e.read_serial = serial_;
        e.read_file = file;
        e.read_line = line;
      }
    }
  }

  // detail::sanitizer_failure from the running fiber.
  [[noreturn]] void sanitizer_failure(const std::string& message) {
    const Fiber& me = running();
    fail(Failure::Kind::usage, [&] { return describe(me) + ": " + message; });
  }

  uint64_t cluster_index() const { return cluster_; }
  uint64_t launch_serial() const { return launch_->serial; }

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
    // A block's shared memory ends with it: later reads by its cluster see the fill (emu.h), and
    // racecheck reports the reads by other blocks that no cluster barrier ordered before the exit.
    if (block.exited == threads_ && cluster_blocks_ > 1 && block.smem_bytes) {
      if (launch_->config.racecheck) check_reads_before_exit(block, me);
      std::memset(block.dynamic_smem, 0xFF, block.smem_bytes);
    }
    switch_away(me);
    __builtin_unreachable();
  }

 private:
  static constexpr unsigned kReady = kMaxClusterBlocks * kMaxThreads;

  // Shared memory buffers of a cluster's blocks are this far apart (cache-line aligned).
  // (dynamic shared memory, 16-byte aligned, then the static arena)
  static size_t smem_stride(size_t smem_bytes) { return ((smem_bytes + 15) / 16 * 16 + kStaticArenaBytes + 63) / 64 * 64; }

  uint32_t next_serial() { return ++serial_; }
  uint32_t* warp_sync_row(unsigned rank, unsigned warp) { return &warp_syncs_[(size_t{rank} * kMaxWarps + warp) * 32 * 32]; }

  // Whether thread `before`'s access at `serial` happens before thread `now`'s access now: a barrier
  // both took part in was released since (a cluster barrier, their block's barrier, a __syncwarp of both).
  bool ordered(unsigned before, uint32_t serial, unsigned now) {
    if (before == now || cluster_sync_serial_ > serial) return true;
    const unsigned rank = now / threads_;
    if (before / threads_ != rank) return false;
    if (blocks_[rank].sync_serial > serial) return true;
    const unsigned a = now % threads_, b = before % threads_;
    if (a / 32 != b / 32) return false;
    return warp_sync_row(rank, a / 32)[(a % 32) * 32 + b % 32] > serial;
  }

  // Whether every read recorded in `e` happens before thread `now`'s access now.
  bool reads_ordered(const ShadowByte& e, unsigned now) {
    if (cluster_sync_serial_ > e.read_serial) return true;
    const unsigned rank = now / threads_;
    if (e.several_blocks || e.reader_rank != rank) return false;
    if (blocks_[rank].sync_serial > e.read_serial) return true;
    if (e.several_warps) return false;
    const unsigned warp = e.reader_warp % kMaxWarps;
    for (unsigned lanes = e.reader_lanes; lanes; lanes &= lanes - 1)
      if (!ordered(rank * threads_ + warp * 32 + __builtin_ctz(lanes), e.read_serial, now)) return false;
    return true;
  }

  // A racecheck report: the byte at `offset` of the cluster's shared memory.
  [[noreturn]] void race(const char* hazard, size_t offset, unsigned now, const char* file, int line, unsigned other,
                         const char* other_file, int other_line, const char* other_did) {
    fail(Failure::Kind::usage, [&] {
      const unsigned rank = static_cast<unsigned>(offset / blocks_[0].smem_stride);
      const size_t in_block = offset - rank * blocks_[0].smem_stride;
      const Block& owner = blocks_[rank];
      const size_t static_start = static_cast<size_t>(owner.static_base - owner.dynamic_smem);
      std::string where = in_block < owner.smem_bytes ? format("dynamic shared memory, byte %zu", in_block)
                                                      : format("static shared memory, byte %zu", in_block - static_start);
      for (unsigned i = 0; in_block >= static_start && i < owner.static_count; ++i) {
        const Block::StaticSite& s = owner.static_sites[i];
        if (in_block - static_start >= s.offset && in_block - static_start < s.offset + s.bytes)
          where = format("static shared array of %s, byte %zu", site(s.file, s.line).c_str(),
                         in_block - static_start - s.offset);
      }
      if (cluster_blocks_ > 1) where += format(" of block %s (rank %u)", dims(owner.block_idx).c_str(), rank);
      return format("racecheck: %s hazard on %s: %s at %s, while %s %s it at %s in the same barrier interval", hazard,
                    where.c_str(), describe_in_cluster(fibers_[now]).c_str(), site(file, line).c_str(),
                    describe_in_cluster(fibers_[other]).c_str(), other_did,
                    other_file ? site(other_file, other_line).c_str() : "?");
    });
  }

  // A block of a cluster exits (its last thread `me`): every read of its dynamic shared memory by
  // another block must be ordered before, by a cluster barrier since the read.
  void check_reads_before_exit(const Block& block, const Fiber& me) {
    const size_t base = size_t{block.cluster_rank} * block.smem_stride;
    for (size_t b = 0; b < block.smem_bytes; ++b) {
      const ShadowByte& e = shadow_[base + b];
      if (e.read_serial < start_serial_ || cluster_sync_serial_ > e.read_serial) continue;
      if (e.reader_rank == block.cluster_rank && !e.several_blocks) continue;
      const unsigned exiting = static_cast<unsigned>(&me - fibers_.data());
      race("read before exit", base + b, exiting, "(the block's exit)", 0, e.last_reader, e.read_file, e.read_line,
           "read");
    }
  }

  std::string describe_in_cluster(const Fiber& fiber) const {
    return describe(fiber) + (cluster_blocks_ > 1 ? " of block " + dims(block_of(fiber).block_idx) : std::string());
  }

  void note_static_smem(const void* kernel, size_t bytes);

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

  // The next fiber to run, by the launch's schedule (emu::Schedule).
  Fiber* pop_ready() {
    if (ready_count_ == 0) return nullptr;
    unsigned pick = 0;  // position in the queue
    switch (launch_->config.schedule) {
      case Schedule::fifo: break;
      case Schedule::lifo: pick = ready_count_ - 1; break;
      case Schedule::random: pick = static_cast<unsigned>(rng_() % ready_count_); break;
    }
    const unsigned head = ready_head_, at = (head + pick) % kReady;
    Fiber* next = ready_[at];
    --ready_count_;
    if (pick == ready_count_) return next;  // the tail leaves
    ready_[at] = ready_[head];               // the head takes the picked one's place
    ready_head_ = (head + 1) % kReady;
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
    if (me.op == WarpOp::sync && launch_->config.racecheck) {
      const uint32_t serial = next_serial();
      uint32_t* syncs = warp_sync_row(block_of(me).cluster_rank, me.index / 32);
      for (unsigned a = mask; a; a &= a - 1)
        for (unsigned b = mask; b; b &= b - 1) syncs[__builtin_ctz(a) * 32 + __builtin_ctz(b)] = serial;
    }
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
      block.static_count = 0;
      block.static_used = 0;
      block.sync_serial = 0;
      for (unsigned w = 0; w < kMaxWarps; ++w) block.warps[w].waiting = block.warps[w].exited = 0;
    }
    cluster_arrived_ = cluster_exited_ = 0;
    cluster_sync_serial_ = 0;
    cluster_ = cluster;
    if (serial_ > 0xF0000000u) {  // before the serials wrap: forget every record
      std::fill(shadow_.begin(), shadow_.end(), ShadowByte{});
      std::fill(warp_syncs_.begin(), warp_syncs_.end(), 0u);
      serial_ = 1;
    }
    start_serial_ = next_serial();  // records before it are stale
    rng_.seed(launch_->config.seed * 0x9E3779B97F4A7C15ull + cluster);  // the same whatever the worker
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
  uint64_t cluster_ = 0;  // the running cluster's index in the launch
  std::mt19937_64 rng_;   // Schedule::random
  // racecheck: a serial numbers every barrier release of this worker; records are stamped with it
  std::vector<ShadowByte> shadow_;  // one per byte of smem_
  std::vector<uint32_t> warp_syncs_;  // [rank][warp][lane][lane]: serial of their last common __syncwarp
  uint32_t serial_ = 1, start_serial_ = 1, cluster_sync_serial_ = 0;
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
    if (const int pending = get_last_error())  // C10_CUDA_KERNEL_LAUNCH_CHECK reports an earlier error
      throw std::runtime_error(format("emu: CUDA error %d (emulated) pending from an earlier call, reported by the "
                                      "launch of %s",
                                      pending, kernel_name(call.kernel).c_str()));
    validate(call, grid, block, smem_bytes, cluster_blocks);
    std::lock_guard<std::mutex> launch_lock(launch_mutex_);
    Launch state;
    state.config = config_;
    state.serial = ++launch_serial_;
    {
      std::lock_guard<std::mutex> lock(kernels_mutex_);
      state.opted_in = record_of(call.kernel).opted_in;
    }
    state.call = call;
    state.grid = grid;
    state.block = block;
    state.smem_bytes = smem_bytes;
    state.threads = block.x * block.y * block.z;
    state.cluster_blocks = cluster_blocks;
    state.clusters = uint64_t{grid.x} * grid.y * grid.z / cluster_blocks;
    std::fegetenv(&state.fenv);
#if defined(__x86_64__) && defined(__GLIBC__)
    if (arith::flush_to_zero()) state.fenv.__mxcsr |= 0x8040;  // FTZ and DAZ, as nvcc -ftz=true
#endif
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

  FuncAttributes func_attributes(const void* kernel) {
    std::lock_guard<std::mutex> lock(kernels_mutex_);
    KernelRecord& record = record_of(kernel);
    if (record.max_threads == 0) record.max_threads = launch_bounds_of(kernel);
    FuncAttributes attributes;
    attributes.static_smem = record.static_smem;
    attributes.max_dynamic_smem =
        record.opted_in ? record.max_dynamic : kDefaultSmemBytes - std::min(kDefaultSmemBytes, record.static_smem);
    attributes.max_threads = record.max_threads;
    attributes.ptx_arch = config_ptx_arch_.load();
    return attributes;
  }

  void func_set_max_dynamic_smem(const void* kernel, size_t bytes) {
    const size_t limit = config().max_dynamic_smem;
    std::lock_guard<std::mutex> lock(kernels_mutex_);
    KernelRecord& record = record_of(kernel);
    if (record.static_smem + bytes > limit)
      throw std::runtime_error(format("emu: cudaFuncSetAttribute(%s, MaxDynamicSharedMemorySize, %zu): invalid "
                                      "argument (static %zu + %zu bytes exceed the device's %zu)",
                                      kernel_name(kernel).c_str(), bytes, record.static_smem, bytes, limit));
    record.opted_in = true;
    record.max_dynamic = bytes;
  }

  void note_static_smem(const void* kernel, size_t bytes) {
    std::lock_guard<std::mutex> lock(kernels_mutex_);
    KernelRecord& record = record_of(kernel);
    record.static_smem = std::max(record.static_smem, bytes);
  }

  int occupancy_max_active_clusters(int* clusters) {
    switch (config().cluster_occupancy) {
      case ClusterOccupancy::fits: *clusters = 1; return 0;
      case ClusterOccupancy::zero: *clusters = 0; return 0;
      case ClusterOccupancy::error: break;
    }
    *clusters = 0;
    pending_error_ = kEmulatedClusterError;
    return kEmulatedClusterError;
  }

  int get_last_error() { return pending_error_.exchange(0); }

  // cudaErrorInvalidClusterSize's code, for the emulated occupancy failure.
  static constexpr int kEmulatedClusterError = 912;

  void set_config(const Config& config) {
    if (config.workers > 64) throw std::invalid_argument("emu: at most 64 workers");
    std::lock_guard<std::mutex> lock(launch_mutex_);
    config_ = config;
    config_ptx_arch_ = config.ptx_arch;
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
    const FuncAttributes attributes = func_attributes(call.kernel);
    const uint64_t threads = uint64_t{block.x} * block.y * block.z;
    if (threads > attributes.max_threads)
      reject(format("%llu threads per block, more than the kernel's __launch_bounds__(%u)",
                    static_cast<unsigned long long>(threads), attributes.max_threads));
    if (attributes.static_smem + smem_bytes > limit)
      reject(format("static (%zu) + dynamic shared memory exceed the device's %zu bytes per block",
                    attributes.static_smem, limit));
    if (smem_bytes > attributes.max_dynamic_smem)
      reject(format("more dynamic shared memory than the kernel's limit of %zu bytes (static: %zu; %s)",
                    attributes.max_dynamic_smem, attributes.static_smem,
                    attributes.max_dynamic_smem + attributes.static_smem <= kDefaultSmemBytes
                        ? "no opt-in: cudaFuncAttributeMaxDynamicSharedMemorySize not raised"
                        : "its cudaFuncAttributeMaxDynamicSharedMemorySize"));
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

  // The __launch_bounds__ bound in the kernel's symbol (see emu.h), or 1024.
  static unsigned launch_bounds_of(const void* kernel) {
    Dl_info info{};
    if (!dladdr(kernel, &info) || !info.dli_sname) return kMaxThreads;
    const char* tag = std::strstr(info.dli_sname, "emu_launch_bounds_");
    return tag ? static_cast<unsigned>(std::strtoul(tag + std::strlen("emu_launch_bounds_"), nullptr, 10)) : kMaxThreads;
  }

  struct KernelRecord {
    size_t static_smem = 0;  // the most a block of it allocated
    bool opted_in = false;
    size_t max_dynamic = 0;
    unsigned max_threads = 0;  // 0: not read yet
  };
  std::mutex kernels_mutex_;
  // By kernel and device: the emulated device is identified by its binary's architecture (ptx_arch),
  // and CUDA keeps a kernel's attributes per device.
  std::map<std::pair<const void*, unsigned>, KernelRecord> kernels_;
  KernelRecord& record_of(const void* kernel) { return kernels_[{kernel, config_ptx_arch_.load()}]; }
  std::atomic<int> pending_error_{0};
  std::atomic<unsigned> config_ptx_arch_{90};
  std::atomic<uint64_t> launch_serial_{0};

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

void Worker::note_static_smem(const void* kernel, size_t bytes) { runtime().note_static_smem(kernel, bytes); }

Traffic traffic() { return runtime().traffic(); }
void reset_traffic() { runtime().reset_traffic(); }
Config config() { return runtime().config(); }
void set_config(const Config& config) { runtime().set_config(config); }

void* static_smem(size_t bytes, size_t align, const char* file, int line) {
  return running_worker("static shared memory").static_smem(bytes, align, file, line);
}

void shared_access(const void* ptr, size_t bytes, size_t align, bool write, const char* file, int line) {
  running_worker("shared memory").shared_access(ptr, bytes, align, write, file, line);
}

FuncAttributes func_attributes(const void* kernel) { return runtime().func_attributes(kernel); }
void func_set_max_dynamic_smem(const void* kernel, size_t bytes) { runtime().func_set_max_dynamic_smem(kernel, bytes); }
int occupancy_max_active_clusters(const void*, unsigned, int* clusters) {
  return runtime().occupancy_max_active_clusters(clusters);
}
int get_last_error() { return runtime().get_last_error(); }

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

void sanitizer_failure(const std::string& message) { running_worker("a sanitizer check").sanitizer_failure(message); }
uint64_t launch_serial() { return running_worker("launch_serial").launch_serial(); }
uint64_t cluster_index() { return running_worker("cluster_index").cluster_index(); }

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
  m.def("set_schedule", [](const std::string& name, uint64_t seed) {
    emu::Config config = emu::config();
    if (name == "fifo") config.schedule = emu::Schedule::fifo;
    else if (name == "lifo") config.schedule = emu::Schedule::lifo;
    else if (name == "random") config.schedule = emu::Schedule::random;
    else throw std::invalid_argument("emu.set_schedule: expected 'fifo', 'lifo' or 'random', got '" + name + "'");
    config.seed = seed;
    emu::set_config(config);
  }, "The order in which released threads resume: 'fifo', 'lifo' or 'random' (seeded)", pybind11::arg("name"),
        pybind11::arg("seed") = 0);
  m.def("schedule", [] {
    const emu::Config config = emu::config();
    static const char* names[] = {"fifo", "lifo", "random"};
    return std::make_tuple(std::string(names[static_cast<int>(config.schedule)]), config.seed);
  }, "(name, seed) of the schedule");
  m.def("set_racecheck", [](bool on) {
    emu::Config config = emu::config();
    config.racecheck = on;
    emu::set_config(config);
  }, "Shared-memory race detection on (the default) or off");
  m.def("racecheck", [] { return emu::config().racecheck; });
  m.def("set_ptx_arch", [](unsigned arch) {
    emu::Config config = emu::config();
    config.ptx_arch = arch;
    emu::set_config(config);
  }, "The architecture the kernels' code was compiled for, as cudaFuncGetAttributes' ptxVersion reports it "
     "(90: sm_90 code, 80: only sm_80 code / PTX, as a build for TORCH_CUDA_ARCH_LIST='8.0+PTX' run on an H100)");
  m.def("ptx_arch", [] { return emu::config().ptx_arch; });
  m.def("set_cluster_occupancy", [](const std::string& name) {
    emu::Config config = emu::config();
    if (name == "fits") config.cluster_occupancy = emu::ClusterOccupancy::fits;
    else if (name == "zero") config.cluster_occupancy = emu::ClusterOccupancy::zero;
    else if (name == "error") config.cluster_occupancy = emu::ClusterOccupancy::error;
    else throw std::invalid_argument("emu.set_cluster_occupancy: expected 'fits', 'zero' or 'error', got '" + name + "'");
    emu::set_config(config);
  }, "What cudaOccupancyMaxActiveClusters answers: 'fits', 'zero' (no cluster fits) or 'error'");
  m.def("cluster_occupancy", [] {
    static const char* names[] = {"fits", "zero", "error"};
    return std::string(names[static_cast<int>(emu::config().cluster_occupancy)]);
  });
  m.def("get_last_error", &emu::get_last_error, "Returns and clears the pending (emulated) CUDA error code");
  m.def("last_launch", [] { return emu::runtime().last_launch(); }, "((grid), (block), smem_bytes) of the last launch");
  m.def("last_cluster_blocks", [] { return emu::runtime().last_cluster_blocks(); },
        "blocks per cluster of the last launch (1: a plain launch)");
}
