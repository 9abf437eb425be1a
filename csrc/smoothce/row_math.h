// Per-position math shared by every backend (CPU lanes, CUDA threads/warps/blocks).
// Formulas: docs/semantics.md §2-§3 (smoothce/reference.py computes the same in plain PyTorch).
// Section numbers (§) below are that page's. Written once, here.
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

// The emulator (tests/emu/arith.h) replaces the kernels' exp, log and division by the device's
// fast-math versions. A function of this file that calls smoothce::math carries SMOOTHCE_MATH_ABI:
// under the emulator its symbol differs from the plain build's (the emulator's module links
// csrc/problem.cpp, which includes this file without the emulator: one name, two bodies otherwise).
#if defined(SMOOTHCE_EMULATOR)
#define SMOOTHCE_MATH_ABI __attribute__((abi_tag("emu_arith")))
#else
#define SMOOTHCE_MATH_ABI
#endif

// exp, log, log1p and division in the math every backend shares: std::exp, std::log, std::log1p and
// a / b, or, under the emulator, emu::arith's (exact, or the device's fast-math arithmetic). Device
// computations here use them; host-only ones (Smoothing::make) keep the plain operators.
namespace smoothce::math {
template <typename T>
SMOOTHCE_HOST_DEVICE SMOOTHCE_MATH_ABI T exp(T x) {
#if defined(SMOOTHCE_EMULATOR)
  return ::emu::arith::exp(x);
#else
  return std::exp(x);
#endif
}
template <typename T>
SMOOTHCE_HOST_DEVICE SMOOTHCE_MATH_ABI T log(T x) {
#if defined(SMOOTHCE_EMULATOR)
  return ::emu::arith::log(x);
#else
  return std::log(x);
#endif
}
template <typename T>
SMOOTHCE_HOST_DEVICE SMOOTHCE_MATH_ABI T log1p(T x) {
#if defined(SMOOTHCE_EMULATOR)
  return ::emu::arith::log1p(x);
#else
  return std::log1p(x);
#endif
}
template <typename T>
SMOOTHCE_HOST_DEVICE SMOOTHCE_MATH_ABI T div(T a, T b) {
#if defined(SMOOTHCE_EMULATOR)
  return ::emu::arith::div(a, b);
#else
  return a / b;
#endif
}
}  // namespace smoothce::math

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

// Target distribution of an index target: q = on at the target class, off elsewhere (§3.1).
template <typename acc_t>
struct TargetValues {
  acc_t on;
  acc_t off;
};

// (on the host, in Smoothing::make: an exact division, not math::div)
template <typename acc_t>
SMOOTHCE_HOST_DEVICE TargetValues<acc_t> uniform_smoothing(acc_t eps, int64_t num_classes) {
  const acc_t off = eps / static_cast<acc_t>(num_classes);
  return {acc_t(1) - eps + off, off};
}

// The constants a kernel needs: ε, ε/C (probability targets), (on, off) (index targets: uniform
// smoothing, "others" or explicit target values, §3.1) and the z-loss weight α.
template <typename acc_t>
struct Smoothing {
  acc_t eps, eps_over_c;
  TargetValues<acc_t> tv;
  acc_t z_loss;

