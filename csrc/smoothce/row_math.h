// Per-position math shared by every backend (CPU lanes, CUDA threads/warps/blocks).
// Formulas: ../../shared/SEMANTICS.md §2, §3 and §7 (cited, not copied). Written once, here.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SMOOTHCE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SMOOTHCE_HOST_DEVICE inline
#endif

namespace smoothce {

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };  // = at::Reduction values

// Accumulation type: fp64 for fp64 logits, fp32 for everything else (half types included).
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// How the per-class "mass" v_c of RowState is formed: none (ε = 0, index targets), unit (v = 1),
// weighted (v = w_c), soft (v = w_c·q_c, probability targets).
enum class Mass : int { kNone = 0, kUnit = 1, kWeighted = 2, kSoft = 3 };

template <typename acc_t>
SMOOTHCE_HOST_DEVICE Mass mass_kind(bool soft_target, acc_t off_value, bool weighted) {
  if (soft_target) return Mass::kSoft;
  if (off_value == acc_t(0)) return Mass::kNone;
  return weighted ? Mass::kWeighted : Mass::kUnit;
}

// Target distribution of an index target: q = on at the target class, off elsewhere (§7).
template <typename acc_t>
struct TargetValues {
  acc_t on;
  acc_t off;
};

template <typename acc_t>
SMOOTHCE_HOST_DEVICE TargetValues<acc_t> uniform_smoothing(acc_t eps, int64_t num_classes) {
  const acc_t off = eps / static_cast<acc_t>(num_classes);
  return {acc_t(1) - eps + off, off};
}

// The smoothing constants a kernel needs: ε, ε/C (probability targets) and (on, off) (index targets).
template <typename acc_t>
struct Smoothing {
  acc_t eps, eps_over_c;
  TargetValues<acc_t> tv;

  static Smoothing uniform(double label_smoothing, int64_t num_classes) {
    const int64_t C = num_classes > 0 ? num_classes : 1;
    const acc_t eps = static_cast<acc_t>(label_smoothing);
    return {eps, static_cast<acc_t>(label_smoothing / static_cast<double>(C)), uniform_smoothing<acc_t>(eps, C)};
  }
};

// Where a position's classes and target are (the Problem view of csrc/smoothce/problem.h, without
// its tensors): x[n, c, s] at n·stride_outer + c·stride_class + s·stride_inner, position pos = n·inner + s.
struct PositionLayout {
  int64_t classes, outer, inner;
  int64_t stride_outer, stride_class, stride_inner;
  int64_t target_stride_outer, target_stride_inner;  // index targets
  int64_t ignore_index;

  // (no division when inner = 1, the (N, C) case)
  SMOOTHCE_HOST_DEVICE int64_t offset_of(int64_t pos) const {
    return inner == 1 ? pos * stride_outer : (pos / inner) * stride_outer + (pos % inner) * stride_inner;
  }
  SMOOTHCE_HOST_DEVICE int64_t target_offset(int64_t n, int64_t s) const {
    return n * target_stride_outer + s * target_stride_inner;
  }
  SMOOTHCE_HOST_DEVICE int64_t target_offset_of(int64_t pos) const {
    return inner == 1 ? target_offset(pos, 0) : target_offset(pos / inner, pos % inner);
  }
};

// Online-softmax state of a set of logits x_c with per-class "mass" v_c (v = w for index targets'
// smoothing term, v = w·q for probability targets):
//   max       = max_c x_c
//   sum_exp   = Σ exp(x_c − max)
//   mass_dx   = Σ v_c·(x_c − max)        (kept relative to max: no cancellation for large logits)
//   mass      = Σ v_c
// Merging two states is associative, so the same merge serves vector lanes, blocks of a row,
// warps and thread blocks.
template <typename acc_t>
struct RowState {
  acc_t max;
  acc_t sum_exp;
  acc_t mass_dx;
  acc_t mass;

