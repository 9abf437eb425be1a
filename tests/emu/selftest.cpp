// Tiny kernels with known results that test the emulator itself (tests/test_emulator.py). They are
// written like the real kernels, with only the CUDA subset of cuda/compat.cuh, except where a
// comment says they misuse it on purpose.
#include <torch/extension.h>

#include "emu.h"

#include "cuda/compat.cuh"

#include <optional>
#include <stdexcept>

namespace emu_selftest {

using smoothce::cuda::cluster_rank;
using smoothce::cuda::cluster_smem;
using smoothce::cuda::cluster_sync;
using smoothce::cuda::kFullMask;

// The sum of each block's blockDim.x elements (a multiple of 32): warp sums by xor shuffles, the
// warp sums through static shared memory, their sum by down shuffles, broadcast through shared
// memory again; every element minus its block's mean goes to `centered`.
template <typename T>
__global__ void block_sum_kernel(const T* __restrict__ in, T* __restrict__ sums, T* __restrict__ centered) {
  SMOOTHCE_SHARED(T, partial, 32);
  const unsigned tid = threadIdx.x, lane = tid % warpSize, warp = tid / warpSize;
  const unsigned i = blockIdx.x * blockDim.x + tid;
  const T x = in[i];
  T v = x;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < blockDim.x / warpSize ? partial[lane] : T(0);
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(kFullMask, v, offset);
    if (lane == 0) partial[0] = v;  // safe: every lane read its partial before the shuffles
  }
  __syncthreads();
  const T total = partial[0];
  if (tid == 0) sums[blockIdx.x] = total;
  centered[i] = x - total / static_cast<T>(blockDim.x);
}

// One shuffle (or __syncwarp) per thread of a single block; mask: the lanes that exist in the
// thread's warp, or their half of it. op 3 is __shfl_sync with a source that differs by lane.
template <typename T>
__global__ void shuffle_kernel(const T* __restrict__ in, T* __restrict__ out, int op, int arg, int width,
                               bool half_masks) {
  const unsigned tid = threadIdx.x, lane = tid % warpSize;
  const unsigned lanes = blockDim.x - (tid - lane) < 32 ? blockDim.x - (tid - lane) : 32;
  unsigned mask = lanes == 32 ? kFullMask : (1u << lanes) - 1;
  if (half_masks) mask &= lane < 16 ? 0x0000ffffu : 0xffff0000u;
  const T v = in[tid];
  T r = v;
  if (op == 0) r = __shfl_xor_sync(mask, v, arg, width);
  else if (op == 1) r = __shfl_down_sync(mask, v, static_cast<unsigned>(arg), width);
  else if (op == 2) r = __shfl_sync(mask, v, arg, width);
  else if (op == 3) r = __shfl_sync(mask, v, static_cast<int>(lane) * 5 + arg, width);
  else __syncwarp(mask);
  out[tid] = r;
}

// Dynamic shared memory: every thread checks that its words hold the 0xFF fill when the block
// starts (`dirty` counts those that do not), then the block reverses its indices through it.
__global__ void smem_kernel(int* __restrict__ dirty, float* __restrict__ reversed, int* __restrict__ aligned,
                            int words) {
  SMOOTHCE_DYNAMIC_SMEM(float, buffer);
  const unsigned tid = threadIdx.x, n = blockDim.x, i = blockIdx.x * n + tid;
  int not_filled = 0;
  for (int w = static_cast<int>(tid); w < words; w += static_cast<int>(n)) {
    uint32_t bits;
    std::memcpy(&bits, &buffer[w], sizeof(bits));
    not_filled += bits != 0xffffffffu;
  }
  dirty[i] = not_filled;
  if (tid == 0) aligned[blockIdx.x] = reinterpret_cast<uintptr_t>(buffer) % 16 == 0;
  __syncthreads();  // all reads of the fill before any write
  for (int w = static_cast<int>(tid); w < words; w += static_cast<int>(n)) buffer[w] = static_cast<float>(w);
  buffer[tid] = static_cast<float>(i);
  __syncthreads();
  reversed[i] = buffer[n - 1 - tid];
}

