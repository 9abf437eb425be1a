// CPU emulation of the CUDA subset that csrc/cuda/compat.cuh allows, so the test suite runs the
// kernels' own source without a GPU. Include after the torch/ATen headers and before any csrc/cuda
// header.
//
// Execution model (emu.cpp): every thread of a block is a fiber (a cooperative user-level thread
// with its own stack); all fibers of a block run on one OS thread, one at a time. A fiber runs until
// it reaches a barrier (__syncthreads, __syncwarp, a shuffle, cluster_sync) or returns, then the next
// ready fiber runs; a barrier's last arrival continues and makes the others ready in thread order.
// Which ready fiber runs next is the schedule (Config::schedule): first in first out (thread order),
// last in first out (a released warp runs on at once, ahead of the others) or a seeded random pick;
// every schedule is deterministic. Blocks of a launch may run on several OS threads
// (Config::workers), each running one block at a time, so no two running blocks share an OS thread.
//
// Thread-block clusters (launch_cluster, sm_90): the blocks of a cluster must run concurrently, so
// they run together as ONE scheduler's fibers on one OS thread (rank 0's threads first, then rank
// 1's, ...); different clusters may run on different OS threads. __syncthreads and warp operations
// stay per block; cluster_sync() is a barrier over every thread of the cluster (any cluster_sync
// call counts, as on the GPU, which has one such barrier per cluster). cluster_smem(p, rank) maps
// an address inside the caller's dynamic shared memory to the same offset in block `rank`'s (CUDA's
// map_shared_rank); those accesses are not counted as traffic (they stay on chip). A plain launch
// is a launch in clusters of one block (as in CUDA): cluster_rank() 0, cluster_blocks() 1,
// cluster_sync() a barrier over the block, cluster_smem(p, 0) == p.
//
// Shared memory: dynamic (SMOOTHCE_DYNAMIC_SMEM) and static (SMOOTHCE_SHARED: `__shared__` does not
// compile here) shared memory are one per-block buffer each, 16-byte aligned; the dynamic buffer is
// filled with 0xFF bytes at the start of every block and each static array at its first use in the
// block, so reading before writing yields NaNs (or -1), not zeros nor a previous block's values. In a
// cluster launch a block's dynamic buffer is filled with 0xFF again when its last thread exits: a
// block that reads another block's shared memory after that block exited (a missing final
// cluster_sync, undefined on a GPU) reads NaNs.
//
// Sanitizer (every check raises from launch() with the kernel, block, threads and source lines):
//   - racecheck (Config::racecheck): every shared-memory access through memory.cuh's
//     load_shared/store_shared is recorded per byte; an access to a byte another thread wrote, or a
//     write to a byte another thread read, with no barrier both took part in since (__syncthreads for
//     the block, cluster_sync for the cluster, __syncwarp for lanes of one warp; shuffles exchange
//     registers and order no memory) is a race. Accesses outside the allocated shared memory and
//     misaligned ones are reported too.
//   - memcheck (memcheck.cpp): global accesses checked for alignment, bounds and cross-block races.
//   - launch rules: a block above the kernel's __launch_bounds__, static + dynamic shared memory above
//     48 KiB without the kernel's opt-in (func_set_max_dynamic_smem) or above the device's maximum, a
//     grid or block beyond CUDA's limits: the launch is refused. A kernel's static size is known once
//     a block of it ran (the first launch is refused when its block allocates past the limit).
//   - a pending error (occupancy_max_active_clusters failed and was not cleared) fails the next launch.
//   - device arithmetic (arith.h): exp, log and division as the fast-math device computes them.
//
// Errors raise from emu::launch, after the launch stopped (no hang, no later block runs):
//   - std::runtime_error: an invalid launch configuration; a __syncthreads() that not every thread
//     reaches (a thread exited, or threads wait at different __syncthreads() calls); a
//     cluster_sync() that not every thread of the cluster reaches (a thread exited); a
//     cluster_smem() of an address outside the caller's dynamic shared memory or of a rank outside
//     the cluster; a warp operation whose mask omits the caller or names lanes that exited or do
//     not exist, or whose lanes call different operations; a width that is not a power of two; a
//     deadlock (its message lists the barriers the threads wait at).
//   - c10::IndexError: SMOOTHCE_DEVICE_INDEX_ERROR (the first one, by block then thread).
//   - a C++ exception thrown by a kernel, as thrown.
// A shuffle whose source lane is outside the mask (undefined on a GPU) returns 0xFF bytes.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#define SMOOTHCE_EMULATOR 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// The bound travels in the kernel's symbol (an ABI tag: `..._kernelB21emu_launch_bounds_512...`),
// where launch() reads it back (dladdr) to refuse a larger block. The bound must be a literal.
#define __launch_bounds__(max_threads, ...) __attribute__((abi_tag("emu_launch_bounds_" #max_threads)))
// __restrict__ is a gcc/clang keyword already.
// Static shared memory only through SMOOTHCE_SHARED (compat.cuh), which the emulator allocates per
// block, poisons and race-checks.
#define __shared__ _Pragma("GCC error \"emulated kernels declare static shared memory with SMOOTHCE_SHARED\"")

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