  SMOOTHCE_HOST_DEVICE static RowState empty() {
    return {-std::numeric_limits<acc_t>::infinity(), acc_t(0), acc_t(0), acc_t(0)};
  }
};

// Rescales a state to a new (larger or equal) max. A state whose max is −inf (all logits −inf)
// keeps sum_exp = 0; its mass_dx is −inf already when it holds mass, so nothing is lost.
template <typename acc_t>
SMOOTHCE_HOST_DEVICE void shift_to(RowState<acc_t>& s, acc_t new_max) {
  if (s.max == new_max) return;
  const acc_t delta = s.max - new_max;  // ≤ 0, or NaN when a NaN logit was seen
  s.sum_exp *= std::exp(delta);
  if (s.mass != acc_t(0)) s.mass_dx += s.mass * delta;
  s.max = new_max;
}

template <typename acc_t>
SMOOTHCE_HOST_DEVICE RowState<acc_t> merge(RowState<acc_t> a, RowState<acc_t> b) {
  // NaN-propagating max: a NaN logit anywhere must make the row NaN.
  const acc_t m = (a.max != a.max || b.max != b.max) ? a.max + b.max : (a.max > b.max ? a.max : b.max);
  shift_to(a, m);
  shift_to(b, m);
  return {m, a.sum_exp + b.sum_exp, a.mass_dx + b.mass_dx, a.mass + b.mass};
}

// The origin a block's relative sums are taken from: its max, or 0 when every logit is −inf
// (so x − origin is −inf, not −inf − (−inf) = NaN, and exp() of it is 0).
template <typename acc_t>
SMOOTHCE_HOST_DEVICE acc_t shift_origin(acc_t block_max) {
  return block_max == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : block_max;
}

// log p(x) = (x − max) − log Σexp. Subtracting the max first keeps log Σexp exact where it is tiny
// (confident rows) instead of rounding it into max + log Σexp, as torch's log_softmax does.
template <typename acc_t>
SMOOTHCE_HOST_DEVICE acc_t log_prob(const RowState<acc_t>& s, acc_t log_sum_exp, acc_t x) {
  return (x - s.max) - log_sum_exp;
}

// −Σ v_c·lp_c = Σ v_c·(lse − x_c) = mass·log(sum_exp) − mass_dx (log_sum_exp = log(s.sum_exp), passed
// in: the callers need it too). Zero mass contributes exactly 0 (so ε = 0 never turns a −inf logit
// into 0·inf = NaN).
template <typename acc_t>
SMOOTHCE_HOST_DEVICE acc_t mass_nll(const RowState<acc_t>& s, acc_t log_sum_exp) {
  if (s.mass == acc_t(0)) return acc_t(0);
  return s.mass * log_sum_exp - s.mass_dx;
}

// Loss of one valid position with an index target t (§2, §7):
//   ℓ = off·Σ_c w_c·(lse − x_c) + (on − off)·w_t·(lse − x_t),
// where `state.mass` = Σ w_c (the smoothing mass) when off ≠ 0 and the row state carries it.
template <typename acc_t>
SMOOTHCE_HOST_DEVICE acc_t index_target_loss(const RowState<acc_t>& state, acc_t log_sum_exp, acc_t x_target,
                                             acc_t w_target, TargetValues<acc_t> tv) {
  acc_t loss = acc_t(0);
  if (tv.off != acc_t(0)) loss += tv.off * mass_nll(state, log_sum_exp);
  const acc_t peak = (tv.on - tv.off) * w_target;
  if (peak != acc_t(0)) loss -= peak * log_prob(state, log_sum_exp, x_target);
  return loss;
}

