// CPU element loops, compiled once per instruction set: each kernels_<isa>.cpp
// defines PYGAN_ISA and includes this file with its own -m flags. The loops
// are written for the compiler's vectoriser (`omp simd`, restrict pointers,
// coefficients copied into locals, branches only on template parameters).
#pragma once

#ifndef PYGAN_ISA
#error "define PYGAN_ISA before including kernels_impl.h"
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#if defined(__SSE2__)
#include <immintrin.h>
#endif
#include <type_traits>

#include "kernel_table.h"
#include "pygan_optim/math.h"

namespace pygan_optim {
namespace cpu {
namespace PYGAN_ISA {
namespace {

// Asks for the line `ahead` bytes past x. A prefetch never faults, so the
// address may lie past a tensor's end (it is formed as an integer, not a pointer).
inline void prefetch_line_past(const void* x, int64_t ahead) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(x) + ahead));
}

// Runs body(b, e) over [0, n) in blocks of 1 KB per stream, each block after
// asking for the lines `ahead` bytes past it in each of `streams` (those the
// loop reads; null ones are skipped). With `ahead` 0 the hardware prefetchers
// are left alone: body(0, n).
template <size_t kElement, size_t kStreams, typename Body>
inline void in_prefetched_blocks(int64_t n, int64_t ahead, const void* const (&streams)[kStreams],
                                 const Body& body) {
  if (ahead <= 0) return body(int64_t{0}, n);
  constexpr int64_t kElementBytes = static_cast<int64_t>(kElement), kLine = 64;
  constexpr int64_t kBlock = 1024 / kElementBytes;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = b + kBlock < n ? b + kBlock : n;
    for (const void* stream : streams) {
      if (stream == nullptr) continue;
      const char* first = static_cast<const char*>(stream) + b * kElementBytes;
      for (int64_t offset = 0; offset < (e - b) * kElementBytes; offset += kLine) {
        prefetch_line_past(first + offset, ahead);
      }
    }
    body(b, e);
  }
}

template <typename scalar_t>
using opmath_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// STORE_EXP_AVG false (beta1 == 0 only): the caller keeps the grad itself as
// exp_avg, so nothing is written to `m` (20 bytes per fp32 parameter).
// BLEND_EMA: `e` is blended toward the new parameter while it is in registers
// (8 more bytes per fp32 parameter instead of a 12-byte EMA pass). The blend
// takes the stored (rounded) parameter, so it equals ema_typed run afterwards.
// OPS: the optional ops of the update (AdamOps in math.h).
// `m` may be `g` (beta1 == 0: a kept grad gets the effective grad written over
// it): each element is read before it is written, so g and m are not restrict.
// `ahead`: see in_prefetched_blocks.
template <typename scalar_t, bool AMSGRAD, bool BETA1_ZERO, bool STORE_EXP_AVG, bool BLEND_EMA,
          typename OPS>
void adam_loop(scalar_t* __restrict p, const scalar_t* g, scalar_t* m,
               scalar_t* __restrict v, scalar_t* __restrict vmax, scalar_t* __restrict e,
               int64_t n, const AdamCoeffs<opmath_t<scalar_t>> c,
               const EmaCoeffs<opmath_t<scalar_t>> ec, int64_t ahead) {
  using T = opmath_t<scalar_t>;
  const void* const read[] = {p, g, BETA1_ZERO ? nullptr : m, v, vmax, e};
  in_prefetched_blocks<sizeof(scalar_t)>(n, ahead, read, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      T param = T(p[i]);
      T exp_avg = BETA1_ZERO ? T(0) : T(m[i]);
      T exp_avg_sq = T(v[i]);
      T max_sq = AMSGRAD ? T(vmax[i]) : T(0);
      adam_update<T, AMSGRAD, BETA1_ZERO, OPS>(param, T(g[i]), exp_avg, exp_avg_sq, max_sq, c);
      const scalar_t new_param = scalar_t(param);
      p[i] = new_param;
      if (STORE_EXP_AVG) m[i] = scalar_t(exp_avg);
      v[i] = scalar_t(exp_avg_sq);
      if (AMSGRAD) vmax[i] = scalar_t(max_sq);
      if (BLEND_EMA) e[i] = scalar_t(ema_update(T(e[i]), T(new_param), ec));
    }
  });
}

