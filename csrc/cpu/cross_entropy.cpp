// CPU implementation of smoothce::forward, smoothce::grad_, smoothce::scale_grad_ and (the shared
// driver of csrc/linear.cpp on these kernels) smoothce::linear_forward.
//
// One fused pass per position: the logits are streamed once from memory (blocks of a row are
// re-read from L1 for the exp-sum after their max is known), giving max, Σexp, the smoothing sum
// and the target logit; when a gradient is wanted it is written right after, while the row is
// still in cache. Two loop shapes share the math of smoothce/row_math.h:
//   * rows:   classes contiguous ((N, C), channels_last): vectorized along a row;
//   * across: classes strided, positions contiguous ((N, C, H, W), x.t()): vectorized across
//             positions, one SIMD lane per position, so no transpose or copy is needed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

#include "smoothce/linear.h"
#include "smoothce/problem.h"
#include "smoothce/row_math.h"

namespace smoothce {
namespace cpu {
namespace {

using at::vec::Vectorized;
#if defined(CPU_CAPABILITY_AVX512)
using FloatReg = __m512;  // the register of a Vectorized<float>
#elif defined(CPU_CAPABILITY_AVX2)
using FloatReg = __m256;
#endif
// Whether this is the AVX-512 build: for the choices measured there only (kFusedMaxPass, kCaptureTarget).
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kAvx512Build = true;
#else
constexpr bool kAvx512Build = false;
#endif

#if defined(SMOOTHCE_AVX512_BF16)
// fp32 -> bf16 (round to nearest even) with AVX512-BF16's vcvtneps2bf16: one instruction for 16
// values, or for 32 from two vectors, where at::vec's conversion (integer rounding, a NaN test) is 7
// operations a vector. The instruction reads denormal inputs as 0, while torch (and at::vec) round
// them to bf16's denormals: a vector holding one (vfpclassps) takes at::vec's conversion instead.
// NaN stays NaN (sign and payload kept, quieted, where at::vec writes one fixed NaN).
constexpr int kDenormal = 0x20;  // vfpclassps: denormal
inline __m256i bf16_from(__m512 v) {
  if (C10_UNLIKELY(_mm512_fpclass_ps_mask(v, kDenormal) != 0)) return at::vec::cvtfp32_bf16(v);
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
}
inline __m512i bf16_from(__m512 a, __m512 b) {  // a's 16 values, then b's
  if (C10_UNLIKELY((_mm512_fpclass_ps_mask(a, kDenormal) | _mm512_fpclass_ps_mask(b, kDenormal)) != 0))
    return at::vec::cvtfp32_bf16(a, b);
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));
}
#elif defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
inline auto bf16_from(FloatReg v) { return at::vec::cvtfp32_bf16(v); }
inline auto bf16_from(FloatReg a, FloatReg b) { return at::vec::cvtfp32_bf16(a, b); }
#endif
// Whether bf16 rounding is cheaper for values known to hold no NaN (bf16_pair_no_nan: AVX2, and
// AVX-512 without AVX512-BF16, whose instruction converts with or without NaN): tile_kernel's
// grad_finite is computed only where it is.
#if (defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)) && !defined(SMOOTHCE_AVX512_BF16)
constexpr bool kBf16NoNaNRounding = true;
#else
constexpr bool kBf16NoNaNRounding = false;
#endif

// ---------------------------------------------------------------- vector load / store / exp
template <typename scalar_t>
inline Vectorized<acc_type<scalar_t>> load_acc(const scalar_t* ptr) {
  if constexpr (std::is_same_v<scalar_t, acc_type<scalar_t>>) {
    return Vectorized<scalar_t>::loadu(ptr);
  } else {
    Vectorized<float> out;
    at::vec::load_to_float(ptr, out);
    return out;
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// The mask of a vector's first `count` lanes (0 ≤ count ≤ 16).
inline __mmask16 first_lanes(int64_t count) { return static_cast<__mmask16>((1u << count) - 1); }
#endif

// Loads `count` < vector-size elements; the other lanes are 0.
// Half types in AVX-512 builds: one masked 16-bit load (it reads nothing past `count`) and the full
// vector's conversion, instead of converting element by element into a buffer and loading that
// (whose vector load waited on the elements' stores). With the masked stores of store_acc and the
// max's tail (kVectorMaxTail), below.
template <typename scalar_t>
inline Vectorized<acc_type<scalar_t>> load_acc(const scalar_t* ptr, int64_t count) {
  using acc_t = acc_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return Vectorized<scalar_t>::loadu(ptr, count);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    const __m256i bits = _mm256_maskz_loadu_epi16(first_lanes(count), ptr);
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
    } else {
      return _mm512_cvtph_ps(bits);
    }
#endif
    alignas(64) acc_t buf[Vectorized<acc_t>::size()] = {};
    for (int64_t i = 0; i < count; ++i) buf[i] = static_cast<acc_t>(ptr[i]);
    return Vectorized<acc_t>::loadu(buf);
  }
}

template <typename scalar_t>
inline void store_acc(scalar_t* ptr, const Vectorized<acc_type<scalar_t>>& v,
                      int64_t count = Vectorized<acc_type<scalar_t>>::size()) {
  using acc_t = acc_type<scalar_t>;
  constexpr int64_t V = Vectorized<acc_t>::size();
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    v.store(ptr, count);
  } else {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    // V floats -> V halves in one store (16 bytes with AVX2, 32 with AVX-512; fewer: masked, AVX-512)
    if (count == V || kAvx512Build) {
      const auto packed = std::is_same_v<scalar_t, at::BFloat16> ? bf16_from(FloatReg(v))
                                                                : at::vec::cvtfp32_fp16(FloatReg(v));
#if defined(CPU_CAPABILITY_AVX512)
      if (count < V) return _mm256_mask_storeu_epi16(ptr, first_lanes(count), packed);
#endif
      std::memcpy(ptr, &packed, sizeof(packed));
      return;
    }
#endif
    alignas(64) acc_t buf[V];
    v.store(buf);
    for (int64_t i = 0; i < count; ++i) ptr[i] = static_cast<scalar_t>(buf[i]);
  }
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// bf16 rounding (to nearest even) without a NaN test: v's bits + 0x7fff + bit 16, the bf16 in each
// 32-bit element's high half (the low half junk). ±inf, and finite values that round past the largest
// bf16, come out as ±inf; a NaN would not (the add can carry its payload into the exponent or sign).
#if defined(CPU_CAPABILITY_AVX512)
inline __m512i bf16_round_high(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  return _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)),
                                                 _mm512_set1_epi32(0x7fff)));
}
#else
inline __m256i bf16_round_high(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  return _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1)),
                                                 _mm256_set1_epi32(0x7fff)));
}
#endif

// 2V floats (a, then b) -> 2V bf16 (round to nearest even) packed, for values known to hold no NaN:
// at::vec's cvtfp32_bf16 without its NaN test (a compare and a blend per vector, 2 of its 7
// operations per vector in pairs); bf16_round_high's rounding.
inline auto bf16_pair_no_nan(FloatReg a, FloatReg b) {
#if defined(CPU_CAPABILITY_AVX512)
  auto round = [](__m512 v) { return _mm512_srli_epi32(bf16_round_high(v), 16); };
  return _mm512_permutexvar_epi64(_mm512_set_epi64(7, 5, 3, 1, 6, 4, 2, 0), _mm512_packus_epi32(round(a), round(b)));
#else
  auto round = [](__m256 v) { return _mm256_srli_epi32(bf16_round_high(v), 16); };
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(round(a), round(b)), 0xd8);
#endif
}
#endif

// Half types: 2V floats (a, then b) -> 2V halves in one store, one pack and lane permute for the pair
// (at::vec's two-vector conversion) instead of one each. kNoNaN (bf16): the caller knows that no
// value is NaN (bf16_pair_no_nan).
template <typename scalar_t, bool kNoNaN = false>
inline void store_acc2(scalar_t* ptr, const Vectorized<float>& a, const Vectorized<float>& b) {
  static_assert(!std::is_same_v<scalar_t, acc_type<scalar_t>>);
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#if !defined(SMOOTHCE_AVX512_BF16)  // (there, one instruction converts with or without NaN)
  if constexpr (kNoNaN && std::is_same_v<scalar_t, at::BFloat16>) {
    const auto packed = bf16_pair_no_nan(a, b);
    std::memcpy(ptr, &packed, sizeof(packed));
    return;
  }
#endif
  const auto packed = std::is_same_v<scalar_t, at::BFloat16> ? bf16_from(FloatReg(a), FloatReg(b))
                                                            : at::vec::cvtfp32_fp16(FloatReg(a), FloatReg(b));
  std::memcpy(ptr, &packed, sizeof(packed));
#else
  store_acc(ptr, a);
  store_acc(ptr + Vectorized<float>::size(), b);
#endif
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// A float vector's bits as int32 lanes (at::vec::cast<float> is the way back; its generic cast to
// int32 goes through memory).
inline Vectorized<int32_t> float_bits(const Vectorized<float>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_castps_si512(v);
#else
  return _mm256_castps_si256(v);
#endif
}

// A vector of bf16 pairs (classes 2k and 2k + 1 of a row in each 32-bit lane's low and high half) as
// the two classes' fp32 lanes: the low half shifted up, the high half masked (bf16_rows_to_lanes).
inline void widen_pair(const Vectorized<float>& pair, float* even, float* odd) {
  using IVec = Vectorized<int32_t>;
  const IVec bits = float_bits(pair);
#if defined(CPU_CAPABILITY_AVX512)  // (one immediate shift: at::vec's << shifts by a vector)
  const IVec low = _mm512_slli_epi32(bits, 16);
#else
  const IVec low = _mm256_slli_epi32(bits, 16);
#endif
  at::vec::cast<float>(low).store(even);
  at::vec::cast<float>(bits & IVec(static_cast<int32_t>(0xffff0000u))).store(odd);
}

// exp for float (AVX2 and AVX-512), with no upper clamp: arguments must be at most 88.37 (the
// kernels' are x − max ≤ 0). exp(0) = 1 exactly (the kernels rely on it: RowState::rest), exp(−inf) = 0,
// NaN in gives NaN out (maxps returns its second operand when one is NaN).
// AVX2: 2^n·P(r) with n = round(x·log2 e), r = x − n·ln 2 and at::vec's exp_u20 polynomial P (degree
// 5), in 12 vector operations instead of exp_u20's 20 (its floor, conversions, blends and two scalings
// are replaced by rounding with a magic-number add and forming 2^n from the sum's bits; its
// one-constant reduction, which loses up to 3.3 ulp near −88, by a two-constant one). Against exp in
// double: at most 1.4 ulp at 10^8 random points of [−88, 0], 1.98 at every float there with a normal
// result (at −2.937). Results below 2^−126 flush to 0. The magic number's low bits carry the exponent bias, so 2^n's bits are the sum's bits
// shifted by an immediate: together 2 of the 14 operations this took before (AVX2 exp-sum loop ~8%
// faster alone, Zen 1).
// AVX-512: 2^(k/16)·(1 + u) with k = round(16·x·log2 e), r = x − (k/16)·ln 2 (|r| ≤ ln 2/32), u =
// r + r²/2 + r³/6 and 2^(k/16) = 2^⌊k/16⌋ (vscalefps: rounded once, gradual underflow) · T[k mod 16]
// (a 16-entry table, one vpermps on the sum's low bits). 8 operations on the FMA pipes where the
// degree-5 polynomial took 9 (the exp-sum loop's bound on Zen 4, whose add pipes do the rest), and
// more accurate: at every float in [−106, 0] with a normal result, at most 1.06 ulp from exp in double
// (the polynomial's way: 1.98 ulp, at −2.937). Zen 4 VM, 1 thread: the exp alone 4–8% more
// throughput; interleaved processes, 10 rounds, 10th percentiles: forward 1.5–3% less time at
// 256×1000, 2048×1000 and 65536×10 (fp32, bf16) and 8×21×128×128 bf16 (fp32 +2.5%), fwd+bwd 2–6%
// (8×21×128×128 fp32 +1%).
// Results down to 2^−149 are denormals, as torch's exp gives them; arguments below −106
// (2^(k/16) < 2^−152) give exactly 0, −inf among them.
inline Vectorized<float> exp_simd(const Vectorized<float>& x) {
  using Vec = Vectorized<float>;
#if defined(CPU_CAPABILITY_AVX512)
  // 1.5·2^19: adding it rounds to a multiple of 1/16 (the sum stays in [2^19, 2^20), whose ulp is
  // 1/16), and the sum's low 4 bits are k mod 16
  const Vec magic(786432.0f);
  const Vec y = at::vec::clamp_min(x, Vec(-106.0f));  // maxps: NaN passes
  const Vec shifted = at::vec::fmadd(y, Vec(1.44269504088896341f), magic);
  const Vec t = shifted - magic;  // k/16
  // r = y − t·ln 2 in two steps (Cody–Waite: t has at most 12 significant bits, ln2_hi 12, so
  // t·ln2_hi is exact)
  Vec r = at::vec::fnmadd(t, Vec(0.693145751953125f), y);
  r = at::vec::fnmadd(t, Vec(1.428606765330187045e-06f), r);
  const Vec u = at::vec::fmadd(r * r, at::vec::fmadd(r, Vec(1.0f / 6.0f), Vec(0.5f)), r);
  alignas(64) static constexpr float kTable[16] = {  // 2^(j/16) rounded to float
      0x1.000000p+0f, 0x1.0b5586p+0f, 0x1.172b84p+0f, 0x1.2387a6p+0f, 0x1.306fe0p+0f, 0x1.3dea64p+0f,
      0x1.4bfdaep+0f, 0x1.5ab07ep+0f, 0x1.6a09e6p+0f, 0x1.7a1148p+0f, 0x1.8ace54p+0f, 0x1.9c4918p+0f,
      0x1.ae89fap+0f, 0x1.c199bep+0f, 0x1.d5818ep+0f, 0x1.ea4afap+0f};
  const __m512 frac = _mm512_permutexvar_ps(_mm512_castps_si512(shifted), _mm512_load_ps(kTable));
  return _mm512_scalef_ps(_mm512_fmadd_ps(frac, u, frac), t);
#else
  const Vec lo(-88.02969193111305f);  // −127·ln 2: 2^n has a zero exponent field: +0
  // 1.5·2^23 + 127: adding it rounds to an integer (the sum stays in [2^23, 2^24), whose ulp is 1),
  // and the sum's low 9 bits are n + 127 ∈ [0, 254] (n ≥ −127)
  const Vec magic(12583039.0f);
  const Vec y = at::vec::clamp_min(x, lo);  // maxps: NaN passes
  const Vec shifted = at::vec::fmadd(y, Vec(1.44269504088896341f), magic);  // n + magic
  const Vec n = shifted - magic;
  // r = y − n·ln 2 in two steps (Cody–Waite: n·ln2_hi is exact), |r| ≤ ln 2 / 2
  Vec r = at::vec::fnmadd(n, Vec(0.693145751953125f), y);
  r = at::vec::fnmadd(n, Vec(1.428606765330187045e-06f), r);
  Vec poly = at::vec::fmadd(r, Vec(0.00828929059f), Vec(0.0418978221f));
  poly = at::vec::fmadd(r, poly, Vec(0.166676521f));
  poly = at::vec::fmadd(r, poly, Vec(0.499991506f));
  poly = at::vec::fmadd(r, poly, Vec(0.999999701f));
  poly = at::vec::fmadd(r, poly, Vec(1.0f));
  // n + 127 shifted into the exponent field, the magic's own bits off the top: 2^n for n in
  // [−127, 127] (−127: +0).
  return poly * Vec(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(shifted), 23)));
#endif
}
#endif

// acc + (d != 0 ? v : 0) lane by lane (d NaN: v added): the sums over the logits below the max
// (RowState::rest, mass_rest). With AVX-512 one masked add on the compare's mask register (at::vec's
// compare, & and + take four instructions).
template <typename acc_t>
inline Vectorized<acc_t> add_below(const Vectorized<acc_t>& acc, const Vectorized<acc_t>& v,
                                   const Vectorized<acc_t>& d) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    return _mm512_mask_add_ps(acc, _mm512_cmp_ps_mask(d, _mm512_setzero_ps(), _CMP_NEQ_UQ), acc, v);
  } else {
    return _mm512_mask_add_pd(acc, _mm512_cmp_pd_mask(d, _mm512_setzero_pd(), _CMP_NEQ_UQ), acc, v);
  }
#else
  return acc + (v & (d != Vectorized<acc_t>(0)));
#endif
}

// Whether the rows' blocks that sum RowState::rest count their logits at the max (d = 0, whose exp
// is exactly 1) instead of summing Σexp too: Σexp = rest + count, one rounding, and the vector add of
// Σexp per vector becomes a popcount of the compare's mask on the integer pipes (add_below_count).
// AVX-512 float only. The exp-sum loop is bound by its vector operations (~18 a vector; Zen 4 VM, a
// microbenchmark of the loop alone: 5% less time with one fewer). In the kernels (interleaved
// processes, 1 thread, 20 rounds, 10th percentiles): fp32 forward 2.5–3% less time at 256×1000 and
// 2048×1000; bf16 forward (whose loop also widens the next block) and fwd+bwd unchanged (±2%).
constexpr bool kCountAtMax = kAvx512Build;

// add_below, and the lanes where d == 0 counted into at_zero (AVX-512 float: the one compare's mask).
inline Vectorized<float> add_below_count(const Vectorized<float>& acc, const Vectorized<float>& v,
                                         const Vectorized<float>& d, int64_t& at_zero) {
#if defined(CPU_CAPABILITY_AVX512)
  const __mmask16 below = _mm512_cmp_ps_mask(d, _mm512_setzero_ps(), _CMP_NEQ_UQ);
  at_zero += __builtin_popcount(static_cast<unsigned>(static_cast<__mmask16>(~below)));
  return _mm512_mask_add_ps(acc, below, acc, v);
#else
  // (unused: kCountAtMax is false)
  float lanes[Vectorized<float>::size()];
  d.store(lanes);
  for (const float l : lanes) at_zero += l == 0.0f;
  return add_below(acc, v, d);
#endif
}

template <typename acc_t>
inline Vectorized<acc_t> vexp(const Vectorized<acc_t>& v) {
  if constexpr (std::is_same_v<acc_t, float>) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    return exp_simd(v);
#else
    return Vectorized<float>::blendv(v.exp_u20(), v, v != v);  // exp_u20 clamps NaN: put it back
#endif
  } else {
    return v.exp();
  }
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// Lane masks of float compares and the selects that take them: with AVX-512 a mask register (one
// compare, one masked move), with AVX2 a vector of all-ones lanes (at::vec's compares and blendv).
// at::vec's AVX-512 compares return vectors, which its blendv compares back into a mask: two
// instructions more for each compare and select. vlog1p's selects taken so (before its AVX-512
// reduction below): 65536×10 forward 2–3% less time (fp32; bf16 1%), the same results bit for bit
// (all 2^32 inputs compared, AVX-512 and AVX2 builds).
#if defined(CPU_CAPABILITY_AVX512)
using FloatMask = __mmask16;
template <int kPredicate>
inline FloatMask lanes_cmp(const Vectorized<float>& a, const Vectorized<float>& b) {
  return _mm512_cmp_ps_mask(a, b, kPredicate);
}
inline Vectorized<float> select(FloatMask m, const Vectorized<float>& if_set, const Vectorized<float>& other) {
  return _mm512_mask_blend_ps(m, other, if_set);
}
#else
using FloatMask = Vectorized<float>;
template <int kPredicate>
inline FloatMask lanes_cmp(const Vectorized<float>& a, const Vectorized<float>& b) {
  return _mm256_cmp_ps(a, b, kPredicate);
}
inline Vectorized<float> select(const FloatMask& m, const Vectorized<float>& if_set, const Vectorized<float>& other) {
  return Vectorized<float>::blendv(other, if_set, m);
}
#endif
// (the predicates of at::vec's ==, >= and <; not_ge: a < b, or either is NaN)
inline FloatMask lanes_eq(const Vectorized<float>& a, const Vectorized<float>& b) { return lanes_cmp<_CMP_EQ_OQ>(a, b); }
inline FloatMask lanes_ge(const Vectorized<float>& a, const Vectorized<float>& b) { return lanes_cmp<_CMP_GE_OQ>(a, b); }
inline FloatMask lanes_lt(const Vectorized<float>& a, const Vectorized<float>& b) { return lanes_cmp<_CMP_LT_OQ>(a, b); }
inline FloatMask lanes_not_ge(const Vectorized<float>& a, const Vectorized<float>& b) {
  return lanes_cmp<_CMP_NGE_UQ>(a, b);
}
#endif

// log1p for float vectors, inline: musl's log1pf (FreeBSD's, < 1 ulp) lane by lane, the branches as
// blends. With AVX-512, at::vec's log1p is a call into Sleef that cost the tiles as much as a fifth of
// a segmentation map's forward (perf, 16-lane tiles of 21 classes).
// AVX-512 builds take u = m·2^k with m in [0.75, 1.5) from vgetmantps and vgetexpps, and u's rounding
// error c from one formula (Fast2Sum of the larger and the smaller of x and 1, exact) at every x, with
// no special case near 1 (there c/u restores what u = 1 + x rounded away): 10 vector operations
// where musl's reduction, rounding error and blends take 22. musl's polynomial, fitted for m in
// [√2/2, √2), holds there too: compared with log1p in double at every float x ≥ −1, at most 0.811 ulp
// (musl's way: 0.756), the same special values (−1: −inf, +inf, NaN and x < −1: NaN). Zen 4 VM,
// 1 thread, interleaved processes, 6 rounds: 65536×10 forward 3–4% less time, fwd+bwd 1–2%. (AVX2
// builds keep musl's way: its reduction with the one formula for c and no special case, also under
// 1 ulp at every float, measured 3–4% slower at bf16 65536×10 and equal at fp32, same VM.)
C10_ALWAYS_INLINE Vectorized<float> vlog1p(const Vectorized<float>& x) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  using Vec = Vectorized<float>;
  const Vec one(1.0f), u = x + one;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 m = _mm512_getmant_ps(u, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_src);
  const Vec k = _mm512_sub_ps(_mm512_getexp_ps(u), _mm512_getexp_ps(m));  // (getexp(m): −1 below 1, else 0)
  const Vec f = Vec(m) - one;
  // c/u ≈ log1p(x) − log(u), c = 1 + x − u exactly (NaN lanes: set at the end)
  const Vec c = (Vec(_mm512_min_ps(x, one)) - (u - Vec(_mm512_max_ps(x, one)))) / u;
