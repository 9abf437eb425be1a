// The CUDA kernels of smoothce::forward and smoothce::scale_grad_ (launch plans: plan.h; host side:
// forward.cuh). Only the CUDA subset of compat.cuh is used, so the CPU emulator builds this file too.
//
// Traffic model (global memory, per element of the N×C logits), with the gradient fused into forward:
//   rows (classes contiguous, row on chip): 1 read + 1 write; inference: 1 read
//   strided (classes strided):  staged tile 1 read + 1 write; unstaged 2 reads (the second mostly
//                               from L2) + 1 write
//   cluster rows (row too long for one block, sm_90): 1 read + 1 write
//   split rows (no clusters, or longer still):  2 reads + 1 write (the finishing kernel re-reads its
//                               chunk); inference 1 read
// Probability targets add their own reads (once where staged); per-position values (target, loss, lse)
// and class weights (served from L1/L2) are small next to C elements.
#pragma once

#include "cuda/compat.cuh"
#include "cuda/memory.cuh"
#include "cuda/plan.h"
#include "smoothce/row_math.h"

namespace smoothce::cuda {

// Scalars the prologue kernels compute on the device and every main kernel reads (no host round trip).
struct DeviceScalars {
  double denominator;  // D: Σ_valid w[t] (index targets) or the number of positions (probabilities)
  double grad_scale;   // 1/D for mean, 1 otherwise; times a scalar upstream gradient
  double weight_sum;   // Σ_c w_c (C without weights)
};

template <typename scalar_t>
struct KernelArgs : PositionLayout, Smoothing<acc_type<scalar_t>> {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* input;
  const scalar_t* soft_target;  // probability targets (input's strides), or null
  const int64_t* target;        // index targets, or null
  const int64_t* target_b;      // mixup partner targets (target's strides), or null
  const acc_t* lam;             // mixup share per position, or null: lam_value everywhere
  acc_t lam_value;
  const acc_t* weight;          // null when unweighted
  scalar_t* grad;               // null when no gradient is wanted
  acc_t* position_loss;
  acc_t* lse;
  const DeviceScalars* scalars;
  const acc_t* position_scale;  // per-position upstream gradient (reduction 'none'), or null
  Mass mass;

  // `counted`: see load_broadcast (the threads of a row's group read its targets together).
  // `raw` (optional) receives the two target values as stored (target_b: ignore_index when absent).
  __device__ PositionTargets<acc_t> targets_of(int64_t pos, bool counted = true, int64_t* raw = nullptr) const {
    const int64_t off = target_offset_of(pos);
    const int64_t t_a = load_broadcast(target + off, counted);
    const int64_t t_b = target_b ? load_broadcast(target_b + off, counted) : ignore_index;
    const acc_t share = lam ? load_broadcast(lam + pos, counted) : lam_value;
    if (raw) {
      raw[0] = t_a;
      raw[1] = t_b;
    }
    return position_targets<acc_t>(t_a, t_b, share, ignore_index, classes);
  }
  // The logits (x_at(c)) and weights at a position's targets. Read before any gradient element of the
  // row is written: the gradient may go over the logits (inplace_backward).
  template <typename XAt>
  __device__ TargetLogits<acc_t> target_logits(const PositionTargets<acc_t>& t, const XAt& x_at, bool counted) const {
    TargetLogits<acc_t> out{acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    if (t.a >= 0) {
      out.x_a = x_at(t.a);
      out.w_a = weight ? load_broadcast(weight + t.a, counted) : acc_t(1);
    }
    if (t.b >= 0) {
      out.x_b = x_at(t.b);
      out.w_b = weight ? load_broadcast(weight + t.b, counted) : acc_t(1);
    }
    return out;
  }
  __device__ acc_t weight_at(int64_t c) const { return weight ? load_global(weight + c) : acc_t(1); }
  // v_c of RowState for class c (prob: the probability target of c; unused for index targets).
  __device__ acc_t class_mass(int64_t c, acc_t prob) const {
    switch (mass) {
      case Mass::kUnit: return acc_t(1);
      case Mass::kWeighted: return load_global(weight + c);
      case Mass::kSoft: return weight_at(c) * soft_target_q(prob, this->eps, this->eps_over_c);
      default: return acc_t(0);
    }
  }
  // The class's term in the gradient: w_c (index targets) or w_c·q_c (probabilities).
  __device__ acc_t grad_mass(int64_t c, acc_t prob) const {
    return mass == Mass::kSoft ? class_mass(c, prob) : weight_at(c);
  }
};

// Per-position values a block shares for its gradient write.
template <typename acc_t>
struct RowScalars {
  acc_t max, log_sum;
  IndexGradCoefs<acc_t> coefs;
  int32_t a, b;  // the index targets (−1: none; probability targets: −1); C < 2^31 (problem.cpp)
  int valid;
};
static_assert(sizeof(RowScalars<double>) <= kRowScalarsBytes, "plan.h reserves kRowScalarsBytes per row");

template <typename T>
__device__ __forceinline__ T nan_max(T a, T b) {
  return (a != a || b != b) ? a + b : (a > b ? a : b);
}

// ---------------------------------------------------------------- group reductions
// A group is `group` consecutive threads: lanes of one warp (group ≤ 32; every lane of the warp
// calls) or the whole block (group = blockDim.x, a multiple of 32; every thread calls, and `scratch`
// is shared memory for N × 32 values). Every thread of the group gets the same result (butterfly;
// + and max commute exactly), in a fixed order.
template <typename T, int N>
struct Fields {
  T v[N];
};

template <typename T, int N, typename Op>
__device__ Fields<T, N> group_reduce(Fields<T, N> f, int group, Op op, T* scratch) {
  const int width = group < kWarp ? group : kWarp;
  for (int offset = width / 2; offset > 0; offset /= 2)
    for (int i = 0; i < N; ++i) f.v[i] = op(f.v[i], __shfl_xor_sync(kFullMask, f.v[i], offset, width));
  if (group <= kWarp) return f;
  const int warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  __syncthreads();  // the previous reduction's readers are done with scratch
  if (threadIdx.x % kWarp == 0)
    for (int i = 0; i < N; ++i) store_shared(scratch + i * kWarp + warp, f.v[i]);
  __syncthreads();
  for (int i = 0; i < N; ++i) {
    T total = load_shared(scratch + i * kWarp);
    for (int w = 1; w < warps; ++w) total = op(total, load_shared(scratch + i * kWarp + w));
    f.v[i] = total;
  }
  return f;
}

// Reduction operators as types (inlined, unlike function pointers).
struct AddOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return nan_max(a, b);
  }
};