constexpr int warpSize = 32;

namespace emu {

// Global-memory bytes counted by the kernels (memory.cuh), summed over all launches.
struct Traffic {
  uint64_t read_bytes = 0;
  uint64_t write_bytes = 0;
};
Traffic traffic();
void reset_traffic();

// The order in which the fibers that a barrier released (and those ready at a block's start) run:
// first in first out (thread order), last in first out (a released warp runs on at once), or a
// seeded random pick among the ready fibers.
enum class Schedule : uint8_t { fifo, lifo, random };

// What cudaOccupancyMaxActiveClusters answers (emulated): the clusters fit, none fit (0), or an error.
enum class ClusterOccupancy : uint8_t { fits, zero, error };

struct Config {
  // Shared memory (static + dynamic) one block may have after opting in (sharedMemPerBlockOptin):
  // 227 KiB as on an H100. Without the kernel's opt-in (func_set_max_dynamic_smem) static + dynamic
  // may not exceed kDefaultSmemBytes.
  size_t max_dynamic_smem = 227 * 1024;
  unsigned workers = 0;                  // OS threads running blocks; 0: min(hardware, 4)
  Schedule schedule = Schedule::fifo;
  uint64_t seed = 0;                     // Schedule::random
  bool racecheck = true;                 // shared-memory race detection (shared_access)
  unsigned ptx_arch = 90;                // the virtual architecture the kernels were "compiled" for
  ClusterOccupancy cluster_occupancy = ClusterOccupancy::fits;
};
constexpr size_t kDefaultSmemBytes = 48 * 1024;
Config config();
void set_config(const Config& config);

namespace detail {

struct BlockView {
  dim3 block_idx, block_dim, grid_dim;
  unsigned char* dynamic_smem = nullptr;
  size_t smem_bytes = 0;
  // The blocks of a cluster have their dynamic shared memory `smem_stride` bytes apart, by rank.
  size_t smem_stride = 0;
  unsigned cluster_rank = 0, cluster_blocks = 1;
  uint64_t read_bytes = 0, write_bytes = 0;  // this block's share of the launch's traffic
};

struct ThreadView {
  dim3 thread_idx;
  BlockView* block = nullptr;
};

// The emulated thread running on this OS thread; null outside kernels. __thread (not thread_local):
// no dynamic-initialisation wrapper on every access.
extern __thread ThreadView* current __attribute__((visibility("hidden")));

[[noreturn]] void outside_kernel(const char* what);

inline ThreadView& current_thread() {
  if (__builtin_expect(current == nullptr, 0)) outside_kernel("threadIdx/blockIdx/blockDim/gridDim");
  return *current;
}

inline BlockView& current_block(const char* what) {
  if (__builtin_expect(current == nullptr, 0)) outside_kernel(what);
  return *current->block;
}

void syncthreads(const char* file, int line);
void cluster_sync(const char* file, int line);
[[noreturn]] void bad_cluster_smem(const void* address, unsigned rank);

enum class WarpOp : uint8_t { sync, shfl_xor, shfl_down, shfl_idx };
// A warp barrier over the lanes of `mask`; a shuffle also replaces the 16 bytes at `data` (the
// value, of `bytes` bytes) by the source lane's (see emu.cpp).
void warp_op(WarpOp op, unsigned mask, int lane_arg, int width, void* data, unsigned bytes, const char* file,
             int line);

void count_outside_kernel(uint64_t bytes, bool write);

template <typename T>
inline T shuffle(WarpOp op, unsigned mask, T value, int lane_arg, int width, const char* file, int line) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16, "shuffles move up to 16 bytes");
  alignas(16) unsigned char data[16];  // fixed size: the runtime moves 16 bytes without a memcpy call
  std::memcpy(data, &value, sizeof(T));
  warp_op(op, mask, lane_arg, width, data, sizeof(T), file, line);
  std::memcpy(&value, data, sizeof(T));
  return value;
}