#else
  using IVec = Vectorized<int32_t>;
  // u = 2^k·m with m in [√2/2, √2), read from u's bits; f = m − 1
  const IVec iu = float_bits(u) + IVec(0x3f800000 - 0x3f3504f3);
  Vec k = at::vec::convert_to_fp_of_same_size<float>((iu >> IVec(23)) - IVec(127));
  Vec f = at::vec::cast<float>((iu & IVec(0x007fffff)) + IVec(0x3f3504f3)) - one;
  // c/u ≈ log1p(x) − log(u): the rounding of u = 1 + x (none once u ≥ 2^25)
  Vec c = select(lanes_ge(k, Vec(2.0f)), one - (u - x), x - (u - one));
  c = select(lanes_ge(k, Vec(25.0f)), Vec(0.0f), c / u);
  // √2/2 ≤ 1 + x < √2: f = x itself, k = c = 0
  const FloatMask near_one = lanes_ge(x, Vec(-0.29289323f)) & lanes_lt(x, Vec(0.41421357f));
  f = select(near_one, x, f);
  k = select(near_one, Vec(0.0f), k);
  c = select(near_one, Vec(0.0f), c);
#endif
  const Vec s = f / (Vec(2.0f) + f), z = s * s, w = z * z;
  const Vec t1 = w * at::vec::fmadd(w, Vec(0.24279078841f), Vec(0.40000972152f));
  const Vec t2 = z * at::vec::fmadd(w, Vec(0.28498786688f), Vec(0.66666662693f));
  const Vec hfsq = Vec(0.5f) * f * f;
  Vec out = s * (hfsq + (t2 + t1)) + (k * Vec(9.0580006145e-06f) + c) - hfsq + f + k * Vec(6.9313812256e-01f);
  // x = −1: −inf; x < −1 or NaN: NaN; +inf: +inf
  const float inf = std::numeric_limits<float>::infinity();
  out = select(lanes_eq(x, Vec(-1.0f)), Vec(-inf), out);
  out = select(lanes_not_ge(x, Vec(-1.0f)), Vec(std::numeric_limits<float>::quiet_NaN()), out);
  return select(lanes_eq(x, Vec(inf)), Vec(inf), out);
#else
  return x.log1p();
#endif
}
inline Vectorized<double> vlog1p(const Vectorized<double>& x) { return x.log1p(); }

// ---------------------------------------------------------------- per-launch constants
template <typename scalar_t>
struct Params : PositionLayout, Smoothing<acc_type<scalar_t>> {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* input;
  const scalar_t* soft_target;  // probability targets, input's strides
  const int64_t* target64;      // index targets (one of target64 / target8)
  const uint8_t* target8;
  const int64_t* target_b64;    // mixup partner targets (target's dtype and strides), or null
  const uint8_t* target_b8;
  const acc_t* lam;             // mixup share per position, or null: lam_value everywhere
  acc_t lam_value;
  const acc_t* weight;  // nullptr when unweighted
  scalar_t* grad;       // nullptr when no gradient is wanted
  acc_t* position_loss;
  acc_t* lse;
  acc_t weight_sum;             // Σ_c w_c (C when unweighted)
  acc_t grad_scale;             // 1/D for mean, 1 otherwise; times a scalar upstream gradient
  const acc_t* position_scale;  // per-position upstream gradient (reduction 'none'), or null

  int64_t target_at_offset(int64_t off) const { return target64 ? target64[off] : static_cast<int64_t>(target8[off]); }
  int64_t target_b_at_offset(int64_t off) const {
    if (target_b64) return target_b64[off];
    return target_b8 ? static_cast<int64_t>(target_b8[off]) : ignore_index;
  }
  // The targets of position `pos` whose targets sit at `off` (target_offset_of(pos)).
  // (Without mixup target_b_at_offset gives ignore_index and lam_value is 1: the plain target.)
  PositionTargets<acc_t> targets_at(int64_t off, int64_t pos) const {
    return position_targets<acc_t>(target_at_offset(off), target_b_at_offset(off), lam ? lam[pos] : lam_value,
                                   ignore_index, classes);
  }
  PositionTargets<acc_t> targets_of(int64_t pos) const { return targets_at(target_offset_of(pos), pos); }
  // No mixup partner (and so no lam: make_problem takes lam only with target_b; lam_value is 1).
  bool no_mixup() const { return !target_b64 && !target_b8; }
  // Index targets without mixup whose classes fit int32: the tile kernels hold them as one class per
  // lane (TileTargets::cls) instead of a PositionTargets each.
  bool plain_index_targets() const { return no_mixup() && classes <= std::numeric_limits<int32_t>::max(); }
  // With plain_index_targets: out[l] = the class of position l of `count` whose targets sit at
  // off0 + l·stride, −1 where it is ignore_index (position_targets' a for lam = 1, without its
  // per-position branches), and −1 for l = count .. V.
  template <int64_t V>
  void plain_targets(int64_t off0, int64_t stride, int64_t count, int32_t* out) const {
    const auto cls = [&](int64_t t) {
      return t != ignore_index && static_cast<uint64_t>(t) < static_cast<uint64_t>(classes) ? static_cast<int32_t>(t)
                                                                                             : int32_t(-1);
    };
    auto read = [&](const auto* target) {
      target += off0;
      if (stride == 1 && count == V) {  // a whole tile of contiguous targets: vectorized
#if defined(CPU_CAPABILITY_AVX2)
        // (8 int64 targets, AVX2: about 20 instructions, against 42 for GCC's vectorization of the loop)
        if constexpr (V == 8 && std::is_same_v<std::remove_cv_t<std::remove_pointer_t<decltype(target)>>, int64_t>) {
          return plain_classes8(target, out);
        }
#endif
        for (int64_t l = 0; l < V; ++l) out[l] = cls(static_cast<int64_t>(target[l]));
        return;
      }
      for (int64_t l = 0; l < count; ++l) out[l] = cls(static_cast<int64_t>(target[l * stride]));
      for (int64_t l = count; l < V; ++l) out[l] = -1;
    };
    if (target64) {
      read(target64);
    } else {
      read(target8);
    }
  }
#if defined(CPU_CAPABILITY_AVX2)
  // plain_targets' classes of 8 contiguous int64 targets: t where t ≠ ignore_index and 0 ≤ t < classes,
  // else −1 (all bits set: t | ~valid), packed from the 64-bit lanes' low halves.
  void plain_classes8(const int64_t* target, int32_t* out) const {
    const __m256i ignore = _mm256_set1_epi64x(ignore_index), limit = _mm256_set1_epi64x(classes);
    const __m256i ones = _mm256_set1_epi64x(-1);
    const auto masked = [&](const int64_t* ptr) {
      const __m256i t = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ptr));
      const __m256i inside = _mm256_and_si256(_mm256_cmpgt_epi64(limit, t), _mm256_cmpgt_epi64(t, ones));
      const __m256i valid = _mm256_andnot_si256(_mm256_cmpeq_epi64(t, ignore), inside);
      return _mm256_or_si256(t, _mm256_andnot_si256(valid, ones));
    };
    const __m256i low = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    const __m256i a = _mm256_permutevar8x32_epi32(masked(target), low);
    const __m256i b = _mm256_permutevar8x32_epi32(masked(target + 4), low);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_blend_epi32(a, b, 0xF0));
  }
#endif
  // Logits (class stride sc from x) and weights at the targets; read before any gradient is written,
  // as the gradient may be written over the logits (inplace_backward).
  template <typename in_t>
  TargetLogits<acc_t> target_logits(const in_t* x, int64_t sc, const PositionTargets<acc_t>& t) const {
    TargetLogits<acc_t> out{acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    if (t.a >= 0) out = {static_cast<acc_t>(x[t.a * sc]), acc_t(0), weight_at(t.a), acc_t(0)};
    if (t.b >= 0) {
      out.x_b = static_cast<acc_t>(x[t.b * sc]);
      out.w_b = weight_at(t.b);
    }
    return out;
  }
  // The target elements of a position's gradient, with the exact exp, and at the row's sole max
  // from 1 − p (grad_at in row_math.h): written after the dense part.
  template <typename out_t>
  void write_target_grads(out_t* g, int64_t sc, acc_t row_max, acc_t log_sum, const IndexGradCoefs<acc_t>& k,
                          const PositionTargets<acc_t>& t, const TargetLogits<acc_t>& x) const {
    auto write = [&](int64_t c, acc_t x_c, acc_t w_c) {
      g[c * sc] = static_cast<out_t>(grad_at(k, x_c, row_max, log_sum, w_c, c == t.a, c == t.b));
    };
    if (t.a >= 0) write(t.a, x.x_a, x.w_a);
    if (t.b >= 0 && t.b != t.a) write(t.b, x.x_b, x.w_b);
  }
  acc_t weight_at(int64_t c) const { return weight ? weight[c] : acc_t(1); }
  acc_t scale_at(int64_t pos) const { return position_scale ? grad_scale * position_scale[pos] : grad_scale; }
  // soft_target_q (row_math.h) on a vector of probabilities.
  Vectorized<acc_t> soft_q(const Vectorized<acc_t>& prob) const {
    return at::vec::fmadd(prob, Vectorized<acc_t>(acc_t(1) - this->eps), Vectorized<acc_t>(this->eps_over_c));
  }
  bool soft = false;      // probability targets (soft_target may be null: a shard without classes)
  bool weighted = false;  // class weights given (weight may be null likewise)
  Mass mass() const { return mass_kind(soft, this->tv.off, weighted); }
};

// (n, s) of consecutive positions pos = n·inner + s, walked along without a division per position
// (offset_of and target_offset_of divide).
struct PositionCursor {
  int64_t n, s;
  PositionCursor(const PositionLayout& p, int64_t pos) : n(pos / p.inner), s(pos % p.inner) {}
  void advance(const PositionLayout& p) {
    if (++s == p.inner) {
      s = 0;
      ++n;
    }
  }
};

// max(v, m) lane by lane, where a NaN v leaves m as it is (maxps returns its second operand when
// either is NaN; a NaN m stays). A row or lane with a NaN logit may so get a finite max, but the
// exp-sum pass then sums that logit's exp(NaN − max) = NaN into Σexp, which makes its loss, lse and
// every gradient element NaN all the same (as a NaN max does, through every exp; merge() keeps a
// block's NaN Σexp), and the max pass saves a NaN test per vector (a compare and a mask OR, which
// had kept the NaN lanes apart): 3–4% of a 10- to 27-class tile's forward (Zen 4 VM, AVX-512, 1
// thread, interleaved in one process); rows (vec_max), interleaved processes on that VM: forward
// 2.5–3% less time at 2048×1000 (fp32 and bf16, 1 thread), 4.5% at 4096×1000 fp32 (2 threads); the
// AVX2 build there 3.5–4% at 2048×1000 (fp32, bf16) and 256×1000 (bf16). fp64 and the build without
// SIMD keep at::vec::maximum (NaN-propagating).
template <typename acc_t>
inline Vectorized<acc_t> max_or_first(const Vectorized<acc_t>& v, const Vectorized<acc_t>& m) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) return _mm512_max_ps(v, m);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) return _mm256_max_ps(v, m);
#endif
  return at::vec::maximum(v, m);
}

// The largest of a vector's lanes (NaN if one is NaN: at::vec::maximum).
template <typename acc_t>
inline acc_t lanes_max(const Vectorized<acc_t>& v) {
  using Vec = Vectorized<acc_t>;
  return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
}

// v's first `count` lanes, fill's in the others (Vec::set; with AVX-512 one masked blend, where
// at::vec's set is a switch over count).
template <typename acc_t>
inline Vectorized<acc_t> first_lanes_or(const Vectorized<acc_t>& fill, const Vectorized<acc_t>& v, int64_t count) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    return _mm512_mask_blend_ps(first_lanes(count), fill, v);
  } else {
    return _mm512_mask_blend_pd(static_cast<__mmask8>(first_lanes(count)), fill, v);
  }
#else
  return Vectorized<acc_t>::set(fill, v, count);
#endif
}

// x[0..count), count < vector size, in the first lanes, −inf in the others: a block's last elements
// for its max.
template <typename scalar_t>
inline Vectorized<acc_type<scalar_t>> load_tail_for_max(const scalar_t* x, int64_t count) {
  using acc_t = acc_type<scalar_t>;
  return first_lanes_or(Vectorized<acc_t>(-std::numeric_limits<acc_t>::infinity()), load_acc(x, count), count);
}
// Whether a block's last elements past its whole vectors join its max pass as one vector
// (load_tail_for_max) instead of a scalar loop after it: AVX-512 builds (their masked loads; an AVX2
// half-type tail goes through a buffer). A row's last 8 elements had cost a 256×1000 bf16 forward
// ~9% of its time (against 992 and 1008 classes), fp32's ~4%. With the masked half-type loads and
// stores (load_acc, store_acc), against the scalar code: bf16 forward 6% less time at 256×1000 and
// 2048×1000 (1 thread) and 4096×1000 (2 threads), fwd+bwd 4%; fp32 forward 2.5%, fwd+bwd 0.5–1.7%;
// 256×1024 (no tail) and 65536×10 unchanged (Zen 4 VM, interleaved processes, 6 rounds).
constexpr bool kVectorMaxTail = kAvx512Build;

// max of x[0..n), n > 0 a multiple of the vector size; a NaN element may be passed over
// (max_or_first), whose exp then makes the row's Σexp NaN. Four independent chains: with one (and
// at::vec::maximum), the max loop took ~40% of a bf16 row's forward (perf, 256×32000); then that
// forward was 20% faster, fp32's 11% (1 thread).
// Half types: x[0..n) is also stored into `wide` in fp32, so that the exp-sum pass reads it from L1
// without converting each element a second time. kPrefetch (row_state, where prefetch_ahead_for is
// false): each step prefetches the lines kMaxPassAheadBytes past its own.
// (bf16 loaded as pairs, 2V elements by one load, a shift and a mask, and stored into `wide` in that
// order for a forward whose exp-sum pass only sums: 0–4% less time at 2048×1000, 256×1000,
// 4096×1000 and 4096×32000 forward, Zen 4 VM, interleaved processes: not kept.)
constexpr int64_t kMaxPassAheadBytes = 2048;

template <typename scalar_t, bool kPrefetch = false>
acc_type<scalar_t> vec_max(const scalar_t* x, int64_t n, acc_type<scalar_t>* wide) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t kLine = 64 / sizeof(scalar_t);  // elements per cache line
  auto load = [&](int64_t c) {
    const Vec v = load_acc(x + c);
    if constexpr (!std::is_same_v<scalar_t, acc_t>) v.store(wide + c);
    return v;
  };
  Vec m0 = load(0), m1 = m0, m2 = m0, m3 = m0;
  int64_t c = V;
  for (; c + 4 * V <= n; c += 4 * V) {
    if constexpr (kPrefetch) {
      for (int64_t a = 0; a < 4 * V; a += kLine)
        __builtin_prefetch(x + c + a + kMaxPassAheadBytes / int64_t(sizeof(scalar_t)), 0, 3);
    }
    m0 = max_or_first(load(c), m0);
    m1 = max_or_first(load(c + V), m1);
    m2 = max_or_first(load(c + 2 * V), m2);
    m3 = max_or_first(load(c + 3 * V), m3);
  }
  for (; c < n; c += V) m0 = max_or_first(load(c), m0);
  return lanes_max(at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3)));
}

// ---------------------------------------------------------------- rows: classes contiguous
constexpr int64_t kRowBlock = 2048;  // elements re-read from L1 between the max and the exp-sum

// fp32/fp64 rows whose logits and gradient (when wanted) are at least this many bytes, more than the
// last-level cache holds: while a block's exps are summed from L1, row_state prefetches the next
// block's logits (after a row's last block, the next row's first), the lines of each step's 2V
// elements at the same place there, so that the next max pass does not wait on memory. Zen 1 VM
// (8 MiB L3), interleaved A/B: fp32 fwd+bwd 12–17% faster at 2 threads (4096×1000, 1024×32000,
// 256×128256; 10–11% at 1 thread), forward 5–7% at 32000 and 128256 classes, 4096×1000's forward
// unchanged, 16384×512 11% faster (1 thread). Ungated, the prefetches cost inputs that stay in cache
// 2–10% (256×1000 to 1024×1000, 16384×100, 16384×40), hence the size gate. Past it, rows of few
// classes measured 2–5% slower at 131072×64 and 0–4% at 65536×100 (1 thread), and as much with the
// prefetches turned off for rows under 512 classes: the per-row cost of this code or the VM's noise,
// not the prefetches; 32768×300: 1% faster. Half-type rows past the gate prefetch alike in AVX-512
// builds, one line of the next block a step of their exp loop (it reads the block widened into L1 by
// the max pass): Zen 4 VM, interleaved processes, against no prefetch there: bf16 forward 17% less
// time at 4096×32000 (2 threads) and 13% at 1024×128256 (1 thread), fwd+bwd 17% at 4096×32000; fp16
// 43% and 27%. (On a Zen 1 VM, AVX2 build, with the max pass's NaN test, they had measured 4–11%
// slower; on the Zen 4 VM, without the prefetches, the max pass without its NaN test (max_or_first)
// made bf16's forward 37–47% slower past the gate, waiting on DRAM.) Below the gate they cost half types 3–4% (forward, 2048×1000 and
// 4096×1000) and 29% (4096×1000 bf16 fwd+bwd) against the max pass's below. The vocabulary-parallel
// statistics pass (shard_stats_kernel) prefetches alike: 2–10% faster at 1024×32000 and 256×128256
// fp32 (2 threads; 2–3% at 1 thread).
// Half-type rows whose input is at most this many bytes prefetch in their max pass instead (vec_max:
// the lines kMaxPassAheadBytes ahead of each step's), which otherwise waited on the L3 (perf: the max
// pass 31% of bf16 4096×1000's fwd+bwd, fp32's 8% with its prefetches ahead). Zen 4 VM, AVX-512,
// 1 thread, interleaved processes: fwd+bwd 9–21% less time at 4096×1000 (bf16, fp16), 7–18% at
// 16384×512, forward 1–9%; 256×1000 within ±2%. Past the gate (from DRAM) the forward measured
// bf16 10–20% slower with them (1024×32000, 1024×128256), fp16 15% faster, and the exp-sum pass
// prefetches instead (above). AVX2 builds prefetch in the max pass past the gate too: on a Zen 3 VM
// (AVX2, same build with and without, interleaved processes) the forward took 7–9% less time with
// them at 1024×32000 and 256×128256 (bf16 and fp16, 1 thread), 7% at 4096×32000 bf16 (2 threads),
// fwd+bwd 4–7% (the exp-sum pass's prefetches: unmeasured there). The statistics pass of a
// vocabulary shard takes the same gate for half types: with the exp-sum pass's prefetches, 13% less
// time at 1024×32000 bf16 (Zen 4 VM, 2 threads, interleaved processes, 3 rounds).
// fp32/fp64 rows below the gate prefetch in their max pass as the half types do. Zen 3 VM (32 MiB
// L3), AVX2, 1 thread, interleaved processes, against no prefetch there: forward 6% less time at
// 2048×1000 and 4096×1000 fp32 (4096×1000 also with 2 threads), 1–3% at 256×1000 and 1024×1000,
// fp64 2–5% at 1024×1000, 2048×1000 and 4096×300; fwd+bwd 4–10% less at 256×1000 and 1024×1000, 3%
// at 2048×1000, within the noise (±2%) at 4096×300, 8192×200 and 16384×100. Past the gate, the
// max-pass prefetch cost fwd+bwd 3% on top of the exp-sum pass's (4096×1000) and 25–32% instead of
// it (4096×1000, 4096×32000, 1024×128256).
// Below the gate, AVX-512 builds run each next block's max pass inside the exp-sum loop of the block
// before it (kFusedMaxPass, below): the max-pass prefetches there are that loop's, kFusedAheadBytes ahead of
// its loads, and vec_max's only for the first row of each task. Past the gate the passes stay apart:
// fused, with the fused loads' prefetches 4 or 8 KiB ahead, the forward took 13% and 21% more time at
// 4096×32000 fp32, fwd+bwd 0–11% more (Zen 4 VM, 2 threads, interleaved processes, 4–6 rounds).
constexpr int64_t kPrefetchAheadBytes = 16 << 20;

// Whether row_state prefetches the next block in its exp-sum pass (past the gate; AVX2 builds' half
// types never: see kPrefetchAheadBytes) rather than ahead of its loads in the max pass.
#if defined(CPU_CAPABILITY_AVX2)
constexpr bool kHalfExpPassPrefetch = false;
#else
constexpr bool kHalfExpPassPrefetch = true;
#endif
template <typename scalar_t>
bool prefetch_ahead_for(const Params<scalar_t>& p, bool writes_grad) {
  const int64_t bytes = p.outer * p.inner * p.classes * int64_t(sizeof(scalar_t));
  if constexpr (std::is_same_v<scalar_t, acc_type<scalar_t>>) {
    return bytes * (writes_grad ? 2 : 1) >= kPrefetchAheadBytes;
  } else {
    return kHalfExpPassPrefetch && bytes > kPrefetchAheadBytes;
  }
}

// The max pass of the block that comes next (the row's next block, or the next row's first) runs in
// the exp-sum loop of the block before it: its loads and maxps share the loop with the exp's
// multiply-adds, which leave load and add ports free, and the next exp-sum loop starts on a max
// already known instead of waiting on a separate pass's chain of maxima (at a row's start, the exp-sum
// loop had waited on the max pass's chains and the horizontal max, and the max pass on the row before's
// results). Zen 4 VM, AVX-512, 1 thread, interleaved processes, 6 rounds, against the passes apart:
// forward 11–13% less time at 256×1000, 2048×1000 and 256×8000 fp32, 8–10% at 256×1000 and 2048×1000
// bf16; fwd+bwd 6–9% less at those fp32 shapes, 7–10% in bf16 (512×6000 too); rows past the gate
// (unfused) within ±2% (1024×32000 bf16 fwd+bwd, fp32 forward).
// A RowPipe carries that max (and, for half types, the block widened into fp32) from one row_state
// call to the next, for the row it was computed for.
template <typename scalar_t>
struct RowPipe {
  using acc_t = acc_type<scalar_t>;
  static constexpr bool kWiden = !std::is_same_v<scalar_t, acc_t>;
  const scalar_t* row = nullptr;  // the row whose first block's max is `max` (null: none)
  acc_t max = acc_t(0);
  int wide_first = 0;  // half types: which half of `wide` holds that block, widened
  // Half types: a block's max pass widens it into a half of `wide` (L1), which its exp-sum pass reads
  // (bf16 1024×128256 forward 8%, 4096×1000 7% faster than converting again; Zen 1, 1 thread); the
  // block after it goes into the other half meanwhile.
  alignas(64) acc_t wide[kWiden ? 2 * kRowBlock : 1];
};

// How far ahead of its loads the fused max pass prefetches the next block's logits (across the block's
// end, into the block after it where rows are contiguous).
constexpr int64_t kFusedAheadBytes = 2048;
// Whether row_state fuses the max passes so (AVX-512 builds). AVX2 builds do not: with their 16 vector
// registers the fused loop took more time, bf16 forward 18% at 256×1000, fwd+bwd 7% at 2048×1000,
// fp32 fwd+bwd 9% there (its forward 5% less; AVX2 build on the Zen 4 VM, 1 thread, interleaved
// processes, 4 rounds).
constexpr bool kFusedMaxPass = kAvx512Build;