// The merge of online-softmax states over the whole block (split rows, one state per thread).
template <typename acc_t>
__device__ RowState<acc_t> block_merge(RowState<acc_t> s) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    auto other_ = [&](acc_t v) { return __shfl_xor_sync(kFullMask, v, offset); };
    const RowState<acc_t> other{other_(s.max),     other_(s.sum_exp), other_(s.rest),
                                other_(s.mass_dx), other_(s.mass),    other_(s.mass_rest)};
    s = merge(s, other);
  }
  SMOOTHCE_SHARED(RowState<acc_t>, scratch, kWarp);
  const int warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  __syncthreads();  // the previous merge's readers are done with scratch
  if (threadIdx.x % kWarp == 0) store_shared(scratch + warp, s);
  __syncthreads();
  RowState<acc_t> total = load_shared(scratch);
  for (int w = 1; w < warps; ++w) total = merge(total, load_shared(scratch + w));
  return total;
}

// ---------------------------------------------------------------- runs of contiguous elements
// Loads per thread issued before any is used: enough bytes in flight to cover DRAM latency at the
// low occupancy the kernels run at (registers, shared memory).
constexpr int kPacksInFlight = 4;

// Walks src[0..n) shared by `nthreads` threads (this one is `thread`): 16-byte packs from the first
// aligned element on go to on_pack(e0, pack) (e0: the pack's first element), the scalar head and tail
// to on_element(e, value).
template <typename T, typename OnElement, typename OnPack>
__device__ void read_packs(const T* src, int64_t n, int thread, int nthreads, const OnElement& on_element,
                           const OnPack& on_pack) {
  constexpr int P = Pack<T>::kSize;
  const int64_t head = misaligned_head(src) < n ? misaligned_head(src) : n;
  for (int64_t e = thread; e < head; e += nthreads) on_element(e, load_global(src + e));
  const int64_t packs = (n - head) / P;
  int64_t k = thread;
  for (; k + (kPacksInFlight - 1) * static_cast<int64_t>(nthreads) < packs; k += kPacksInFlight * static_cast<int64_t>(nthreads)) {
    Pack<T> batch[kPacksInFlight];
    for (int u = 0; u < kPacksInFlight; ++u) batch[u] = load_pack(src + head + (k + u * static_cast<int64_t>(nthreads)) * P);
    for (int u = 0; u < kPacksInFlight; ++u) on_pack(head + (k + u * static_cast<int64_t>(nthreads)) * P, batch[u]);
  }
  for (; k < packs; k += nthreads) on_pack(head + k * P, load_pack(src + head + k * P));
  for (int64_t e = head + packs * P + thread; e < n; e += nthreads) on_element(e, load_global(src + e));
}

// f(e, src[e]) for e in [0, n).
template <typename T, typename F>
__device__ void read_run(const T* src, int64_t n, int thread, int nthreads, const F& f) {
  read_packs(src, n, thread, nthreads, f, [&](int64_t e0, const Pack<T>& pack) {
    for (int j = 0; j < Pack<T>::kSize; ++j) f(e0 + j, pack.v[j]);
  });
}

// Copies src[0..n) into shared memory dst (16-byte aligned, n + 16 bytes of room). Returns the
// shift: element e lands at dst[shift + e], chosen so that aligned global vectors land on aligned
// shared vectors.
template <typename T>
__device__ int stage_run(const T* src, int64_t n, T* dst, int thread, int nthreads) {
  constexpr int P = Pack<T>::kSize;
  const int head = static_cast<int>(misaligned_head(src) < n ? misaligned_head(src) : n);
  const int shift = head == 0 ? 0 : P - head;
  read_packs(
      src, n, thread, nthreads, [&](int64_t e, T value) { store_shared(dst + shift + e, value); },
      [&](int64_t e0, const Pack<T>& pack) { store_shared(reinterpret_cast<Pack<T>*>(dst + shift + e0), pack); });
  return shift;
}

// dst[e] = value(e) for e in [0, n), 16-byte vector stores where the alignment allows.
template <typename T, typename Value>
__device__ void write_run(T* dst, int64_t n, int thread, int nthreads, const Value& value) {
  constexpr int P = Pack<T>::kSize;
  const int64_t head = misaligned_head(dst) < n ? misaligned_head(dst) : n;
  for (int64_t e = thread; e < head; e += nthreads) store_global(dst + e, static_cast<T>(value(e)));
  const int64_t packs = (n - head) / P;
  for (int64_t k = thread; k < packs; k += nthreads) {
    Pack<T> pack;
    for (int j = 0; j < P; ++j) pack.v[j] = static_cast<T>(value(head + k * P + j));
    store_pack(dst + head + k * P, pack);
  }
  for (int64_t e = head + packs * P + thread; e < n; e += nthreads) store_global(dst + e, static_cast<T>(value(e)));
}

// dst[e] = map(e, src[e]) for e in [0, n) (dst may be src): vector loads and stores when both share
// their alignment, else vector stores only.
template <typename T, typename Map>
__device__ void map_run(const T* src, T* dst, int64_t n, int thread, int nthreads, const Map& map) {
  if (misaligned_head(src) != misaligned_head(dst)) {
    write_run(dst, n, thread, nthreads, [&](int64_t e) { return map(e, load_global(src + e)); });
    return;
  }
  read_packs(
      src, n, thread, nthreads, [&](int64_t e, T x) { store_global(dst + e, static_cast<T>(map(e, x))); },
      [&](int64_t e0, const Pack<T>& in) {
        Pack<T> out;
        for (int j = 0; j < Pack<T>::kSize; ++j) out.v[j] = static_cast<T>(map(e0 + j, in.v[j]));
        store_pack(dst + e0, out);
      });
}