// Copies `n` floats to `dst` with non-temporal (streaming) stores where the
// instruction set has them: the lines of `dst` are then written without being
// read first, which a normal store to a line not in cache does (RFO).
inline void stream_floats(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 63) != 0; ++i) dst[i] = src[i];
  for (; i + 16 <= n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
#elif defined(__AVX2__)
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 31) != 0; ++i) dst[i] = src[i];
  for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
#elif defined(__SSE2__)
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 15) != 0; ++i) dst[i] = src[i];
  for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
#endif
  for (; i < n; ++i) dst[i] = src[i];
}

#if defined(__AVX512F__) || defined(__AVX2__)
// The lanes of one vector register, for a loop that stores with intrinsics
// (streaming stores). adam_update and ema_update run on it lane by lane with
// the operations, roundings and FMAs they have on a float, so the results
// keep their bits; math.h's templates find the overloads below by
// argument-dependent lookup, and these using-declarations keep math.h's float
// and double versions visible here beside them.
using pygan_optim::divide_by_constant;
using pygan_optim::mul_add;
using pygan_optim::sqrt_of;
#if defined(__AVX512F__)
using RawVec = __m512;
#define PYGAN_VEC(op) _mm512_##op
#else
using RawVec = __m256;
#define PYGAN_VEC(op) _mm256_##op
#endif
struct FloatVec {
  static constexpr int64_t kLanes = sizeof(RawVec) / sizeof(float);
  RawVec v;
  explicit FloatVec(RawVec x) : v(x) {}
  FloatVec(float x) : v(PYGAN_VEC(set1_ps)(x)) {}  // implicit: coefficients broadcast
  static FloatVec load(const float* x) { return FloatVec(PYGAN_VEC(loadu_ps)(x)); }
  void store(float* x) const { PYGAN_VEC(storeu_ps)(x, v); }
  void stream(float* x) const { PYGAN_VEC(stream_ps)(x, v); }  // x aligned to the vector
};
inline FloatVec operator+(FloatVec a, FloatVec b) { return FloatVec(PYGAN_VEC(add_ps)(a.v, b.v)); }
inline FloatVec operator*(FloatVec a, FloatVec b) { return FloatVec(PYGAN_VEC(mul_ps)(a.v, b.v)); }
inline FloatVec operator/(FloatVec a, FloatVec b) { return FloatVec(PYGAN_VEC(div_ps)(a.v, b.v)); }
inline FloatVec sqrt_of(FloatVec x) { return FloatVec(PYGAN_VEC(sqrt_ps)(x.v)); }
inline FloatVec mul_add(FloatVec a, FloatVec b, FloatVec c) {
#if defined(__FMA__)
  return FloatVec(PYGAN_VEC(fmadd_ps)(a.v, b.v, c.v));
#else
  return a * b + c;
#endif
}
// math.h's CPU divide_by_constant on every lane: x * inv_c in double, rounded
// to float, one half of the lanes at a time.
inline FloatVec divide_by_constant(FloatVec x, FloatVec /*c*/, double inv_c) {
#if defined(__AVX512F__)
  const __m512d inv = _mm512_set1_pd(inv_c);
  const __m256 lo = _mm512_castps512_ps256(x.v);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x.v), 1));
  const __m256 lo_q = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_cvtps_pd(lo), inv));
  const __m256 hi_q = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_cvtps_pd(hi), inv));
  return FloatVec(_mm512_castpd_ps(_mm512_insertf64x4(
      _mm512_castpd256_pd512(_mm256_castps_pd(lo_q)), _mm256_castps_pd(hi_q), 1)));
#else
  const __m256d inv = _mm256_set1_pd(inv_c);
  const __m128 lo_q = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(x.v)), inv));
  const __m128 hi_q = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(x.v, 1)), inv));
  return FloatVec(_mm256_insertf128_ps(_mm256_castps128_ps256(lo_q), hi_q, 1));
#endif
}
#undef PYGAN_VEC

inline AdamCoeffs<FloatVec> broadcast(const AdamCoeffs<float>& c) {
  return {c.grad_shift,    c.grad_mult,   c.beta2,         c.lerp_weight,   c.one_minus_beta2,
          c.eps,           c.l2_decay,    c.param_decay,   c.neg_step_size,
          c.bias_correction2_sqrt, c.inv_bias_correction2_sqrt, c.add_l2};
}
#endif