// Online state of one contiguous row x[0..C) (soft targets: P with the same layout).
// With `exps`, exp(x − origin of its block) is also stored there and each block's max in
// `block_maxes`, so the gradient pass rescales instead of calling exp again.
// A block of −inf logits only (a masked, padded vocabulary's last block) takes its sums (0) from
// origin 0 (shift_origin), but its max, in its state and in block_maxes, is −inf (RowState's
// convention): the row's max comes from the other blocks. (With 0 as its max, a row whose logits
// are all below 0 was measured from 0: an infinite loss where exp(−120) underflows, and confident
// rows lost `rest`'s precision.)
// grad_row (half types, or null): the row's gradient, which row_grad writes after this pass from the
// fp32 exps. Its lines are prefetched for writing here, one per 64 bytes, so that fetching them for
// ownership overlaps this pass's arithmetic instead of stalling the gradient pass: bf16 4096×32000
// and 1024×128256 fwd+bwd 16% faster at 2 threads. (fp32 stores its exps into the gradient in this pass
// anyway; prefetching its gradient row there measured 7–15% slower.)
// next_row: the row row_state is called for next (null: none), whose first block's max this call
// computes into `pipe` (RowPipe) in its last block's exp-sum loop, below the gate. prefetch_ahead
// (prefetch_ahead_for): past the gate the next block's logits are prefetched in the exp-sum pass for
// a max pass of their own instead, else in the first block's max pass (vec_max) ahead of its loads.
template <typename scalar_t, Mass kMass>
RowState<acc_type<scalar_t>> row_state(const Params<scalar_t>& p, const scalar_t* x, const scalar_t* prob,
                                       acc_type<scalar_t>* exps, acc_type<scalar_t>* block_maxes,
                                       scalar_t* grad_row, bool prefetch_ahead, const scalar_t* next_row,
                                       RowPipe<scalar_t>& pipe) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t kLine = 64 / sizeof(scalar_t);  // elements per cache line
  constexpr bool kWiden = RowPipe<scalar_t>::kWiden;
  const int64_t C = p.classes;
  // the max of this block and where it is widened, when the block before it computed them
  bool have_max = kFusedMaxPass && pipe.row == x;
  acc_t fused_max = pipe.max;
  int half = pipe.wide_first;
  pipe.row = nullptr;
  RowState<acc_t> state = RowState<acc_t>::empty();
  for (int64_t begin = 0; begin < C; begin += kRowBlock) {
    const int64_t end = std::min(C, begin + kRowBlock);
    const int64_t vec_end = begin + (end - begin) / V * V;
    acc_t* wide = kWiden ? pipe.wide + half * kRowBlock : nullptr;
    // max of the block (either pass may pass over a NaN, which the sums then carry)
    acc_t block_max = -std::numeric_limits<acc_t>::infinity();
    if (have_max) {
      block_max = fused_max;  // (with kVectorMaxTail, its elements past the whole vectors too: below)
    } else if (vec_end > begin) {
      block_max = prefetch_ahead ? vec_max(x + begin, vec_end - begin, wide)
                                 : vec_max<scalar_t, true>(x + begin, vec_end - begin, wide);
    }
    if constexpr (kVectorMaxTail) {
      if (!have_max && vec_end < end)
        block_max = std::max(block_max, lanes_max(load_tail_for_max(x + vec_end, end - vec_end)));
    } else {
      for (int64_t c = vec_end; c < end; ++c) {
        const acc_t v = static_cast<acc_t>(x[c]);
        block_max = (v != v || block_max != block_max) ? v + block_max : std::max(block_max, v);
      }
    }
    const acc_t origin = shift_origin(block_max);
    if (exps) block_maxes[begin / kRowBlock] = block_max;
    // The block after this one: below the gate its max pass (its whole vectors) runs in this block's
    // exp-sum loop, which prefetches kFusedAheadBytes ahead of those loads; past the gate
    // (prefetch_ahead) the loop prefetches the block itself, for its own max pass.
    const scalar_t* next = end < C ? x + end : next_row;
    const int64_t next_len = next ? (end < C ? std::min(C, end + kRowBlock) - end : std::min(C, kRowBlock)) : 0;
    const int64_t next_n = kFusedMaxPass && !prefetch_ahead ? next_len / V * V : 0;
    // (AVX2 builds' half types past the gate: null at compile time; a pointer known only at run time
    // there made GCC leave row_state's sweeps out of line: bf16 and fp16 forward 4–10% slower at
    // 256×1000, 2048×1000, 16384×512 and 1024×4000, AVX2 build on the Zen 4 VM, 1 thread)
    const scalar_t* ahead = nullptr;  // prefetched at ahead + o with the loop's element o, o < ahead_n
    int64_t ahead_n = 0;
    if (next_n > 0) {
      ahead = next + kFusedAheadBytes / int64_t(sizeof(scalar_t));
      ahead_n = next_n;
    } else if ((!kWiden || kHalfExpPassPrefetch) && prefetch_ahead) {
      ahead = next;
      ahead_n = next_len;
    }
    acc_t* next_wide = kWiden ? pipe.wide + (half ^ 1) * kRowBlock : nullptr;
    // (one chain of maxima: the exp-sum loop takes ~11 cycles a vector, a maxps 2)
    Vec vnext(-std::numeric_limits<acc_t>::infinity());
    auto next_max = [&](int64_t o) {  // the next block's V elements at o, if it has them
      if (o < next_n) {
        const Vec v = load_acc(next + o);
        if constexpr (kWiden) v.store(next_wide + o);
        vnext = max_or_first(v, vnext);
      }
    };
    // Σ exp(x − origin), its part below the max (RowState::rest) and the mass sums; two independent
    // accumulator sets so that two exp polynomials (long dependency chains) are in flight at once.
    const Vec vorigin(origin);
    Vec vsum[2] = {Vec(0), Vec(0)}, vrest[2] = {Vec(0), Vec(0)}, vmass_dx[2] = {Vec(0), Vec(0)},
        vmass[2] = {Vec(0), Vec(0)}, vmass_rest[2] = {Vec(0), Vec(0)};
    // kCount: with rest summed, Σexp is rest + the logits at the max (kCountAtMax)
    constexpr bool kCount = kCountAtMax && std::is_same_v<acc_t, float>;
    int64_t at_max = 0;
    // kPart: the block's last count < V elements, in lanes 0..count (the others padded with
    // d = −inf, exp 0, and no mass); a scalar std::exp per element there cost ~15% of a 1000-class
    // row.
    // kRest: the parts below the block's max (rest, mass_rest) are summed too. A block whose max is
    // below the running max of the blocks before it cannot hold the row's max, and merge() replaces
    // its rest and mass_rest by its rescaled sums (shift_to), so they are not summed there: the
    // same results, 3 of AVX2's ~18 operations per vector saved in all blocks but the running
    // maxima's (about H_k of a row's k blocks: 5 of 63 at 128256 classes, 3.4 of 16 at 32000).
    auto accumulate = [&](int64_t c, int k, auto part, int64_t count, auto rest) {
      constexpr bool kPart = decltype(part)::value;
      constexpr bool kRest = decltype(rest)::value;
      auto load = [&](const auto* ptr) { return kPart ? load_acc(ptr, count) : load_acc(ptr); };
      Vec d = (kWiden && !kPart ? Vec::loadu(wide + (c - begin)) : load(x + c)) - vorigin;
      if constexpr (kPart) d = first_lanes_or(Vec(-std::numeric_limits<acc_t>::infinity()), d, count);
      const Vec e = vexp(d);
      if constexpr (kRest && kCount) {
        vrest[k] = add_below_count(vrest[k], e, d, at_max);
      } else {
        vsum[k] += e;
        if constexpr (kRest) vrest[k] = add_below(vrest[k], e, d);
      }
      if (exps) e.store(exps + c, count);
      const Vec d_mass = kPart ? first_lanes_or(Vec(0), d, count) : d;
      if constexpr (kMass == Mass::kUnit) {
        vmass_dx[k] += d_mass;
      } else if constexpr (kMass == Mass::kWeighted) {
        const Vec w = kPart ? Vec::loadu(p.weight + c, count) : Vec::loadu(p.weight + c);
        vmass_dx[k] = at::vec::fmadd(w, d_mass, vmass_dx[k]);
        vmass[k] += w;
      } else if constexpr (kMass == Mass::kSoft) {
        Vec v = p.soft_q(load(prob + c));
        if (p.weight) v = v * (kPart ? Vec::loadu(p.weight + c, count) : Vec::loadu(p.weight + c));
        if constexpr (kPart) v = first_lanes_or(Vec(0), v, count);
        vmass_dx[k] = at::vec::fmadd(v, d_mass, vmass_dx[k]);
        vmass[k] += v;
        if constexpr (kRest) vmass_rest[k] = add_below(vmass_rest[k], v, d);
      }
    };
    // kFuse: the loop runs the next block's max pass (next_max). The loops without it (no next block
    // in this task, past the gate, AVX2 builds) hold none of its code: its tests there had cost bf16
    // rows past the gate 5–7% (1024×32000 fwd+bwd, 1 thread).
    auto sweep = [&](auto rest, auto fuse) {
      constexpr bool kFuse = decltype(fuse)::value;
      const std::false_type whole;
      int64_t c = begin;
      if constexpr (kWiden) {
        // Half types: a line of the gradient row a step (kLine elements, from the block's start), each
        // line prefetched once for writing (testing c % kLine every 2V elements, with the loop's own
        // counting, took 7% of a 1024×1000 bf16 fwd+bwd's instructions, callgrind). The same
        // accumulators in the same order as the loop below.
        static_assert(kLine % (2 * V) == 0);
        for (; c + kLine <= vec_end; c += kLine) {
          if (grad_row) __builtin_prefetch(grad_row + c, 1, 3);
          if (ahead && c - begin < ahead_n) __builtin_prefetch(ahead + (c - begin), 0, 3);
#pragma GCC unroll 4
          for (int64_t j = 0; j < kLine; j += 2 * V) {
            accumulate(c + j, 0, whole, V, rest);
            accumulate(c + j + V, 1, whole, V, rest);
            if constexpr (kFuse) {
              next_max(c + j - begin);
              next_max(c + j + V - begin);
            }
          }
        }
        if (grad_row && c < end) __builtin_prefetch(grad_row + c, 1, 3);
      }
      for (; c + 2 * V <= vec_end; c += 2 * V) {  // (half types: the block's last line, prefetched above)
        if (!kWiden && ahead) {  // the lines of the 2V elements at the same place ahead
          for (int64_t a = c - begin; a < std::min(c - begin + 2 * V, ahead_n); a += kLine)
            __builtin_prefetch(ahead + a, 0, 3);
        }
        accumulate(c, 0, whole, V, rest);
        accumulate(c + V, 1, whole, V, rest);
        if constexpr (kFuse) {
          next_max(c - begin);
          next_max(c + V - begin);
        }
      }
      if (c < vec_end) {
        accumulate(c, 0, whole, V, rest);
        if constexpr (kFuse) next_max(c - begin);
      }
      if (vec_end < end) accumulate(vec_end, 1, std::true_type{}, end - vec_end, rest);
    };
    const bool below = block_max < state.max;  // false for the first block, and with a NaN
    auto sweep_rest = [&](auto fuse) {
      if (below) {
        sweep(std::false_type{}, fuse);
      } else {
        sweep(std::true_type{}, fuse);
      }
    };
    if (kFusedMaxPass && next_n > 0) {  // (AVX2 builds instantiate no fused loop)
      sweep_rest(std::bool_constant<kFusedMaxPass>{});
    } else {
      sweep_rest(std::false_type{});
    }
    // the next block's vectors past this block's (a row's short last block before the next row's first)
    for (int64_t o = vec_end - begin; o < next_n; o += V) next_max(o);
    // and its elements past them, which the next call then leaves out of its own max pass
    if (kVectorMaxTail && next_n > 0 && next_len > next_n)
      vnext = max_or_first(load_tail_for_max(next + next_n, next_len - next_n), vnext);
    auto hsum = [](const Vec* v) {
      return at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, v[0] + v[1]);
    };
    const acc_t rest = below ? acc_t(0) : hsum(vrest);
    const acc_t sum = kCount && !below ? rest + static_cast<acc_t>(at_max) : hsum(vsum);
    RowState<acc_t> block{block_max, sum, below ? sum : rest, acc_t(0), acc_t(0), acc_t(0)};
    if constexpr (kMass != Mass::kNone) block.mass_dx = hsum(vmass_dx);
    if constexpr (kMass == Mass::kUnit) block.mass = static_cast<acc_t>(end - begin);
    if constexpr (kMass == Mass::kWeighted || kMass == Mass::kSoft) block.mass = hsum(vmass);
    if constexpr (kMass == Mass::kSoft) block.mass_rest = below ? block.mass : hsum(vmass_rest);
    state = begin == 0 ? block : merge(state, block);
    have_max = next_n > 0;
    if (have_max) {  // (the next block in the other half of pipe.wide; unfused blocks keep one, as L1 does)
      fused_max = lanes_max(vnext);
      half ^= 1;
    }
  }
  if (next_row && have_max) {  // the next row's first block
    pipe.row = next_row;
    pipe.max = fused_max;
    pipe.wide_first = half;
  }
  return state;
}

// Writes the gradient of one contiguous row (target element of an index target fixed after), with
// p = exp((x − row_max) − log_sum) (see log_prob in row_math.h):
//   index: g = softmax_coef·p − off_coef·w
//   soft:  g = softmax_coef·p − scale·w·q       (softmax_coef = scale·Σ w·q)
// With exps (from row_state: exp(x − origin_b)), p is that times exp((max_b − row_max) − log_sum),
// one scalar exp per block (max_b = origin_b, or −inf for a block of −inf logits: a factor 0 for
// its exps, which are 0); exps may alias g (fp32/fp64), each element is read before it is written.
template <typename scalar_t, bool kSoft>
void row_grad(const Params<scalar_t>& p, const scalar_t* x, const scalar_t* prob, scalar_t* g,
              acc_type<scalar_t> row_max, acc_type<scalar_t> log_sum, acc_type<scalar_t> softmax_coef,
              acc_type<scalar_t> off_coef, const acc_type<scalar_t>* exps, const acc_type<scalar_t>* block_maxes) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t C = p.classes;
  const bool subtract = off_coef != acc_t(0);  // zero: no 0·w·q term (and no 0·inf)
  // bf16, index targets, no class weights: each element is coef·p − off_coef with p in [0, 1] and
  // the block's coef = softmax_coef·exp(≤ 0), so no element is NaN where row_max, log_sum and the
  // coefficients are finite (a NaN logit makes row_max or log_sum NaN, a +inf one makes row_max
  // +inf): the rounding skips its NaN test: bf16 fwd+bwd 3–8% faster at 4096×32000 and 1024×128256,
  // 2–3% at 4096×1000 (Zen 1, 1 thread, interleaved A/B).
  const bool no_nan = std::is_same_v<scalar_t, at::BFloat16> && !kSoft && !p.weight && std::isfinite(row_max) &&
                      std::isfinite(log_sum) && std::isfinite(softmax_coef) && std::isfinite(off_coef);
  for (int64_t begin = 0; begin < C; begin += kRowBlock) {
    const int64_t end = std::min(C, begin + kRowBlock);
    acc_t coef = softmax_coef;
    if (exps) coef *= std::exp((block_maxes[begin / kRowBlock] - row_max) - log_sum);
    const Vec vmax(row_max), vlog_sum(log_sum), vcoef(coef), voff(off_coef);
    // V gradient elements at c (count < V: the block's last ones, as in row_state). `general` false:
    // index targets without class weights, g = coef·p − off_coef with the tests of off_coef and of
    // the weights out of the loop (off_coef 0: minus +0, which changes no value, −0 included); GCC
    // contracts it into one fused multiply-subtract (rounded once) in builds with FMA. bf16 fwd+bwd
    // 3–5% faster at 1024×32000, 256×128256 and 16384×512 (Zen 1, 1 thread, interleaved A/B), fp32 0–2%.
    const Vec vsub = subtract ? voff : Vec(0);
    auto value = [&](int64_t c, auto part, int64_t count, auto general) {
      constexpr bool kPart = decltype(part)::value;
      auto load = [&](const auto* ptr) { return kPart ? Vec::loadu(ptr, count) : Vec::loadu(ptr); };
      auto load_in = [&](const scalar_t* ptr) { return kPart ? load_acc(ptr, count) : load_acc(ptr); };
      const Vec e = exps ? load(exps + c) : vexp((load_in(x + c) - vmax) - vlog_sum);
      Vec out = vcoef * e;
      if constexpr (!decltype(general)::value) {
        out = out - vsub;
      } else if (subtract) {
        Vec sub = voff;
        if constexpr (kSoft) sub = sub * p.soft_q(load_in(prob + c));
        if (p.weight) sub = sub * load(p.weight + c);
        out = out - sub;
      }
      return out;
    };
    auto sweep = [&](auto general) {
      const std::false_type whole;
      int64_t c = begin;
      // (loops unrolled twice: with their own counting, 2 of about 17 instructions a bf16 vector)
      if constexpr (!std::is_same_v<scalar_t, acc_t>) {  // half types: pairs of vectors share a pack
        if (no_nan) {
#pragma GCC unroll 2
          for (; c + 2 * V <= end; c += 2 * V)
            store_acc2<scalar_t, true>(g + c, value(c, whole, V, general), value(c + V, whole, V, general));
        } else {
#pragma GCC unroll 2
          for (; c + 2 * V <= end; c += 2 * V)
            store_acc2(g + c, value(c, whole, V, general), value(c + V, whole, V, general));
        }
      }
#pragma GCC unroll 2
      for (; c + V <= end; c += V) store_acc(g + c, value(c, whole, V, general));
      if (c < end) store_acc(g + c, value(c, std::true_type{}, end - c, general), end - c);
    };
    if (kSoft || p.weight) {
      sweep(std::true_type{});
    } else if constexpr (!kSoft) {
      sweep(std::false_type{});
    }
  }
}

// The class of a row's (sole) max: searched in the blocks whose max is the row's max.
template <typename scalar_t>
int64_t sole_max_class(const Params<scalar_t>& p, const scalar_t* x, const acc_type<scalar_t>* block_maxes,
                       acc_type<scalar_t> row_max) {
  using Vec = Vectorized<acc_type<scalar_t>>;
  constexpr int64_t V = Vec::size();
  const Vec vmax(row_max);
  for (int64_t begin = 0; begin < p.classes; begin += kRowBlock) {
    if (block_maxes[begin / kRowBlock] != row_max) continue;
    const int64_t end = std::min(p.classes, begin + kRowBlock);
    int64_t c = begin;
    while (c + V <= end && (load_acc(x + c) == vmax).zero_mask() == (1 << V) - 1) c += V;  // no lane equal
    for (; c < end; ++c)
      if (static_cast<acc_type<scalar_t>>(x[c]) == row_max) return c;
  }
  return -1;
}

// Where rows_kernel finds a position's row (logits, probability targets, gradient): in the tensors,
// at offset_of(pos).
template <typename scalar_t>
struct TensorRows {
  const Params<scalar_t>& p;
  const scalar_t* x(int64_t pos) const { return p.input + p.offset_of(pos); }
  const scalar_t* prob(int64_t pos) const { return p.soft_target + p.offset_of(pos); }
  scalar_t* g(int64_t pos) const { return p.grad ? p.grad + p.offset_of(pos) : nullptr; }
};

template <typename scalar_t, Mass kMass, typename Rows>
void rows_kernel(const Params<scalar_t>& p, int64_t pos_begin, int64_t pos_end, const Rows& rows) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool kSoft = kMass == Mass::kSoft;
  // The sum pass keeps its exps for the gradient pass: in the gradient itself for fp32/fp64, in a
  // per-task fp32 row buffer for half types (which would lose the exp's precision). Gradients past
  // the last-level cache written with non-temporal stores instead (no read for ownership; fp32's exps
  // in the row buffer) measured slower: 4096×32000 fwd+bwd 5% more time in fp32 at 2 threads (14% at
  // 1 thread), 12% in bf16 (Zen 4 VM, AVX-512, interleaved processes, 4 rounds).
  constexpr bool kExpsInGrad = std::is_same_v<scalar_t, acc_t>;
  // Probability targets whose gradient is written over their logits (inplace_backward,
  // across_rows_kernel's buffer) keep their exps apart too: sole_max_class reads the logits after the
  // sum pass (with the exps over them it found no class, and a confident row's gradient at its max
  // lost its cancellation-free form: relative error 0.28 instead of 1e-7).
  std::vector<acc_t> block_maxes(p.grad ? (p.classes + kRowBlock - 1) / kRowBlock : 0);
  std::vector<acc_t> exp_row(p.grad && (!kExpsInGrad || kSoft) ? p.classes : 0);
  acc_t* maxes = block_maxes.empty() ? nullptr : block_maxes.data();
  const bool prefetch_ahead = prefetch_ahead_for(p, p.grad != nullptr);
  RowPipe<scalar_t> pipe;
  for (int64_t pos = pos_begin; pos < pos_end; ++pos) {
    const scalar_t* x = rows.x(pos);
    const scalar_t* prob = kSoft ? rows.prob(pos) : nullptr;
    scalar_t* g = rows.g(pos);
    PositionTargets<acc_t> t{};
    TargetLogits<acc_t> xt{};
    if constexpr (!kSoft) {
      t = p.targets_of(pos);
      if (!t.valid()) {
        p.position_loss[pos] = acc_t(0);
        p.lse[pos] = acc_t(0);
        if (g) std::fill_n(g, p.classes, scalar_t(0));
        continue;
      }
      xt = p.target_logits(x, 1, t);
    }
    acc_t* exps = nullptr;
    if (g) {
      if constexpr (kExpsInGrad) {
        exps = kSoft && g == x ? exp_row.data() : g;
      } else {
        exps = exp_row.data();
      }
    }
    const scalar_t* next = pos + 1 < pos_end ? rows.x(pos + 1) : nullptr;
    const RowState<acc_t> state =
        row_state<scalar_t, kMass>(p, x, prob, exps, maxes, kExpsInGrad ? nullptr : g, prefetch_ahead, next, pipe);
    const acc_t log_sum = row_log_sum(state);
    const PositionResult<acc_t> r =
        kSoft ? soft_target_position(state, log_sum, p.scale_at(pos), p.z_loss)
              : index_target_position(state, log_sum, t, xt, p.weight_sum, p.scale_at(pos), p);
    p.lse[pos] = r.lse;
    p.position_loss[pos] = r.loss;
    if (g) {
      // Probability targets: the sole max's class, found before the gradient may overwrite the logits.
      const int64_t sole = kSoft && r.coefs.sole_rest >= acc_t(0) ? sole_max_class(p, x, maxes, state.max) : -1;
      row_grad<scalar_t, kSoft>(p, x, prob, g, state.max, r.log_sum, r.coefs.softmax_coef, r.coefs.off_coef, exps,
                                maxes);
      if (!kSoft) p.write_target_grads(g, 1, state.max, r.log_sum, r.coefs, t, xt);
      if (sole >= 0) g[sole] = static_cast<scalar_t>(sole_max_grad(r.coefs));
    }
  }
}