// Adds one logit (d = x − the row's max origin) to the rows kernels' sums: Σexp, its part below the
// max, and with a class mass (mass(): v) Σv·d, Σv, Σv below the max (RowState's fields after max).
template <typename acc_t, typename Mass_>
__device__ __forceinline__ void add_to_sums(Fields<acc_t, 5>& sums, acc_t d, bool with_mass, const Mass_& mass) {
  const acc_t e = math::exp(d);
  const bool below = d != acc_t(0);
  sums.v[0] += e;
  if (below) sums.v[1] += e;
  if (with_mass) {
    const acc_t v = mass();
    sums.v[2] += v * d;
    sums.v[3] += v;
    if (below) sums.v[4] += v;
  }
}

// The loss and lse of one position, and what its gradient needs (a zero RowScalars when invalid).
// `targets`/`x`: the index targets and their logits (unused for probability targets).
// `write`: this thread stores loss and lse (and is the one counted for the per-position reads).
template <typename scalar_t>
__device__ RowScalars<acc_type<scalar_t>> finish_position(const KernelArgs<scalar_t>& a, const RowState<acc_type<scalar_t>>& state,
                                                          int64_t pos, const PositionTargets<acc_type<scalar_t>>& targets,
                                                          bool valid, const TargetLogits<acc_type<scalar_t>>& x,
                                                          const DeviceScalars& scalars, bool write) {
  using acc_t = acc_type<scalar_t>;
  RowScalars<acc_t> out{};
  out.a = -1;
  out.b = -1;
  out.valid = valid;
  acc_t loss = acc_t(0), lse = acc_t(0);
  if (valid) {
    acc_t scale = static_cast<acc_t>(scalars.grad_scale);
    if (a.position_scale) scale *= load_broadcast(a.position_scale + pos, write);
    const PositionResult<acc_t> r =
        a.mass == Mass::kSoft
            ? soft_target_position(state, row_log_sum(state), scale, a.z_loss)
            : index_target_position(state, row_log_sum(state), targets, x, static_cast<acc_t>(scalars.weight_sum),
                                    scale, a);
    out.max = state.max;
    out.log_sum = r.log_sum;
    out.coefs = r.coefs;
    if (a.mass != Mass::kSoft) {
      out.a = static_cast<int32_t>(targets.a);
      out.b = static_cast<int32_t>(targets.b);
    }
    loss = r.loss;
    lse = r.lse;
  }
  if (write) {
    store_global(a.position_loss + pos, loss);
    store_global(a.lse + pos, lse);
  }
  return out;
}

template <typename acc_t>
__device__ __forceinline__ acc_t grad_value(const RowScalars<acc_t>& r, acc_t x, acc_t class_mass, int64_t c) {
  if (!r.valid) return acc_t(0);
  return grad_at(r.coefs, x, r.max, r.log_sum, class_mass, c == r.a, c == r.b);
}

// ---------------------------------------------------------------- prologue: D, Σw, the range check
// Per-block partial sums of D = Σ_valid w[t] over index targets (mixup: Σ k_a·w[a] + k_b·w[b]), and the
// range check (torch's behaviour, a device-side assert, naming the value).
template <typename scalar_t>
__global__ void target_weight_kernel(KernelArgs<scalar_t> a, double* partial) {
  using acc_t = acc_type<scalar_t>;
  double total = 0.0;
  const int64_t positions = a.outer * a.inner;
  for (int64_t pos = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; pos < positions;
       pos += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t raw[2];
    const PositionTargets<acc_t> t = a.targets_of(pos, true, raw);
    bool in_range = true;
    for (int i = 0; i < 2; ++i) {
      if (raw[i] != a.ignore_index && (raw[i] < 0 || raw[i] >= a.classes)) {
        SMOOTHCE_DEVICE_INDEX_ERROR(raw[i], a.classes, a.ignore_index);
        in_range = false;
      }
    }
    if (!in_range) continue;
    if (t.k_a != acc_t(0)) total += static_cast<double>(t.k_a) * static_cast<double>(a.weight_at(t.a));
    if (t.k_b != acc_t(0)) total += static_cast<double>(t.k_b) * static_cast<double>(a.weight_at(t.b));
  }
  SMOOTHCE_SHARED(double, scratch, kWarp);
  total = group_reduce(Fields<double, 1>{{total}}, blockDim.x, AddOp(), scratch).v[0];
  if (threadIdx.x == 0) store_global(partial + blockIdx.x, total);
}

// One block: the DeviceScalars from the partial sums (fixed order: deterministic).
// `upstream`: a scalar upstream gradient folded into grad_scale, or null.
template <typename acc_t>
__global__ void scalars_kernel(const double* partial, int64_t partials, double fixed_denominator,
                               const acc_t* weight, int64_t classes, int64_t reduction, const acc_t* upstream,
                               DeviceScalars* out) {
  Fields<double, 2> sums{{0.0, 0.0}};
  for (int64_t i = threadIdx.x; i < partials; i += blockDim.x) sums.v[0] += load_global(partial + i);
  for (int64_t c = threadIdx.x; weight && c < classes; c += blockDim.x) sums.v[1] += static_cast<double>(load_global(weight + c));
  SMOOTHCE_SHARED(double, scratch, 2 * kWarp);
  sums = group_reduce(sums, blockDim.x, AddOp(), scratch);
  if (threadIdx.x == 0) {
    const double denominator = fixed_denominator >= 0.0 ? fixed_denominator : sums.v[0];
    const double weight_sum = weight ? sums.v[1] : static_cast<double>(classes);
    const double scale = (reduction == kMean ? 1.0 / denominator : 1.0) *
                         (upstream ? static_cast<double>(load_global(upstream)) : 1.0);
    store_global(out, DeviceScalars{denominator, scale, weight_sum});
  }
}

