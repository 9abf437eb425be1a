// The launch plan: which kernel, grid, block and shared memory a problem gets. One plain function,
// shared by the CUDA launcher (cross_entropy.cu) and the CPU emulator (tests/emu), so the tests run
// exactly the plans a GPU would (with device limits they choose, to reach every variant).
#pragma once

#include <algorithm>
#include <cstdint>

namespace smoothce::cuda {

enum class Variant : int {
  kRows = 0,       // classes contiguous, the row staged in shared memory: several rows per warp,
                   // a row per warp or a row per block, by C
  kSplitRows = 1,  // classes contiguous, a row too long for shared memory: chunks of it per block,
                   // combined by a second kernel
  kStrided = 2,    // classes strided ((N, C, H, W), x.t()): a thread per position, threads along
                   // the contiguous positions (coalesced), walking the classes
  kClusterRows = 3,  // classes contiguous, a row too long for one block's shared memory, on a device
                     // with thread-block clusters (sm_90): a cluster of blocks holds the row on chip
};

struct DeviceLimits {
  int64_t sm_count = 108;
  int64_t max_smem = 48 * 1024;  // dynamic shared memory one block may opt in to
  int64_t split_chunk = 8192;    // classes per block when a row is split (a tuning knob, not a limit)
  int64_t max_cluster_blocks = 0;  // blocks per thread-block cluster (8 on sm_90, 0: no clusters)
};

struct PlanInput {
  int64_t outer = 0, classes = 0, inner = 0;  // the Problem view (csrc/smoothce/problem.h)
  bool class_contiguous = true;
  bool dense_rows = false;  // classes contiguous and offset(pos) = pos·C: a block's rows are one run
  int64_t elem_size = 4;    // bytes of an input element
  bool soft = false;        // probability targets are staged beside the logits
};

struct Plan {
  Variant variant = Variant::kRows;
  int threads = 0;           // per block
  int group = 0;             // rows: threads per row (1..32 within a warp, or = threads)
  int rows_per_block = 0;    // rows: threads / group
  bool cooperative = false;  // rows: the block stages and writes its rows as one contiguous run
  int64_t row_stride = 0;    // rows: elements between the rows staged per group
  int64_t chunk = 0;         // split / cluster rows: classes per block
  int64_t chunks = 0;        // split rows: work items per row; cluster rows: blocks per cluster
  bool staged = false;       // strided: the tile stays in shared memory between the passes
  int64_t work = 0;          // work items the grid-stride loop walks (row tiles, row chunks, position tiles)
  int64_t blocks = 0;
  int64_t smem_bytes = 0;    // dynamic shared memory per block
};

// Per-row scalars the rows kernel keeps in shared memory for its cooperative gradient write.
constexpr int64_t kRowScalarsBytes = 80;
// The cluster kernel's reduction scratch (5 × 32 fp64) and the partials it shares with its cluster (6).
constexpr int64_t kClusterScratchBytes = 5 * 32 * 8 + 6 * 8;
// A cluster is only as big as it must be for its row to fit, and preferably this small per block
// (several blocks per SM); larger chunks are taken when nothing smaller fits.
constexpr int64_t kClusterChunkBytes = 64 * 1024;
// Shared memory a block uses without opting in; larger plans lower occupancy, so they are only
// chosen when nothing smaller holds the row.
constexpr int64_t kDefaultSmem = 48 * 1024;
constexpr int kRowsThreads = 256;
constexpr int kMaxRowsThreads = 512;  // = rows_kernel's __launch_bounds__
constexpr int64_t kWarpRowMaxClasses = 1024;  // above: a block per row

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p *= 2;
  return p;
}

// (constexpr: also callable from device code, nvcc --expt-relaxed-constexpr as torch builds.)
// Bytes of shared memory holding `elements` staged elements of one tensor, with room to shift the
// run so that 16-byte global vectors land on 16-byte shared vectors.
constexpr int64_t staged_bytes(int64_t elements, int64_t elem_size) { return round_up(elements * elem_size + 16, 16); }