template <typename scalar_t, Mass kMass>
void rows_kernel(const Params<scalar_t>& p, int64_t pos_begin, int64_t pos_end) {
  rows_kernel<scalar_t, kMass>(p, pos_begin, pos_end, TensorRows<scalar_t>{p});
}

// ---------------------------------------------------------------- tiles: one SIMD lane per position
// The per-lane (per-position) values of a tile: its online-softmax sums, then each lane's results.
template <typename acc_t, int64_t V>
struct TileLanes {
  alignas(64) acc_t max[V], sum[V], rest[V], mass_dx[V], mass[V], mass_rest[V];
  alignas(64) acc_t log_sum[V], coef[V], off[V];
  IndexGradCoefs<acc_t> k[V];
  TargetLogits<acc_t> x[V];
};

// The index targets of a tile's lanes: with Params::plain_index_targets, each lane's class in `cls`
// (−1: ignored, or past the tile's positions; Params::plain_targets), else each lane's PositionTargets
// in `t` (mixup). Probability targets use neither.
// Filling a 24-byte PositionTargets a lane, reading the target logits and weights lane by lane and
// storing the target gradient elements lane by lane after their classes' vectors took 17% of a
// 65536×10 fp32 tile kernel (perf). Now a lane's class is one int32, the logits and weights are read
// by masked vector gathers (gather_valid) and the elements blended into their classes' stores
// (blend_class). Zen 4 VM, AVX-512, 1 thread, interleaved processes, against the per-lane code:
// 65536×10 fwd+bwd 15–20% less time (fp32, bf16, fp16), forward 15–17%; 8×21×256×256 fwd+bwd 5–16%,
// 16×19×97×101 5–17%; 4×150×64×64 and 2×400×64×64 within ±3%; fp64 fwd+bwd 7% less time.
template <typename acc_t, int64_t V>
struct TileTargets {
  alignas(64) int32_t cls[V];
  PositionTargets<acc_t> t[V];
};

// Loss, lse and gradient coefficients of a tile's valid lanes, from their sums and log Σexp (invalid
// lanes: zeros), lane by lane: probability targets and mixup (tile_index_results does the rest).
template <typename scalar_t, Mass kMass, typename tile_t, typename acc_t, int64_t V>
inline void tile_lane_results(const Params<scalar_t>& p, const tile_t* x, int64_t sc, int64_t pos0, int64_t count,
                              const bool* valid, const PositionTargets<acc_t>* targets, TileLanes<acc_t, V>& lanes) {
  for (int64_t l = 0; l < V; ++l) {
    if (!valid[l]) {
      lanes.log_sum[l] = lanes.coef[l] = lanes.off[l] = acc_t(0);
      if (l < count) p.position_loss[pos0 + l] = p.lse[pos0 + l] = acc_t(0);
      continue;
    }
    RowState<acc_t> state{lanes.max[l], lanes.sum[l], lanes.rest[l], acc_t(0), acc_t(0), acc_t(0)};
    if constexpr (kMass != Mass::kNone) state.mass_dx = lanes.mass_dx[l];
    if constexpr (kMass == Mass::kUnit || kMass == Mass::kWeighted) state.mass = p.weight_sum;
    if constexpr (kMass == Mass::kSoft) {
      state.mass = lanes.mass[l];
      state.mass_rest = lanes.mass_rest[l];
    }
    const acc_t scale = p.scale_at(pos0 + l);
    PositionResult<acc_t> r;
    if constexpr (kMass == Mass::kSoft) {
      r = soft_target_position(state, lanes.log_sum[l], scale, p.z_loss);
    } else {
      lanes.x[l] = p.target_logits(x + l, sc, targets[l]);
      r = index_target_position(state, lanes.log_sum[l], targets[l], lanes.x[l], p.weight_sum, scale, p);
    }
    p.lse[pos0 + l] = r.lse;
    p.position_loss[pos0 + l] = r.loss;
    lanes.coef[l] = r.coefs.softmax_coef;
    lanes.off[l] = r.coefs.off_coef;
    lanes.k[l] = r.coefs;
  }
}

// base[idx] in the lanes whose cls ≥ 0, 0 in the others (where nothing is read). (at::vec::mask_gather
// gathers nothing with AVX-512: it tests its mask's lanes by comparing them with an all-ones float,
// a NaN, for equality.)
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kVectorGather = true;
inline Vectorized<float> gather_valid(const float* base, const Vectorized<int32_t>& cls, const Vectorized<int32_t>& idx) {
  return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), _mm512_cmpge_epi32_mask(cls, _mm512_setzero_si512()), idx,
                                  base, sizeof(float));
}
#elif defined(CPU_CAPABILITY_AVX2)
constexpr bool kVectorGather = true;
inline Vectorized<float> gather_valid(const float* base, const Vectorized<int32_t>& cls, const Vectorized<int32_t>& idx) {
  const __m256 valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(cls, _mm256_set1_epi32(-1)));
  return _mm256_mask_i32gather_ps(_mm256_setzero_ps(), base, idx, valid, sizeof(float));
}
#else
constexpr bool kVectorGather = false;
inline Vectorized<float> gather_valid(const float*, const Vectorized<int32_t>&, const Vectorized<int32_t>&) {
  return Vectorized<float>(0);
}
#endif

// Index targets without mixup (the common case): every lane's loss, lse, gradient coefficients and
// target gradient element with vector operations. These are index_target_position and grad_at of
// row_math.h for a target mass v = 1 and no second target (t.b = −1, peak_b = 0), the same operations
// in the same order lane by lane, with blends where those branch on a lane's value. Done lane by lane
// in scalar code (tile_lane_results), they cost 25–45% of a tile of 10–21 classes.
// In: the lanes' max (the origin: 0 where all logits are −inf), rest, mass_dx, log Σexp and the lanes
// whose max is sole (row_math.h's sole_max, as tile_kernel computed it for log Σexp).
// Out: lse and loss stored for the count lanes (0 in invalid lanes), lanes.coef and lanes.off, and in
// target_grad the gradient element at each valid lane's target (with want_grad).
template <typename scalar_t, typename tile_t, typename acc_t, int64_t V>
C10_ALWAYS_INLINE void tile_index_results(const Params<scalar_t>& p, const tile_t* x, int64_t sc, int64_t pos0,
                                          int64_t count, const int32_t* cls,
                                          const Vectorized<acc_t>& vmax, const Vectorized<acc_t>& vsole,
                                          const Vectorized<acc_t>& vrest, const Vectorized<acc_t>& vmass_dx,
                                          const Vectorized<acc_t>& vlog_sum, const Vectorized<acc_t>& vinvalid,
                                          bool want_grad, TileLanes<acc_t, V>& lanes, acc_t* target_grad,
                                          const Vectorized<acc_t>* captured_xa = nullptr) {
  using Vec = Vectorized<acc_t>;
  // Lane by lane only what differs per lane: the target logit, and the target's weight and the
  // position's scale where there are class weights and per-position scales.
  // fp32 tiles whose element offsets fit int32 gather them with vector gathers (valid lanes only).
  alignas(64) acc_t xa[V], wa[V], scale[V];
  const Vec zero(0);
  // (Vec::set is an out-of-line call in at::vec: full tiles, nearly all, take the scale as it is)
  Vec vxa, vwa = Vec::blendv(Vec(1), zero, vinvalid),
           vscale = count == V ? Vec(p.grad_scale) : Vec::set(zero, Vec(p.grad_scale), count);
  // captured_xa: the target logits, taken by tile_kernel as their classes went by (weights alone are
  // gathered then).
  if (captured_xa) vxa = *captured_xa;
  bool gathered = false;
  if constexpr (std::is_same_v<tile_t, float> && kVectorGather) {
    if ((p.classes - 1) * sc + V <= std::numeric_limits<int32_t>::max()) {
      using IVec = Vectorized<int32_t>;
      const IVec vcls = IVec::loadu(cls);
      if (!captured_xa) vxa = gather_valid(x, vcls, vcls * IVec(static_cast<int32_t>(sc)) + IVec::arange(0, 1));
      if (p.weight) vwa = gather_valid(p.weight, vcls, vcls);
      gathered = true;
    }
  }
  if (!gathered) {
    if (!captured_xa) {
      for (int64_t l = 0; l < V; ++l) xa[l] = cls[l] >= 0 ? static_cast<acc_t>(x[cls[l] * sc + l]) : acc_t(0);
      vxa = Vec::loadu(xa);
    }
    if (p.weight) {
      for (int64_t l = 0; l < V; ++l) wa[l] = cls[l] >= 0 ? p.weight[cls[l]] : acc_t(0);
      vwa = Vec::loadu(wa);
    }
  }
  if (p.position_scale) {
    for (int64_t l = 0; l < V; ++l) scale[l] = l < count ? p.scale_at(pos0 + l) : acc_t(0);
    vscale = Vec::loadu(scale);
  }
  const acc_t off = p.tv.off, ws = p.weight_sum, z = p.z_loss;
  const Vec vpeak = Vec(p.tv.on - off) * vwa;  // (on − off)·k_a·w_a
  // ℓ = off·v·(Σw·L − mass_dx) − peak_a·lp_a (mass_nll: 0 without mass; no 0·inf where peak_a = 0)
  Vec loss = zero;
  if (off != acc_t(0) && ws != acc_t(0)) loss = Vec(off) * (Vec(ws) * vlog_sum - vmass_dx);
  const Vec lp_a = (vxa - vmax) - vlog_sum;
  loss = loss - Vec::blendv(vpeak * lp_a, zero, vpeak == zero);
  const Vec lse = vmax + vlog_sum;
  Vec coef = vscale * (Vec(off * ws) + vpeak);
  if (z != acc_t(0)) {  // add_z_loss
    loss = loss + Vec(z) * lse * lse;
    coef = coef + vscale * Vec(acc_t(2)) * Vec(z) * lse;
  }
  Vec::blendv(lse, zero, vinvalid).store(p.lse + pos0, count);
  Vec::blendv(loss, zero, vinvalid).store(p.position_loss + pos0, count);
  const Vec voff = vscale * Vec(off);
  Vec::blendv(coef, zero, vinvalid).store(lanes.coef);
  Vec::blendv(voff, zero, vinvalid).store(lanes.off);
  if (!want_grad) return;
  // grad_at at the target: at the row's sole max (sole_max) sole_base − coef·rest/(1 + rest) with
  // sole_base = scale·(off·v·(Σw − w_a) + 2α·v·lse), else coef·p_a − off_coef·w_a − scale·peak_a.
  Vec g = coef * vexp(lp_a) - Vec::blendv(voff * vwa, zero, voff == zero) - vscale * vpeak;
  const Vec sole = vsole & (vxa == vmax);  // the target is the sole max
  Vec base = Vec(off) * (Vec(ws) - vwa);
  if (z != acc_t(0)) base = base + Vec(acc_t(2) * z) * lse;
  g = Vec::blendv(g, vscale * base - coef * (vrest / (Vec(1) + vrest)), sole);
  g.store(target_grad);
}

// out with `value` in the lanes whose class (cls) is c's.
inline Vectorized<float> blend_class(const Vectorized<float>& out, const Vectorized<int32_t>& cls,
                                     const Vectorized<int32_t>& c, const Vectorized<float>& value) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_mask_mov_ps(out, _mm512_cmpeq_epi32_mask(cls, c), value);
#else
  return Vectorized<float>::blendv(out, value, at::vec::cast<float>(cls == c));
#endif
}
// Up to this many classes, tile_kernel blends each lane's target gradient element into its class's
// vector (2 vector operations a class with AVX-512) rather than storing it lane by lane after.
constexpr int64_t kBlendTargetClasses = 32;
// tile_kernel's capture_target (AVX-512 builds only: measured there).
constexpr bool kCaptureTarget = kAvx512Build;

// A tile is up to V positions pos0 .. pos0+count, lane l of class c at x[c*sc + l] (and P, g alike).
// Strided layouts ((N, C, H, W), x.t()) are walked in place (tile_t = scalar_t); small-C rows are
// gathered into a class-major buffer of the accumulation type first (tile_t = acc_t). The tile's C×V
// logits are read from memory once (pass 1: max) and re-read from cache (pass 2: sums, pass 3:
// gradient).
// `targets` holds the lanes' index targets (TileTargets); `exps` (C·V values, may be
// null) keeps pass 2's exp(x − max) for pass 3; `ahead` (may be null): pass 1 prefetches the line
// at ahead + c·sc for each class c, and the line at g_ahead + c·sc (may be null) for writing
// (across_kernel). g may be x (inplace_backward): every logit is read
// before its gradient element is written.
// Returns true where the gradient written is known to hold no NaN (bf16 tiles of index targets; the
// tiles widened in a buffer round it without the NaN test), else false.
// Always inlined into its three callers (which pass constant strides or buffers): left to itself,
// GCC inlined some instances and not others, and flipped with unrelated edits (out of line, fp32
// 65536×10 and 8×21×256×256 were 4–7% slower).
// `between`: the caller's independent work (small_rows_kernel: the next tile's rows), run once: after
// the exp-sum pass, before the per-lane results that wait on its sums (log1p and the results are a
// chain of dependent operations), so that the CPU runs it meanwhile; in a tile without a valid lane,
// before its zeros.
struct NoWork {
  void operator()() const {}
};
template <typename scalar_t, Mass kMass, typename tile_t, typename Between = NoWork>
C10_ALWAYS_INLINE bool tile_kernel(const Params<scalar_t>& p, const tile_t* x, const tile_t* prob, tile_t* g,
                                   int64_t sc, int64_t pos0, int64_t count,
                                   const TileTargets<acc_type<scalar_t>, Vectorized<acc_type<scalar_t>>::size()>& targets,
                                   acc_type<scalar_t>* exps,
                                   const tile_t* ahead = nullptr, tile_t* g_ahead = nullptr,
                                   bool capture_target = false, const Between& between = Between{}) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr bool kSoft = kMass == Mass::kSoft;
  const int64_t C = p.classes;
  auto load = [&](const tile_t* ptr) { return count == V ? load_acc(ptr) : load_acc(ptr, count); };
  const bool plain = !kSoft && p.plain_index_targets();  // targets.cls, vector results (tile_index_results)

  // Two max chains (see max_or_first): 65536×10 forward 3–4% faster than one.
  if (ahead) __builtin_prefetch(ahead, 0, 3);
  Vec max0 = load(x), max1 = max0;
  for (int64_t c = 1; c < C; c += 2) {
    if (ahead) {
      __builtin_prefetch(ahead + c * sc, 0, 3);
      if (c + 1 < C) __builtin_prefetch(ahead + (c + 1) * sc, 0, 3);
    }
    max0 = max_or_first(load(x + c * sc), max0);
    if (c + 1 < C) max1 = max_or_first(load(x + (c + 1) * sc), max1);
  }
  const Vec vmax = max_or_first(max1, max0);
  // The lanes that are positions with a target to score: `valid` (but for plain index targets, whose
  // valid lanes are those with cls ≥ 0) and vinvalid (blendv mask: all bits set in ignored / padding
  // lanes). Plain targets in fp32 lanes: one compare (lane by lane, this took 7% of a 21-class map's
  // forward, perf), after the max pass: at the tile's start, that vector load of the classes just
  // stored (plain_targets) waited on them (perf: 15% of a 21-class map's fwd+bwd, which was 4% slower
  // than with the lane-by-lane test). A tile without a valid lane costs that max pass.
  constexpr bool kFloatLanes = std::is_same_v<acc_t, float>;
  bool valid[V];
  alignas(64) acc_t invalid_bits[V];
  bool any_valid = false, vector_valid = false;
  if constexpr (kFloatLanes) {
    if (plain) {
      const Vec invalid = at::vec::cast<float>(Vectorized<int32_t>::loadu(targets.cls) < Vectorized<int32_t>(0));
      invalid.store(invalid_bits);
      any_valid = invalid.zero_mask() != 0;
      vector_valid = true;
    }
  }
  if (!vector_valid) {
    for (int64_t l = 0; l < V; ++l) {
      valid[l] = l < count && (kSoft || (plain ? targets.cls[l] >= 0 : targets.t[l].valid()));
      any_valid |= valid[l];
      std::memset(&invalid_bits[l], valid[l] ? 0 : 0xFF, sizeof(acc_t));
    }
  }
  if (!any_valid) {
    between();
    for (int64_t l = 0; l < count; ++l) p.position_loss[pos0 + l] = p.lse[pos0 + l] = acc_t(0);
    if (g)
      for (int64_t c = 0; c < C; ++c) store_acc(g + c * sc, Vec(0), count);
    return true;
  }
  const Vec vorigin = Vec::blendv(vmax, Vec(0), vmax == Vec(-std::numeric_limits<acc_t>::infinity()));
  Vec vsum(0), vrest(0), vmass_dx(0), vmass(0), vmass_rest(0), vmass_lost(0), vmass_rest_lost(0);
  const bool compensated = kSoft && p.eps != acc_t(0) && C > 32;  // (the bias grows with C: 21 classes, 2e-8)
  // One lane sums all C classes of its position: in chunks of walk_chunk(C) classes (row_math.h), each
  // chunk's partial sums added to the totals.
  const int64_t chunk = walk_chunk(C);
  // capture_target (across_kernel where a tile's lines crowd one L1 set; AVX-512; plain index targets,
  // up to kBlendTargetClasses classes): each lane's target logit is taken in this pass as its class
  // goes by (a compare and a masked move a class) for tile_index_results, which otherwise gathers it
  // from C lines a stride apart that have left the L1 by then (perf: 7% of fp32 8×21×256×256
  // fwd+bwd's across_kernel samples after that gather). Zen 4 VM, interleaved processes, 6 rounds,
  // against the gather: fp32 fwd+bwd 7–9% less time at 8×21×128×128, 16×19×64×64 and 8×21×256×256
  // (8% at 2 threads), forward 6–7%; 16×19×97×101, whose lines spread over the sets and which keeps
  // the gather, read 0.99 (the control). Taken at every such map, the spread ones included, the
  // capture cost 16×19×97×101 6% (its gather hits the L1).
  const bool capture = kCaptureTarget && kFloatLanes && capture_target && plain && C <= kBlendTargetClasses;
  using IVec = Vectorized<int32_t>;
  const IVec vcapture_cls = capture ? IVec::loadu(targets.cls) : IVec(-1);
  Vec vxa(0);
  for (int64_t c0 = 0; c0 < C; c0 += chunk) {
    const int64_t c1 = std::min(C, c0 + chunk);
    Vec csum(0), crest(0), cmass_dx(0), cmass(0), cmass_rest(0);
    for (int64_t c = c0; c < c1; ++c) {
      if (g_ahead) __builtin_prefetch(g_ahead + c * sc, 1, 3);
      const Vec xc = load(x + c * sc);
      if constexpr (kFloatLanes) {
        if (capture) vxa = blend_class(vxa, vcapture_cls, IVec(static_cast<int32_t>(c)), xc);
      }
      const Vec d = xc - vorigin;
      const Vec e = vexp(d);
      csum += e;
      crest = add_below(crest, e, d);
      if (exps) e.store(exps + c * V);
      if constexpr (kMass == Mass::kUnit) {
        cmass_dx += d;
      } else if constexpr (kMass == Mass::kWeighted) {
        cmass_dx = at::vec::fmadd(Vec(p.weight[c]), d, cmass_dx);
      } else if constexpr (kSoft) {
        Vec v = p.soft_q(load(prob + c * sc));
        if (p.weight) v = v * Vec(p.weight[c]);
        cmass_dx = at::vec::fmadd(v, d, cmass_dx);
        // With label smoothing, Σv and its part below the max are compensated (Kahan; *_lost: what
        // the last add rounded away) over all the classes: smoothing adds the same ε/C at every class
        // but the target, whose roundings all lean one way. Summed plainly in one run, a confident
        // position's gradient at its max (Σ_{j≠max} v_j less a tiny term) was 2e-6 relative off at
        // 150 classes and 1.1e-5 at 1000 (ε = 0.1, fp32). It costs soft-target tiles with smoothing
        // 8–15% of their fwd+bwd at 4×150×64×64 (Zen 4 VM, 1 thread, interleaved processes; 4–10% at
        // 10 and 21 classes), so tiles of up to 32 classes and targets without smoothing (whose own
        // values vary) sum plainly, in chunks.
        if (compensated) {
          kahan_add(vmass, vmass_lost, v);
          kahan_add(vmass_rest, vmass_rest_lost, Vec::blendv(v, Vec(0), d == Vec(0)));
        } else {
          cmass += v;
          cmass_rest = add_below(cmass_rest, v, d);
        }
      }
    }
    vsum += csum;
    vrest += crest;
    vmass_dx += cmass_dx;
    if constexpr (kSoft) {
      if (!compensated) {
        vmass += cmass;
        vmass_rest += cmass_rest;
      }
    }
  }
  between();
  TileLanes<acc_t, V> lanes;
  vorigin.store(lanes.max);
  vsum.store(lanes.sum);
  vrest.store(lanes.rest);
  vmass_dx.store(lanes.mass_dx);
  vmass.store(lanes.mass);
  vmass_rest.store(lanes.mass_rest);
  // One vector log1p for every lane: log Σexp = log1p(Σexp − 1) (Σexp ≥ 1 holds the max's exp(0) = 1,
  // and Σexp − 1 rounds at most as Σexp does), or log1p(rest) where the max is sole (row_log_sum;
  // vsole is row_math.h's sole_max lane by lane, the same operations on the same values).
  const Vec vat_max = vsum - vrest;
  const Vec vsole = (vrest < Vec(1)) & (vat_max > Vec(acc_t(0.5))) & (vat_max < Vec(acc_t(1.5)));
  vlog1p(Vec::blendv(vsum - Vec(1), vrest, vsole)).store(lanes.log_sum);
  const Vec vinvalid = Vec::loadu(invalid_bits);
  // Plain index targets: vector results (tile_index_results; never for probability targets, whose
  // instances leave it out); else lane by lane.
  alignas(64) acc_t target_grad[V];
  if (plain) {
    if constexpr (!kSoft)
      tile_index_results<scalar_t, tile_t>(p, x, sc, pos0, count, targets.cls, vorigin, vsole, vrest, vmass_dx,
                                         Vec::loadu(lanes.log_sum), vinvalid, g != nullptr, lanes, target_grad,
                                         capture ? &vxa : nullptr);
  } else {
    tile_lane_results<scalar_t, kMass, tile_t>(p, x, sc, pos0, count, valid, targets.t, lanes);
  }
  if (!g) return false;

  const Vec vcoef = Vec::loadu(lanes.coef), voff = Vec::loadu(lanes.off);
  // bf16 with index targets (kBf16NoNaNRounding): whether this gradient holds no NaN, for the caller's
  // rounding (narrow, bf16_lanes_to_rows).
  // Its elements are coef·p − off·w and the target's from the same finite terms when every valid
  // lane's lse (so max and Σexp), coef and off are finite, and 0 in the other lanes: a NaN or infinite
  // logit makes its lane's lse NaN or infinite, and coef holds off·Σw, which is finite only where every
  // class weight is. (The sum of the three is finite only when each is.)
  bool grad_finite = false;
  if constexpr (kBf16NoNaNRounding && std::is_same_v<scalar_t, at::BFloat16> && !kSoft) {
    if (plain) {
      const Vec terms = Vec::blendv(vorigin + Vec::loadu(lanes.log_sum), Vec(0), vinvalid) + vcoef + voff;
      grad_finite = ((terms - terms) != Vec(0)).zero_mask() == (1 << V) - 1;
    }
  }
  // p = exp(x − max) / Σexp (garbage lanes are blended out). Σexp is reloaded from `lanes`: kept live
  // through the results, GCC spilled it inside the exp-sum loop in some instances (a store and a
  // reload per class on the sum's dependency chain: bf16 4×150×64×64 forward 21% slower).
  const Vec vinv_sum = Vec(acc_t(1)) / Vec::loadu(lanes.sum);
  // Probability targets: lanes whose sole max gets sole_base − softmax_coef·r (row_math.h grad_at);
  // under sole_max the max is the lane's only logit with x − max = 0 (and so exp(x − max) = 1).
  // (Index targets skip the lane loop: its zeros cost 3% of a 10-class tile's instructions, callgrind.)
  alignas(64) acc_t sole_bits[V] = {}, sole_value[V] = {};
  bool any_soft_sole = false;
  if constexpr (kSoft) {
    for (int64_t l = 0; l < V; ++l) {
      const bool sole = valid[l] && lanes.k[l].sole_rest >= acc_t(0);
      std::memset(&sole_bits[l], sole ? 0xFF : 0, sizeof(acc_t));
      sole_value[l] = sole ? sole_max_grad(lanes.k[l]) : acc_t(0);
      any_soft_sole |= sole;
    }
  }
  const Vec vsole_soft = Vec::loadu(sole_bits), vsole_value = Vec::loadu(sole_value);
  // Plain index targets, fp32 lanes, few classes: each lane's target element is blended into its
  // class's vector before the store (blend_class), instead of stored over it lane by lane after.
  const bool blend_targets = kFloatLanes && plain && C <= kBlendTargetClasses;
  const IVec vcls = blend_targets ? IVec::loadu(targets.cls) : IVec(-1);
  const Vec vtarget_grad = blend_targets ? Vec::loadu(target_grad) : Vec(0);
  // Index targets, whole tiles with their exps kept (the common case): the same operations in a loop
  // without per-class tests (the general loop below tests the weights, the exp buffer, the blend and
  // the tile's count at every class: with the loop's own counting, 16 of its 27 instructions a class
  // at 10 classes, AVX2). The target blend compares with a vector count of the classes.
  bool stored = false;
  if constexpr (!kSoft) {
    if (exps && count == V) {
      const acc_t* const weight = p.weight;
      const auto fast = [&](auto weighted, auto blend) {
        IVec vc(0);
        for (int64_t c = 0; c < C; ++c) {
          Vec sub = voff;
          if constexpr (decltype(weighted)::value) sub = sub * Vec(weight[c]);
          Vec out = Vec::blendv(vcoef * (Vec::loadu(exps + c * V) * vinv_sum) - sub, Vec(0), vinvalid);
          if constexpr (decltype(blend)::value) {
            out = blend_class(out, vcls, vc, vtarget_grad);
            vc = vc + IVec(1);
          }
          store_acc(g + c * sc, out);
        }
      };
      const bool weighted = weight != nullptr;
      if (kFloatLanes && blend_targets) {
        if constexpr (kFloatLanes) weighted ? fast(std::true_type{}, std::true_type{}) : fast(std::false_type{}, std::true_type{});
      } else {
        weighted ? fast(std::true_type{}, std::false_type{}) : fast(std::false_type{}, std::false_type{});
      }
      stored = true;
    }
  }
  if (!stored) {
    for (int64_t c = 0; c < C; ++c) {
      Vec sub = voff;
      if constexpr (kSoft) sub = sub * p.soft_q(load(prob + c * sc));
      if (p.weight) sub = sub * Vec(p.weight[c]);
      const Vec e = exps ? Vec::loadu(exps + c * V) : vexp(load(x + c * sc) - vorigin);
      Vec out = vcoef * (e * vinv_sum) - sub;
      if (kSoft && any_soft_sole) out = Vec::blendv(out, vsole_value, (e == Vec(1)) & vsole_soft);
      out = Vec::blendv(out, Vec(0), vinvalid);
      if constexpr (kFloatLanes && !kSoft) {
        if (blend_targets) out = blend_class(out, vcls, IVec(static_cast<int32_t>(c)), vtarget_grad);
      }
      store_acc(g + c * sc, out, count);
    }
  }
  if constexpr (!kSoft) {
    if (blend_targets) return grad_finite;
    for (int64_t l = 0; l < count; ++l) {
      if (plain ? targets.cls[l] < 0 : !valid[l]) continue;
      if (plain) {
        g[targets.cls[l] * sc + l] = static_cast<tile_t>(target_grad[l]);
      } else {
        p.write_target_grads(g + l, sc, lanes.max[l], lanes.log_sum[l], lanes.k[l], targets.t[l], lanes.x[l]);
      }
    }
  }
  return grad_finite;
}