  // target_values: explicit (on, off) for index targets, or null for uniform smoothing by ε.
  static Smoothing make(double label_smoothing, int64_t num_classes, const double* target_values, double z_loss) {
    const int64_t C = num_classes > 0 ? num_classes : 1;
    const acc_t eps = static_cast<acc_t>(label_smoothing);
    const TargetValues<acc_t> tv = target_values == nullptr
                                       ? uniform_smoothing<acc_t>(eps, C)
                                       : TargetValues<acc_t>{static_cast<acc_t>(target_values[0]),
                                                             static_cast<acc_t>(target_values[1])};
    return {eps, static_cast<acc_t>(label_smoothing / static_cast<double>(C)), tv, static_cast<acc_t>(z_loss)};
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
//   rest      = Σ exp(x_c − max) over the x_c < max only (sum_exp less the logits at the max)
//   mass_dx   = Σ v_c·(x_c − max)        (kept relative to max: no cancellation for large logits)
//   mass      = Σ v_c
//   mass_rest = Σ v_c over the x_c < max only (probability targets' gradient at a sole max)
// Merging two states is associative, so the same merge serves vector lanes, blocks of a row,
// warps and thread blocks. `rest` is what a confident row's loss and gradient are made of (see
// sole_max below): summed apart from the 1 of the max, it keeps its own precision however small.
template <typename acc_t>
struct RowState {
  acc_t max;
  acc_t sum_exp;
  acc_t rest;
  acc_t mass_dx;
  acc_t mass;
  acc_t mass_rest;

  SMOOTHCE_HOST_DEVICE static RowState empty() {
    return {-std::numeric_limits<acc_t>::infinity(), acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  }
};

// Rescales a state to a new (larger or equal) max. A state whose max is −inf (all logits −inf)
// keeps sum_exp = 0; its mass_dx is −inf already when it holds mass, so nothing is lost. Below the
// new max every logit of the state is in `rest`.
template <typename acc_t>
SMOOTHCE_HOST_DEVICE SMOOTHCE_MATH_ABI void shift_to(RowState<acc_t>& s, acc_t new_max) {
  if (s.max == new_max) return;
  const acc_t delta = s.max - new_max;  // ≤ 0, or NaN when a NaN logit was seen
  s.sum_exp *= math::exp(delta);
  s.rest = s.sum_exp;
  s.mass_rest = s.mass;
  if (s.mass != acc_t(0)) s.mass_dx += s.mass * delta;
  s.max = new_max;
}

template <typename acc_t>
SMOOTHCE_HOST_DEVICE SMOOTHCE_MATH_ABI RowState<acc_t> merge(RowState<acc_t> a, RowState<acc_t> b) {
  // NaN-propagating max: a NaN logit anywhere must make the row NaN.
  const acc_t m = (a.max != a.max || b.max != b.max) ? a.max + b.max : (a.max > b.max ? a.max : b.max);
  shift_to(a, m);
  shift_to(b, m);
  return {m,         a.sum_exp + b.sum_exp, a.rest + b.rest, a.mass_dx + b.mass_dx,
          a.mass + b.mass, a.mass_rest + b.mass_rest};
}

// Exactly one logit at the max and the others' share rest = Σexp − 1 below 1 (p_max > 1/2): the
// confident row, where 1 − p_max and log Σexp are small numbers that Σexp (≈ 1) has rounded away.
// There log Σexp = log1p(rest) and 1 − p_max = rest/(1 + rest), both without cancellation
// (docs/semantics.md §5). (sum_exp − rest counts the logits at the max: exp(0) = 1 each; with
// rest < 1 its rounding is far below 1/2.)
template <typename acc_t>
SMOOTHCE_HOST_DEVICE bool sole_max(const RowState<acc_t>& s) {
  const acc_t at_max = s.sum_exp - s.rest;
  return s.rest < acc_t(1) && at_max > acc_t(0.5) && at_max < acc_t(1.5);
}

// log Σexp relative to the max: log1p(rest) for a sole max, else log(sum_exp).
template <typename acc_t>
SMOOTHCE_HOST_DEVICE SMOOTHCE_MATH_ABI acc_t row_log_sum(const RowState<acc_t>& s) {
  return sole_max(s) ? math::log1p(s.rest) : math::log(s.sum_exp);
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

// The index targets of one position (§3.2): its target a and, for mixup, a second target b, with
// q = k_a·q(a) + k_b·q(b), k_a = lam·valid_a, k_b = (1 − lam)·valid_b (plain targets: lam = 1, no b).
// An ignored (or absent) target has index −1 and k = 0. The position counts k_a·w_a + k_b·w_b in the
// mean's denominator; with k_a + k_b = 0 it contributes nothing at all.
template <typename acc_t>
struct PositionTargets {
  int64_t a, b;
  acc_t k_a, k_b;

  SMOOTHCE_HOST_DEVICE acc_t mass() const { return k_a + k_b; }
  SMOOTHCE_HOST_DEVICE bool valid() const { return k_a + k_b > acc_t(0); }
};

// t_b < 0 with no mixup partner: pass ignore_index (or any invalid value) and lam = 1. Values out of
// range must have been rejected before (they are treated as ignored here, never used as an index).
template <typename acc_t>
SMOOTHCE_HOST_DEVICE PositionTargets<acc_t> position_targets(int64_t t_a, int64_t t_b, acc_t lam, int64_t ignore_index,
                                                             int64_t classes) {
  const bool va = t_a != ignore_index && t_a >= 0 && t_a < classes;
  const bool vb = t_b != ignore_index && t_b >= 0 && t_b < classes;
  PositionTargets<acc_t> t{va ? t_a : -1, vb ? t_b : -1, va ? lam : acc_t(0), vb ? acc_t(1) - lam : acc_t(0)};
  if (t.k_a == acc_t(0)) t.a = -1;
  if (t.k_b == acc_t(0)) t.b = -1;
  return t;
}

// The logits and class weights at a position's targets (0 where a target is absent).
template <typename acc_t>
struct TargetLogits {
  acc_t x_a, x_b, w_a, w_b;
};

// Gradient of one position: ∂ℓ/∂x_j = scale·[Σq_w·p_j − w_j·q_j] (+ the z-loss term). The kernels
// evaluate it as softmax_coef·exp(log_prob(x_j)) − off_coef·w_j, less peak_a at j = a and peak_b at
// j = b (grad_element below). At the row's sole max (sole_max above), when it is an index target or
// the target is a probability vector, p = 1 − r, r = rest/(1 + rest), and the element is
// sole_base − softmax_coef·r, sole_base formed without the cancelling p·(…) − (…) (sole_max_grad).
template <typename acc_t>
struct IndexGradCoefs {
  acc_t softmax_coef;  // scale·(Σq_w + 2α·v·lse)
  acc_t off_coef;      // scale·off·v (index targets), scale (probability targets)
  acc_t peak_a;        // scale·(on − off)·k_a·w_a
  acc_t peak_b;        // scale·(on − off)·k_b·w_b
  acc_t sole_rest;     // the row's rest when sole_max_grad applies (index targets: a target at the max), else −1
  acc_t sole_base;     // softmax_coef − off_coef·mass − peaks of that class, formed without cancellation
};

// One gradient element ∂ℓ/∂x_j from the position's coefficients (index targets: class_mass = w_j;
// probability targets: class_mass = w_j·q_j). A zero off_coef contributes nothing (no 0·inf).
template <typename acc_t>
SMOOTHCE_HOST_DEVICE acc_t grad_element(const IndexGradCoefs<acc_t>& k, acc_t prob, acc_t class_mass, bool is_a,
                                        bool is_b) {
  acc_t g = k.softmax_coef * prob;
  if (k.off_coef != acc_t(0)) g -= k.off_coef * class_mass;
  if (is_a) g -= k.peak_a;
  if (is_b) g -= k.peak_b;
  return g;
}

// ∂ℓ/∂x at the sole max: sole_base − softmax_coef·r, with 1 − p = r = rest/(1 + rest) (no cancellation).
template <typename acc_t>
SMOOTHCE_HOST_DEVICE SMOOTHCE_MATH_ABI acc_t sole_max_grad(const IndexGradCoefs<acc_t>& k) {
  return k.sole_base - k.softmax_coef * math::div(k.sole_rest, acc_t(1) + k.sole_rest);
}

// ∂ℓ/∂x_c (logit x_c; the row's max and log Σexp): sole_max_grad at the sole max when the coefficients
// have it, else grad_element.
template <typename acc_t>
SMOOTHCE_HOST_DEVICE SMOOTHCE_MATH_ABI acc_t grad_at(const IndexGradCoefs<acc_t>& k, acc_t x_c, acc_t row_max,
                                                     acc_t log_sum, acc_t class_mass, bool is_a, bool is_b) {
  if (k.sole_rest >= acc_t(0) && x_c == row_max) return sole_max_grad(k);
  return grad_element(k, math::exp((x_c - row_max) - log_sum), class_mass, is_a, is_b);
}

// Everything a valid position's loss and gradient need, from its finished RowState.
template <typename acc_t>
struct PositionResult {
  acc_t lse;      // max + log Σexp
  acc_t log_sum;  // log Σexp (relative to max)
  acc_t loss;
  IndexGradCoefs<acc_t> coefs;
};

// PaLM's z-loss α·v·lse² and its gradient coefficient 2α·v·lse (v: the position's target mass);
// α = 0 adds exactly nothing (no 0·inf for an all −inf row).
template <typename acc_t>
SMOOTHCE_HOST_DEVICE void add_z_loss(PositionResult<acc_t>& r, acc_t z_loss, acc_t v, acc_t scale) {
  if (z_loss == acc_t(0)) return;
  r.loss += z_loss * v * r.lse * r.lse;
  r.coefs.softmax_coef += scale * acc_t(2) * z_loss * v * r.lse;
}

// Probability targets: `state.mass` = Σ w·q of the row (§2.3). log_sum = row_log_sum(state) (passed in:
// the CPU tiles take it for all their lanes with one vector log). At a sole max j the gradient's
// coefficient sum Σ w·q − w_j·q_j is the other classes' mass_rest.
template <typename acc_t>
SMOOTHCE_HOST_DEVICE PositionResult<acc_t> soft_target_position(const RowState<acc_t>& state, acc_t log_sum,
                                                                acc_t scale, acc_t z_loss) {
  PositionResult<acc_t> r{state.max + log_sum, log_sum, mass_nll(state, log_sum),
                          {scale * state.mass, scale, acc_t(0), acc_t(0), acc_t(-1), acc_t(0)}};
  add_z_loss(r, z_loss, acc_t(1), scale);
  if (sole_max(state)) {
    acc_t base = state.mass_rest;
    if (z_loss != acc_t(0)) base += acc_t(2) * z_loss * r.lse;
    r.coefs.sole_rest = state.rest;
    r.coefs.sole_base = scale * base;
  }
  return r;
}

// Index targets (§2.1, §3.1, §3.2; z-loss §2.5): `state.mass` = Σ_c w_c when tv.off ≠ 0.
// With v = k_a + k_b,
//   ℓ = off·v·Σ_c w_c·(lse − x_c) + (on − off)·[k_a·w_a·(lse − x_a) + k_b·w_b·(lse − x_b)] + α·v·lse².
template <typename acc_t>
SMOOTHCE_HOST_DEVICE PositionResult<acc_t> index_target_position(
    const RowState<acc_t>& state, acc_t log_sum, const PositionTargets<acc_t>& t, const TargetLogits<acc_t>& x,
    acc_t weight_sum, acc_t scale, const Smoothing<acc_t>& s) {
  const acc_t v = t.mass(), off = s.tv.off;
  const acc_t peak_a = (s.tv.on - off) * t.k_a * x.w_a, peak_b = (s.tv.on - off) * t.k_b * x.w_b;
  acc_t loss = acc_t(0);
  if (off != acc_t(0)) loss += off * v * mass_nll(state, log_sum);
  if (peak_a != acc_t(0)) loss -= peak_a * log_prob(state, log_sum, x.x_a);
  if (peak_b != acc_t(0)) loss -= peak_b * log_prob(state, log_sum, x.x_b);
  PositionResult<acc_t> r{state.max + log_sum, log_sum, loss,
                          {scale * (off * v * weight_sum + peak_a + peak_b), scale * off * v, scale * peak_a,
                           scale * peak_b, acc_t(-1), acc_t(0)}};
  add_z_loss(r, s.z_loss, v, scale);
  // A target at the sole max (at most one class can be): its coefficients without its own peak and
  // its own w·off, i.e. the other classes' share Σ_{c≠j} w_c·q_c (+ the z-loss term).
  const bool at_a = t.a >= 0 && x.x_a == state.max, at_b = t.b >= 0 && x.x_b == state.max;
  if ((at_a || at_b) && sole_max(state)) {
    const acc_t w_j = at_a ? x.w_a : x.w_b;
    const acc_t other_peaks = t.a == t.b ? acc_t(0) : (at_a ? peak_b : peak_a);  // a = b: both peaks are j's
    acc_t base = off * v * (weight_sum - w_j) + other_peaks;
    if (s.z_loss != acc_t(0)) base += acc_t(2) * s.z_loss * v * r.lse;
    r.coefs.sole_rest = state.rest;
    r.coefs.sole_base = scale * base;
  }
  return r;
}

// Vocabulary-parallel (docs/semantics.md §10): each rank's shard of a position's classes gives a
// ShardStats, kShardStats values exchanged between the ranks in this order (the RowState fields, then
// the TargetLogits fields: a target's logit and weight from the rank that holds it, 0 elsewhere).
// Merged in rank order, every rank gets the same (bit for bit) statistics of the whole row.
constexpr int64_t kShardStats = 10;

template <typename acc_t>
struct ShardStats {
  RowState<acc_t> state;
  TargetLogits<acc_t> target;

  SMOOTHCE_HOST_DEVICE void store(acc_t* out) const {
    const acc_t v[kShardStats] = {state.max,  state.sum_exp, state.rest,  state.mass_dx, state.mass,
                                  state.mass_rest, target.x_a, target.x_b, target.w_a, target.w_b};
    for (int64_t i = 0; i < kShardStats; ++i) out[i] = v[i];
  }
  SMOOTHCE_HOST_DEVICE static ShardStats load(const acc_t* in) {
    return {{in[0], in[1], in[2], in[3], in[4], in[5]}, {in[6], in[7], in[8], in[9]}};
  }
};

// The whole row's statistics from the ranks' (load(r): rank r's ShardStats, r < ranks): the states
// merged in rank order, the target values summed (exactly one rank holds each target; the others add 0).
template <typename acc_t, typename Load>
SMOOTHCE_HOST_DEVICE SMOOTHCE_MATH_ABI ShardStats<acc_t> merge_shards(const Load& load, int64_t ranks) {
  ShardStats<acc_t> all = load(0);
  for (int64_t r = 1; r < ranks; ++r) {
    const ShardStats<acc_t> s = load(r);
    all.state = merge(all.state, s.state);
    all.target = {all.target.x_a + s.target.x_a, all.target.x_b + s.target.x_b, all.target.w_a + s.target.w_a,
                  all.target.w_b + s.target.w_b};
  }
  return all;
}

// Adds one logit x with mass v to a state kept relative to its running max (the online softmax of
// one thread walking a strided row): rescales when x raises the max; a NaN poisons the state.
template <typename acc_t, bool kWithMass>
SMOOTHCE_HOST_DEVICE SMOOTHCE_MATH_ABI void accumulate(RowState<acc_t>& s, acc_t x, acc_t v) {
  if (!(x <= s.max)) shift_to(s, (x != x || s.max != s.max) ? x + s.max : x);
  const acc_t d = x - shift_origin(s.max);
  const acc_t e = math::exp(d);
  s.sum_exp += e;
  if (x != s.max) s.rest += e;
  if (kWithMass) {
    s.mass_dx += v * d;
    s.mass += v;
    if (x != s.max) s.mass_rest += v;
  }
}

// What the adds to a state's mass and mass_rest rounded away, carried into the next add (Kahan).
template <typename acc_t>
struct MassLost {
  acc_t mass = acc_t(0), mass_rest = acc_t(0);
};

// sum += v, compensated: `lost` carries what each add rounded away into the next (Kahan). Also for the
// CPU kernels' vectors (at::vec::Vectorized).
template <typename acc_t>
SMOOTHCE_HOST_DEVICE void kahan_add(acc_t& sum, acc_t& lost, const acc_t& v) {
  const acc_t y = v - lost, t = sum + y;
  lost = (t - sum) - y;
  sum = t;
}

// accumulate<acc_t, true> with mass and mass_rest summed compensated. One thread walking all C classes
// of a probability target with label smoothing adds the same ε/C at (nearly) every class, and plain
// fp32 adds round all of those the same way: a confident position's gradient at its max (Σ_{j≠max} v_j
// less a tiny term) drifted by ~C/2 ulps. A rescale (x above the max) restarts mass_rest from mass,
// and its companion from mass's.
template <typename acc_t>
SMOOTHCE_HOST_DEVICE SMOOTHCE_MATH_ABI void accumulate_compensated(RowState<acc_t>& s, MassLost<acc_t>& lost, acc_t x,
                                                                   acc_t v) {
  acc_t mass = s.mass, mass_rest = s.mass_rest;
  if (!(x <= s.max)) {
    mass_rest = mass;
    lost.mass_rest = lost.mass;
  }
  accumulate<acc_t, true>(s, x, v);  // sum_exp, rest, mass_dx (mass, mass_rest: replaced below)
  kahan_add(mass, lost.mass, v);
  if (x != s.max) kahan_add(mass_rest, lost.mass_rest, v);
  s.mass = mass;
  s.mass_rest = mass_rest;
}

// A kernel whose one thread or SIMD lane walks all C classes of a position (the CPU's strided tiles,
// the CUDA strided kernel) sums them in chunks of walk_chunk(C) classes and adds each chunk's sums to
// the position's: a sum's rounding then grows with chunk + C/chunk adds instead of C. All C up to 32
// classes, else a power of 2 near √C (32 at 1000 classes, 64 at 3000, 256 at 32000). Summed in one
// run, strided maps' confident rows had their gradient 98 fp32 ulps off at 1000 classes and 136 at
// 3000, past the bound of tests/test_precision.py (53 and 31), which the rows' split sums keep.
SMOOTHCE_HOST_DEVICE int64_t walk_chunk(int64_t C) {
  if (C <= 32) return C;
  int64_t chunk = 32;
  while (chunk * chunk * 2 < C) chunk *= 2;
  return chunk;
}

// Moves a chunk's sums into the position's state, both kept at the same max (the CUDA strided walk:
// the chunk's state accumulates, and the position's is rescaled with it when the max rises). Without
// `with_mass` the chunk keeps its mass and mass_rest: sums compensated over all the classes
// (accumulate_compensated), taken at the end. (mass_dx's rescale by mass·Δ comes out right in total:
// each side adds its own mass times Δ.)
template <typename acc_t>
SMOOTHCE_HOST_DEVICE void fold_sums(RowState<acc_t>& s, RowState<acc_t>& chunk, bool with_mass) {
  s.sum_exp += chunk.sum_exp;
  s.rest += chunk.rest;
  s.mass_dx += chunk.mass_dx;
  chunk.sum_exp = chunk.rest = chunk.mass_dx = acc_t(0);
  if (with_mass) {
    s.mass += chunk.mass;
    s.mass_rest += chunk.mass_rest;
    chunk.mass = chunk.mass_rest = acc_t(0);
  }
}

// Probability target mass of class c: w_c·q_c with q = (1 − ε)·P + ε/C (§2.3).
template <typename acc_t>
SMOOTHCE_HOST_DEVICE acc_t soft_target_q(acc_t prob, acc_t eps, acc_t eps_over_c) {
  return (acc_t(1) - eps) * prob + eps_over_c;
}

}  // namespace smoothce