// Adam with beta1 == 0 on float tensors: exp_avg becomes the (scaled) grad and
// is never read, so it is streamed out instead of stored (its lines are then
// written without being read first). With vector registers it is streamed from
// them, in the one pass; otherwise (and for AMSGRAD) blocks of the shared
// vectorised loop write it to a buffer in L1 first, which costs up to a tenth
// of the step when memory is fast (NOTES.md). `m` may be `g`, as in adam_loop.
// Returns whether it zeroed the grad too (asked by `zero_g`; only the register
// loop does: zeros stored right after each vector of the grad is read, while
// its line is in L1, instead of a memset pass over the chunk afterwards).
template <bool AMSGRAD, bool BLEND_EMA, typename OPS>
bool adam_loop_beta1_zero_streamed(float* __restrict p, float* g, float* m,
                                   float* __restrict v,
                                   float* __restrict vmax, float* __restrict e, int64_t n,
                                   const AdamCoeffs<float> c, const EmaCoeffs<float> ec,
                                   bool zero_g, int64_t ahead) {
#if defined(__AVX512F__) || defined(__AVX2__)
  if constexpr (!AMSGRAD) {
    auto run = [&](auto zero) {
      constexpr bool ZERO = decltype(zero)::value;
      constexpr int64_t kLanes = FloatVec::kLanes;
      // Plain stores up to exp_avg's first vector boundary, then streaming ones.
      int64_t i = 0;
      while (i < n && reinterpret_cast<uintptr_t>(m + i) % sizeof(FloatVec) != 0) ++i;
      const int64_t head = i;
      adam_loop<float, false, true, true, BLEND_EMA, OPS>(p, g, m, v, nullptr, e, i, c, ec, 0);
      const AdamCoeffs<FloatVec> cv = broadcast(c);
      const EmaCoeffs<FloatVec> ecv{ec.keep, ec.take};
      for (; i + kLanes <= n; i += kLanes) {
        if (ahead > 0 && (i - head) % 16 == 0) {  // once per 64-byte line of each stream read
          prefetch_line_past(p + i, ahead);
          prefetch_line_past(g + i, ahead);
          prefetch_line_past(v + i, ahead);
          if constexpr (BLEND_EMA) prefetch_line_past(e + i, ahead);
        }
        FloatVec param = FloatVec::load(p + i), exp_avg(0.0f), exp_avg_sq = FloatVec::load(v + i),
                 unused(0.0f);
        adam_update<FloatVec, false, true, OPS>(param, FloatVec::load(g + i), exp_avg, exp_avg_sq,
                                                unused, cv);
        param.store(p + i);
        exp_avg_sq.store(v + i);
        exp_avg.stream(m + i);
        if constexpr (BLEND_EMA) ema_update(FloatVec::load(e + i), param, ecv).store(e + i);
        if constexpr (ZERO) FloatVec(0.0f).store(g + i);
      }
      adam_loop<float, false, true, true, BLEND_EMA, OPS>(p + i, g + i, m + i, v + i, nullptr,
                                                         BLEND_EMA ? e + i : nullptr, n - i, c, ec,
                                                         0);
      if constexpr (ZERO) {  // the scalar head and tail
        std::memset(g, 0, sizeof(float) * head);
        std::memset(g + i, 0, sizeof(float) * (n - i));
      }
      _mm_sfence();  // streaming stores are weakly ordered: finish them before returning
      return ZERO;
    };
    return zero_g ? run(std::true_type{}) : run(std::false_type{});
  }
#endif
  constexpr int64_t kBlock = 1024;
  alignas(64) float m_block[kBlock];
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t len = b + kBlock < n ? kBlock : n - b;
    adam_loop<float, AMSGRAD, true, true, BLEND_EMA, OPS>(
        p + b, g + b, m_block, v + b, AMSGRAD ? vmax + b : nullptr, BLEND_EMA ? e + b : nullptr,
        len, c, ec, ahead);
    stream_floats(m + b, m_block, len);
  }
#if defined(__SSE2__)
  _mm_sfence();  // streaming stores are weakly ordered: finish them before returning
#endif
  return false;
}

// Below this many elements per chunk, exp_avg is stored plainly, not streamed:
// on AMD Zen 4 with the register loop, 1000- and 2000-element tensors ran 2-8%
// faster streamed, 100- to 512-element ones within noise either way (NOTES.md,
// "10k x 1k"; 3072 while the stream went through an L1 buffer).
constexpr int64_t kStreamMinElements = 1000;