// The exp buffer of a tile when a gradient is wanted and C·V values stay cache-sized.
template <typename scalar_t>
int64_t tile_exps_size(const Params<scalar_t>& p) {
  constexpr int64_t V = Vectorized<acc_type<scalar_t>>::size();
  return p.grad && p.classes * V * sizeof(acc_type<scalar_t>) <= 256 * 1024 ? p.classes * V : 0;
}

// The index targets of `count` consecutive positions of a strided map, from (outer n, inner s0).
template <typename scalar_t, Mass kMass>
inline void map_targets(const Params<scalar_t>& p, int64_t n, int64_t s0, int64_t count,
                        TileTargets<acc_type<scalar_t>, Vectorized<acc_type<scalar_t>>::size()>& targets) {
  if constexpr (kMass == Mass::kSoft) return;
  if (p.plain_index_targets()) {
    p.template plain_targets<Vectorized<acc_type<scalar_t>>::size()>(p.target_offset(n, s0), p.target_stride_inner,
                                                                     count, targets.cls);
  } else {
    for (int64_t l = 0; l < count; ++l)
      targets.t[l] = p.targets_at(p.target_offset(n, s0 + l), n * p.inner + s0 + l);
  }
}

// dst[0..n) = src[0..n) in the accumulation type, and back (rounded once), with vector conversions.
// n: a count, or a compile-time one (std::integral_constant), whose loops then unroll without tests
// (across_wide_kernel's whole groups).
template <typename scalar_t>
void widen(const scalar_t* src, acc_type<scalar_t>* dst, auto n) {
  constexpr int64_t V = Vectorized<acc_type<scalar_t>>::size();
  int64_t i = 0;
  for (; i + V <= n; i += V) load_acc(src + i).store(dst + i);
  if (i < n) load_acc(src + i, n - i).store(dst + i, n - i);
}

// kNoNaN: src holds no NaN (store_acc2's).
template <typename scalar_t, bool kNoNaN = false>
void narrow(const acc_type<scalar_t>* src, scalar_t* dst, auto n) {
  using Vec = Vectorized<acc_type<scalar_t>>;
  constexpr int64_t V = Vec::size();
  int64_t i = 0;
  // (half types: two vectors a pack, as store_acc2)
  if constexpr (!std::is_same_v<scalar_t, acc_type<scalar_t>>)
    for (; i + 2 * V <= n; i += 2 * V)
      store_acc2<scalar_t, kNoNaN>(dst + i, Vec::loadu(src + i), Vec::loadu(src + i + V));
  for (; i + V <= n; i += V) store_acc(dst + i, Vec::loadu(src + i));
  if (i < n) store_acc(dst + i, Vec::loadu(src + i, n - i), n - i);
}

// Strided classes, contiguous positions, widened: a group of up to kLineTiles consecutive tiles (a
// 64-byte line of each class, all of one outer index) is copied into buffers in the accumulation type
// once and computed there (the small-rows kernel's tile_kernel instance), and its gradient is copied
// into place, each class's line whole (half types: two vectors per pack and store, store_acc2).
// Half types, always: the passes read fp32 from L1 instead of converting each logit in each pass
// (bf16 8×21×256×256: forward 7%, fwd+bwd 13% faster than converting in place, 2 threads,
// interleaved in one process), and each class's line is read by consecutive loads and written once
// instead of in 16-byte pieces, one tile at a time (AVX2 VM, 1 thread, interleaved processes: bf16
// 4×150×64×64 forward 14%, fwd+bwd 15% less time, 8×21×256×256 fwd+bwd 6%; 16×19×97×101 within ±5%
// either way. Zen 4 VM, AVX-512, two tiles a group: bf16 and fp16 4×150×64×64 fwd+bwd 26–27%,
// 2×400×64×64 34–35% less time).
// fp32, AVX2 builds: only where more of a tile's C lines fall into one set of the L1 than it has
// ways, 8 (class_lines_share_l1_set; the L1's set is chosen by address bits 6–11, which virtual and
// physical addresses share, so the strides tell it). In place, each of a tile's passes then reads
// them all again from beyond the L1. Zen 3 VM, 1 thread, fresh processes, interleaved, against in
// place: fwd+bwd 4–37% less time at 8×21×256×256, 8×16×256×256, 16×19×64×64, 4×150×64×64,
// 2×400×64×64 and 2×150×128×128 (2% more at 8×21×128×128), forward 2–26% less; 2 threads, fwd+bwd
// 7% less at 8×21×256×256, 30% at 4×150×64×64 and equal at 8×21×128×128; with the gradient
// prefetch below, 12×12×256×256 fwd+bwd 20% less (forward 2%). In the benchmark's own process
// (2 threads, 4 runs of each build, in alternating order), 8×21×256×256 fp32 forward 19% less time
// (medians 5.8 against 7.2 ms), fwd+bwd within noise (11.5 against 11.6 ms) before that prefetch.
// Maps whose lines spread over the sets stay in place: widened, 8×21×250×262 took 21–51% more
// time, 2×400×60×60 25%, and 16×19×97×101 and 4×150×56×56 (about 10 lines a set) 28–35% more
// without the gradient prefetch, 4–16% less with it. fp64 widened was 42% slower (Zen 4). fp32 in
// AVX-512 builds stays in place (across_kernel): widened where lines crowd a set, fwd+bwd took 5–13%
// more time at 8×21×128×128, 16×19×64×64 and 4×150×64×64 (1 thread) and was within the noise at
// 8×21×256×256 (1 and 2 threads; Zen 4 VM, interleaved processes, 6–8 rounds).
// Used where one tile's buffers fit kWideTileBytes (widens_tiles).
constexpr int64_t kWideTileBytes = 64 * 1024;
// kWidePrefetch, kWideReadLocality: across_wide_kernel's prefetches, and the cache level its reads'
// go to (__builtin_prefetch's locality: 3 the L1, 2 the L2).
#if defined(CPU_CAPABILITY_AVX2)
constexpr bool kWidePrefetch = true;
constexpr int kWideReadLocality = 3;
constexpr bool kWidenFloat = true;
#elif defined(CPU_CAPABILITY_AVX512)
constexpr bool kWidePrefetch = true;
constexpr int kWideReadLocality = 2;
constexpr bool kWidenFloat = false;
#else
constexpr bool kWidePrefetch = false;  // (unmeasured)
constexpr int kWideReadLocality = 3;
constexpr bool kWidenFloat = false;
#endif
template <typename scalar_t>
constexpr bool kMayWiden = std::is_same_v<scalar_t, float> ? kWidenFloat : !std::is_same_v<scalar_t, acc_type<scalar_t>>;

// Whether more than 8 of the C lines one class stride apart fall into one of the 64 sets of a 32 KiB
// 8-way L1 of 64-byte lines (indexed by address bits 6–11).
template <typename scalar_t>
bool class_lines_share_l1_set(const Params<scalar_t>& p) {
  constexpr int64_t kPeriod = 4096, kMostPerSet = 8;
  std::array<int64_t, kPeriod / 64> lines_in_set{};
  const int64_t step = p.stride_class * int64_t(sizeof(scalar_t)) % kPeriod;  // (c · step < 2^63: c < 2^51)
  for (int64_t c = 0; c < p.classes; ++c)
    if (++lines_in_set[c * step % kPeriod / 64] > kMostPerSet) return true;
  return false;
}

template <typename scalar_t, Mass kMass>
bool widens_tiles(const Params<scalar_t>& p) {
  using acc_t = acc_type<scalar_t>;
  constexpr int64_t V = Vectorized<acc_t>::size();
  if (!kMayWiden<scalar_t> || p.classes * V * int64_t(sizeof(acc_t)) * (kMass == Mass::kSoft ? 3 : 2) > kWideTileBytes)
    return false;
  return !std::is_same_v<scalar_t, acc_t> || class_lines_share_l1_set(p);
}

template <typename scalar_t, Mass kMass>
void across_wide_kernel(const Params<scalar_t>& p, int64_t tile_begin, int64_t tile_end) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static_assert(kMayWiden<scalar_t>);
  constexpr int64_t V = Vec::size();
  constexpr bool kSoft = kMass == Mass::kSoft;
  constexpr int64_t kLineTiles = std::max<int64_t>(1, 64 / (V * int64_t(sizeof(scalar_t))));
  constexpr int64_t GV = kLineTiles * V;  // the buffers' class stride
  const int64_t C = p.classes, sc = p.stride_class;
  const int64_t tiles_per_outer = (p.inner + V - 1) / V;
  std::vector<acc_t> exps(tile_exps_size<scalar_t>(p));
  std::vector<acc_t> wide(C * GV * (kSoft ? 3 : 2));
  acc_t* x_wide = wide.data();
  acc_t* g_wide = x_wide + C * GV;
  acc_t* prob_wide = kSoft ? g_wide + C * GV : nullptr;
  TileTargets<acc_t, V> targets = {};
  for (int64_t tile = tile_begin; tile < tile_end;) {
    const int64_t n = tile / tiles_per_outer, s0 = (tile % tiles_per_outer) * V;
    const int64_t offset = n * p.stride_outer + s0 * p.stride_inner;
    // This group: `tiles` tiles, `width` positions from s0.
    const int64_t tiles = std::min({kLineTiles, tile_end - tile, tiles_per_outer - tile % tiles_per_outer});
    const int64_t width = std::min(tiles * V, p.inner - s0);
    // Meanwhile (AVX2 and AVX-512 builds), each class's line that holds the next group's last position
    // is prefetched: the line the group would miss on where lines do not start at a group (its first is
    // this group's last). Zen 3 VM, AVX2, 1 thread, interleaved processes, against no prefetch: bf16
    // and fp16 fwd+bwd 15–20% less time at 8×21×250×262, 0–12% at 16×19×97×101. Maps whose lines share
    // a few cache sets (power-of-two strides) were left out of it for a while, where prefetched lines
    // might evict each other before they are read (once measured 6–9% slower so), but measured again it
    // pays there too on balance: bf16 fwd+bwd 17% less at 8×21×256×256, 8% more at 4×150×64×64 and ±3%
    // at 2×400×64×64, 8×21×128×128 and 16×19×64×64 (1 thread); 2 threads 6% and 11% less at the first
    // two; fp32 (widened, see above) forward 0–21% less, fwd+bwd 6–16% less at 4×150×64×64 and
    // 2×400×64×64 but 4–6% more at 8×21×256×256, 8×21×128×128 and 16×19×64×64 (1 thread; 2 threads 5–9%
    // less at 8×21×256×256, 4×150×64×64 and 8×21×128×128). Prefetching the next group's first line
    // instead missed the unaligned maps' lines.
    // With a gradient, this group's own gradient lines are prefetched for writing as its logits are
    // widened, so that their fetch for ownership overlaps the group's arithmetic instead of stalling
    // the stores that copy the gradient back (perf: 14% of the fp32 widened kernel's samples): fwd+bwd
    // 0–36% less time at 8×21×256×256, 4×150×64×64, 2×400×64×64, 8×21×128×128, 8×21×250×262 and
    // 16×19×97×101, bf16 and fp32, 1 and 2 threads (2% more once, fp32 8×21×128×128, 1 thread;
    // interleaved processes, Zen 3 VM). The next group's gradient lines instead cost 13% (fp32
    // 8×21×256×256, 1 thread) and 20% (2×400×64×64).
    // AVX-512 builds (groups of two bf16 or fp16 tiles, a line of each class) did without both until
    // perf put 23% of bf16 8×21×256×256 fwd+bwd's samples on the widening loads, waiting on memory.
    // With them, against without (Zen 4 VM, interleaved processes, medians of 5–7 per-round ratios; a
    // noisy VM: fp32, whose code did not change, read 0.93–0.98 at 1 thread and 0.76–0.89 at 2):
    // fwd+bwd, 1 thread, 20–25% less time at bf16 8×21×256×256, 15–34% fp16, 20% bf16 8×21×250×262 and
    // 18% 4×150×64×64; 2 threads, 8×21×256×256 19% in one run and 6% in one whose fp32 read 11% less
    // (forward 32%, fp32 24%), 2–14% at five other maps; forward, 1 thread, 27–29% at 8×21×250×262, 20%
    // 2×400×64×64, the others within ±7%. The next group's lines go to the L2 there (kWideReadLocality:
    // one L1 set cannot hold a group's lines of a power-of-two stride and the next group's too): 2–14%
    // less time than into the L1 at 8×21×256×256, 8×21×250×262 and 4×150×64×64 (bf16 fwd+bwd, 1
    // thread). Without the gradient prefetch: within ±5%.
    const bool prefetch = kWidePrefetch && tile + tiles < tile_end;
    // (w: the group's width, a constant GV for whole groups: with the width tested at every vector,
    // copying in and out took 30% of the instructions of 2×21×128×128 fp32 fwd+bwd, callgrind)
    const auto widen_classes = [&](auto w) {
      for (int64_t c = 0; c < C; ++c) {
        if (prefetch) __builtin_prefetch(p.input + offset + c * sc + 2 * GV - 1, 0, kWideReadLocality);
        if (kWidePrefetch && p.grad) __builtin_prefetch(p.grad + offset + c * sc, 1, 3);
        widen<scalar_t>(p.input + offset + c * sc, x_wide + c * GV, w);
        if constexpr (kSoft) widen<scalar_t>(p.soft_target + offset + c * sc, prob_wide + c * GV, w);
      }
    };
    const std::integral_constant<int64_t, GV> whole;
    width == GV ? widen_classes(whole) : widen_classes(width);
    // (bf16: a group whose gradient holds no NaN is rounded without the NaN test, tile_kernel's grad_finite)
    bool grad_finite = true;
    for (int64_t k = 0; k < tiles; ++k) {
      const int64_t count = std::min(V, width - k * V);
      map_targets<scalar_t, kMass>(p, n, s0 + k * V, count, targets);
      grad_finite &= tile_kernel<scalar_t, kMass, acc_t>(p, x_wide + k * V, kSoft ? prob_wide + k * V : nullptr,
                                                         p.grad ? g_wide + k * V : nullptr, GV, n * p.inner + s0 + k * V,
                                                         count, targets, exps.empty() ? nullptr : exps.data());
    }
    const auto copy_back = [&](auto w, auto no_nan) {
      for (int64_t c = 0; c < C; ++c)
        narrow<scalar_t, decltype(no_nan)::value>(g_wide + c * GV, p.grad + offset + c * sc, w);
    };
    const auto copy_all_back = [&](auto no_nan) { width == GV ? copy_back(whole, no_nan) : copy_back(width, no_nan); };
    if (p.grad) {
      if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
        grad_finite ? copy_all_back(std::true_type{}) : copy_all_back(std::false_type{});
      } else {
        copy_all_back(std::false_type{});
      }
    }
    tile += tiles;
  }
}

// Strided classes, contiguous positions: tiles walk the tensor in place (half types: where
// across_wide_kernel does not apply).
template <typename scalar_t, Mass kMass>
void across_kernel(const Params<scalar_t>& p, int64_t tile_begin, int64_t tile_end) {
  using acc_t = acc_type<scalar_t>;
  constexpr int64_t V = Vectorized<acc_t>::size();
  constexpr bool kSoft = kMass == Mass::kSoft;
  // Each tile's max pass prefetches, class by class, the line after the one it reads (the next tile's
  // where a tile is a line; a tile reads one line per class, C lines a stride apart). With many
  // classes at a power-of-two stride the hardware prefetchers do not follow (C streams whose lines
  // share a few cache sets): fp32 1×1000×64×64 forward 17–28% and fwd+bwd 4–11% less time (Zen 4
  // VM, AVX-512, torch 2.14.1, 1 thread, interleaved processes); 8×21×256×256, 16×19×97×101,
  // 2×400×64×64, small maps, fp64 and bf16 within ±6% (noise). AVX2 builds: unmeasured.
  // fp32 with a gradient: the exp-sum pass also prefetches the next tile's gradient lines for
  // writing, so that their fetch for ownership overlaps this tile's arithmetic. Against no such
  // prefetch (Zen 4 VM, 1 thread, interleaved processes): fwd+bwd 13% less time at 16×19×97×101, 6%
  // at 2×400×64×64, 3% at 8×21×256×256, forward within ±3%; in one process, 22–30% at 1×1000×60×60,
  // 11% at 1×600×64×64, ±5% at 1×1000×64×64 and 1×2000×32×32. fp64 and half types do without: with
  // the prefetch code in its instance (in this pass or the max pass), fp64's forward measured 13–39%
  // slower; the widened half-type tiles (across_wide_kernel) up to 21% slower with it.
  constexpr int64_t kAhead = std::max<int64_t>(V, 64 / sizeof(scalar_t));
  const int64_t sc = p.stride_class;
  const int64_t tiles_per_outer = (p.inner + V - 1) / V;
  std::vector<acc_t> exps(tile_exps_size<scalar_t>(p));
  TileTargets<acc_t, V> targets = {};
  // Where more of a tile's lines share an L1 set than it has ways, tile_kernel takes each lane's target
  // logit as its class goes by (capture_target) instead of gathering it from lines that left the L1.
  const bool capture_target = kCaptureTarget && class_lines_share_l1_set(p);
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t n = tile / tiles_per_outer, s0 = (tile % tiles_per_outer) * V;
    const int64_t offset = n * p.stride_outer + s0 * p.stride_inner;
    const int64_t count = std::min(V, p.inner - s0);
    map_targets<scalar_t, kMass>(p, n, s0, count, targets);
    const scalar_t* ahead = s0 + kAhead + V <= p.inner ? p.input + offset + kAhead : nullptr;
    scalar_t* g_ahead = std::is_same_v<scalar_t, float> && ahead && p.grad ? p.grad + offset + kAhead : nullptr;
    tile_kernel<scalar_t, kMass, scalar_t>(p, p.input + offset, kSoft ? p.soft_target + offset : nullptr,
                                           p.grad ? p.grad + offset : nullptr, sc, n * p.inner + s0, count, targets,
                                           exps.empty() ? nullptr : exps.data(), ahead, g_ahead, capture_target);
  }
}

