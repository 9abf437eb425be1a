// The device arithmetic of the emulated kernels (included at the end of emu.h): exp, log, log1p and
// division as the real build computes them, selected at run time (arith.cpp: set_arithmetic).
//
// The CUDA build uses nvcc --use_fast_math: in device code single-precision expf/logf become
// __expf/__logf, float division is approximate (-prec-div=false), denormals are flushed to zero
// (-ftz=true), and a*b+c contracts into an FMA (--fmad=true, the default even without fast math).
// fp64 is not affected by fast math.
//   "exact"  (default): std::exp, std::log and a / b: the host's libm, as if the GPU were exact.
//   "device": for float, the correctly rounded result (computed in double, then rounded) moved by a
//             deterministic pseudo-random error within the documented maximum of the fast-math
//             version, with denormal inputs and results flushed to signed zero; double stays exact.
//             Launches also run with FTZ/DAZ set in MXCSR (emu.cpp asks flush_to_zero()), so plain
//             float arithmetic flushes denormals too (on x86 that flushes fp64 denormals as well,
//             which the GPU does not: only results below 2^-1022 differ).
// Contraction is modelled at build time, in both modes (tests/emulator.py: -ffp-contract=fast -mfma).
//
// Documented maxima (CUDA C++ Programming Guide, "Mathematical Functions": table "Single-Precision
// Floating-Point Intrinsic Functions" and the paragraph on -prec-div above it; ulp errors are
// against the correctly rounded result):
//   __expf(x)        2 + floor(abs(1.173 * x)) ulp
//   __logf(x)        x in [0.5, 2]: absolute error 2^-21.41; otherwise 3 ulp
//   x / y            (-prec-div=false) 2 ulp (full range, as the "x/y" row of the standard functions
//                    table says for -prec-div=false)
//   __fdividef(x,y)  2 ulp for |y| in [2^-126, 2^126]; 0 for 2^126 < |y| < 2^128 (NaN if x is inf)
// Identities: exp(±0) = 1 and log(1) = 0 stay exact. The Guide's bounds allow an error there too, but
// the hardware's approximations (ex2.approx(x·log2(e)), lg2.approx(x)·ln(2)) are taken to be exact at
// 2^0 and log2(1) (an assumption: the Guide does not say), and exact results of the kernels depend on
// them: a row of one class (C = 1, or every other logit -inf) has Σexp = exp(0) = 1 and log Σexp = 0,
// hence a loss of exactly 0.
// The error of an input is a hash of its bits and a seed (the same input always gives the same
// result, as on the GPU): an eighth of the inputs get the full maximum, the others a uniform pick in
// [-max, max]. Another seed is another error pattern within the same bounds (another "device").
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace emu::arith {

enum class Mode : uint8_t { exact = 0, device = 1 };

namespace detail {
// The mode and the seed of the error pattern (arith.cpp); set between launches from Python.
extern Mode mode __attribute__((visibility("hidden")));
extern uint32_t seed __attribute__((visibility("hidden")));
}  // namespace detail

inline bool device() { return detail::mode == Mode::device; }

// Whether launches run with denormals flushed to zero (FTZ/DAZ), as --use_fast_math builds do:
// true in device mode.
bool flush_to_zero();

namespace detail {

inline uint32_t bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}
inline float from_bits(uint32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

// An integer hash with good avalanche (Chris Wellons' lowbias32), of the input and the seed.
inline uint32_t mix(uint32_t h) {
  h ^= seed;
  h ^= h >> 16;
  h *= 0x7feb352du;
  h ^= h >> 15;
  h *= 0x846ca68bu;
  h ^= h >> 16;
  return h;
}

// Denormals to signed zero (DAZ on inputs, FTZ on results).
inline float flush(float x) {
  return (bits(x) & 0x7f800000u) == 0 ? from_bits(bits(x) & 0x80000000u) : x;
}

// An error in [-max, max] ulps from a hash: the full maximum (either sign) for an eighth of the
// hashes, else uniform.
inline int32_t pick_ulps(uint32_t h, int32_t max) {
  if ((h & 7u) == 0) return (h & 8u) ? max : -max;
  const uint64_t span = 2 * static_cast<uint64_t>(max) + 1;
  return static_cast<int32_t>(((h >> 4) * span) >> 28) - max;
}

// A factor in [-1, 1] from a hash: ±1 for an eighth of the hashes, else uniform.
inline double pick_unit(uint32_t h) {
  if ((h & 7u) == 0) return (h & 8u) ? 1.0 : -1.0;
  return static_cast<double>(h >> 4) * 0x1p-27 - 1.0;
}

// The finite nonzero float r moved by `ulps` representable numbers away from (ulps > 0) or toward
// zero, kept finite; a result below the normal range is flushed to signed zero.
inline float move_ulps(float r, int32_t ulps) {
  const uint32_t b = bits(r), sign = b & 0x80000000u;
  int64_t magnitude = static_cast<int64_t>(b & 0x7fffffffu) + ulps;
  if (magnitude > 0x7f7fffff) magnitude = 0x7f7fffff;
  if (magnitude < 0x00800000) return from_bits(sign);
  return from_bits(sign | static_cast<uint32_t>(magnitude));
}

constexpr double kLogAbsError = 0x1.8157d9d08a78dp-22;  // 2^-21.41

inline float device_exp(float x) {
  x = flush(x);
  if (x == 0.0f) return 1.0f;  // exact (see "Identities" above)
  const float r = static_cast<float>(std::exp(static_cast<double>(x)));
  if (!(r > 0.0f) || r > std::numeric_limits<float>::max()) return r;  // 0 (underflow), inf, NaN
  const int32_t max = 2 + static_cast<int32_t>(std::fabs(static_cast<double>(x)) * 1.173);
  return move_ulps(r, pick_ulps(mix(bits(x) ^ 0x3c6ef372u), max));
}

inline float device_log(float x) {
  x = flush(x);
  if (!(x > 0.0f) || x > std::numeric_limits<float>::max()) return std::log(x);  // -inf, NaN, inf
  if (x == 1.0f) return 0.0f;  // exact (see "Identities" above)
  const double exact = std::log(static_cast<double>(x));
  const uint32_t h = mix(bits(x) ^ 0xa54ff53au);
  if (x >= 0.5f && x <= 2.0f) {
    // An absolute error: up to 2^-21.41 (3 ulp of 1, and a large relative error near x = 1).
    float r = static_cast<float>(exact + pick_unit(h) * kLogAbsError);
    if (std::fabs(static_cast<double>(r) - exact) > kLogAbsError)  // rounding went past the bound
      r = std::nextafter(r, static_cast<float>(exact));
    return flush(r);
  }
  return move_ulps(static_cast<float>(exact), pick_ulps(h, 3));
}

// log1pf is not one of the fast intrinsics: --use_fast_math leaves it the library function, whose
// maximum error the Guide's single-precision table gives as 1 ulp (computed with FTZ).
inline float device_log1p(float x) {
  x = flush(x);
  if (x == 0.0f || !(x > -1.0f) || x > std::numeric_limits<float>::max()) return std::log1p(x);  // 0, -inf, NaN, inf
  const float r = static_cast<float>(std::log1p(static_cast<double>(x)));
  if (r == 0.0f) return flush(r);
  return flush(move_ulps(r, pick_ulps(mix(bits(x) ^ 0x9b05688cu), 1)));
}

// x / y with -prec-div=false (`fdividef`: __fdividef, which returns 0 for 2^126 < |y| < 2^128).
inline float device_div(float a, float b, bool fdividef) {
  a = flush(a);
  b = flush(b);
  if (fdividef && std::fabs(b) > 0x1p126f && std::fabs(b) <= std::numeric_limits<float>::max())
    return std::isinf(a) ? std::numeric_limits<float>::quiet_NaN() : a * 0.0f * (b < 0.0f ? -1.0f : 1.0f);
  // The double quotient rounded to float is the correctly rounded float quotient (53 >= 2·24 + 2).
  const float r = static_cast<float>(static_cast<double>(a) / static_cast<double>(b));
  if (r == 0.0f || !(std::fabs(r) <= std::numeric_limits<float>::max())) return flush(r);  // 0, inf, NaN
  return move_ulps(r, pick_ulps(mix(bits(a) ^ mix(bits(b) ^ 0x510e527fu)), 2));
}

}  // namespace detail

// exp, log, log1p and division of the kernels' math (smoothce::math in csrc/smoothce/row_math.h).
template <typename T>
inline T exp(T x) {
  if constexpr (std::is_same_v<T, float>) {
    if (device()) return detail::device_exp(x);
  }
  return std::exp(x);
}

template <typename T>
inline T log(T x) {
  if constexpr (std::is_same_v<T, float>) {
    if (device()) return detail::device_log(x);
  }
  return std::log(x);
}

template <typename T>
inline T log1p(T x) {
  if constexpr (std::is_same_v<T, float>) {
    if (device()) return detail::device_log1p(x);
  }
  return std::log1p(x);
}

template <typename T>
inline T div(T a, T b) {
  if constexpr (std::is_same_v<T, float>) {
    if (device()) return detail::device_div(a, b, false);
  }
  return a / b;
}

}  // namespace emu::arith

// CUDA's fast intrinsics: the device versions in device mode, exact otherwise.
inline float __expf(float x) { return ::emu::arith::exp(x); }
inline float __logf(float x) { return ::emu::arith::log(x); }
inline float __fdividef(float a, float b) {
  return ::emu::arith::device() ? ::emu::arith::detail::device_div(a, b, true) : a / b;
}