// ---------------------------------------------------------------- rows: classes contiguous
// A tile of plan.rows_per_block rows per iteration, plan.group threads per row. The tile is staged
// in shared memory (one contiguous run for dense rows, else a row per group), reduced twice (max,
// then Σexp and the mass sums) and the gradient written from shared memory: 1 read + 1 write.
// Every group runs the whole body (rows past the end and ignored rows included) so that warp
// shuffles and barriers see all their threads; their results are discarded.
template <typename scalar_t>
__global__ void __launch_bounds__(512, 1) rows_kernel(KernelArgs<scalar_t> a, Plan plan) {
  using acc_t = acc_type<scalar_t>;
  SMOOTHCE_DYNAMIC_SMEM(unsigned char, smem);
  const int64_t C = a.classes;
  const int G = plan.group, R = plan.rows_per_block;
  const int row_in_tile = threadIdx.x / G, lane = threadIdx.x % G;
  const bool soft = a.mass == Mass::kSoft;
  const int64_t staged = plan.cooperative ? staged_bytes(R * C, sizeof(scalar_t))
                                          : R * plan.row_stride * static_cast<int64_t>(sizeof(scalar_t));
  scalar_t* x_smem = reinterpret_cast<scalar_t*>(smem);
  scalar_t* p_smem = reinterpret_cast<scalar_t*>(smem + staged);
  RowScalars<acc_t>* row_scalars = reinterpret_cast<RowScalars<acc_t>*>(smem + (soft ? 2 : 1) * staged);
  SMOOTHCE_SHARED(acc_t, reduce_scratch, 5 * kWarp);
  const DeviceScalars scalars = load_broadcast(a.scalars, threadIdx.x == 0);
  const int64_t positions = a.outer * a.inner;
  const int64_t tiles = ceil_div(positions, R);

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t row0 = tile * R;
    const int rows = static_cast<int>(positions - row0 < R ? positions - row0 : R);
    const int64_t pos = row0 + row_in_tile;
    const bool active = row_in_tile < rows;

    // 1. stage the logits (and probabilities)
    const scalar_t* x = nullptr;
    const scalar_t* prob = nullptr;
    int x_shift = 0, p_shift = 0;
    if (plan.cooperative) {
      const int64_t base = a.offset_of(row0);
      x_shift = stage_run(a.input + base, rows * C, x_smem, threadIdx.x, blockDim.x);
      if (soft) p_shift = stage_run(a.soft_target + base, rows * C, p_smem, threadIdx.x, blockDim.x);
      x = x_smem + x_shift + row_in_tile * C;
      prob = p_smem + p_shift + row_in_tile * C;
    } else {
      scalar_t* x_row = x_smem + row_in_tile * plan.row_stride;
      scalar_t* p_row = p_smem + row_in_tile * plan.row_stride;
      if (active) {
        x_shift = stage_run(a.input + a.offset_of(pos), C, x_row, lane, G);
        if (soft) p_shift = stage_run(a.soft_target + a.offset_of(pos), C, p_row, lane, G);
      }
      x = x_row + x_shift;
      prob = p_row + p_shift;
    }
    PositionTargets<acc_t> targets{-1, -1, acc_t(0), acc_t(0)};
    bool valid = active;
    if (active && !soft) {
      targets = a.targets_of(pos, lane == 0);
      valid = targets.valid();
    }
    __syncthreads();

    // 2. max, then Σexp and the mass sums relative to it
    acc_t row_max = -std::numeric_limits<acc_t>::infinity();
    for (int64_t c = lane; c < C; c += G) row_max = nan_max(row_max, static_cast<acc_t>(load_shared(x + c)));
    row_max = group_reduce(Fields<acc_t, 1>{{row_max}}, G, MaxOp(), reduce_scratch).v[0];
    const acc_t origin = shift_origin(row_max);
    // Σexp, its part below the max, Σv·(x − origin), Σv, Σv below the max
    Fields<acc_t, 5> sums{{acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)}};
    for (int64_t c = lane; c < C; c += G) {
      const acc_t d = static_cast<acc_t>(load_shared(x + c)) - origin;
      add_to_sums(sums, d, a.mass != Mass::kNone, [&] {
        return a.class_mass(c, soft ? static_cast<acc_t>(load_shared(prob + c)) : acc_t(0));
      });
    }
    sums = group_reduce(sums, G, AddOp(), reduce_scratch);
    RowState<acc_t> state{origin, sums.v[0], sums.v[1], sums.v[2], sums.v[3], sums.v[4]};
    if (a.mass == Mass::kWeighted) state.mass = static_cast<acc_t>(scalars.weight_sum);

    // 3. loss and lse; 4. the gradient from shared memory
    const TargetLogits<acc_t> x_targets =
        a.target_logits(targets, [&](int64_t c) { return static_cast<acc_t>(load_shared(x + c)); }, lane == 0);
    const RowScalars<acc_t> row = finish_position(a, state, pos, targets, valid, x_targets, scalars, active && lane == 0);
    if (a.grad) {
      if (plan.cooperative) {
        if (lane == 0) store_shared(row_scalars + row_in_tile, row);
        __syncthreads();
        const scalar_t* x_run = x_smem + x_shift;
        const scalar_t* p_run = p_smem + p_shift;
        const int row_classes = static_cast<int>(C);
        write_run(a.grad + a.offset_of(row0), rows * C, threadIdx.x, blockDim.x, [&](int64_t e) {
          const int r = static_cast<int>(e) / row_classes, c = static_cast<int>(e) - r * row_classes;
          const acc_t class_mass = a.grad_mass(c, soft ? static_cast<acc_t>(load_shared(p_run + e)) : acc_t(0));
          return grad_value(load_shared(row_scalars + r), static_cast<acc_t>(load_shared(x_run + e)), class_mass, c);
        });
      } else if (active) {
        write_run(a.grad + a.offset_of(pos), C, lane, G, [&](int64_t c) {
          const acc_t class_mass = a.grad_mass(c, soft ? static_cast<acc_t>(load_shared(prob + c)) : acc_t(0));
          return grad_value(row, static_cast<acc_t>(load_shared(x + c)), class_mass, c);
        });
      }
    }
    __syncthreads();  // shared memory is restaged by the next tile
  }
}