// Contiguous rows of few classes: too short to vectorize along, so V rows are transposed into a
// class-major buffer (one lane per row), computed as a tile and the gradient scattered back.
constexpr int64_t kSmallClasses = 32;

// The stride between consecutive positions' rows when it is one stride for all of them ((N, C):
// inner = 1; channels_last: stride_outer = inner·stride_inner), else −1.
inline int64_t uniform_stride(int64_t inner, int64_t stride_outer, int64_t stride_inner) {
  if (inner == 1) return stride_outer;
  return stride_outer == inner * stride_inner ? stride_inner : -1;
}

#if defined(CPU_CAPABILITY_AVX512)
// A 16×16 float block transposed in registers (r[i] lane j ← r[j] lane i): unpacks of 32- and 64-bit
// pairs, then two rounds of 128-bit lane shuffles (FBGEMM's scheme, as at::vec's transpose_block), 64
// shuffles with every index known at compile time, so the block stays in registers.
C10_ALWAYS_INLINE void transpose_16x16(__m512 r[16]) {
  __m512 t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  auto pd = [](__m512 v) { return _mm512_castps_pd(v); };
#pragma GCC unroll 16
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[4 * i]), pd(t[4 * i + 2])));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[4 * i]), pd(t[4 * i + 2])));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(t[4 * i + 1]), pd(t[4 * i + 3])));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(t[4 * i + 1]), pd(t[4 * i + 3])));
  }
#pragma GCC unroll 16
  for (int i = 0; i < 2; ++i) {
#pragma GCC unroll 16
    for (int k = 0; k < 4; ++k) {
      t[8 * i + k] = _mm512_shuffle_f32x4(r[8 * i + k], r[8 * i + 4 + k], 0x88);
      t[8 * i + 4 + k] = _mm512_shuffle_f32x4(r[8 * i + k], r[8 * i + 4 + k], 0xdd);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xdd);
  }
}

// The masked elements of a row's block of 16 as fp32 lanes (0 in the others), and back (half types:
// rounded once, as store_acc). Half types convert in registers, so their rows need no fp32 copy.
inline __m512 load_row(const float* ptr, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, ptr); }
inline __m512 load_row(const at::BFloat16* ptr, __mmask16 mask) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, ptr)), 16));
}
inline __m512 load_row(const at::Half* ptr, __mmask16 mask) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, ptr));
}
inline void store_row(float* ptr, __mmask16 mask, __m512 v) { _mm512_mask_storeu_ps(ptr, mask, v); }
inline void store_row(at::BFloat16* ptr, __mmask16 mask, __m512 v) {
  _mm256_mask_storeu_epi16(ptr, mask, bf16_from(v));
}
inline void store_row(at::Half* ptr, __mmask16 mask, __m512 v) {
  _mm256_mask_storeu_epi16(ptr, mask, at::vec::cvtfp32_fp16(v));
}

// 16 rows of cols ≤ 32 elements (ld_src apart) into class-major fp32 dst (dst[c·16 + i] = src[i·ld_src + c]);
// dst has room for 32 rows of 16 and rows cols.. of the last block of 16 get zeros.
template <typename src_t>
inline void rows_to_lanes(const src_t* src, int64_t ld_src, float* dst, int64_t cols) {
  for (int64_t b = 0; b < cols; b += 16) {
    const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, cols - b)) - 1);
    __m512 r[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) r[i] = load_row(src + i * ld_src + b, mask);
    transpose_16x16(r);
#pragma GCC unroll 16
    for (int k = 0; k < 16; ++k) _mm512_storeu_ps(dst + (b + k) * 16, r[k]);
  }
}

// The way back: class-major src (32 rows of 16, as rows_to_lanes fills them) into 16 rows of cols
// elements, ld_dst apart (only their cols elements are written).
template <typename dst_t>
inline void lanes_to_rows(const float* src, dst_t* dst, int64_t ld_dst, int64_t cols) {
  for (int64_t b = 0; b < cols; b += 16) {
    const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, cols - b)) - 1);
    __m512 r[16];
#pragma GCC unroll 16
    for (int k = 0; k < 16; ++k) r[k] = _mm512_loadu_ps(src + (b + k) * 16);
    transpose_16x16(r);
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) store_row(dst + i * ld_dst + b, mask, r[i]);
  }
}

// A strided map's 16 positions of cols classes (src[c·ld_src + i], i < 16: one 64-byte line a class)
// into 16 rows (dst[i·ld_dst + c]), and rows back into the map: across_rows_kernel's transposes.
// map_to_rows prefetches the lines of the classes this many ahead of each block's (in-tile: the
// hardware prefetchers do not follow lines a class stride apart): 1x2048x3600 fwd+bwd 17%,
// 4096×1000 14%, 2×32000×500 9% less time than without (Zen 4 VM, 1 thread, in one process).
constexpr int64_t kMapRowsAhead = 32;

inline void map_to_rows(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t cols) {
  auto block = [&](int64_t b, auto part) C10_ALWAYS_INLINE_ATTRIBUTE {
    constexpr bool kPart = decltype(part)::value;
    const int64_t n = kPart ? cols - b : 16;
    const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
    const bool ahead = !kPart && b + kMapRowsAhead + 16 <= cols;
    __m512 r[16];
#pragma GCC unroll 16
    for (int k = 0; k < 16; ++k) {
      if (ahead) __builtin_prefetch(src + (b + kMapRowsAhead + k) * ld_src, 0, 3);
      r[k] = k < n ? _mm512_loadu_ps(src + (b + k) * ld_src) : _mm512_setzero_ps();
    }
    transpose_16x16(r);
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
      if constexpr (kPart) {
        _mm512_mask_storeu_ps(dst + i * ld_dst + b, mask, r[i]);
      } else {
        _mm512_storeu_ps(dst + i * ld_dst + b, r[i]);
      }
    }
  };
  int64_t b = 0;
  for (; b + 16 <= cols; b += 16) block(b, std::false_type{});
  if (b < cols) block(b, std::true_type{});
}
inline void rows_to_map(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t cols) {
  auto block = [&](int64_t b, auto part) C10_ALWAYS_INLINE_ATTRIBUTE {
    const int64_t n = decltype(part)::value ? cols - b : 16;
    const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
    __m512 r[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) r[i] = _mm512_maskz_loadu_ps(mask, src + i * ld_src + b);
    transpose_16x16(r);
#pragma GCC unroll 16
    for (int k = 0; k < 16; ++k)
      if (k < n) _mm512_storeu_ps(dst + (b + k) * ld_dst, r[k]);
  };
  int64_t b = 0;
  for (; b + 16 <= cols; b += 16) block(b, std::false_type{});
  if (b < cols) block(b, std::true_type{});
}
constexpr bool kRegisterTranspose = true;
constexpr bool kMaskedRowStores = true;  // lanes_to_rows writes any rows in place
constexpr bool kHalfRows = true;         // and converts half-type rows in registers (load_row, store_row)
// bf16 rows as pairs of classes (one 32-bit element: class 2k in its low half, 2k + 1 in its high
// half): 16 rows of up to 32 classes through one 16×16 transpose of 32-bit elements, where rows
// converted on the way (load_row, store_row) take one per 16 classes; a pair widens into its two
// fp32 classes with a shift and a mask. Rows are read and written with masked 16-bit loads and
// stores: exactly their cols elements (2 ≤ cols ≤ 32); an odd cols' last pair widens a zero into row
// cols of dst (the tile kernel reads only rows < cols).
inline void bf16_rows_to_lanes(const at::BFloat16* src, int64_t ld_src, float* dst, int64_t cols) {
  const __mmask32 mask = static_cast<__mmask32>((uint64_t(1) << cols) - 1);
  __m512 r[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(mask, src + i * ld_src));
  transpose_16x16(r);
  const int64_t pairs = (cols + 1) / 2;
#pragma GCC unroll 16
  for (int k = 0; k < 16; ++k)
    if (k < pairs) widen_pair(r[k], dst + 2 * k * 16, dst + (2 * k + 1) * 16);
}

// The way back: class-major fp32 src into 16 bf16 rows of cols elements (2 ≤ cols ≤ 32), each class
// rounded once to nearest even and paired with its neighbour, transposed 16×16 in 32 bits, each row
// stored with one masked store. AVX512-BF16: two classes converted in one instruction (bf16_from, NaN
// kept) and interleaved with one permute; otherwise at::vec's rounding (NaN: 0xffff), without its NaN
// test where src holds no NaN (kNoNaN, as bf16_pair_no_nan).
template <bool kNoNaN>
inline void bf16_lanes_to_rows(const float* src, at::BFloat16* dst, int64_t ld_dst, int64_t cols) {
  const __mmask32 mask = static_cast<__mmask32>((uint64_t(1) << cols) - 1);
  const int64_t pairs = (cols + 1) / 2;
#if defined(SMOOTHCE_AVX512_BF16)
  // even's 16 values, then odd's, into (even_i, odd_i) pairs
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
#endif
  __m512 r[16];
#pragma GCC unroll 16
  for (int k = 0; k < 16; ++k) {
    if (k < pairs) {
      const __m512 even = _mm512_loadu_ps(src + 2 * k * 16), odd = _mm512_loadu_ps(src + (2 * k + 1) * 16);
#if defined(SMOOTHCE_AVX512_BF16)
      r[k] = _mm512_castsi512_ps(_mm512_permutexvar_epi16(interleave, bf16_from(even, odd)));
#else
      __m512i lo = _mm512_srli_epi32(bf16_round_high(even), 16), hi = bf16_round_high(odd);
      if constexpr (!kNoNaN) {
        lo = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(even, even, _CMP_ORD_Q), _mm512_set1_epi32(0xffff), lo);
        hi = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(odd, odd, _CMP_ORD_Q),
                                     _mm512_set1_epi32(static_cast<int>(0xffff0000u)), hi);
      }
      r[k] = _mm512_castsi512_ps(_mm512_mask_blend_epi16(0xaaaaaaaau, lo, hi));
#endif
    } else {
      r[k] = _mm512_setzero_ps();
    }
  }
  transpose_16x16(r);
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) _mm512_mask_storeu_epi16(dst + i * ld_dst, mask, _mm512_castps_si512(r[i]));
}
constexpr bool kBf16PairRows = true;  // bf16_rows_to_lanes, bf16_lanes_to_rows
constexpr bool kPairsExact = true;    // which read and write a tile's rows only
#elif defined(CPU_CAPABILITY_AVX2)
// AVX2: the same with 8×8 blocks, 24 shuffles: unpacks of 32-bit pairs, 64-bit shuffles within 128-bit
// lanes, then 128-bit lane permutes.
C10_ALWAYS_INLINE void transpose_8x8(__m256 r[8]) {
  __m256 t[8];
#pragma GCC unroll 8
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);      // a0 b0 a1 b1 | a4 b4 a5 b5
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);  // a2 b2 a3 b3 | a6 b6 a7 b7
  }
  __m256 u[8];
#pragma GCC unroll 8
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);      // a0 b0 c0 d0 | a4 b4 c4 d4
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);  // a1 b1 c1 d1 | a5 b5 c5 d5
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
  }
#pragma GCC unroll 8
  for (int k = 0; k < 4; ++k) {
    r[k] = _mm256_permute2f128_ps(u[k], u[4 + k], 0x20);      // column k: rows a..d, then e..h
    r[k + 4] = _mm256_permute2f128_ps(u[k], u[4 + k], 0x31);  // column k + 4
  }
}

// 8 rows of cols ≤ 32 floats (ld_src apart) into class-major dst (dst[c·8 + i] = src[i·ld_src + c]); dst
// has room for 32 rows of 8. Rows cols.. of the last block of 8 get what follows a row in memory (the
// tile kernel reads only rows < cols): a row's last, partial block is loaded whole where that stays
// inside the 8 rows' span (masked loads, slow on some CPUs, took half of this function on Zen 1).
inline void rows_to_lanes(const float* src, int64_t ld_src, float* dst, int64_t cols) {
  __m256 r[8];
  const auto transpose_and_store = [&](int64_t b) {
    transpose_8x8(r);
    float* const out = dst + b * 8;
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) _mm256_storeu_ps(out + k * 8, r[k]);
  };
  int64_t b = 0;
  for (; b + 8 <= cols; b += 8) {
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld_src + b);
    transpose_and_store(b);
  }
  if (b == cols) return;
  // the last, partial block (after the loop: inside it, GCC computed the partial block's row tests at
  // every call, 5% of a 65536×10 fwd+bwd's instructions)
  const int64_t n = cols - b;
  const float* const in = src + b;
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  if (b >= 8 && ld_src >= cols) {
    // after a whole block, rows apart: rows 0..6 have 8 elements of the span from b on
    // ((7 − i)·ld_src ≥ cols > b), only row 7 is masked
#pragma GCC unroll 7
    for (int i = 0; i < 7; ++i) r[i] = _mm256_loadu_ps(in + i * ld_src);
    r[7] = _mm256_maskload_ps(in + 7 * ld_src, mask);
  } else {
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      // the span ends at src[7·ld_src + cols)
      if ((7 - i) * ld_src + n >= 8) {
        r[i] = _mm256_loadu_ps(in + i * ld_src);
      } else {
        r[i] = _mm256_maskload_ps(in + i * ld_src, mask);
      }
    }
  }
  transpose_and_store(b);
}

// 8 fp32 lanes into a row's block of 8 elements (fp16: converted in one instruction, rounded once as
// store_acc).
inline void store8(float* ptr, __m256 v) { _mm256_storeu_ps(ptr, v); }
inline void store8(at::Half* ptr, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(ptr), at::vec::cvtfp32_fp16(v));
}

// The way back into 8 contiguous rows of cols elements (ld_dst == cols) with whole 8-element stores
// (AVX2's masked stores are microcoded on some CPUs, and it has none for 16 bits): the last, partial
// block of classes goes first, each row's spill-over into the next row's first block is overwritten
// when that block is written, and the last row's spills past the 8·cols elements, so dst needs 7
// elements of room after them that are written later (small_rows_kernel: the next tile's rows, or a
// buffer's).
template <typename dst_t>
inline void lanes_to_rows(const float* src, dst_t* dst, int64_t ld_dst, int64_t cols) {
  TORCH_INTERNAL_ASSERT_DEBUG_ONLY(ld_dst == cols);
  const int64_t last = (cols - 1) / 8 * 8;
  for (int64_t b = last; b >= 0; b -= 8) {
    __m256 r[8];
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(src + (b + k) * 8);
    transpose_8x8(r);
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) store8(dst + i * ld_dst + b, r[i]);
  }
}

// bf16 rows as pairs of classes: one 32-bit element holds classes 2k (low half) and 2k + 1 (high half)
// of a row, so 8 rows of up to 16 classes move through one 8×8 transpose of 32-bit elements, where
// widened rows take one per 8 classes, and widening a pair into its two fp32 classes takes two
// operations (the low half shifted up, the high half masked). `cols` ≥ 2 classes, ≤ 32. Every row
// reads its blocks of 16 classes whole: up to 15 elements past a row, so the caller makes sure that
// src[7·ld_src + (cols + 15) / 16 · 16) is still readable. Rows past cols of the last block get what
// follows a row in memory (the tile kernel reads only rows < cols).
inline void bf16_rows_to_lanes(const at::BFloat16* src, int64_t ld_src, float* dst, int64_t cols) {
  for (int64_t b = 0; b < cols; b += 16) {
    __m256 r[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i)
      r[i] = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i * ld_src + b)));
    transpose_8x8(r);
    const int64_t pairs = (std::min<int64_t>(16, cols - b) + 1) / 2;
    float* const out = dst + b * 8;
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k)
      if (k < pairs) widen_pair(r[k], out + 2 * k * 8, out + (2 * k + 1) * 8);
  }
}

// The way back: class-major fp32 src into 8 contiguous bf16 rows of cols elements (ld_dst == cols,
// 2 ≤ cols ≤ 32), each class rounded once to nearest even as at::vec's conversion (NaN: 0xffff) and
// paired with its neighbour, then transposed 8×8 in 32 bits and stored 16 classes a row at once. As
// lanes_to_rows, the last block goes first and each row's spill-over into the next is overwritten
// when that row is written; the last row spills up to 15 elements past the 8·cols, so dst needs that
// room after them, written later (small_rows_kernel: the next tile's rows, or a buffer's). kNoNaN:
// src holds no NaN (bf16_pair_no_nan's rounding, without the NaN test).
template <bool kNoNaN>
inline void bf16_lanes_to_rows(const float* src, at::BFloat16* dst, int64_t ld_dst, int64_t cols) {
  TORCH_INTERNAL_ASSERT_DEBUG_ONLY(ld_dst == cols && cols >= 2);
  for (int64_t b = (cols - 1) / 16 * 16; b >= 0; b -= 16) {
    const int64_t pairs = (std::min<int64_t>(16, cols - b) + 1) / 2;
    __m256 r[8];
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {
      if (k < pairs) {
        const __m256 even = _mm256_loadu_ps(src + (b + 2 * k) * 8), odd = _mm256_loadu_ps(src + (b + 2 * k + 1) * 8);
        __m256i lo = _mm256_srli_epi32(bf16_round_high(even), 16), hi = bf16_round_high(odd);
        if constexpr (!kNoNaN) {
          lo = _mm256_blendv_epi8(_mm256_set1_epi32(0xffff), lo, _mm256_castps_si256(_mm256_cmp_ps(even, even, _CMP_ORD_Q)));
          hi = _mm256_blendv_epi8(_mm256_set1_epi32(static_cast<int>(0xffff0000u)), hi,
                                  _mm256_castps_si256(_mm256_cmp_ps(odd, odd, _CMP_ORD_Q)));
        }
        r[k] = _mm256_castsi256_ps(_mm256_blend_epi16(lo, hi, 0xaa));
      } else {
        r[k] = _mm256_setzero_ps();
      }
    }
    transpose_8x8(r);
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i * ld_dst + b), _mm256_castps_si256(r[i]));
  }
}
constexpr bool kRegisterTranspose = true;
constexpr bool kMaskedRowStores = false;  // lanes_to_rows writes 8 contiguous rows, spilling 7 floats
constexpr bool kHalfRows = false;
constexpr bool kBf16PairRows = true;  // bf16_rows_to_lanes, bf16_lanes_to_rows
constexpr bool kPairsExact = false;  // (they read and write up to 15 elements past a tile)
#else
constexpr bool kRegisterTranspose = false;
constexpr bool kMaskedRowStores = false;
constexpr bool kHalfRows = false;
inline void rows_to_lanes(const float*, int64_t, float*, int64_t) {}
template <typename dst_t>
inline void lanes_to_rows(const float*, dst_t*, int64_t, int64_t) {}
constexpr bool kBf16PairRows = false;
inline void bf16_rows_to_lanes(const at::BFloat16*, int64_t, float*, int64_t) {}
template <bool kNoNaN>
inline void bf16_lanes_to_rows(const float*, at::BFloat16*, int64_t, int64_t) {}
constexpr bool kPairsExact = false;
#endif

// dst[j·ld_dst + i] = src[i·ld_src + j] for i < rows, j < cols, element by element: partial tiles and
// fp64 (full fp32 tiles with AVX-512 and AVX2: rows_to_lanes, lanes_to_rows). at::vec::transpose_mxn
// takes its sizes at run time, and its blocks, indexed by them, live in memory rather than registers:
// it measured no faster than this loop for 16×10 fp32 tiles.
template <typename src_t, typename dst_t>
inline void transpose(const src_t* src, int64_t ld_src, dst_t* dst, int64_t ld_dst, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * ld_dst + i] = static_cast<dst_t>(src[i * ld_src + j]);
}

