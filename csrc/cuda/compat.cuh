// The CUDA subset the kernels of csrc/cuda/*.cuh may use, so that the same source builds with nvcc
// (real kernels) and with the host compiler under the test suite's emulator (tests/emu/emu.h,
// which must be included before any csrc/cuda header there).
//
// Kernels may use ONLY (the emulator implements exactly this list):
//   __global__ __device__ __host__ __forceinline__ __restrict__
//   __launch_bounds__(n, ...) with a literal n (the emulator refuses larger blocks)
//   threadIdx blockIdx blockDim gridDim (.x .y .z), warpSize (32)
//   __syncthreads(), __syncwarp(mask)
//   __shfl_xor_sync / __shfl_down_sync / __shfl_sync(mask, value, lane, width) on float, double,
//     int, unsigned, long long
//   static shared arrays of trivial types only via SMOOTHCE_SHARED(type, name, count) (not
//     `__shared__`: the emulator allocates, poisons and race-checks them per block); dynamic shared
//     memory only via SMOOTHCE_DYNAMIC_SMEM(type, name)
//   shared memory read and written only through memory.cuh's load_shared / store_shared (racecheck)
//   __threadfence()
//   math: expf logf exp log fmaxf fminf fabsf (and std:: forms through row_math.h)
//   SMOOTHCE_DEVICE_INDEX_ERROR(value, classes, ignore_index): an out-of-range target (device assert)
//   thread-block clusters (sm_90) through smoothce::cuda::cluster_sync(), cluster_rank() and
//     cluster_smem(ptr, rank) (map_shared_rank)
// Global memory is read and written only through memory.cuh (which counts bytes, checks bounds,
// alignment and cross-block races under emulation).
// Launches only through SMOOTHCE_LAUNCH(kernel, grid, block, smem_bytes, args...) on the current
// stream, or SMOOTHCE_LAUNCH_CLUSTER(kernel, grid, block, smem_bytes, cluster_blocks, args...); a
// kernel whose launches may ask for more than 48 KiB of shared memory is first prepared
// (prepare_kernel) to the most any of its plans asks for.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#if defined(__CUDACC__)

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdio>

#define SMOOTHCE_EMULATED 0
#define SMOOTHCE_DYNAMIC_SMEM(type, name)                        \
  extern __shared__ __align__(16) unsigned char smoothce_smem[]; \
  type* name = reinterpret_cast<type*>(smoothce_smem)
#define SMOOTHCE_SHARED(type, name, count) __shared__ type name[count]
#define SMOOTHCE_COUNT_READ(bytes) ((void)0)
#define SMOOTHCE_COUNT_WRITE(bytes) ((void)0)
// (memory.cuh's accessors: the emulator checks each access and names its source site)
#define SMOOTHCE_SITE_PARAMS
#define SMOOTHCE_ON_GLOBAL(ptr, bytes, align, write) ((void)0)
#define SMOOTHCE_ON_SHARED(ptr, bytes, align, write) ((void)0)

// Same behaviour as torch's nll_loss on CUDA: a device-side assert (the context reports it at the
// next synchronisation), after printing which value was wrong.
#define SMOOTHCE_DEVICE_INDEX_ERROR(value, classes, ignore_index)                                         \
  do {                                                                                                    \
    printf("smoothce.cross_entropy: target value %lld is out of bounds: expected class indices in "       \
           "[0, %lld) or ignore_index (%lld)\n",                                                          \
           static_cast<long long>(value), static_cast<long long>(classes),                                \
           static_cast<long long>(ignore_index));                                                         \
    CUDA_KERNEL_ASSERT(false && "smoothce: target out of bounds");                                        \
  } while (0)

#define SMOOTHCE_LAUNCH(kernel, grid, block, smem_bytes, ...)                             \
  do {                                                                                    \
    kernel<<<grid, block, smem_bytes, ::at::cuda::getCurrentCUDAStream()>>>(__VA_ARGS__); \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                       \
  } while (0)