// ---------------------------------------------------------------- cluster rows: a row on a cluster's chips
// A cluster of plan.chunks blocks takes one row at a time; block `rank` stages classes
// [rank·chunk, (rank + 1)·chunk) in its shared memory. Each reduction (max, then the sums) is a
// block reduction whose result the block publishes in its shared memory, a cluster barrier, and a
// fixed-order merge of every block's value read through distributed shared memory: the row is read
// once and its gradient written once, however long it is. Peers read only its dynamic shared memory
// (what cluster_smem maps), where it publishes its partials.
template <typename scalar_t>
__global__ void __launch_bounds__(512, 1) cluster_rows_kernel(KernelArgs<scalar_t> a, Plan plan) {
  using acc_t = acc_type<scalar_t>;
  SMOOTHCE_DYNAMIC_SMEM(unsigned char, smem);
  const bool soft = a.mass == Mass::kSoft;
  const int64_t staged = staged_bytes(plan.chunk, sizeof(scalar_t));
  scalar_t* x_smem = reinterpret_cast<scalar_t*>(smem);
  scalar_t* p_smem = reinterpret_cast<scalar_t*>(smem + staged);
  acc_t* reduce_scratch = reinterpret_cast<acc_t*>(smem + (soft ? 2 : 1) * staged);  // 5 × 32 values
  acc_t* published = reduce_scratch + 5 * kWarp;  // this block's max and sums, read by the cluster
  const unsigned rank = cluster_rank(), blocks = static_cast<unsigned>(plan.chunks);
  const int64_t c0 = rank * plan.chunk;
  const int64_t n = a.classes - c0 < plan.chunk ? (a.classes > c0 ? a.classes - c0 : 0) : plan.chunk;
  const DeviceScalars scalars = load_broadcast(a.scalars, threadIdx.x == 0);
  const int64_t positions = a.outer * a.inner, clusters = gridDim.x / blocks;
  const bool leader = rank == 0 && threadIdx.x == 0;  // writes loss and lse

  for (int64_t pos = blockIdx.x / blocks; pos < positions; pos += clusters) {
    const scalar_t* row = a.input + a.offset_of(pos);
    const int x_shift = stage_run(row + c0, n, x_smem, threadIdx.x, blockDim.x);
    const int p_shift = soft ? stage_run(a.soft_target + a.offset_of(pos) + c0, n, p_smem, threadIdx.x, blockDim.x) : 0;
    const scalar_t* x = x_smem + x_shift;
    const scalar_t* prob = p_smem + p_shift;
    const PositionTargets<acc_t> targets =
        soft ? PositionTargets<acc_t>{-1, -1, acc_t(0), acc_t(0)} : a.targets_of(pos, threadIdx.x == 0);
    const bool valid = soft || targets.valid();
    // Target logits from global memory now: other blocks of the cluster write their gradient chunks
    // after the second cluster barrier, possibly over the logits (inplace_backward).
    const TargetLogits<acc_t> x_targets = a.target_logits(
        targets, [&](int64_t c) { return static_cast<acc_t>(load_broadcast(row + c, leader)); }, leader);
    __syncthreads();

    acc_t row_max = -std::numeric_limits<acc_t>::infinity();
    for (int64_t c = threadIdx.x; c < n; c += blockDim.x)
      row_max = nan_max(row_max, static_cast<acc_t>(load_shared(x + c)));
    row_max = group_reduce(Fields<acc_t, 1>{{row_max}}, blockDim.x, MaxOp(), reduce_scratch).v[0];
    if (threadIdx.x == 0) store_shared(published, row_max);
    cluster_sync();
    for (unsigned r = 0; r < blocks; ++r) row_max = nan_max(row_max, load_shared(cluster_smem(published, r)));
    const acc_t origin = shift_origin(row_max);

    // Σexp, its part below the max, Σv·(x − origin), Σv, Σv below the max
    Fields<acc_t, 5> sums{{acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)}};
    for (int64_t c = threadIdx.x; c < n; c += blockDim.x) {
      const acc_t d = static_cast<acc_t>(load_shared(x + c)) - origin;
      add_to_sums(sums, d, a.mass != Mass::kNone, [&] {
        return a.class_mass(c0 + c, soft ? static_cast<acc_t>(load_shared(prob + c)) : acc_t(0));
      });
    }
    sums = group_reduce(sums, blockDim.x, AddOp(), reduce_scratch);
    if (threadIdx.x == 0)
      for (int i = 0; i < 5; ++i) store_shared(published + 1 + i, sums.v[i]);
    cluster_sync();  // (published[0] of the next row is written after every block passed this one)
    Fields<acc_t, 5> total{{acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)}};
    for (unsigned r = 0; r < blocks; ++r) {
      const acc_t* remote = cluster_smem(published, r);
      for (int i = 0; i < 5; ++i) total.v[i] += load_shared(remote + 1 + i);
    }
    RowState<acc_t> state{origin, total.v[0], total.v[1], total.v[2], total.v[3], total.v[4]};
    if (a.mass == Mass::kWeighted) state.mass = static_cast<acc_t>(scalars.weight_sum);

    const RowScalars<acc_t> result = finish_position(a, state, pos, targets, valid, x_targets, scalars, leader);
    if (a.grad)
      write_run(a.grad + a.offset_of(pos) + c0, n, threadIdx.x, blockDim.x, [&](int64_t c) {
        const acc_t class_mass = a.grad_mass(c0 + c, soft ? static_cast<acc_t>(load_shared(prob + c)) : acc_t(0));
        return grad_value(result, static_cast<acc_t>(load_shared(x + c)), class_mass, c0 + c);
      });
    __syncthreads();  // the staged chunk is restaged by the next row
  }
  cluster_sync();  // no block leaves while another may still read its published values
}

// ---------------------------------------------------------------- split rows: C too long for shared memory
// Work item = (position, chunk of plan.chunk classes). Pass 1: each block folds its chunk into one
// online-softmax state, written to `partial` (one read of the logits); the block whose chunk holds an
// index target also copies that logit to target_x[2·pos] (target) or [2·pos + 1] (mixup partner), so
// that pass 2 never reads a logit another block may already have overwritten (inplace_backward).
template <typename scalar_t>
__global__ void __launch_bounds__(512, 1) split_state_kernel(KernelArgs<scalar_t> a, Plan plan,
                                                          RowState<acc_type<scalar_t>>* partial,
                                                          acc_type<scalar_t>* target_x) {
  using acc_t = acc_type<scalar_t>;
  const bool soft = a.mass == Mass::kSoft;
  for (int64_t item = blockIdx.x; item < plan.work; item += gridDim.x) {
    const int64_t pos = item / plan.chunks, c0 = (item % plan.chunks) * plan.chunk;
    const int64_t n = a.classes - c0 < plan.chunk ? a.classes - c0 : plan.chunk;
    const int64_t offset = a.offset_of(pos) + c0;
    RowState<acc_t> state = RowState<acc_t>::empty();
    read_run(a.input + offset, n, threadIdx.x, blockDim.x, [&](int64_t e, scalar_t x) {
      if (a.mass == Mass::kNone) {
        accumulate<acc_t, false>(state, static_cast<acc_t>(x), acc_t(0));
      } else {
        const acc_t prob = soft ? static_cast<acc_t>(load_global(a.soft_target + offset + e)) : acc_t(0);
        accumulate<acc_t, true>(state, static_cast<acc_t>(x), a.class_mass(c0 + e, prob));
      }
    });
    state = block_merge(state);
    if (threadIdx.x == 0) {
      store_global(partial + item, state);
      if (!soft) {
        const PositionTargets<acc_t> t = a.targets_of(pos);
        if (t.a >= c0 && t.a < c0 + n) store_global(target_x + 2 * pos, static_cast<acc_t>(load_global(a.input + offset + (t.a - c0))));
        if (t.b >= c0 && t.b < c0 + n) store_global(target_x + 2 * pos + 1, static_cast<acc_t>(load_global(a.input + offset + (t.b - c0))));
      }
    }
  }
}

