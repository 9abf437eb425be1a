// CPU emulation of the CUDA subset that csrc/cuda/compat.cuh allows, so the test suite runs the
// kernels' own source without a GPU. Include after the torch/ATen headers and before any csrc/cuda
// header.
//
// Execution model (emu.cpp): every thread of a block is a fiber (a cooperative user-level thread
// with its own stack); all fibers of a block run on one OS thread, one at a time, starting in
// thread-index order. A fiber runs until it reaches a barrier (__syncthreads, __syncwarp, a
// shuffle) or returns, then the next runnable fiber runs; the schedule of a block is
// deterministic. Blocks of a launch may run on several OS threads (Config::workers), each running
// one block at a time, so no two running blocks share an OS thread.
//
// Shared memory: `__shared__` is `static thread_local`. The block's fibers share their OS thread,
// hence one copy per block; blocks running on other OS threads have their own. Static shared
// arrays keep their content from the previous block on the same OS thread (CUDA leaves it
// undefined). Dynamic shared memory (SMOOTHCE_DYNAMIC_SMEM) is a per-block buffer, 16-byte
// aligned, filled with 0xFF bytes at the start of every block, so reading before writing yields
// NaNs (or -1), not zeros.
//
// Errors raise from emu::launch, after the launch stopped (no hang, no later block runs):
//   - std::runtime_error: an invalid launch configuration; a __syncthreads() that not every thread
//     reaches (a thread exited, or threads wait at different __syncthreads() calls); a warp
//     operation whose mask omits the caller or names lanes that exited or do not exist, or whose
//     lanes call different operations; a width that is not a power of two; a deadlock.
//   - c10::IndexError: SMOOTHCE_DEVICE_INDEX_ERROR (the first one, by block then thread).
//   - a C++ exception thrown by a kernel, as thrown.
// A shuffle whose source lane is outside the mask (undefined on a GPU) returns 0xFF bytes.
// __expf, __logf and __fdividef are exact. __launch_bounds__ is not checked.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#define SMOOTHCE_EMULATOR 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// __restrict__ is a gcc/clang keyword already.
// One copy per OS thread = per running block (see above).
#define __shared__ static thread_local

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

struct Config {
  size_t max_dynamic_smem = 227 * 1024;  // per block, as an H100 with opt-in allows
  unsigned workers = 0;                  // OS threads running blocks; 0: min(hardware, 4)
};
Config config();
void set_config(const Config& config);

namespace detail {

struct BlockView {
  dim3 block_idx, block_dim, grid_dim;
  void* dynamic_smem = nullptr;
  uint64_t read_bytes = 0, write_bytes = 0;  // this OS thread's share of the launch's traffic
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

void syncthreads(const char* file, int line);

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

void launch(const KernelCall& call, dim3 grid, dim3 block, size_t smem_bytes);

}  // namespace detail

inline void* dynamic_smem() { return detail::current_thread().block->dynamic_smem; }

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

// Runs kernel<<<grid, block, smem_bytes>>>(args...) to completion on the CPU.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "emu::launch: wrong number of kernel arguments");
  using Bound = detail::BoundKernel<Params...>;
  const Bound bound{kernel, decltype(Bound::args)(std::forward<Args>(args)...)};
  detail::launch({&Bound::run, &bound, reinterpret_cast<const void*>(kernel)}, grid, block, smem_bytes);
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

// Exact versions of CUDA's fast approximations (the kernels' accuracy is tested on CPU with these).
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