namespace smoothce::cuda {

// A launch in clusters of `cluster_blocks` consecutive blocks along x, on the current stream.
struct ClusterLaunch {
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute attribute[1];

  ClusterLaunch(dim3 grid, dim3 block, size_t smem_bytes, unsigned cluster_blocks) {
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem_bytes;
    config.stream = ::at::cuda::getCurrentCUDAStream();
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = cluster_blocks;
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
  }
  ClusterLaunch(const ClusterLaunch&) = delete;  // config.attrs points into this object
};

// The runtime calls of prepare_kernel and cluster_fits (below, shared with the emulator).
struct KernelInfo {
  int ptx_arch;  // the virtual architecture its code was compiled for (major·10 + minor): a build
                 // for "8.0+PTX" run on an sm_90 device runs sm_80 code, JIT-compiled
};
inline KernelInfo query_kernel(const void* kernel) {
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  return {attributes.ptxVersion};
}
inline void set_max_dynamic_smem(const void* kernel, int64_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}
inline int current_device() { return ::c10::cuda::current_device(); }
// cudaOccupancyMaxActiveClusters: 0 (success) or the error's code.
template <typename... Params>
inline int max_active_clusters(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes,
                               unsigned cluster_blocks, int* clusters) {
  const ClusterLaunch launch(grid, block, smem_bytes, cluster_blocks);
  return static_cast<int>(cudaOccupancyMaxActiveClusters(clusters, kernel, &launch.config));
}
// cudaGetLastError: clears a (non-sticky) error the runtime recorded, which the next launch's check
// would otherwise report as its own.
inline void clear_last_error() { (void)cudaGetLastError(); }

template <typename... Params, typename... Args>
inline void launch_cluster(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes,
                           unsigned cluster_blocks, Args&&... args) {
  const ClusterLaunch launch(grid, block, smem_bytes, cluster_blocks);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&launch.config, kernel, std::forward<Args>(args)...));
}

// The cluster kernels run only where the plan asked for clusters (sm_90 and newer); the sm_80 build
// of their code traps.
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#else
  __trap();
#endif
}

__device__ __forceinline__ unsigned cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().block_rank();
#else
  __trap();
  return 0;
#endif
}

template <typename T>
__device__ __forceinline__ T* cluster_smem(T* ptr, unsigned rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(ptr, rank);
#else
  __trap();
  return ptr;
#endif
}

}  // namespace smoothce::cuda

#define SMOOTHCE_LAUNCH_CLUSTER(kernel, grid, block, smem_bytes, cluster_blocks, ...) \
  ::smoothce::cuda::launch_cluster(kernel, grid, block, smem_bytes, cluster_blocks, __VA_ARGS__)

#else  // host compiler: the emulator must have defined the CUDA subset

#ifndef SMOOTHCE_EMULATOR
#error "csrc/cuda headers build with nvcc, or with the host compiler after tests/emu/emu.h"
#endif
#define SMOOTHCE_EMULATED 1
#define SMOOTHCE_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::emu::dynamic_smem())
#define SMOOTHCE_SHARED(type, name, count) \
  type* name = static_cast<type*>(::emu::static_smem(sizeof(type) * (count), alignof(type), __FILE__, __LINE__))
#define SMOOTHCE_COUNT_READ(bytes) ::emu::count_read(bytes)
#define SMOOTHCE_COUNT_WRITE(bytes) ::emu::count_write(bytes)
#define SMOOTHCE_SITE_PARAMS , const char *smoothce_file = __builtin_FILE(), int smoothce_line = __builtin_LINE()
#define SMOOTHCE_ON_GLOBAL(ptr, bytes, align, write) \
  ::emu::global_access(ptr, bytes, align, write, smoothce_file, smoothce_line)
#define SMOOTHCE_ON_SHARED(ptr, bytes, align, write) \
  ::emu::shared_access(ptr, bytes, align, write, smoothce_file, smoothce_line)