// Pass 2: each block merges its position's chunk states (the whole block, in a fixed order:
// deterministic; one load per thread, not chunks loads in a row on one thread), the chunk-0 block
// writes loss and lse, and with a gradient every block re-reads its chunk and writes it (items =
// positions × chunks; positions alone without a gradient).
template <typename scalar_t>
__global__ void __launch_bounds__(512, 1) split_finish_kernel(KernelArgs<scalar_t> a, Plan plan, int64_t items,
                                                           const RowState<acc_type<scalar_t>>* partial,
                                                           const acc_type<scalar_t>* target_x) {
  using acc_t = acc_type<scalar_t>;
  SMOOTHCE_SHARED(RowScalars<acc_t>, shared_row, 1);
  const bool soft = a.mass == Mass::kSoft;
  const int64_t per_position = a.grad ? plan.chunks : 1;
  const DeviceScalars scalars = load_broadcast(a.scalars, threadIdx.x == 0);
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t pos = item / per_position, chunk = item % per_position;
    RowState<acc_t> state = RowState<acc_t>::empty();
    for (int64_t k = threadIdx.x; k < plan.chunks; k += blockDim.x)
      state = merge(state, load_global(partial + pos * plan.chunks + k));
    state = block_merge(state);
    if (threadIdx.x == 0) {
      if (a.mass == Mass::kUnit) state.mass = static_cast<acc_t>(a.classes);
      if (a.mass == Mass::kWeighted) state.mass = static_cast<acc_t>(scalars.weight_sum);
      const PositionTargets<acc_t> targets = soft ? PositionTargets<acc_t>{-1, -1, acc_t(0), acc_t(0)} : a.targets_of(pos);
      const bool valid = soft || targets.valid();
      const TargetLogits<acc_t> x_targets = a.target_logits(
          targets, [&](int64_t c) { return load_global(target_x + 2 * pos + (c == targets.a ? 0 : 1)); }, true);
      store_shared(shared_row, finish_position(a, state, pos, targets, valid, x_targets, scalars, chunk == 0));
    }
    __syncthreads();
    if (a.grad) {
      const RowScalars<acc_t> row = load_shared(shared_row);
      const int64_t c0 = chunk * plan.chunk;
      const int64_t n = a.classes - c0 < plan.chunk ? a.classes - c0 : plan.chunk;
      const int64_t offset = a.offset_of(pos) + c0;
      map_run(a.input + offset, a.grad + offset, n, threadIdx.x, blockDim.x, [&](int64_t e, scalar_t x) {
        const acc_t prob = soft ? static_cast<acc_t>(load_global(a.soft_target + offset + e)) : acc_t(0);
        return grad_value(row, static_cast<acc_t>(x), a.grad_mass(c0 + e, prob), c0 + e);
      });
    }
    // (no barrier here: thread 0 rewrites shared_row in the next item only after block_merge's first
    // barrier, which every reader of this item's shared_row has passed)
  }
}

// ---------------------------------------------------------------- strided: a thread per position
// Consecutive threads take consecutive positions (contiguous in memory: coalesced loads), each
// walking its classes with their stride in one online-softmax pass. With plan.staged the block's
// C × threads tile (and probabilities) stays in shared memory for the gradient (1 read + 1 write);
// otherwise the gradient pass reads the logits again. No barriers: a thread touches only its column.
// Four blocks of 256 threads per SM (64 registers a thread) for the 2- and 4-byte types: the chunked
// sums (walk_chunk) took bf16 and fp16 to 71 registers on sm_90 (64 before), three blocks; with the
// bound ptxas fits every type but fp64 in 60–64 without spilling (cuda-check). Unmeasured on a GPU.
template <typename scalar_t>
__global__ void __launch_bounds__(256, sizeof(scalar_t) <= 4 ? 4 : 1) strided_kernel(KernelArgs<scalar_t> a, Plan plan) {
  using acc_t = acc_type<scalar_t>;
  SMOOTHCE_DYNAMIC_SMEM(scalar_t, tile);
  const int64_t C = a.classes, T = blockDim.x;
  const bool soft = a.mass == Mass::kSoft;
  // A smoothed probability target's Σv and its part below the max, summed compensated past 32 classes
  // (accumulate_compensated; as the CPU tiles do): on the emulator with the device's arithmetic, summed
  // plainly, a confident position's gradient at its max was 27 ulps off at 150 classes (ε = 0.1).
  const bool compensated = soft && a.eps != acc_t(0) && C > 32;
  const int64_t chunk = walk_chunk(C);
  scalar_t* x_tile = tile + threadIdx.x;
  scalar_t* p_tile = tile + C * T + threadIdx.x;
  const DeviceScalars scalars = load_broadcast(a.scalars, threadIdx.x == 0);
  const int64_t tiles_per_outer = ceil_div(a.inner, T);
  for (int64_t item = blockIdx.x; item < plan.work; item += gridDim.x) {
    const int64_t n = item / tiles_per_outer, s = (item % tiles_per_outer) * T + threadIdx.x;
    if (s >= a.inner) continue;
    const int64_t pos = n * a.inner + s;
    const int64_t base = n * a.stride_outer + s * a.stride_inner;
    const PositionTargets<acc_t> targets = soft ? PositionTargets<acc_t>{-1, -1, acc_t(0), acc_t(0)} : a.targets_of(pos);
    const bool valid = soft || targets.valid();
    // The classes are summed in chunks of walk_chunk(C) (row_math.h): `part` sums the chunk's at the running
    // max, `state`, kept at the same max, takes them when the chunk is whole (fold_sums).
    RowState<acc_t> state = RowState<acc_t>::empty(), part = state;
    MassLost<acc_t> lost;  // part's (compensated: its mass sums run over all the classes)
    int64_t filled = 0;
    auto consume = [&](int64_t c, scalar_t x) {
      if (plan.staged) store_shared(x_tile + c * T, x);
      if (a.mass == Mass::kNone) {
        accumulate<acc_t, false>(part, static_cast<acc_t>(x), acc_t(0));
      } else {
        acc_t prob = acc_t(0);
        if (soft) {
          const scalar_t p = load_global(a.soft_target + base + c * a.stride_class);
          if (plan.staged) store_shared(p_tile + c * T, p);
          prob = static_cast<acc_t>(p);
        }
        if (compensated)
          accumulate_compensated(part, lost, static_cast<acc_t>(x), a.class_mass(c, prob));
        else
          accumulate<acc_t, true>(part, static_cast<acc_t>(x), a.class_mass(c, prob));
      }
      if (part.max != state.max) shift_to(state, part.max);  // (a NaN: at every class, NaN stays)
      if (++filled == chunk) {
        fold_sums(state, part, !compensated);
        filled = 0;
      }
    };
    int64_t next = 0;
    for (; next + kPacksInFlight <= C; next += kPacksInFlight) {  // several loads in flight, then their use
      scalar_t batch[kPacksInFlight];
      for (int u = 0; u < kPacksInFlight; ++u) batch[u] = load_global(a.input + base + (next + u) * a.stride_class);
      for (int u = 0; u < kPacksInFlight; ++u) consume(next + u, batch[u]);
    }
    for (; next < C; ++next) consume(next, load_global(a.input + base + next * a.stride_class));
    fold_sums(state, part, true);
    if (a.mass == Mass::kWeighted) state.mass = static_cast<acc_t>(scalars.weight_sum);
    auto x_at = [&](int64_t c) {
      return static_cast<acc_t>(plan.staged ? load_shared(x_tile + c * T) : load_global(a.input + base + c * a.stride_class));
    };
    auto p_at = [&](int64_t c) {
      if (!soft) return acc_t(0);
      return static_cast<acc_t>(plan.staged ? load_shared(p_tile + c * T)
                                            : load_global(a.soft_target + base + c * a.stride_class));
    };
    const RowScalars<acc_t> row =
        finish_position(a, state, pos, targets, valid, a.target_logits(targets, x_at, true), scalars, true);
    if (a.grad)
      for (int64_t c = 0; c < C; ++c)
        store_global(a.grad + base + c * a.stride_class,
              static_cast<scalar_t>(valid ? grad_value(row, x_at(c), a.grad_mass(c, p_at(c)), c) : acc_t(0)));
  }
}