// Gradient of one position, index target: ∂ℓ/∂x_j = scale·[Σq_w·p_j − w_j·q_j], where
// Σq_w = off·Σ_c w_c + (on − off)·w_t. The kernels evaluate it as
//   softmax_coef·exp(log_prob(x_j)) − off_coef·w_j      for j ≠ t, and subtract peak_coef at j = t
// (grad_element below; at j = t with p_t = exp(log_prob(x_t)) computed exactly, as p_t − 1 cancels).
template <typename acc_t>
struct IndexGradCoefs {
  acc_t softmax_coef;  // scale·Σq_w
  acc_t off_coef;      // scale·off
  acc_t peak_coef;     // scale·(on − off)·w_t
};

template <typename acc_t>
SMOOTHCE_HOST_DEVICE IndexGradCoefs<acc_t> index_grad_coefs(acc_t scale, acc_t weight_sum, acc_t w_target,
                                                            TargetValues<acc_t> tv) {
  const acc_t peak = (tv.on - tv.off) * w_target;
  return {scale * (tv.off * weight_sum + peak), scale * tv.off, scale * peak};
}

// One gradient element ∂ℓ/∂x_j from the position's coefficients (index targets: class_mass = w_j;
// probability targets: class_mass = w_j·q_j with softmax_coef = scale·Σ w·q, off_coef = scale and
// peak_coef = 0). A zero off_coef contributes nothing (no 0·inf).
template <typename acc_t>
SMOOTHCE_HOST_DEVICE acc_t grad_element(const IndexGradCoefs<acc_t>& k, acc_t prob, acc_t class_mass,
                                        bool is_target) {
  acc_t g = k.softmax_coef * prob;
  if (k.off_coef != acc_t(0)) g -= k.off_coef * class_mass;
  if (is_target) g -= k.peak_coef;
  return g;
}

// Everything a valid position's loss and gradient need, from its finished RowState.
template <typename acc_t>
struct PositionResult {
  acc_t lse;      // max + log Σexp
  acc_t log_sum;  // log Σexp (relative to max)
  acc_t loss;
  IndexGradCoefs<acc_t> coefs;
};

// Probability targets: `state.mass` = Σ w·q of the row (§3).
template <typename acc_t>
SMOOTHCE_HOST_DEVICE PositionResult<acc_t> soft_target_position(const RowState<acc_t>& state, acc_t scale) {
  const acc_t log_sum = std::log(state.sum_exp);
  return {state.max + log_sum, log_sum, mass_nll(state, log_sum), {scale * state.mass, scale, acc_t(0)}};
}

// Index targets: `state.mass` = Σ_c w_c when tv.off ≠ 0 (§2, §7).
template <typename acc_t>
SMOOTHCE_HOST_DEVICE PositionResult<acc_t> index_target_position(const RowState<acc_t>& state, acc_t x_target,
                                                                 acc_t w_target, acc_t weight_sum, acc_t scale,
                                                                 TargetValues<acc_t> tv) {
  const acc_t log_sum = std::log(state.sum_exp);
  return {state.max + log_sum, log_sum, index_target_loss(state, log_sum, x_target, w_target, tv),
          index_grad_coefs(scale, weight_sum, w_target, tv)};
}

// Adds one logit x with mass v to a state kept relative to its running max (the online softmax of
// one thread walking a strided row): rescales when x raises the max; a NaN poisons the state.
template <typename acc_t, bool kWithMass>
SMOOTHCE_HOST_DEVICE void accumulate(RowState<acc_t>& s, acc_t x, acc_t v) {
  if (!(x <= s.max)) shift_to(s, (x != x || s.max != s.max) ? x + s.max : x);
  const acc_t d = x - shift_origin(s.max);
  s.sum_exp += std::exp(d);
  if (kWithMass) {
    s.mass_dx += v * d;
    s.mass += v;
  }
}

// Probability target mass of class c: w_c·q_c with q = (1 − ε)·P + ε/C (§3).
template <typename acc_t>
SMOOTHCE_HOST_DEVICE acc_t soft_target_q(acc_t prob, acc_t eps, acc_t eps_over_c) {
  return (acc_t(1) - eps) * prob + eps_over_c;
}

}  // namespace smoothce