// A type-erased kernel call: the kernel and its arguments, converted once to its parameter types.
struct KernelCall {
  void (*run)(const void* call);  // runs the kernel for the current emulated thread
  const void* call;
  const void* kernel;             // for error messages (the kernel's symbol name)
};

template <typename... Params>
struct BoundKernel {
  void (*kernel)(Params...);
  std::tuple<std::decay_t<Params>...> args;

  // Each emulated thread gets its own copies of the parameters, as on a GPU.
  static void run(const void* self) {
    const auto& bound = *static_cast<const BoundKernel*>(self);
    std::apply(bound.kernel, bound.args);
  }
};

void launch(const KernelCall& call, dim3 grid, dim3 block, size_t smem_bytes, unsigned cluster_blocks);

template <typename... Params, typename... Args>
void bind_and_launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, unsigned cluster_blocks,
                     Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "emu::launch: wrong number of kernel arguments");
  using Bound = BoundKernel<Params...>;
  const Bound bound{kernel, decltype(Bound::args)(std::forward<Args>(args)...)};
  launch({&Bound::run, &bound, reinterpret_cast<const void*>(kernel)}, grid, block, smem_bytes, cluster_blocks);
}

}  // namespace detail

inline void* dynamic_smem() { return detail::current_thread().block->dynamic_smem; }

// Static shared memory (SMOOTHCE_SHARED): `bytes` at one address for every thread of the block that
// executes this declaration site, allocated at the site's first execution in the block and filled
// with 0xFF bytes (a GPU leaves it undefined). The kernel's static size is what its blocks allocated
// (the largest seen): a launch whose static + dynamic size exceeds the kernel's limit is refused.
void* static_smem(size_t bytes, size_t align, const char* file, int line);

// --- function attributes and the runtime's error state, as cudaFuncGetAttributes & co. report them

struct FuncAttributes {
  size_t static_smem = 0;       // sharedSizeBytes (0 until a block of the kernel ran)
  size_t max_dynamic_smem = 0;  // maxDynamicSharedSizeBytes: kDefaultSmemBytes − static unless set
  unsigned max_threads = 1024;  // maxThreadsPerBlock: the __launch_bounds__ bound
  unsigned ptx_arch = 90;       // ptxVersion × 10 (Config::ptx_arch)
};
FuncAttributes func_attributes(const void* kernel);
// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes): throws when
// static + bytes exceed the device's opt-in maximum, as CUDA refuses it.
void func_set_max_dynamic_smem(const void* kernel, size_t bytes);
// cudaOccupancyMaxActiveClusters: 0 (success) with *clusters set, or a nonzero error code that also
// becomes the pending error (Config::cluster_occupancy).
int occupancy_max_active_clusters(const void* kernel, unsigned cluster_blocks, int* clusters);
// cudaGetLastError: returns the pending error's code (0: none) and clears it. A launch while an error
// is pending throws it, as C10_CUDA_KERNEL_LAUNCH_CHECK would after the launch.
int get_last_error();

// --- thread-block clusters (see the execution model above) ---

// The calling block's rank in its cluster (blockIdx.x % cluster_blocks()), and the cluster's size.
inline unsigned cluster_rank() { return detail::current_block("cluster_rank").cluster_rank; }
inline unsigned cluster_blocks() { return detail::current_block("cluster_blocks").cluster_blocks; }

// A barrier over every thread of every block of the caller's cluster. The call site's file and
// line name the barrier in error messages.
inline void cluster_sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  detail::cluster_sync(file, line);
}

// The address at the same offset as `address` (inside the caller's dynamic shared memory) in the
// dynamic shared memory of block `rank` of the caller's cluster: CUDA's map_shared_rank.
inline void* cluster_smem(void* address, unsigned rank) {
  const detail::BlockView& block = detail::current_block("cluster_smem");
  // Unsigned: an address below the buffer wraps to a huge offset.
  const uintptr_t offset = reinterpret_cast<uintptr_t>(address) - reinterpret_cast<uintptr_t>(block.dynamic_smem);
  if (__builtin_expect(offset >= block.smem_bytes || rank >= block.cluster_blocks, 0))
    detail::bad_cluster_smem(address, rank);
  unsigned char* rank0 = block.dynamic_smem - block.cluster_rank * block.smem_stride;
  return rank0 + rank * block.smem_stride + offset;
}