// ---------------------------------------------------------------- vocabulary-parallel shards
// The input is one rank's shard of the classes as contiguous rows (positions, classes): global
// classes [start, start + classes) of num_classes; index targets are global (docs/semantics.md §10).
// shard_stats_kernel reads the shard once for its ShardStats per position; shard_weight_kernel and
// shard_finish_kernel take every rank's (stacked in rank order, rank r's at stats + r·rank_stride):
// the mean's D from the targets' merged weights, then per position the merged statistics, loss and
// lse, and with a gradient the shard re-read and its gradient written (2 reads + 1 write in all).
struct ShardPlace {
  int64_t start, num_classes;
};

// The position's targets among all classes (range num_classes); `raw` as KernelArgs::targets_of.
template <typename scalar_t>
__device__ PositionTargets<acc_type<scalar_t>> global_targets(const KernelArgs<scalar_t>& a, const ShardPlace& shard,
                                                              int64_t pos, bool counted, int64_t* raw = nullptr) {
  const int64_t off = a.target_offset_of(pos);
  const int64_t t_a = load_broadcast(a.target + off, counted);
  const int64_t t_b = a.target_b ? load_broadcast(a.target_b + off, counted) : a.ignore_index;
  const acc_type<scalar_t> share = a.lam ? load_broadcast(a.lam + pos, counted) : a.lam_value;
  if (raw) {
    raw[0] = t_a;
    raw[1] = t_b;
  }
  return position_targets<acc_type<scalar_t>>(t_a, t_b, share, a.ignore_index, shard.num_classes);
}

// The same targets as columns of the shard (−1 where another rank holds the class).
template <typename acc_t>
__device__ PositionTargets<acc_t> shard_columns(PositionTargets<acc_t> t, const ShardPlace& shard, int64_t classes) {
  auto local = [&](int64_t c) { return c >= shard.start && c < shard.start + classes ? c - shard.start : -1; };
  t.a = t.a >= 0 ? local(t.a) : -1;
  t.b = t.b >= 0 ? local(t.b) : -1;
  return t;
}

// The ShardStats at stats[offset] (kShardStats values, as ShardStats::store lays them out).
template <typename acc_t>
__device__ __forceinline__ const ShardStats<acc_t>* shard_stats_at(const acc_t* stats, int64_t offset) {
  static_assert(sizeof(ShardStats<acc_t>) == kShardStats * sizeof(acc_t), "ShardStats: kShardStats values");
  return reinterpret_cast<const ShardStats<acc_t>*>(stats + offset);
}
template <typename acc_t>
__device__ __forceinline__ ShardStats<acc_t>* shard_stats_at(acc_t* stats, int64_t offset) {
  return const_cast<ShardStats<acc_t>*>(shard_stats_at(static_cast<const acc_t*>(stats), offset));
}