// Every thread writes its threadIdx, blockIdx, blockDim, gridDim to its own row of 12.
__global__ void index_kernel(int* __restrict__ out) {
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  int* row = out + (static_cast<int64_t>(block) * threads + thread) * 12;
  const dim3 values[4] = {threadIdx, blockIdx, blockDim, gridDim};
  for (int k = 0; k < 4; ++k) {
    row[3 * k] = static_cast<int>(values[k].x);
    row[3 * k + 1] = static_cast<int>(values[k].y);
    row[3 * k + 2] = static_cast<int>(values[k].z);
  }
}

// Misuses __syncthreads on purpose (mode 4 is the correct control); threads run in index order.
// mode 0: threads < split return before the barrier (the others arrive after they exited); 1:
// threads >= split return (they exit while the others wait); 2: threads < split and the others
// reach different __syncthreads(); 3: threads < split wait at __syncthreads, the others at
// __syncwarp.
__global__ void barrier_kernel(int* __restrict__ out, int mode, int split) {
  const unsigned tid = threadIdx.x;
  const bool first = static_cast<int>(tid) < split;
  if (mode == 0) {
    if (first) return;
    __syncthreads();
  } else if (mode == 1) {
    if (!first) return;
    __syncthreads();
  } else if (mode == 2) {
    if (first) {
      __syncthreads();
    } else {
      __syncthreads();
    }
  } else if (mode == 3) {
    if (first) {
      __syncthreads();
    } else {
      __syncwarp();
    }
  } else {
    __syncthreads();
  }
  out[tid] = 1;
}

// Misuses warp operations on purpose (mode 5 is the correct control). 0: lanes call with a mask
// holding lane 0 only; 1: lane 0 calls a different shuffle; 2: a full mask over a partial warp;
// 3: width 3; 4: lane `lane_arg` returns before a full-mask shuffle.
__global__ void warp_kernel(float* __restrict__ out, int mode, int lane_arg) {
  const unsigned tid = threadIdx.x, lane = tid % warpSize;
  float v = static_cast<float>(tid);
  if (mode == 0) {
    v = __shfl_xor_sync(0x1u, v, 1);
  } else if (mode == 1) {
    v = lane == 0 ? __shfl_down_sync(kFullMask, v, 1) : __shfl_xor_sync(kFullMask, v, 1);
  } else if (mode == 2) {
    v = __shfl_xor_sync(kFullMask, v, 1);
  } else if (mode == 3) {
    v = __shfl_xor_sync(kFullMask, v, 1, 3);
  } else if (mode == 4) {
    if (static_cast<int>(lane) == lane_arg) return;
    v = __shfl_xor_sync(kFullMask, v, 1);
  } else {
    v = __shfl_xor_sync(kFullMask, v, 1);
  }
  out[tid] = v;
}

// Copies valid targets; an out-of-range one is a device-side index error.
__global__ void target_kernel(const int64_t* __restrict__ targets, int64_t* __restrict__ out, int64_t n,
                              int64_t classes, int64_t ignore_index) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t t = targets[i];
  if (t != ignore_index && (t < 0 || t >= classes)) {
    SMOOTHCE_DEVICE_INDEX_ERROR(t, classes, ignore_index);
    return;
  }
  out[i] = t;
}

// A grid-stride copy that counts its global-memory bytes.
template <typename T>
__global__ void copy_kernel(const T* __restrict__ in, T* __restrict__ out, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    SMOOTHCE_COUNT_READ(sizeof(T));
    const T v = in[i];
    SMOOTHCE_COUNT_WRITE(sizeof(T));
    out[i] = v;
  }
}

// Not valid CUDA: a C++ exception thrown by one thread while the others wait at a barrier must
// surface from the launch, and the emulator must stay usable.
__global__ void throwing_kernel(int* __restrict__ out, int thrower) {
  __syncthreads();
  if (static_cast<int>(threadIdx.x) == thrower) throw std::domain_error("selftest: thrown in a kernel");
  __syncthreads();
  out[threadIdx.x] = 1;
}