#define SMOOTHCE_DEVICE_INDEX_ERROR(value, classes, ignore_index) \
  ::emu::index_error(static_cast<long long>(value), static_cast<long long>(classes), static_cast<long long>(ignore_index))
#define SMOOTHCE_LAUNCH(kernel, grid, block, smem_bytes, ...) \
  ::emu::launch(kernel, dim3(grid), dim3(block), static_cast<size_t>(smem_bytes), __VA_ARGS__)
#define SMOOTHCE_LAUNCH_CLUSTER(kernel, grid, block, smem_bytes, cluster_blocks, ...)                       \
  ::emu::launch_cluster(kernel, dim3(grid), dim3(block), static_cast<size_t>(smem_bytes),                      \
                        static_cast<unsigned>(cluster_blocks), __VA_ARGS__)

namespace smoothce::cuda {
struct KernelInfo {
  int ptx_arch;
};
inline KernelInfo query_kernel(const void* kernel) {
  return {static_cast<int>(::emu::func_attributes(kernel).ptx_arch)};
}
inline void set_max_dynamic_smem(const void* kernel, int64_t bytes) {
  ::emu::func_set_max_dynamic_smem(kernel, static_cast<size_t>(bytes));
}
// (the emulated device is identified by its binary's architecture: set_ptx_arch makes another one)
inline int current_device() { return static_cast<int>(::emu::config().ptx_arch); }
template <typename Kernel>
inline int max_active_clusters(Kernel kernel, dim3, dim3, size_t, unsigned cluster_blocks, int* clusters) {
  return ::emu::occupancy_max_active_clusters(reinterpret_cast<const void*>(kernel), cluster_blocks, clusters);
}
inline void clear_last_error() { (void)::emu::get_last_error(); }
// (the caller's file and line name the barrier in the emulator's messages)
inline void cluster_sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::emu::cluster_sync(file, line);
}
inline unsigned cluster_rank() { return ::emu::cluster_rank(); }
template <typename T>
inline T* cluster_smem(T* ptr, unsigned rank) {
  return static_cast<T*>(::emu::cluster_smem(static_cast<void*>(ptr), rank));
}
}  // namespace smoothce::cuda

#endif

namespace smoothce::cuda {
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Once per kernel and device (and again only to raise it): the kernel's dynamic shared memory limit
// set to `max_dynamic`, the most any plan asks for (DeviceLimits::max_smem; the runtime refuses it
// when the kernel's static shared memory leaves no room). Set once, to the largest value, under the
// lock that other host threads' launches of the kernel wait on: no launch sees a limit lowered for
// another's plan. Returns what the plans need to know of the kernel.
inline KernelInfo prepare_kernel(const void* kernel, int64_t max_dynamic) {
  struct Prepared {
    KernelInfo info;
    int64_t max_dynamic;
  };
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, Prepared> prepared;
  const std::pair<const void*, int> key{kernel, current_device()};
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = prepared.find(key);
  if (found != prepared.end() && found->second.max_dynamic >= max_dynamic) return found->second.info;
  set_max_dynamic_smem(kernel, max_dynamic);
  const KernelInfo info = query_kernel(kernel);
  prepared[key] = Prepared{info, max_dynamic};
  return info;
}
template <typename... Params>
inline KernelInfo prepare_kernel(void (*kernel)(Params...), int64_t max_dynamic) {
  return prepare_kernel(reinterpret_cast<const void*>(kernel), max_dynamic);
}

// Whether the device can run such clusters at all (the blocks of a cluster must fit on one GPC at
// once); the launcher falls back to a plan without clusters when it cannot. An error of the query
// is cleared: the fallback's launch check would report it as its own otherwise.
template <typename Kernel>
inline bool cluster_fits(Kernel kernel, dim3 grid, dim3 block, size_t smem_bytes, unsigned cluster_blocks) {
  int clusters = 0;
  if (max_active_clusters(kernel, grid, block, smem_bytes, cluster_blocks, &clusters) != 0) {
    clear_last_error();
    return false;
  }
  return clusters > 0;
}
}  // namespace smoothce::cuda