template <typename scalar_t, Mass kMass>
void small_rows_kernel(const Params<scalar_t>& p, int64_t tile_begin, int64_t tile_end) {
  using acc_t = acc_type<scalar_t>;
  constexpr int64_t V = Vectorized<acc_t>::size();
  constexpr bool kSoft = kMass == Mass::kSoft;
  const int64_t C = p.classes, positions = p.outer * p.inner;
  // (zeroed: the register transposes move whole blocks of 16 classes, past C too)
  acc_t x_bufs[2][kSmallClasses * V] = {}, prob_buf[kSmallClasses * V] = {}, g_buf[kSmallClasses * V] = {},
        exp_buf[kSmallClasses * V];
  // A forward without a gradient transposes the next tile's rows into the other x buffer while this
  // tile's per-lane results wait on its sums (tile_kernel's `between`). Zen 4 VM, AVX-512, torch
  // 2.14.1, interleaved processes, 6 rounds: forward 3.5–4% less time at 65536×10 (fp32 and bf16, 1
  // thread; 3.6% at 2), 3–3.5% at 65536×27, 65536×3 and 16384×32. With a gradient it measured 1–2.5%
  // slower at 65536×10 (and, in another build, 4% faster: within this code's layout noise), so it
  // preloads only without one. The maps' widened groups (across_wide_kernel) preloaded alike gained
  // nothing (bf16 forward 0.99–1.07× the time at 8×21×128×128, 4×150×64×64 and 8×21×256×256).
  // Two tiles in flight (tile_kernel split after its exp-sum pass, the next tile's max and exp-sum
  // passes run before this tile's results and gradient, their state kept in a struct) measured
  // slower: forward 1.07× the time at 65536×10 (fp32 and bf16, against this preload), fwd+bwd
  // 0.985–1.00× (1 thread, same VM, one build with a switch, 6 rounds): not kept. Without its results
  // (an experiment that skipped them) the forward took 24% less time, but putting another tile's
  // passes between them and their sums did not take that time away.
  int cur = 0;             // x_bufs[cur]: this tile's logits
  bool preloaded = false;  // (by the tile before)
  // (+ V: AVX2's lanes_to_rows spills up to 7 floats past a tile, bf16_lanes_to_rows 15 bf16)
  acc_t wide[kSmallClasses * V + V];
  acc_t* exps = p.grad ? exp_buf : nullptr;
  int64_t offsets[V];
  TileTargets<acc_t, V> targets = {};
  // Rows one stride apart (the common case): a tile is transposed in and out as one block, and
  // without mixup its targets are read at one stride too, without the general walk.
  const int64_t row_stride = uniform_stride(p.inner, p.stride_outer, p.stride_inner);
  const bool plain = !kSoft && p.plain_index_targets();
  const int64_t target_stride = plain ? uniform_stride(p.inner, p.target_stride_outer, p.target_stride_inner) : -1;
  // A tile of rows one stride apart into the class-major buffer and its gradient back (half types:
  // rows that are one block widened and narrowed with vector conversions, transposed in fp32; a
  // 16-bit element at a time costs twice as much). A gradient of contiguous rows is transposed into
  // `wide` (L1) and leaves with vector stores, fp32 too: element-wise stores straight into it, 10 rows
  // apart, made 65536×10 fp32 fwd+bwd 10–15% slower.
  constexpr bool kHalf = !std::is_same_v<scalar_t, acc_t>;
  // Full tiles of 16 fp32 lanes (AVX-512) move through 16×16 register transposes instead (the
  // element-wise ones took half of the kernel's time, perf): forward with gradient 28% faster at
  // 65536×10 fp32, 15% bf16, 38% at 65536×16 fp32, 31% at 65536×27 bf16 (1 thread, interleaved A/B).
  // AVX2, tiles of 8 through 8×8 transposes: 14% (fp32) and 16% (bf16) at 65536×10, 19% and 21% at
  // 65536×27, forward alone 3–10% (Zen 1, 1 thread, interleaved A/B).
  // With AVX-512, half-type rows are converted in registers on the way (load_row, store_row, with
  // masked 16-bit loads and stores), not widened into and narrowed out of `wide`, whose 64-byte stores
  // the transpose's loads straddle: bf16 and fp16 fwd+bwd 6–9% less time at 65536×10, 4–7% at
  // 65536×27, forward 2–5% (Zen 4 VM, 1 thread, interleaved processes); fp32 unchanged. bf16 now
  // moves as pairs of classes (kPairs, below).
  // AVX2 builds write fp32 and fp16 gradient tiles in place as well where the 7 elements that
  // lanes_to_rows spills past a tile fall on the next tile's first row, which this task writes next
  // (`spill`), instead of through `wide`: Zen 3 VM, 1 thread, interleaved processes, both orders:
  // fp32 fwd+bwd 3–14% less time at 65536×3, 65536×10, 65536×27 and 16384×32, fp16 2–8% (the
  // benchmark's own process, 2 threads, medians of 3 runs each: 65536×10 fp32 9%). bf16 moves as
  // pairs of classes (kPairs, below). (Half-type rows loaded and converted in registers a row of 8
  // classes at a time cost bf16 and fp16 5–15% at 3, 10 and 27 classes: not kept.)
  constexpr bool kRegisters = kRegisterTranspose && std::is_same_v<acc_t, float>;
  // (the input and a probability target apart from the gradient: the next tile's rows are read after
  // this tile's gradient is written)
  auto apart = [&](const scalar_t* a) {
    const auto begin = reinterpret_cast<uintptr_t>(a), grad = reinterpret_cast<uintptr_t>(p.grad);
    const auto bytes = static_cast<uintptr_t>((positions * C + V) * int64_t(sizeof(scalar_t)));
    return !a || begin + bytes <= grad || grad + bytes <= begin;
  };
  // bf16: whole tiles of rows of 2 classes or more move as pairs of classes, converted and rounded
  // in registers (bf16_rows_to_lanes, bf16_lanes_to_rows: one transpose per 16 classes with AVX2, one
  // per tile with AVX-512). AVX2: not widened into and narrowed out of `wide` 8 classes a block, and
  // the gradient is written in place as fp32's is (`spill`); rows read up to 15 elements past a tile:
  // tiles whose reads would leave the input's last row take `wide`, and what they write past a tile
  // falls on the next tile's rows (8·C ≥ 16 elements). AVX2 build against widening and narrowing
  // (two vectors a pack, store_acc2), on a Zen 4 VM, 1 thread, interleaved processes, 5 rounds:
  // fwd+bwd 19–23% less time at 65536×3, 65536×10 and 65536×27, forward 21–22% at 10 and 27 classes;
  // instructions (callgrind, 3 fwd+bwd calls) 35.2M → 31.1M at 65536×10, 64.5M → 55.5M at
  // 65536×27, 24.0M → 21.9M at 65536×3. AVX-512 (AVX512-BF16) build against rows converted on the
  // way (load_row, store_row), same VM and method, medians of per-round ratios over several runs
  // (this VM's noise moved them far apart): fwd+bwd 7–18% less time at 65536×10, 8–16% at 65536×27
  // (41% once), 8–13% at 65536×3, 17–30% at 16384×32; forward within the noise (−11% to +20%).
  constexpr bool kPairs = kBf16PairRows && std::is_same_v<scalar_t, at::BFloat16>;
  const bool pair_rows = kPairs && C >= 2 && row_stride >= 0;
  const int64_t pair_reach = (V - 1) * row_stride + (kPairsExact ? C : (C + 15) / 16 * 16),
                input_end = (positions - 1) * row_stride + C;
  constexpr bool kSpills = !kMaskedRowStores && (kPairs || !std::is_same_v<scalar_t, at::BFloat16>);
  const bool may_spill = kSpills && p.grad && row_stride == C && apart(p.input) && apart(p.soft_target);
  auto load_tile = [&](const scalar_t* src, acc_t* dst, int64_t count, bool read_pairs) {
    if constexpr (kPairs) {
      if (read_pairs) return bf16_rows_to_lanes(src, row_stride, dst, C);
    }
    if constexpr (kRegisters) {
      if (count == V && (kHalf && !kHalfRows ? row_stride == C : true)) {
        if constexpr (kHalf && !kHalfRows) {
          widen(src, wide, V * C);
          rows_to_lanes(wide, C, dst, C);
        } else {
          rows_to_lanes(src, row_stride, dst, C);
        }
        return;
      }
    }
    if (kHalf && row_stride == C) {
      widen(src, wide, count * C);
      transpose(wide, C, dst, V, count, C);
    } else {
      transpose(src, row_stride, dst, V, count, C);
    }
  };
  auto store_tile = [&](const acc_t* src, scalar_t* dst, int64_t count, bool spill, bool grad_finite) {
    if constexpr (kPairs) {
      if (pair_rows && count == V && row_stride == C) {
        const bool in_place = kPairsExact || spill;
        scalar_t* const out = in_place ? dst : reinterpret_cast<scalar_t*>(wide);  // (room for the 15 past a tile)
        grad_finite ? bf16_lanes_to_rows<true>(src, out, C, C) : bf16_lanes_to_rows<false>(src, out, C, C);
        if (!in_place) std::memcpy(dst, wide, V * C * sizeof(scalar_t));
        return;
      }
    }
    if constexpr (kRegisters) {
      if (count == V && row_stride == C) {  // (a gradient's rows are dense: problem.cpp)
        if constexpr ((kHalf && !kHalfRows) || !kMaskedRowStores) {
          if constexpr (kSpills && !kPairs) {  // (bf16 pairs: above, and rows of 1 class through `wide`)
            if (spill) return lanes_to_rows(src, dst, C, C);
          }
          lanes_to_rows(src, wide, C, C);
          if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
            if (grad_finite) return narrow<scalar_t, true>(wide, dst, V * C);
          }
          narrow(wide, dst, V * C);
        } else {
          lanes_to_rows(src, dst, C, C);
        }
        return;
      }
    }
    if (row_stride == C) {
      transpose(src, V, wide, C, C, count);
      narrow(wide, dst, count * C);
    } else {
      transpose(src, V, dst, row_stride, C, count);
    }
  };
  // Whether the tile of `n` rows from row `first` moves as pairs (whole, its reads within the input).
  const auto reads_pairs = [&](int64_t first, int64_t n) {
    return pair_rows && n == V && first * row_stride + pair_reach <= input_end;
  };
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t pos0 = tile * V, count = std::min(V, positions - pos0);
    acc_t* const x_buf = x_bufs[cur];
    if (target_stride >= 0) p.template plain_targets<V>(pos0 * target_stride, target_stride, count, targets.cls);
    if (row_stride >= 0) {
      const bool read_pairs = reads_pairs(pos0, count);
      if (!preloaded) load_tile(p.input + pos0 * row_stride, x_buf, count, read_pairs);
      if constexpr (kSoft) load_tile(p.soft_target + pos0 * row_stride, prob_buf, count, read_pairs);
    }
    if (row_stride < 0 || (!kSoft && target_stride < 0)) {
      PositionCursor at(p, pos0);
      for (int64_t l = 0; l < count; ++l, at.advance(p)) {
        if (!kSoft && target_stride < 0) {
          const PositionTargets<acc_t> t = p.targets_at(p.target_offset(at.n, at.s), pos0 + l);
          if (plain) {
            targets.cls[l] = static_cast<int32_t>(t.a);
          } else {
            targets.t[l] = t;
          }
        }
        if (row_stride >= 0) continue;
        offsets[l] = at.n * p.stride_outer + at.s * p.stride_inner;
        for (int64_t c = 0; c < C; ++c) {
          x_buf[c * V + l] = static_cast<acc_t>(p.input[offsets[l] + c]);
          if constexpr (kSoft) prob_buf[c * V + l] = static_cast<acc_t>(p.soft_target[offsets[l] + c]);
        }
      }
      if (plain && target_stride < 0)
        for (int64_t l = count; l < V; ++l) targets.cls[l] = -1;
    }
    const bool preload = !p.grad && row_stride >= 0 && tile + 1 < tile_end;
    const auto load_next = [&] {
      if (!preload) return;
      const int64_t next0 = pos0 + V, next_count = std::min(V, positions - next0);
      load_tile(p.input + next0 * row_stride, x_bufs[cur ^ 1], next_count, reads_pairs(next0, next_count));
    };
    const bool grad_finite = tile_kernel<scalar_t, kMass, acc_t>(p, x_buf, prob_buf, p.grad ? g_buf : nullptr, V, pos0,
                                                                 count, targets, exps, nullptr, nullptr, false, load_next);
    preloaded = preload;
    cur ^= 1;
    if (!p.grad) continue;
    if (row_stride >= 0) {
      // (the next tile: this task's, written next and whole)
      const bool spill = may_spill && tile + 1 < tile_end && pos0 + 2 * V <= positions;
      store_tile(g_buf, p.grad + pos0 * row_stride, count, spill, grad_finite);
    } else {
      for (int64_t l = 0; l < count; ++l)
        for (int64_t c = 0; c < C; ++c) p.grad[offsets[l] + c] = static_cast<scalar_t>(g_buf[c * V + l]);
    }
  }
}

// ---------------------------------------------------------------- driver
constexpr int64_t kReduceChunk = 16384;  // fixed chunks: sums do not depend on the thread count

// D = Σ_valid w[t] for index targets (mixup: Σ k_a·w[a] + k_b·w[b]); also the range check (reports the
// first bad value).
template <typename scalar_t>
double index_target_total_weight(const Params<scalar_t>& p) {
  using acc_t = acc_type<scalar_t>;
  const int64_t positions = p.outer * p.inner;
  const int64_t chunks = (positions + kReduceChunk - 1) / kReduceChunk;
  std::vector<double> partial(chunks, 0.0);
  std::vector<c10::optional<int64_t>> first_bad(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      double total = 0.0;
      const int64_t begin = chunk * kReduceChunk, end = std::min(positions, (chunk + 1) * kReduceChunk);
      auto out_of_range = [&](int64_t t) { return t != p.ignore_index && (t < 0 || t >= p.classes); };
      if (p.no_mixup()) {  // the common case, kept tight
        // Targets one stride apart ((N,) and (N, H, W) contiguous, any slice of them) are read in a plain
        // loop: no position cursor and no branch on the targets' dtype per position.
        const int64_t target_stride = uniform_stride(p.inner, p.target_stride_outer, p.target_stride_inner);
        auto for_each_target = [&](auto&& f) {
          if (target_stride >= 0) {
            auto walk = [&](const auto* target) {
              for (int64_t pos = begin; pos < end; ++pos)
                if (!f(static_cast<int64_t>(target[pos * target_stride]))) break;
            };
            if (p.target64) {
              walk(p.target64);
            } else {
              walk(p.target8);
            }
            return;
          }
          PositionCursor at(p, begin);
          for (int64_t pos = begin; pos < end; ++pos, at.advance(p))
            if (!f(p.target_at_offset(p.target_offset(at.n, at.s)))) break;
        };
        bool any_bad = false;
        if (p.weight) {
          for_each_target([&](int64_t t) {
            if (t == p.ignore_index) return true;
            any_bad = out_of_range(t);
            if (!any_bad) total += static_cast<double>(p.weight[t]);
            return !any_bad;
          });
        } else {  // no branch on the target (scattered ignored positions would mispredict)
          int64_t count = 0, bad = 0;
          const auto tally = [&](int64_t t) {
            const int64_t counted = t != p.ignore_index;
            bad |= counted & (static_cast<uint64_t>(t) >= static_cast<uint64_t>(p.classes));
            count += counted;
          };
          if (target_stride == 1) {  // contiguous: a loop without an exit, which the compiler vectorizes
            auto walk = [&](const auto* target) {
              for (int64_t pos = begin; pos < end; ++pos) tally(static_cast<int64_t>(target[pos]));
            };
            if (p.target64) {
              walk(p.target64);
            } else {
              walk(p.target8);
            }
          } else {
            for_each_target([&](int64_t t) {
              tally(t);
              return true;
            });
          }
          any_bad = bad != 0;
          total = static_cast<double>(count);
        }
        if (any_bad) {
          for_each_target([&](int64_t t) {
            if (out_of_range(t)) first_bad[chunk] = t;
            return !out_of_range(t);
          });
        }
        partial[chunk] = total;
        continue;
      }
      for (int64_t pos = begin; pos < end; ++pos) {
        const int64_t off = p.target_offset_of(pos);
        const int64_t t = p.target_at_offset(off), t_b = p.target_b_at_offset(off);
        if (out_of_range(t) || out_of_range(t_b)) {
          first_bad[chunk] = out_of_range(t) ? t : t_b;
          break;
        }
        const PositionTargets<acc_t> k = p.targets_at(off, pos);
        if (k.k_a != acc_t(0)) total += static_cast<double>(k.k_a) * static_cast<double>(p.weight_at(k.a));
        if (k.k_b != acc_t(0)) total += static_cast<double>(k.k_b) * static_cast<double>(p.weight_at(k.b));
      }
      partial[chunk] = total;
    }
  });
  double total = 0.0;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    if (first_bad[chunk].has_value()) {
      TORCH_CHECK_INDEX(false, "smoothce.cross_entropy: target value ", *first_bad[chunk],
                        " is out of bounds: expected class indices in [0, ", p.classes, ") or ignore_index (",
                        p.ignore_index, ")");
    }
    total += partial[chunk];
  }
  return total;
}

double sum_positions(const at::Tensor& position_loss) {
  const int64_t positions = position_loss.numel();
  const int64_t chunks = (positions + kReduceChunk - 1) / kReduceChunk;
  std::vector<double> partial(chunks, 0.0);
  AT_DISPATCH_FLOATING_TYPES(position_loss.scalar_type(), "smoothce_sum", [&] {
    const scalar_t* data = position_loss.const_data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        // 16 interleaved partial sums, which the compiler keeps in vector registers (a chain of
        // dependent adds would take 4 cycles per element; with 4 partials in scalar registers this took
        // ~1 cycle per element, 3% of a 65536×10 fp32 fwd+bwd)
        constexpr int kParts = 16;
        double part[kParts] = {};
        const int64_t end = std::min(positions, (chunk + 1) * kReduceChunk);
        int64_t i = chunk * kReduceChunk;
        for (; i + kParts <= end; i += kParts)
          for (int k = 0; k < kParts; ++k) part[k] += static_cast<double>(data[i + k]);
        for (; i < end; ++i) part[0] += static_cast<double>(data[i]);
        for (int width = kParts / 2; width > 0; width /= 2)  // pairwise
          for (int k = 0; k < width; ++k) part[k] += part[k + width];
        partial[chunk] = part[0];
      }
    });
  });
  double total = 0.0;
  for (double v : partial) total += v;
  return total;
}

// Strided fp32 maps of many classes with AVX-512 ((N, C, L) logits of a vocabulary): a tile's C lines
// a stride apart (C·64 bytes) no longer stay in cache from its max pass to its exp-sum and gradient
// passes, which wait on the L3 (perf, 2×32000×500: 60% of the kernel's samples on loads) and pay a
// second exp. So each whole tile of 16 positions is transposed into 16 contiguous rows in a
// per-task buffer (16×16 register transposes), computed there by the rows kernel, in place, and its
// gradient transposed back; partial tiles (a map's last positions of an outer index) stay in place.
// The results are the rows kernel's, as for the same logits laid out as rows.
// From this many classes with a gradient, from kAcrossRowsForwardClasses without. Zen 4 VM, AVX-512,
// torch 2.14.1, 1 thread, interleaved in one process against the tiles in place: fwd+bwd 47% less
// time at 2×32000×512, 28% at 2×32000×500, 24% at 1×2048×3600, 17% at 4096×1000, 7–15% at 2×4096×500,
// 2×4096×512 and 8×2048×256; forward 46% at 2×32000×512, 28% at 2×32000×500, 14–27% at 8192 and 16384
// classes. Slower: forward at 2048 classes (1.56× the time) and mixed at 4096 (0.82× and 1.1×), and
// in single runs fwd+bwd of 512 and 1024 classes (1.3–2× at 1×512×4096, 4×1024×1024 and 1×1024×3600;
// faster only at power-of-two strides of 16 KiB: 1×1000×4096 and 1×1024×4096, 0.76–0.83×). The
// buffer holds 16 rows (and as many of probability targets): 2 MiB a task at 32000 classes.
constexpr int64_t kAcrossRowsClasses = 2048;
constexpr int64_t kAcrossRowsForwardClasses = 8192;

template <typename scalar_t>
bool across_rows(const Params<scalar_t>& p) {
  return kMaskedRowStores && std::is_same_v<scalar_t, float> &&
         p.classes >= (p.grad ? kAcrossRowsClasses : kAcrossRowsForwardClasses);
}

template <typename scalar_t, Mass kMass>
void across_rows_kernel(const Params<scalar_t>& p, int64_t tile_begin, int64_t tile_end) {
  constexpr int64_t V = Vectorized<acc_type<scalar_t>>::size();
  constexpr bool kSoft = kMass == Mass::kSoft;
  const int64_t C = p.classes, sc = p.stride_class;
  const int64_t tiles_per_outer = (p.inner + V - 1) / V;
  // the buffer's row stride: whole lines, an odd number of them, so that a block's 16 row pieces fall
  // in 16 different L1 sets (rows of 1024 or 4096 floats shared one set)
  const int64_t lines = (C + 15) / 16, ld = (lines | 1) * 16;
  std::vector<scalar_t> buf(V * ld * (kSoft ? 2 : 1));
  struct Rows {  // position pos0 + i at row i of the buffer; the gradient over the logits
    scalar_t *x_rows, *prob_rows, *grad;
    int64_t pos0, ld;
    const scalar_t* x(int64_t pos) const { return x_rows + (pos - pos0) * ld; }
    const scalar_t* prob(int64_t pos) const { return prob_rows + (pos - pos0) * ld; }
    scalar_t* g(int64_t pos) const { return grad ? x_rows + (pos - pos0) * ld : nullptr; }
  };
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t n = tile / tiles_per_outer, s0 = (tile % tiles_per_outer) * V;
    if (s0 + V > p.inner) {
      across_kernel<scalar_t, kMass>(p, tile, tile + 1);
      continue;
    }
    const int64_t offset = n * p.stride_outer + s0 * p.stride_inner;
    scalar_t* x_rows = buf.data();
    scalar_t* prob_rows = kSoft ? x_rows + V * ld : nullptr;
    map_to_rows(p.input + offset, sc, x_rows, ld, C);
    if constexpr (kSoft) map_to_rows(p.soft_target + offset, sc, prob_rows, ld, C);
    const int64_t pos0 = n * p.inner + s0;
    rows_kernel<scalar_t, kMass>(p, pos0, pos0 + V, Rows{x_rows, prob_rows, p.grad, pos0, ld});
    if (p.grad) rows_to_map(x_rows, ld, p.grad + offset, sc, C);
  }
}

template <typename scalar_t, Mass kMass>
void run_kernel(const Params<scalar_t>& p) {
  constexpr int64_t V = Vectorized<acc_type<scalar_t>>::size();
  constexpr int64_t kGrainElements = 32768;  // elements per parallel task
  const int64_t C = std::max<int64_t>(p.classes, 1), positions = p.outer * p.inner;
  if (p.stride_class == 1 || p.classes == 1) {
    if (C <= kSmallClasses) {
      const int64_t tiles = (positions + V - 1) / V;
      at::parallel_for(0, tiles, std::max<int64_t>(1, kGrainElements / (C * V)),
                       [&](int64_t begin, int64_t end) { small_rows_kernel<scalar_t, kMass>(p, begin, end); });
    } else {
      at::parallel_for(0, positions, std::max<int64_t>(1, kGrainElements / C),
                       [&](int64_t begin, int64_t end) { rows_kernel<scalar_t, kMass>(p, begin, end); });
    }
  } else {
    const int64_t tiles = p.outer * ((p.inner + V - 1) / V);
    const bool wide = widens_tiles<scalar_t, kMass>(p);
    at::parallel_for(0, tiles, std::max<int64_t>(1, kGrainElements / (C * V)), [&](int64_t begin, int64_t end) {
      if constexpr (kMayWiden<scalar_t>) {
        if (wide) return across_wide_kernel<scalar_t, kMass>(p, begin, end);
      }
      if constexpr (std::is_same_v<scalar_t, float> && kMaskedRowStores) {
        if (across_rows(p)) return across_rows_kernel<scalar_t, kMass>(p, begin, end);
      }
      across_kernel<scalar_t, kMass>(p, begin, end);
    });
  }
}

// Calls f(std::integral_constant<Mass, kind>) for the run-time mass kind.
template <typename F>
void with_mass(Mass mass, F&& f) {
  switch (mass) {
    case Mass::kNone: f(std::integral_constant<Mass, Mass::kNone>{}); break;
    case Mass::kUnit: f(std::integral_constant<Mass, Mass::kUnit>{}); break;
    case Mass::kWeighted: f(std::integral_constant<Mass, Mass::kWeighted>{}); break;
    case Mass::kSoft: f(std::integral_constant<Mass, Mass::kSoft>{}); break;
  }
}

// ---------------------------------------------------------------- gradient buffer
// glibc serves allocations above 32 MiB with fresh mmap pages, and faulting them in costs more than
// the whole kernel (measured: ~190 ms for 128 MiB on the 2-core dev VM, against ~25 ms of compute).
// A training step frees last step's gradient before the next forward, so one cached buffer is
// reused when nothing but this cache holds it. SMOOTHCE_CPU_GRAD_CACHE=0 turns it off;
// smoothce.empty_cache() releases it.
struct GradCache {
  std::mutex mutex;
  c10::Storage storage;  // the storage only: the gradient tensor itself stays stealable by AccumulateGrad
};