// Thread-block clusters with distributed shared memory (its dynamic shared memory, which
// cluster_smem maps). Block `rank` of a cluster keeps its row of `in` (blockDim.x values, one per
// thread) in its shared memory; after a cluster barrier, thread t sums (r + 1) * element
// (t + r) % n of every other rank r's row (`sums`); after a second barrier (no block overwrites a
// row another may still read) it stores 2 * its element into the next rank's shared memory, and
// after a third reads what the previous rank stored (`shifted`). Per thread, `info` gets
// cluster_rank(), cluster_blocks(), whether cluster_smem maps the block's own memory to itself and
// whether the thread's word held the 0xFF fill before the block wrote it.
// Misuses on purpose (mode 0 is the correct kernel): 1: block rank `arg` returns before the first
// barrier; 2: every block returns after reading the others, without a barrier before leaving;
// 3: cluster_smem of global memory; 4: cluster_smem of rank `arg`; 5: in block rank `arg`, thread
// 0 waits at the cluster barrier and the others at __syncthreads().
__global__ void cluster_kernel(const float* __restrict__ in, float* __restrict__ sums, float* __restrict__ shifted,
                               int* __restrict__ info, int mode, int arg) {
  SMOOTHCE_DYNAMIC_SMEM(float, row);
  const unsigned tid = threadIdx.x, n = blockDim.x, rank = cluster_rank();
  const unsigned blocks = ::emu::cluster_blocks();  // the emulator's own query (compat.cuh has none)
  const int64_t i = static_cast<int64_t>(blockIdx.x) * n + tid;
  uint32_t fill;
  std::memcpy(&fill, &row[tid], sizeof(fill));
  int* const my_info = info + 4 * i;
  my_info[0] = static_cast<int>(rank);
  my_info[1] = static_cast<int>(blocks);
  my_info[2] = cluster_smem(row, rank) == row;
  my_info[3] = fill == 0xffffffffu;
  SMOOTHCE_COUNT_READ(sizeof(float));
  const float x = in[i];
  row[tid] = x;
  const bool chosen = static_cast<int>(rank) == arg;
  if (mode == 1 && chosen) return;
  if (mode == 3) cluster_smem(sums, 0);
  if (mode == 4) cluster_smem(row, static_cast<unsigned>(arg));
  if (mode == 5 && chosen && tid != 0) __syncthreads();
  cluster_sync();
  float sum = 0.0f;
  for (unsigned r = 0; r < blocks; ++r)
    if (r != rank) sum += static_cast<float>(r + 1) * cluster_smem(row, r)[(tid + r) % n];
  SMOOTHCE_COUNT_WRITE(sizeof(float));
  sums[i] = sum;
  if (mode == 2) return;
  cluster_sync();
  cluster_smem(row, (rank + 1) % blocks)[tid] = 2.0f * x;
  cluster_sync();
  SMOOTHCE_COUNT_WRITE(sizeof(float));
  shifted[i] = row[tid];
}

namespace {

dim3 to_dim3(const std::vector<int64_t>& d) {
  TORCH_CHECK(d.size() == 3, "expected (x, y, z)");
  return dim3(static_cast<unsigned>(d[0]), static_cast<unsigned>(d[1]), static_cast<unsigned>(d[2]));
}

torch::Tensor like(const torch::Tensor& t, int64_t n) { return torch::empty({n}, t.options()); }

std::vector<torch::Tensor> block_sum(const torch::Tensor& in, int64_t threads) {
  TORCH_CHECK(in.dim() == 1 && in.is_contiguous() && in.numel() % threads == 0);
  const int64_t blocks = in.numel() / threads;
  torch::Tensor sums = like(in, blocks), centered = like(in, in.numel());
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "block_sum", [&] {
    SMOOTHCE_LAUNCH(block_sum_kernel<scalar_t>, blocks, threads, 0, in.data_ptr<scalar_t>(),
                    sums.data_ptr<scalar_t>(), centered.data_ptr<scalar_t>());
  });
  return {sums, centered};
}