// Calls fn(std::bool_constant<b>{}): a run-time flag as a template argument.
template <typename Fn>
void with_flag(bool b, const Fn& fn) {
  if (b) fn(std::true_type{});
  else fn(std::false_type{});
}

// Calls fn(AdamOps<...>{}) with only the ops `c` needs. fp32 without AMSGRAD
// (every GAN config) gets those loops; other dtypes and AMSGRAD run every op
// (exact either way), which keeps the number of loops compiled down.
template <bool SPECIALIZE, typename T, typename Fn>
void with_adam_ops(const AdamCoeffs<T>& c, const Fn& fn) {
  if constexpr (!SPECIALIZE) {
    fn(AdamOps<>{});
  } else {
    with_flag(c.scales_grad(), [&](auto scale) {
      with_flag(c.decays(), [&](auto decay) {
        with_flag(c.divides_by_bc2(), [&](auto divide) {
          fn(AdamOps<decltype(scale)::value, decltype(decay)::value, decltype(divide)::value>{});
        });
      });
    });
  }
}

template <typename scalar_t>
void adam_typed(const AdamTensors& t, int64_t begin, int64_t end, const AdamCoeffs<double>& c64,
                const EmaCoeffs<double>& ec64, bool amsgrad, bool beta1_zero, bool zero_grad,
                int64_t ahead) {
  auto* p = static_cast<scalar_t*>(t.param) + begin;
  auto* g = static_cast<scalar_t*>(t.grad) + begin;
  auto* m = t.exp_avg ? static_cast<scalar_t*>(t.exp_avg) + begin : nullptr;
  auto* v = static_cast<scalar_t*>(t.exp_avg_sq) + begin;
  auto* vmax = amsgrad ? static_cast<scalar_t*>(t.max_exp_avg_sq) + begin : nullptr;
  auto* e = t.ema ? static_cast<scalar_t*>(t.ema) + begin : nullptr;
  const int64_t n = end - begin;
  const auto c = c64.template cast<opmath_t<scalar_t>>();
  const auto ec = ec64.template cast<opmath_t<scalar_t>>();
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  bool zeroed = false;  // the grad's zeros already written by the loop
  with_flag(amsgrad, [&](auto ams) {
    constexpr bool A = decltype(ams)::value;
    with_flag(e != nullptr, [&](auto blend) {
      constexpr bool B = decltype(blend)::value;
      with_adam_ops<kFloat && !A>(c, [&](auto ops) {
        using O = decltype(ops);
        if (m == nullptr) {  // beta1 == 0 and the grad is kept as exp_avg (see AdamTensors)
          adam_loop<scalar_t, A, true, false, B, O>(p, g, m, v, vmax, e, n, c, ec, ahead);
        } else if (kFloat && beta1_zero && m != g && n >= kStreamMinElements) {
          // (exp_avg only written: streamed. Written over the grad, its lines
          // were just read, so it is stored plainly below.)
          if constexpr (kFloat) {
            zeroed = adam_loop_beta1_zero_streamed<A, B, O>(p, g, m, v, vmax, e, n, c, ec,
                                                            zero_grad, ahead);
          }
        } else if (beta1_zero) {
          adam_loop<scalar_t, A, true, true, B, O>(p, g, m, v, vmax, e, n, c, ec, ahead);
        } else {
          adam_loop<scalar_t, A, false, true, B, O>(p, g, m, v, vmax, e, n, c, ec, ahead);
        }
      });
    });
  });
  // The chunk was just read, so its lines are in cache: zeroing here costs no
  // extra pass over memory (only one over the cache, which the register loop
  // above saves by zeroing as it goes: 0-10% of an AMP + clip wrapper step with
  // zeros, NOTES.md).
  if (zero_grad && !zeroed) std::memset(static_cast<void*>(g), 0, sizeof(scalar_t) * n);
}

template <typename scalar_t>
bool scale_typed(const void* in_v, void* out_v, int64_t begin, int64_t end, double factor64) {
  const scalar_t* __restrict in = static_cast<const scalar_t*>(in_v) + begin;
  scalar_t* out = static_cast<scalar_t*>(out_v) + begin;  // may alias `in` (in-place)
  using T = opmath_t<scalar_t>;
  const T factor = T(factor64);
  int bad = 0;
  const int64_t n = end - begin;
#pragma omp simd reduction(| : bad)
  for (int64_t i = 0; i < n; ++i) {
    const T x = T(in[i]);
    bad |= not_finite(x);
    out[i] = scalar_t(x * factor);
  }
  return bad != 0;
}