GradCache& grad_cache() {
  static GradCache cache;
  return cache;
}

bool grad_cache_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("SMOOTHCE_CPU_GRAD_CACHE");
    return env == nullptr || std::string(env) != "0";
  }();
  return enabled;
}

// A tensor laid out as empty_grad_like(like) lays it out (problem.h): like's strides, from the cache,
// where like is dense or keeps its layout.
at::Tensor allocate_grad(const at::Tensor& like) {
  if (!grad_cache_enabled() || !(like.is_non_overlapping_and_dense() || grad_keeps_layout(like)))
    return empty_grad_like(like);
  const size_t needed = at::detail::computeStorageNbytes(like.sizes(), like.strides(), like.element_size());
  GradCache& cache = grad_cache();
  std::lock_guard<std::mutex> guard(cache.mutex);
  const c10::Storage& cached = cache.storage;
  const bool reusable = cached && cached.use_count() == 1 && cached.nbytes() >= needed &&
                        cached.nbytes() <= 2 * needed + 4096;
  if (!reusable) {
    cache.storage = {};  // release the old buffer before allocating the new one
    cache.storage = at::empty_strided(like.sizes(), like.strides(), like.options()).storage();
  }
  return at::empty({0}, like.options()).set_(cache.storage, 0, like.sizes(), like.strides());
}

// The launch constants of a checked problem (inputs, targets, class weights in the accumulation type,
// its layout and the smoothing constants); the outputs and the scale are the caller's to set.
template <typename scalar_t>
Params<scalar_t> params_of(const Problem& prob, const at::Tensor& weight_acc,
                           const Smoothing<acc_type<scalar_t>>& smoothing) {
  using acc_t = acc_type<scalar_t>;
  Params<scalar_t> p{};
  p.input = prob.input.const_data_ptr<scalar_t>();
  if (prob.soft_target) {
    p.soft_target = prob.target.const_data_ptr<scalar_t>();
  } else if (prob.target.scalar_type() == at::kLong) {
    p.target64 = prob.target.const_data_ptr<int64_t>();
    p.target_b64 = prob.target_b.defined() ? prob.target_b.const_data_ptr<int64_t>() : nullptr;
  } else {
    p.target8 = prob.target.const_data_ptr<uint8_t>();
    p.target_b8 = prob.target_b.defined() ? prob.target_b.const_data_ptr<uint8_t>() : nullptr;
  }
  p.lam = prob.lam.defined() ? prob.lam.const_data_ptr<acc_t>() : nullptr;
  p.lam_value = static_cast<acc_t>(prob.lam_value);
  p.weight = weight_acc.defined() ? weight_acc.const_data_ptr<acc_t>() : nullptr;
  p.soft = prob.soft_target;
  p.weighted = weight_acc.defined();
  static_cast<PositionLayout&>(p) = prob.layout();
  static_cast<Smoothing<acc_t>&>(p) = smoothing;
  return p;
}

// Runs the kernels on a checked problem into `out`; returns the reduced (or per-position) loss.
at::Tensor run_forward(const Problem& prob, const ForwardBuffers& out) {
  const at::Tensor& weight_acc = out.weight;
  const at::Tensor& upstream = out.upstream;
  double denominator = 1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prob.input.scalar_type(), "smoothce_forward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    Params<scalar_t> p = params_of<scalar_t>(prob, weight_acc, prob.smoothing<acc_t>());
    p.grad = prob.compute_grad ? out.kernel_grad.mutable_data_ptr<scalar_t>() : nullptr;
    p.position_loss = out.position_loss.mutable_data_ptr<acc_t>();
    p.lse = out.lse.mutable_data_ptr<acc_t>();
    p.weight_sum = weight_acc.defined() ? static_cast<acc_t>(weight_acc.sum().item<double>())
                                        : static_cast<acc_t>(prob.classes);

    denominator = prob.soft_target ? static_cast<double>(prob.positions()) : index_target_total_weight(p);
    p.grad_scale = prob.reduction == kMean ? static_cast<acc_t>(1.0 / denominator) : acc_t(1);
    if (upstream.defined() && upstream.dim() == 0) p.grad_scale *= *upstream.const_data_ptr<acc_t>();
    p.position_scale = upstream.defined() && upstream.dim() > 0 ? upstream.const_data_ptr<acc_t>() : nullptr;

    with_mass(p.mass(), [&](auto kMass) { run_kernel<scalar_t, decltype(kMass)::value>(p); });
  });

  out.copy_back();
  if (prob.reduction == kNone) return out.position_loss.to(out.loss_dtype);
  const double total = sum_positions(out.position_loss);
  const double value = prob.reduction == kMean ? total / denominator : total;
  return at::scalar_tensor(value, prob.input.options().dtype(out.loss_dtype));
}

// smoothce::forward; with grad_over_logits, the gradient written over the input (smoothce::grad_, and
// the fused linear driver's chunks).
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& input, const at::Tensor& target,
                                                       const c10::optional<at::Tensor>& weight, int64_t ignore_index,
                                                       int64_t reduction, double label_smoothing, bool compute_grad,
                                                       bool float32_loss, const c10::optional<at::Tensor>& grad_output,
                                                       const Extensions& ext, bool grad_over_logits) {
  const Problem prob = make_problem(input, target, weight, ignore_index, reduction, label_smoothing, compute_grad,
                                    float32_loss, ext);
  const ForwardBuffers out = make_forward_buffers(prob, input, float32_loss, grad_output,
                                                  grad_over_logits ? &grad_over_input : &allocate_grad);
  at::Tensor loss = run_forward(prob, out);
  return {loss, out.lse, out.grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight, int64_t ignore_index,
    int64_t reduction, double label_smoothing, bool compute_grad, bool float32_loss,
    const c10::optional<at::Tensor>& grad_output, SMOOTHCE_EXTENSION_PARAMS) {
  return forward(input, target, weight, ignore_index, reduction, label_smoothing, compute_grad, float32_loss,
                 grad_output, SMOOTHCE_EXTENSIONS, false);
}

// smoothce::grad_: the gradient for grad_output written over the logits (inplace_backward).
void grad_cpu_(at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
               int64_t ignore_index, int64_t reduction, double label_smoothing, bool float32_loss,
               const at::Tensor& grad_output, SMOOTHCE_EXTENSION_PARAMS) {
  forward(input, target, weight, ignore_index, reduction, label_smoothing, true, float32_loss, grad_output,
          SMOOTHCE_EXTENSIONS, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_forward_cpu(
    const at::Tensor& input, const at::Tensor& linear_weight, const c10::optional<at::Tensor>& linear_bias,
    const at::Tensor& target, const c10::optional<at::Tensor>& weight, int64_t ignore_index, int64_t reduction,
    double label_smoothing, bool float32_loss, std::array<bool, 4> output_mask, int64_t chunk_size,
    bool fp32_grad_weight, const c10::optional<at::Tensor>& grad_output, SMOOTHCE_EXTENSION_PARAMS) {
  return linear_forward(input, linear_weight, linear_bias, target, weight, ignore_index, reduction, label_smoothing,
                        float32_loss, output_mask, chunk_size, fp32_grad_weight, grad_output, SMOOTHCE_EXTENSIONS,
                        &forward);
}

void scale_grad_cpu(at::Tensor& grad, const at::Tensor& grad_output) {
  check_scale_grad_args(grad, grad_output);
  if (grad.numel() == 0) return;
  if (grad_output.dim() == 0) {
    // Plain loss.backward() on mean/sum: the gradient written in forward is already final. (Read in
    // place: on CPU that is a plain load, no aten::item round trip.)
    if (cpu_scalar(grad_output) == 1.0) return;
    grad.mul_(grad_output);
  } else {
    grad.mul_(grad.dim() == 1 ? grad_output : grad_output.unsqueeze(1));
  }
}


// ---------------------------------------------------------------- vocabulary-parallel shards
// The input is one rank's shard of the classes, [vocab_start, vocab_start + C_local) of num_classes,
// laid out as contiguous rows (positions, C_local) (smoothce/distributed.py moves the classes last);
// index targets are global. shard_stats reads the shard once for its ShardStats per position;
// shard_forward merges every rank's (gathered in rank order) and reads the shard again to write its
// part of the gradient. Both use the rows kernels' row_state and row_grad on the shard.

struct Shard {
  int64_t start, num_classes;

  // The shard's column of global class c, or −1 when another rank holds it.
  int64_t local(int64_t c, int64_t shard_classes) const {
    return c >= start && c < start + shard_classes ? c - start : -1;
  }
};

Shard shard_of(const Problem& prob, int64_t vocab_start, int64_t num_classes) {
  check_shard(prob, vocab_start, num_classes);
  return {vocab_start, num_classes};
}

// The launch constants of a shard: the rows kernels' Params with the smoothing of all num_classes.
template <typename scalar_t>
Params<scalar_t> shard_params(const Problem& prob, const Shard& shard, const at::Tensor& weight_acc) {
  const double* tv = prob.has_target_values ? prob.target_values : nullptr;
  return params_of<scalar_t>(
      prob, weight_acc, Smoothing<acc_type<scalar_t>>::make(prob.label_smoothing, shard.num_classes, tv, prob.z_loss));
}

// The global targets of a position (range [0, num_classes)) and their columns in the shard (−1 elsewhere).
template <typename scalar_t>
std::pair<PositionTargets<acc_type<scalar_t>>, PositionTargets<acc_type<scalar_t>>> shard_targets(
    const Params<scalar_t>& p, const Shard& shard, int64_t pos) {
  const int64_t off = p.target_offset_of(pos);
  const auto t = position_targets<acc_type<scalar_t>>(p.target_at_offset(off), p.target_b_at_offset(off),
                                                       p.lam ? p.lam[pos] : p.lam_value, p.ignore_index,
                                                       shard.num_classes);
  auto local = t;
  local.a = t.a >= 0 ? shard.local(t.a, p.classes) : -1;
  local.b = t.b >= 0 ? shard.local(t.b, p.classes) : -1;
  return {t, local};
}

// Index targets outside [0, num_classes) (and ≠ ignore_index) are an error, on every rank alike.
template <typename scalar_t>
void check_shard_targets(const Params<scalar_t>& p, const Shard& shard) {
  const bool mixup = p.target_b64 != nullptr || p.target_b8 != nullptr;
  for (int64_t pos = 0; pos < p.outer; ++pos) {
    const int64_t off = p.target_offset_of(pos);
    for (const int64_t t : {p.target_at_offset(off), mixup ? p.target_b_at_offset(off) : p.ignore_index}) {
      TORCH_CHECK_INDEX(t == p.ignore_index || (t >= 0 && t < shard.num_classes),
                        "smoothce.vocab_parallel_cross_entropy: target value ", t,
                        " is out of bounds: expected class indices in [0, ", shard.num_classes,
                        ") (all ranks' classes) or ignore_index (", p.ignore_index, ")");
    }
  }
}

// Positions per parallel task of the shard kernels: about 32K logits.
template <typename scalar_t>
int64_t shard_grain(const Params<scalar_t>& p) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(p.classes, 1));
}

template <typename scalar_t, Mass kMass>
void shard_stats_kernel(const Params<scalar_t>& p, const Shard& shard, acc_type<scalar_t>* stats) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool kSoft = kMass == Mass::kSoft;
  const bool prefetch_ahead = prefetch_ahead_for(p, false);
  at::parallel_for(0, p.outer, shard_grain(p), [&](int64_t begin, int64_t end) {
    RowPipe<scalar_t> pipe;
    for (int64_t pos = begin; pos < end; ++pos) {
      const scalar_t* x = p.input + pos * p.stride_outer;
      ShardStats<acc_t> s{RowState<acc_t>::empty(), {acc_t(0), acc_t(0), acc_t(0), acc_t(0)}};
      if constexpr (!kSoft) {
        const auto [t, local] = shard_targets(p, shard, pos);
        if (!t.valid()) {  // nothing of this position is used
          s.store(stats + pos * kShardStats);
          continue;
        }
        s.target = p.target_logits(x, 1, local);
      }
      const scalar_t* next = pos + 1 < end ? x + p.stride_outer : nullptr;
      s.state = row_state<scalar_t, kMass>(p, x, kSoft ? p.soft_target + pos * p.stride_outer : nullptr, nullptr,
                                           nullptr, nullptr, prefetch_ahead, next, pipe);
      s.store(stats + pos * kShardStats);
    }
  });
}

at::Tensor shard_stats_cpu(const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                           int64_t vocab_start, int64_t num_classes, int64_t ignore_index, double label_smoothing,
                           bool float32_loss, SMOOTHCE_EXTENSION_PARAMS) {
  const Problem prob = make_problem(input, target, weight, ignore_index, kSum, label_smoothing, false, float32_loss,
                                    SMOOTHCE_EXTENSIONS);
  const Shard shard = shard_of(prob, vocab_start, num_classes);
  const auto acc_dtype = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor stats = at::empty({prob.outer, kShardStats}, input.options().dtype(acc_dtype));
  const at::Tensor weight_acc = prob.weight.has_value() ? prob.weight->to(acc_dtype).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "smoothce_shard_stats", [&] {
    const Params<scalar_t> p = shard_params<scalar_t>(prob, shard, weight_acc);
    if (!prob.soft_target) check_shard_targets(p, shard);
    acc_type<scalar_t>* out = stats.mutable_data_ptr<acc_type<scalar_t>>();
    with_mass(p.mass(), [&](auto kMass) { shard_stats_kernel<scalar_t, decltype(kMass)::value>(p, shard, out); });
  });
  return stats;
}

// D of reduction 'mean' for index targets: Σ k_a·w_a + k_b·w_b over the positions, from the merged
// target weights (fixed chunks: the same sum on every rank).
template <typename scalar_t>
double shard_total_weight(const Params<scalar_t>& p, const Shard& shard, const acc_type<scalar_t>* stats,
                          int64_t ranks, int64_t rank_stride) {
  using acc_t = acc_type<scalar_t>;
  const int64_t positions = p.outer, chunks = (positions + kReduceChunk - 1) / kReduceChunk;
  std::vector<double> partial(chunks, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      double total = 0.0;
      for (int64_t pos = chunk * kReduceChunk; pos < std::min(positions, (chunk + 1) * kReduceChunk); ++pos) {
        const PositionTargets<acc_t> t = shard_targets(p, shard, pos).first;
        if (!t.valid()) continue;
        acc_t w_a = 0, w_b = 0;
        for (int64_t r = 0; r < ranks; ++r) {
          const ShardStats<acc_t> s = ShardStats<acc_t>::load(stats + r * rank_stride + pos * kShardStats);
          w_a += s.target.w_a;
          w_b += s.target.w_b;
        }
        if (t.k_a != acc_t(0)) total += static_cast<double>(t.k_a) * static_cast<double>(w_a);
        if (t.k_b != acc_t(0)) total += static_cast<double>(t.k_b) * static_cast<double>(w_b);
      }
      partial[chunk] = total;
    }
  });
  double total = 0.0;
  for (double v : partial) total += v;
  return total;
}

template <typename scalar_t, Mass kMass>
void shard_forward_kernel(const Params<scalar_t>& p, const Shard& shard, const acc_type<scalar_t>* stats,
                          int64_t ranks, int64_t rank_stride) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool kSoft = kMass == Mass::kSoft;
  at::parallel_for(0, p.outer, shard_grain(p), [&](int64_t begin, int64_t end) {
    for (int64_t pos = begin; pos < end; ++pos) {
      const scalar_t* x = p.input + pos * p.stride_outer;
      const scalar_t* prob = kSoft ? p.soft_target + pos * p.stride_outer : nullptr;
      scalar_t* g = p.grad ? p.grad + pos * p.stride_outer : nullptr;
      PositionTargets<acc_t> t{}, local{};
      if constexpr (!kSoft) {
        std::tie(t, local) = shard_targets(p, shard, pos);
        if (!t.valid()) {
          p.position_loss[pos] = acc_t(0);
          p.lse[pos] = acc_t(0);
          if (g) std::fill_n(g, p.classes, scalar_t(0));
          continue;
        }
      }
      const ShardStats<acc_t> all = merge_shards<acc_t>(
          [&](int64_t r) { return ShardStats<acc_t>::load(stats + r * rank_stride + pos * kShardStats); }, ranks);
      const acc_t log_sum = row_log_sum(all.state);
      // Σ_c w_c over every rank's classes is the merged mass where the smoothing term needs it (off ≠ 0).
      const PositionResult<acc_t> r =
          kSoft ? soft_target_position(all.state, log_sum, p.scale_at(pos), p.z_loss)
                : index_target_position(all.state, log_sum, t, all.target, all.state.mass, p.scale_at(pos), p);
      p.lse[pos] = r.lse;
      p.position_loss[pos] = r.loss;
      if (!g) continue;
      // The sole max's class, if this shard holds it, found before the gradient may overwrite the logits.
      int64_t sole = -1;
      if (kSoft && r.coefs.sole_rest >= acc_t(0)) {
        for (int64_t c = 0; c < p.classes && sole < 0; ++c)
          if (static_cast<acc_t>(x[c]) == all.state.max) sole = c;
      }
      row_grad<scalar_t, kSoft>(p, x, prob, g, all.state.max, r.log_sum, r.coefs.softmax_coef, r.coefs.off_coef,
                                nullptr, nullptr);
      if (!kSoft) p.write_target_grads(g, 1, all.state.max, r.log_sum, r.coefs, local, all.target);
      if (sole >= 0) g[sole] = static_cast<scalar_t>(sole_max_grad(r.coefs));
    }
  });
}

// smoothce::shard_forward; with grad_over_logits, smoothce::shard_grad_ (the gradient written over the shard:
// each logit is read before its gradient element is written, the targets' logits come from the stats).
std::tuple<at::Tensor, at::Tensor, at::Tensor> shard_forward(
    const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    const at::Tensor& stats, int64_t vocab_start, int64_t num_classes, int64_t ignore_index, int64_t reduction,
    double label_smoothing, bool compute_grad, bool float32_loss, const c10::optional<at::Tensor>& grad_output,
    const Extensions& ext, bool grad_over_logits) {
  const Problem prob = make_problem(input, target, weight, ignore_index, reduction, label_smoothing, compute_grad,
                                    float32_loss, ext);
  const Shard shard = shard_of(prob, vocab_start, num_classes);
  const ForwardBuffers out = make_forward_buffers(prob, input, float32_loss, grad_output,
                                                  grad_over_logits ? &grad_over_input : &allocate_grad);
  check_shard_stats(prob, stats, out.acc_dtype);
  double denominator = 1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "smoothce_shard_forward", [&] {
    using acc_t = acc_type<scalar_t>;
    Params<scalar_t> p = shard_params<scalar_t>(prob, shard, out.weight);
    const acc_t* all = stats.const_data_ptr<acc_t>();
    if (!prob.soft_target) check_shard_targets(p, shard);
    p.grad = compute_grad ? out.kernel_grad.mutable_data_ptr<scalar_t>() : nullptr;
    p.position_loss = out.position_loss.mutable_data_ptr<acc_t>();
    p.lse = out.lse.mutable_data_ptr<acc_t>();
    denominator = prob.soft_target ? static_cast<double>(prob.positions())
                                   : shard_total_weight(p, shard, all, stats.size(0), stats.stride(0));
    p.grad_scale = reduction == kMean ? static_cast<acc_t>(1.0 / denominator) : acc_t(1);
    if (out.upstream.defined() && out.upstream.dim() == 0) p.grad_scale *= *out.upstream.const_data_ptr<acc_t>();
    p.position_scale = out.upstream.defined() && out.upstream.dim() > 0 ? out.upstream.const_data_ptr<acc_t>() : nullptr;
    with_mass(p.mass(), [&](auto kMass) {
      shard_forward_kernel<scalar_t, decltype(kMass)::value>(p, shard, all, stats.size(0), stats.stride(0));
    });
  });
  out.copy_back();
  if (reduction == kNone) return {out.position_loss.to(out.loss_dtype), out.lse, out.grad};
  const double total = sum_positions(out.position_loss);
  const double value = reduction == kMean ? total / denominator : total;
  return {at::scalar_tensor(value, input.options().dtype(out.loss_dtype)), out.lse, out.grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> shard_forward_cpu(
    const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    const at::Tensor& stats, int64_t vocab_start, int64_t num_classes, int64_t ignore_index, int64_t reduction,
    double label_smoothing, bool compute_grad, bool float32_loss, const c10::optional<at::Tensor>& grad_output,
    SMOOTHCE_EXTENSION_PARAMS) {
  return shard_forward(input, target, weight, stats, vocab_start, num_classes, ignore_index, reduction,
                       label_smoothing, compute_grad, float32_loss, grad_output, SMOOTHCE_EXTENSIONS, false);
}

void shard_grad_cpu_(at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                     const at::Tensor& stats, int64_t vocab_start, int64_t num_classes, int64_t ignore_index,
                     int64_t reduction, double label_smoothing, bool float32_loss, const at::Tensor& grad_output,
                     SMOOTHCE_EXTENSION_PARAMS) {
  shard_forward(input, target, weight, stats, vocab_start, num_classes, ignore_index, reduction, label_smoothing, true,
                float32_loss, grad_output, SMOOTHCE_EXTENSIONS, true);
}

}  // namespace

void empty_grad_cache() {
  GradCache& cache = grad_cache();
  std::lock_guard<std::mutex> guard(cache.mutex);
  cache.storage = {};
}

// The kernels' vector functions over n floats (smoothce._C._tile_log1p, _tile_exp: tests compare them
// with log1p and exp in double at a sample of every float, in each build's instructions): the tiles'
// log Σexp, vlog1p, and every kernel's exp, vexp (for arguments ≤ 0, as the kernels' x − max).
template <Vectorized<float> (*F)(const Vectorized<float>&)>
void map_floats(const float* in, float* out, int64_t n) {
  using Vec = Vectorized<float>;
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - i);
    F(Vec::loadu(in + i, count)).store(out + i, count);
  }
}
void tile_log1p(const float* in, float* out, int64_t n) { map_floats<vlog1p>(in, out, n); }
void tile_exp(const float* in, float* out, int64_t n) { map_floats<vexp<float>>(in, out, n); }

TORCH_LIBRARY_IMPL(smoothce, CPU, m) {
  m.impl("forward", &forward_cpu);
  m.impl("scale_grad_", &scale_grad_cpu);
  m.impl("grad_", &grad_cpu_);
  m.impl("linear_forward", &linear_forward_cpu);
  m.impl("shard_stats", &shard_stats_cpu);
  m.impl("shard_forward", &shard_forward_cpu);
  m.impl("shard_grad_", &shard_grad_cpu_);
}

}  // namespace cpu
}  // namespace smoothce