torch::Tensor shuffle(const torch::Tensor& in, int64_t op, int64_t arg, int64_t width, bool half_masks) {
  TORCH_CHECK(in.dim() == 1 && in.is_contiguous());
  torch::Tensor out = like(in, in.numel());
  AT_DISPATCH_SWITCH(in.scalar_type(), "shuffle",
                     AT_DISPATCH_CASE(at::kInt, [&] {
                       SMOOTHCE_LAUNCH(shuffle_kernel<int>, 1, in.numel(), 0, in.data_ptr<int>(), out.data_ptr<int>(),
                                       op, arg, width, half_masks);
                     }) AT_DISPATCH_CASE(at::kLong, [&] {
                       SMOOTHCE_LAUNCH(shuffle_kernel<int64_t>, 1, in.numel(), 0, in.data_ptr<int64_t>(),
                                       out.data_ptr<int64_t>(), op, arg, width, half_masks);
                     }) AT_DISPATCH_CASE(at::kDouble, [&] {
                       SMOOTHCE_LAUNCH(shuffle_kernel<double>, 1, in.numel(), 0, in.data_ptr<double>(),
                                       out.data_ptr<double>(), op, arg, width, half_masks);
                     }));
  return out;
}

std::vector<torch::Tensor> dynamic_smem(int64_t blocks, int64_t threads, int64_t smem_bytes) {
  auto ints = torch::TensorOptions().dtype(torch::kInt);
  torch::Tensor dirty = torch::empty({blocks * threads}, ints), aligned = torch::empty({blocks}, ints);
  torch::Tensor reversed = torch::empty({blocks * threads}, torch::kFloat);
  // (as a host program must: more than 48 KiB of shared memory needs the kernel's opt-in)
  if (smem_bytes > static_cast<int64_t>(emu::kDefaultSmemBytes))
    emu::func_set_max_dynamic_smem(reinterpret_cast<const void*>(&smem_kernel), static_cast<size_t>(smem_bytes));
  SMOOTHCE_LAUNCH(smem_kernel, blocks, threads, smem_bytes, dirty.data_ptr<int>(), reversed.data_ptr<float>(),
                  aligned.data_ptr<int>(), static_cast<int>(smem_bytes / 4));
  return {dirty, reversed, aligned};
}

torch::Tensor indices(const std::vector<int64_t>& grid, const std::vector<int64_t>& block, int64_t smem_bytes) {
  const int64_t threads = block[0] * block[1] * block[2] * grid[0] * grid[1] * grid[2];
  torch::Tensor out = torch::full({std::max<int64_t>(threads, 0), 12}, -1, torch::kInt);
  SMOOTHCE_LAUNCH(index_kernel, to_dim3(grid), to_dim3(block), smem_bytes, out.data_ptr<int>());
  return out;
}

torch::Tensor barrier(int64_t threads, int64_t mode, int64_t split) {
  torch::Tensor out = torch::zeros({threads}, torch::kInt);
  SMOOTHCE_LAUNCH(barrier_kernel, 1, threads, 0, out.data_ptr<int>(), mode, split);
  return out;
}

torch::Tensor warp(int64_t threads, int64_t mode, int64_t lane_arg) {
  torch::Tensor out = torch::zeros({threads}, torch::kFloat);
  SMOOTHCE_LAUNCH(warp_kernel, 1, threads, 0, out.data_ptr<float>(), mode, lane_arg);
  return out;
}

void targets(const torch::Tensor& targets, torch::Tensor& out, int64_t classes, int64_t ignore_index,
             int64_t threads) {
  TORCH_CHECK(targets.dim() == 1 && targets.is_contiguous() && targets.scalar_type() == torch::kLong);
  TORCH_CHECK(out.sizes() == targets.sizes() && out.is_contiguous() && out.scalar_type() == torch::kLong);
  const int64_t n = targets.numel(), blocks = (n + threads - 1) / threads;
  SMOOTHCE_LAUNCH(target_kernel, blocks, threads, 0, targets.data_ptr<int64_t>(), out.data_ptr<int64_t>(), n,
                  classes, ignore_index);
}