inline Plan make_plan(const PlanInput& in, const DeviceLimits& limits) {
  Plan plan;
  const int64_t C = std::max<int64_t>(in.classes, 1);
  const int64_t positions = in.outer * in.inner;
  const int64_t tensors = in.soft ? 2 : 1;  // logits (and probabilities) staged
  const int64_t vec = 16 / in.elem_size;
  auto finish = [&](int64_t work) {
    plan.work = work;
    const int64_t per_sm = std::max<int64_t>(1, 2048 / plan.threads);
    plan.blocks = std::max<int64_t>(1, std::min(work, limits.sm_count * per_sm));
    return plan;
  };

  if (!in.class_contiguous) {
    plan.variant = Variant::kStrided;
    plan.threads = 256;
    for (int threads : {256, 128, 64}) {
      if (tensors * C * threads * in.elem_size <= kDefaultSmem) {
        plan.threads = threads;
        plan.staged = true;
        plan.smem_bytes = tensors * C * threads * in.elem_size;
        break;
      }
    }
    return finish(in.outer * ceil_div(in.inner, plan.threads));
  }

  auto rows_smem = [&](int rows, bool cooperative, int64_t row_stride) {
    const int64_t staged = cooperative ? staged_bytes(rows * C, in.elem_size) : rows * row_stride * in.elem_size;
    return tensors * staged + rows * kRowScalarsBytes;
  };
  plan.variant = Variant::kRows;
  plan.cooperative = in.dense_rows;
  plan.row_stride = round_up(C + vec, vec);
  if (C <= kWarpRowMaxClasses) {
    // ~8 classes per thread: several rows per warp for short rows, a warp for C > 128
    plan.group = std::min(32, next_pow2(ceil_div(C, 8)));
    plan.threads = kRowsThreads;
    while (plan.threads > plan.group &&
           rows_smem(plan.threads / plan.group, plan.cooperative, plan.row_stride) > kDefaultSmem)
      plan.threads /= 2;
    plan.threads = std::max(plan.threads, 32);
  } else {
    // a block per row, ~16 classes per thread (at most 512 threads: rows_kernel's launch bounds
    // leave it 128 registers, which fp64 needs)
    plan.threads = static_cast<int>(std::clamp<int64_t>(next_pow2(ceil_div(C, 16)), 128, kMaxRowsThreads));
    plan.group = plan.threads;
  }
  plan.rows_per_block = plan.threads / plan.group;
  plan.smem_bytes = rows_smem(plan.rows_per_block, plan.cooperative, plan.row_stride);
  if (plan.smem_bytes <= limits.max_smem) return finish(ceil_div(positions, plan.rows_per_block));

  // The row does not fit in one block: a cluster of blocks holds it, each a chunk in shared memory.
  for (const int64_t budget : {std::min(kClusterChunkBytes + kClusterScratchBytes, limits.max_smem), limits.max_smem}) {
    for (int64_t blocks = 2; blocks <= limits.max_cluster_blocks; ++blocks) {
      const int64_t chunk = round_up(ceil_div(C, blocks), vec);
      const int64_t smem = tensors * staged_bytes(chunk, in.elem_size) + kClusterScratchBytes;
      if (smem > budget) continue;
      plan = Plan{};
      plan.variant = Variant::kClusterRows;
      plan.chunk = chunk;
      plan.chunks = blocks;
      plan.threads = static_cast<int>(std::clamp<int64_t>(next_pow2(ceil_div(chunk, 16)), 128, kMaxRowsThreads));
      plan.group = plan.threads;
      plan.rows_per_block = 1;
      plan.smem_bytes = smem;
      plan.work = positions;
      const int64_t per_sm = std::max<int64_t>(1, 2048 / plan.threads);
      plan.blocks = blocks * std::max<int64_t>(1, std::min(positions, limits.sm_count * per_sm / blocks));
      return plan;
    }
  }

  // The row does not fit on chip: chunks of it per block (each thread an online softmax state
  // over its elements, straight from global memory), combined by a second kernel.
  plan = Plan{};
  plan.variant = Variant::kSplitRows;
  plan.chunks = ceil_div(C, std::max<int64_t>(vec, limits.split_chunk));
  plan.chunk = round_up(ceil_div(C, plan.chunks), vec);
  plan.chunks = ceil_div(C, plan.chunk);
  plan.threads = static_cast<int>(std::clamp<int64_t>(next_pow2(ceil_div(plan.chunk, 16)), 32, 512));
  plan.group = plan.threads;
  plan.rows_per_block = 1;
  return finish(positions * plan.chunks);
}

}  // namespace smoothce::cuda