// Squares are added in fp32 over blocks of this many elements (vector lanes
// keep partial sums), then the block sums in double: accurate and vectorised.
constexpr int64_t kSumBlock = 1024;

template <typename scalar_t>
double sum_squares_typed(const void* x_v, int64_t begin, int64_t end, double scale64,
                         bool* not_finite_out) {
  const scalar_t* __restrict x = static_cast<const scalar_t*>(x_v) + begin;
  using T = opmath_t<scalar_t>;
  const T scale = T(scale64);
  double total = 0.0;
  int bad = 0;
  const int64_t n = end - begin;
  for (int64_t b = 0; b < n; b += kSumBlock) {
    const int64_t stop = b + kSumBlock < n ? b + kSumBlock : n;
    T block = T(0);
#pragma omp simd reduction(+ : block) reduction(| : bad)
    for (int64_t i = b; i < stop; ++i) {
      const T value = T(x[i]);
      bad |= not_finite(value);
      const T scaled = value * scale;
      block = mul_add(scaled, scaled, block);
    }
    total += double(block);
  }
  if (bad) *not_finite_out = true;
  return total;
}

template <typename scalar_t>
void ema_typed(void* ema_v, const void* param_v, int64_t begin, int64_t end,
               const EmaCoeffs<double>& weights64, int64_t ahead) {
  scalar_t* __restrict ema = static_cast<scalar_t*>(ema_v) + begin;
  const scalar_t* __restrict param = static_cast<const scalar_t*>(param_v) + begin;
  using T = opmath_t<scalar_t>;
  const EmaCoeffs<T> c = weights64.template cast<T>();
  const void* const read[] = {ema, param};
  in_prefetched_blocks<sizeof(scalar_t)>(end - begin, ahead, read, [&](int64_t b, int64_t e) {
#pragma omp simd
    for (int64_t i = b; i < e; ++i) {
      ema[i] = scalar_t(ema_update(T(ema[i]), T(param[i]), c));
    }
  });
}

// A memory-roof probe with a kernel's stream mix: reads N_IN float arrays and
// writes N_OUT in one pass with (almost) nothing to compute, so its bandwidth
// is what a kernel moving the same streams can reach at best. Outputs from
// `n_back` on are only written (not inputs): they get streaming stores, the
// fastest way to write a line not read first (no read for ownership). It
// prefetches its inputs `ahead` bytes ahead, as the kernels do.
template <int N_IN, int N_OUT>
void stream_loop(const float* const* in, float* const* out, int n_back, int64_t begin,
                 int64_t end, int64_t ahead) {
  const float* src[N_IN];
  float* dst[N_OUT];
  for (int k = 0; k < N_IN; ++k) src[k] = in[k];
  for (int j = 0; j < N_OUT; ++j) dst[j] = out[j];
  auto sum_at = [&](int64_t i) {
    float s = 0.0f;
    for (int k = 0; k < N_IN; ++k) s += src[k][i];
    return s;
  };
  int64_t i = begin;
#if defined(__AVX512F__) || defined(__AVX2__)
  // Streaming stores need aligned addresses: plain ones up to the first vector
  // boundary of the write-only outputs, which must be aligned alike (torch's
  // allocations are; otherwise the probe stores plainly, without streaming).
  const auto offset = [](const float* x) {
    return reinterpret_cast<uintptr_t>(x) % sizeof(FloatVec);
  };
  bool alike = true;
  for (int j = n_back + 1; j < N_OUT; ++j) alike = alike && offset(dst[j]) == offset(dst[n_back]);
  if (n_back < N_OUT && alike) {
    for (; i < end && offset(dst[n_back] + i) != 0; ++i) {
      const float s = sum_at(i);
      for (int j = 0; j < N_OUT; ++j) dst[j][i] = s;
    }
    const int64_t head = i;
    for (; i + FloatVec::kLanes <= end; i += FloatVec::kLanes) {
      if (ahead > 0 && (i - head) % 16 == 0) {
        for (int k = 0; k < N_IN; ++k) prefetch_line_past(src[k] + i, ahead);
      }
      FloatVec s(0.0f);
      for (int k = 0; k < N_IN; ++k) s = s + FloatVec::load(src[k] + i);
      for (int j = 0; j < N_OUT; ++j) {
        if (j < n_back) s.store(dst[j] + i);
        else s.stream(dst[j] + i);
      }
    }
    _mm_sfence();  // streaming stores are weakly ordered
  }
#endif
  const void* read[N_IN];
  for (int k = 0; k < N_IN; ++k) read[k] = src[k] + i;
  in_prefetched_blocks<sizeof(float)>(end - i, ahead, read, [&](int64_t b, int64_t e) {
#pragma omp simd
    for (int64_t t = i + b; t < i + e; ++t) {
      const float s = sum_at(t);
      for (int j = 0; j < N_OUT; ++j) dst[j][t] = s;
    }
  });
}