torch::Tensor copy(const torch::Tensor& in, int64_t blocks, int64_t threads) {
  TORCH_CHECK(in.dim() == 1 && in.is_contiguous());
  torch::Tensor out = like(in, in.numel());
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "copy", [&] {
    SMOOTHCE_LAUNCH(copy_kernel<scalar_t>, blocks, threads, 0, in.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                    in.numel());
  });
  return out;
}

// No cluster_blocks: a plain launch.
std::vector<torch::Tensor> cluster(const torch::Tensor& in, int64_t threads, std::optional<int64_t> cluster_blocks,
                                   int64_t mode, int64_t arg) {
  TORCH_CHECK(in.dim() == 1 && in.is_contiguous() && in.scalar_type() == torch::kFloat && in.numel() % threads == 0);
  const int64_t blocks = in.numel() / threads, smem_bytes = threads * static_cast<int64_t>(sizeof(float));
  torch::Tensor sums = like(in, in.numel()), shifted = torch::full_like(in, -7.0f);
  torch::Tensor info = torch::full({in.numel(), 4}, -1, torch::kInt);
  if (!cluster_blocks)
    SMOOTHCE_LAUNCH(cluster_kernel, blocks, threads, smem_bytes, in.data_ptr<float>(), sums.data_ptr<float>(),
                    shifted.data_ptr<float>(), info.data_ptr<int>(), mode, arg);
  else
    SMOOTHCE_LAUNCH_CLUSTER(cluster_kernel, blocks, threads, smem_bytes, *cluster_blocks, in.data_ptr<float>(),
                            sums.data_ptr<float>(), shifted.data_ptr<float>(), info.data_ptr<int>(), mode, arg);
  return {sums, shifted, info};
}

torch::Tensor throw_in_kernel(int64_t threads, int64_t thrower) {
  torch::Tensor out = torch::zeros({threads}, torch::kInt);
  SMOOTHCE_LAUNCH(throwing_kernel, 1, threads, 0, out.data_ptr<int>(), thrower);
  return out;
}

}  // namespace
}  // namespace emu_selftest

void bind_selftests(pybind11::module_& m) {
  using namespace emu_selftest;
  pybind11::module_ s = m.def_submodule("selftest", "known kernels that test the emulator itself");
  s.def("block_sum", &block_sum, "(per-block sums, x - block mean) of a float/double vector");
  s.def("shuffle", &shuffle, "one block; op 0 xor, 1 down, 2 idx, 3 idx with source lane*5+arg, 4 __syncwarp");
  s.def("dynamic_smem", &dynamic_smem, "(words not holding the fill per thread, reversed indices, aligned flags)");
  s.def("indices", &indices, "rows (threadIdx, blockIdx, blockDim, gridDim) per thread, in launch order");
  s.def("barrier", &barrier, "mode 0 exits before arrivals, 1 exits while others wait, 2 different barriers, "
                             "3 __syncthreads vs __syncwarp, 4 correct");
  s.def("warp", &warp, "mode 0 mask without the caller, 1 mixed shuffles, 2 full mask on a partial warp, "
                       "3 width 3, 4 lane_arg exits before a shuffle, 5 correct");
  s.def("targets", &targets, "copies class-index targets to out; raises IndexError on an out-of-range one");
  s.def("copy", &copy, "grid-stride copy counting its traffic");
  s.def("throw_in_kernel", &throw_in_kernel, "thread `thrower` throws between two barriers");
  s.def("cluster", &cluster, "(sums, shifted, info) of a cluster launch (cluster_blocks None: plain); mode 0 correct, "
                             "1 rank arg returns early, 2 no barrier before leaving, 3 cluster_smem of global "
                             "memory, 4 cluster_smem of rank arg, 5 rank arg's threads split between barriers");
}