inline void count_read(size_t bytes) {
  if (__builtin_expect(detail::current != nullptr, 1)) detail::current->block->read_bytes += bytes;
  else detail::count_outside_kernel(bytes, false);
}

inline void count_write(size_t bytes) {
  if (__builtin_expect(detail::current != nullptr, 1)) detail::current->block->write_bytes += bytes;
  else detail::count_outside_kernel(bytes, true);
}

// A device-side assert on an out-of-range target: stops the calling thread and the launch;
// launch() then throws c10::IndexError with this message (the first one, by block then thread).
void index_error(long long value, long long classes, long long ignore_index);

// --- sanitizer hooks (compat.cuh / memory.cuh call them from the kernels) ---

// memcheck (memcheck.cpp): every global-memory access of a kernel: `bytes` at `ptr`, which must be
// aligned to `align` (a power of two up to 16) and lie inside a live tensor; a write is also checked
// against the other blocks (clusters) of the same launch. `file`, `line`: the access's source site.
void global_access(const void* ptr, size_t bytes, size_t align, bool write, const char* file, int line);

// racecheck (emu.cpp): every shared-memory access (static, dynamic or a cluster peer's).
void shared_access(const void* ptr, size_t bytes, size_t align, bool write, const char* file, int line);

namespace detail {
// Messages: printf into a string; "(x,y,z)"; "file:line" (the file's base name).
std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string dims(dim3 d);
std::string site(const char* file, int line);
// Stops the running launch from inside a kernel with `message` (the emulator prefixes the kernel,
// the block and the calling thread); launch() raises it as std::runtime_error. [[noreturn]].
[[noreturn]] void sanitizer_failure(const std::string& message);
// The running launch's serial number (unique per launch, increasing) and the calling thread's
// cluster (the linear block index / cluster size: the unit of cross-block checks).
uint64_t launch_serial();
uint64_t cluster_index();
}  // namespace detail

// Runs kernel<<<grid, block, smem_bytes>>>(args...) to completion on the CPU.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, Args&&... args) {
  detail::bind_and_launch(kernel, grid, block, smem_bytes, 1, std::forward<Args>(args)...);
}

// The same in clusters of `cluster_blocks` consecutive blocks along x (cudaLaunchKernelEx with a
// cluster dimension of (cluster_blocks, 1, 1)): grid.x must be a multiple of cluster_blocks, which
// is 1 to 8 (the portable cluster size).
template <typename... Params, typename... Args>
void launch_cluster(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, unsigned cluster_blocks,
                    Args&&... args) {
  detail::bind_and_launch(kernel, grid, block, smem_bytes, cluster_blocks, std::forward<Args>(args)...);
}

}  // namespace emu

#define threadIdx (static_cast<const dim3&>(::emu::detail::current_thread().thread_idx))
#define blockIdx (static_cast<const dim3&>(::emu::detail::current_thread().block->block_idx))
#define blockDim (static_cast<const dim3&>(::emu::detail::current_thread().block->block_dim))
#define gridDim (static_cast<const dim3&>(::emu::detail::current_thread().block->grid_dim))

// The call site's file and line name the barrier in error messages.
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::emu::detail::syncthreads(file, line);
}

inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  ::emu::detail::warp_op(::emu::detail::WarpOp::sync, mask, 0, warpSize, nullptr, 0, file, line);
}

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = warpSize,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::emu::detail::shuffle(::emu::detail::WarpOp::shfl_xor, mask, value, lane_mask, width, file, line);
}

template <typename T>
inline T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = warpSize,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::emu::detail::shuffle(::emu::detail::WarpOp::shfl_down, mask, value, static_cast<int>(delta), width,
                                file, line);
}

template <typename T>
inline T __shfl_sync(unsigned mask, T value, int src_lane, int width = warpSize,
                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::emu::detail::shuffle(::emu::detail::WarpOp::shfl_idx, mask, value, src_lane, width, file, line);
}

// __expf, __logf and __fdividef: arith.h (exact, or the fast-math device versions in device mode).

#include "arith.h"  // the device arithmetic of the kernels' math (exp, log, division)