template <int N_IN>
void stream_to(const float* const* in, float* const* out, int n_out, int n_back, int64_t begin,
               int64_t end, int64_t ahead) {
  switch (n_out) {
    case 1: return stream_loop<N_IN, 1>(in, out, n_back, begin, end, ahead);
    case 2: return stream_loop<N_IN, 2>(in, out, n_back, begin, end, ahead);
    case 3: return stream_loop<N_IN, 3>(in, out, n_back, begin, end, ahead);
    default: return stream_loop<N_IN, 4>(in, out, n_back, begin, end, ahead);
  }
}

void stream(const float* const* in, int n_in, float* const* out, int n_out, int n_back,
            int64_t begin, int64_t end, int64_t ahead) {
  switch (n_in) {
    case 1: return stream_to<1>(in, out, n_out, n_back, begin, end, ahead);
    case 2: return stream_to<2>(in, out, n_out, n_back, begin, end, ahead);
    case 3: return stream_to<3>(in, out, n_out, n_back, begin, end, ahead);
    default: return stream_to<4>(in, out, n_out, n_back, begin, end, ahead);
  }
}

// Calls fn.template operator()<scalar_t>() for the storage type of `dtype`.
template <typename Fn>
auto dispatch(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::Double: return fn(double{});
    case DType::BFloat16: return fn(c10::BFloat16{});
    case DType::Half: return fn(c10::Half{});
    case DType::Float:
    default: return fn(float{});
  }
}

void adam(const AdamTensors& t, int64_t begin, int64_t end, const AdamCoeffs<double>& c,
          const EmaCoeffs<double>& ema, bool amsgrad, bool beta1_zero, bool zero_grad,
          int64_t ahead) {
  dispatch(t.dtype, [&](auto tag) {
    adam_typed<decltype(tag)>(t, begin, end, c, ema, amsgrad, beta1_zero, zero_grad, ahead);
  });
}

bool scale(const void* in, void* out, DType dtype, int64_t begin, int64_t end, double factor) {
  return dispatch(dtype, [&](auto tag) {
    return scale_typed<decltype(tag)>(in, out, begin, end, factor);
  });
}

double sum_squares(const void* x, DType dtype, int64_t begin, int64_t end, double scale,
                   bool* not_finite_out) {
  return dispatch(dtype, [&](auto tag) {
    return sum_squares_typed<decltype(tag)>(x, begin, end, scale, not_finite_out);
  });
}

void ema(void* ema_v, const void* param, DType dtype, int64_t begin, int64_t end,
         const EmaCoeffs<double>& weights, int64_t ahead) {
  dispatch(dtype, [&](auto tag) {
    ema_typed<decltype(tag)>(ema_v, param, begin, end, weights, ahead);
  });
}

}  // namespace
}  // namespace PYGAN_ISA
}  // namespace cpu
}  // namespace pygan_optim

// Defines `const KernelTable& FN()` returning this instruction set's loops.
#define PYGAN_DEFINE_KERNEL_TABLE(FN, NAME)                                 \
  namespace pygan_optim {                                                   \
  namespace cpu {                                                           \
  const KernelTable& FN() {                                                 \
    static const KernelTable table{NAME, PYGAN_ISA::adam, PYGAN_ISA::scale, \
                                   PYGAN_ISA::sum_squares, PYGAN_ISA::ema,  \
                                   PYGAN_ISA::stream};                      \
    return table;                                                           \
  }                                                                         \
  }                                                                         \
  }