// A block per position (grid-stride): the shard's RowState, and its logits and weights at the targets.
template <typename scalar_t>
__global__ void __launch_bounds__(512, 1) shard_stats_kernel(KernelArgs<scalar_t> a, ShardPlace shard,
                                                          acc_type<scalar_t>* stats) {
  using acc_t = acc_type<scalar_t>;
  const bool soft = a.mass == Mass::kSoft;
  for (int64_t pos = blockIdx.x; pos < a.outer; pos += gridDim.x) {
    const int64_t offset = a.offset_of(pos);
    int64_t raw[2];
    const PositionTargets<acc_t> t = soft ? PositionTargets<acc_t>{-1, -1, acc_t(0), acc_t(0)}
                                          : global_targets(a, shard, pos, threadIdx.x == 0, raw);
    const bool valid = soft || t.valid();
    RowState<acc_t> state = RowState<acc_t>::empty();
    if (valid) {
      read_run(a.input + offset, a.classes, threadIdx.x, blockDim.x, [&](int64_t e, scalar_t x) {
        if (a.mass == Mass::kNone) {
          accumulate<acc_t, false>(state, static_cast<acc_t>(x), acc_t(0));
        } else {
          const acc_t prob = soft ? static_cast<acc_t>(load_global(a.soft_target + offset + e)) : acc_t(0);
          accumulate<acc_t, true>(state, static_cast<acc_t>(x), a.class_mass(e, prob));
        }
      });
    }
    state = block_merge(state);
    if (threadIdx.x == 0) {
      if (!soft) {
        for (int i = 0; i < 2; ++i)
          if (raw[i] != a.ignore_index && (raw[i] < 0 || raw[i] >= shard.num_classes))
            SMOOTHCE_DEVICE_INDEX_ERROR(raw[i], shard.num_classes, a.ignore_index);
      }
      ShardStats<acc_t> out{valid ? state : RowState<acc_t>::empty(), {acc_t(0), acc_t(0), acc_t(0), acc_t(0)}};
      if (valid && !soft)
        out.target = a.target_logits(shard_columns(t, shard, a.classes),
                                     [&](int64_t c) { return static_cast<acc_t>(load_global(a.input + offset + c)); },
                                     true);
      store_global(shard_stats_at(stats, pos * kShardStats), out);
    }
  }
}

// Per-block partial sums of D = Σ k_a·w_a + k_b·w_b over the valid positions, the weights at the
// targets summed over the ranks' statistics (the rank holding a target gave its weight, the others 0).
template <typename scalar_t>
__global__ void shard_weight_kernel(KernelArgs<scalar_t> a, ShardPlace shard, const acc_type<scalar_t>* stats,
                                    int64_t ranks, int64_t rank_stride, double* partial) {
  using acc_t = acc_type<scalar_t>;
  double total = 0.0;
  for (int64_t pos = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; pos < a.outer;
       pos += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const PositionTargets<acc_t> t = global_targets(a, shard, pos, true);
    if (!t.valid()) continue;
    acc_t w_a = acc_t(0), w_b = acc_t(0);
    for (int64_t r = 0; r < ranks; ++r) {
      const ShardStats<acc_t> s = load_global(shard_stats_at(stats, r * rank_stride + pos * kShardStats));
      w_a += s.target.w_a;
      w_b += s.target.w_b;
    }
    if (t.k_a != acc_t(0)) total += static_cast<double>(t.k_a) * static_cast<double>(w_a);
    if (t.k_b != acc_t(0)) total += static_cast<double>(t.k_b) * static_cast<double>(w_b);
  }
  SMOOTHCE_SHARED(double, scratch, kWarp);
  total = group_reduce(Fields<double, 1>{{total}}, blockDim.x, AddOp(), scratch).v[0];
  if (threadIdx.x == 0) store_global(partial + blockIdx.x, total);
}

// A block per position (grid-stride): thread 0 merges the ranks' statistics in rank order (the same
// on every rank), writes loss and lse; with a gradient the block then writes the shard's.
template <typename scalar_t>
__global__ void __launch_bounds__(512, 1) shard_finish_kernel(KernelArgs<scalar_t> a, ShardPlace shard,
                                                           const acc_type<scalar_t>* stats, int64_t ranks,
                                                           int64_t rank_stride) {
  using acc_t = acc_type<scalar_t>;
  SMOOTHCE_SHARED(RowScalars<acc_t>, shared_row, 1);
  const bool soft = a.mass == Mass::kSoft;
  const DeviceScalars scalars = load_broadcast(a.scalars, threadIdx.x == 0);
  for (int64_t pos = blockIdx.x; pos < a.outer; pos += gridDim.x) {
    if (threadIdx.x == 0) {
      const ShardStats<acc_t> all = merge_shards<acc_t>(
          [&](int64_t r) { return load_global(shard_stats_at(stats, r * rank_stride + pos * kShardStats)); }, ranks);
      const PositionTargets<acc_t> t =
          soft ? PositionTargets<acc_t>{-1, -1, acc_t(0), acc_t(0)} : global_targets(a, shard, pos, true);
      const bool valid = soft || t.valid();
      DeviceScalars position_scalars = scalars;
      position_scalars.weight_sum = static_cast<double>(all.state.mass);  // Σ_c w_c over every rank's classes
      RowScalars<acc_t> row = finish_position(a, all.state, pos, t, valid, all.target, position_scalars, true);
      if (valid && !soft) {  // the gradient's target columns, in this shard
        const PositionTargets<acc_t> columns = shard_columns(t, shard, a.classes);
        row.a = static_cast<int32_t>(columns.a);
        row.b = static_cast<int32_t>(columns.b);
      }
      store_shared(shared_row, row);
    }
    __syncthreads();
    if (a.grad) {
      const RowScalars<acc_t> row = load_shared(shared_row);
      const int64_t offset = a.offset_of(pos);
      map_run(a.input + offset, a.grad + offset, a.classes, threadIdx.x, blockDim.x, [&](int64_t e, scalar_t x) {
        const acc_t prob = soft ? static_cast<acc_t>(load_global(a.soft_target + offset + e)) : acc_t(0);
        return grad_value(row, static_cast<acc_t>(x), a.grad_mass(e, prob), e);
      });
    }
    __syncthreads();  // every reader of shared_row is done before thread 0 writes the next position's
  }
}

// ---------------------------------------------------------------- backward: grad *= grad_output
// A scalar upstream gradient read on the device: when it is 1 (plain loss.backward() on mean/sum)
// every block returns at once, so the fused gradient costs nothing more and the host never syncs.
// Otherwise one read and one write of the gradient (a dense tensor walked as its flat storage).
template <typename scalar_t>
__global__ void scale_grad_kernel(scalar_t* grad, int64_t numel, const acc_type<scalar_t>* grad_output) {
  using acc_t = acc_type<scalar_t>;
  const acc_t scale = load_broadcast(grad_output, threadIdx.x == 0);
  if (scale == acc_t(1)) return;
  map_run(grad, grad, numel, blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x,
          static_cast<int64_t>(gridDim.x) * blockDim.x,
          [&](int64_t, scalar_t g) { return static_cast<acc_t>(g) * scale; });
}

}  // namespace smoothce::cuda
