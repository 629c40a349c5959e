// Element-wise math shared by the CPU and CUDA kernels.
//
// Every function here is force-inlined: the CPU kernels are compiled once per
// instruction set (default, AVX2, AVX-512) and an out-of-line copy of a helper
// compiled for AVX-512 must never be picked by the linker for the default path.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PYGAN_HD __host__ __device__ __forceinline__
#else
#define PYGAN_HD inline __attribute__((always_inline))
#endif

namespace pygan_optim {

// sqrt in the argument's own precision. An unqualified sqrt(float) on the host
// resolves to ::sqrt(double) and would run the whole loop's sqrt in double.
PYGAN_HD float sqrt_of(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);
#else
  return std::sqrt(x);
#endif
}
PYGAN_HD double sqrt_of(double x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}

// a * b + c, rounded once where the hardware has FMA (CUDA, and the CPU loops
// built for AVX2/AVX-512), twice in the default CPU build: torch's vectorised
// CPU kernels fuse exactly there too. The CPU loops are compiled with
// -ffp-contract=off, so this is the only place an FMA appears in them.
// Interpret mode runs the CUDA kernels on the host: FMA as on the GPU.
template <typename T>
PYGAN_HD T mul_add(T a, T b, T c) {
#if defined(__CUDA_ARCH__)
  return fma(a, b, c);  // CUDA overloads fma for float and double
#elif defined(__FMA__) || defined(PYGAN_CUDA_INTERPRET)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// x / c, correctly rounded, as torch divides, with `inv_c` = 1 / c computed in
// double. On the CPU, for float x, it is the float rounding of x * inv_c in
// double: a quotient of two floats is never within 2^-48 (relative) of a float
// rounding midpoint (it is never one), and the double product is within 2^-52
// of the quotient, so both round to the same float. A multiply instead of a
// divide there: the divide unit, which the loop also needs for the square root
// and the per-element divide, caps the step when the memory is fast (NOTES.md).
// GPUs divide as before: some run double at 1/64 of the float rate.
PYGAN_HD float divide_by_constant(float x, float c, double inv_c) {
#if defined(__CUDA_ARCH__)
  (void)inv_c;
  return x / c;
#else
  (void)c;
  return static_cast<float>(static_cast<double>(x) * inv_c);
#endif
}
PYGAN_HD double divide_by_constant(double x, double c, double /*inv_c*/) { return x / c; }

// True for inf and NaN. Written as a comparison so it vectorises.
template <typename T>
PYGAN_HD bool not_finite(T x) {
  return !(x - x == T(0));
}

// Whether a factor finite in double has no finite value in T: the reciprocal
// of a loss scale at or below 2^-127 (GradScaler's after some 144 skipped
// steps in a row) in float math, where every unscaled grad would become inf
// or NaN; torch's fused Adam divides by the scale instead. The values are
// then taken times 2^kRangeShift (exact: a power of two) against a factor
// 2^kRangeShift times smaller, which gives torch's quotients. 2^32 brings the
// smallest float32 scale's reciprocal (2^149) to 2^117, and keeps the squares
// of unit-sized unscaled values (the norm's) clear of float's subnormals.
constexpr int kRangeShift = 32;
template <typename T>
PYGAN_HD bool past_range(double factor) {
  return not_finite(T(factor)) && !not_finite(factor);
}

// A factor and the power of two the values are first multiplied by: `factor`
// and 0, or, past T's range, factor * 2^-kRangeShift and kRangeShift.
struct ShiftedFactor {
  double factor;
  int shift;
};
template <typename T>
PYGAN_HD ShiftedFactor into_range(double factor) {
  if (!past_range<T>(factor)) return {factor, 0};
  return {ldexp(factor, -kRangeShift), kRangeShift};
}

// The smallest positive normal value of an opmath type.
template <typename T>
struct MinNormal;
template <>
struct MinNormal<float> {
  static constexpr double value = 0x1p-126;
};
template <>
struct MinNormal<double> {
  static constexpr double value = 0x1p-1022;
};

// The factor an update multiplies the grads by, shifted into T's range at
// either end: past the top, as into_range; below T's normals, where T holds
// it only inexactly (1/scale x clip coefficient at loss scales from 2^126,
// which GradScaler reaches in a long run whose grads never overflow), the
// values are taken times 2^-kRangeShift against a factor 2^kRangeShift times
// larger. MMEngine's unscale (exact: a power of two, where the unscaled grad
// is a normal float) then clip keeps the coefficient's low bits, and so do the
// shifted values (for a subnormal unscaled grad, MMEngine rounds twice and the
// shifted product once). A factor T holds exactly (a power of two) needs no shift.
template <typename T>
PYGAN_HD ShiftedFactor grad_factor_in_range(double factor) {
  const ShiftedFactor up = into_range<T>(factor);
  if (up.shift != 0) return up;
  const bool inexact = factor != 0.0 && fabs(factor) < MinNormal<T>::value &&
                       static_cast<double>(static_cast<T>(factor)) != factor;
  if (!inexact) return up;
  return {ldexp(factor, kRangeShift), -kRangeShift};
}

// Per-tensor coefficients of one Adam step, hoisted out of the element loop.
template <typename T>
struct AdamCoeffs {
  // The grad is taken times grad_shift, then times grad_mult: 1/grad_scale x
  // clip coefficient, negated for maximize. grad_shift is 1, or the power of
  // two that brings grad_mult into T's normal range (grad_factor_in_range).
  T grad_shift;
  T grad_mult;
  T beta2;
  T lerp_weight;      // 1 - beta1: torch updates exp_avg with lerp(exp_avg, grad, 1 - beta1)
  T one_minus_beta2;
  T eps;
  T l2_decay;         // weight_decay for Adam (added to the grad), 0 for AdamW
  T param_decay;      // 1 - lr * weight_decay for AdamW, 1 for Adam
  T neg_step_size;    // -lr / (1 - beta1^step)
  T bias_correction2_sqrt;  // sqrt(1 - beta2^step); divided by, as torch does
  double inv_bias_correction2_sqrt;  // 1 / bias_correction2_sqrt as a T (divide_by_constant)
  // Adam with weight_decay != 0: torch adds the decay term only then. Adding
  // param * 0 instead would turn the grad of an inf parameter into NaN.
  bool add_l2;

  // Rounded to U, the grads' factor shifted into U's range where it needs it.
  template <typename U>
  PYGAN_HD AdamCoeffs<U> cast() const {
    const U bc2 = U(bias_correction2_sqrt);
    const ShiftedFactor mult = grad_factor_in_range<U>(double(grad_shift) * double(grad_mult));
    return {U(ldexp(1.0, mult.shift)), U(mult.factor), U(beta2), U(lerp_weight),
            U(one_minus_beta2), U(eps), U(l2_decay), U(param_decay), U(neg_step_size), bc2,
            1.0 / double(bc2), add_l2};
  }

  // Whether an op of the update does anything: multiplying or dividing by an
  // exact 1 changes no bit, so the CPU loops leave such ops out (AdamOps).
  // sqrt(bias_correction2) rounds to 1 from step ~16.6k with beta2 = 0.999.
  PYGAN_HD bool scales_grad() const { return grad_mult != T(1) || grad_shift != T(1); }
  PYGAN_HD bool decays() const { return add_l2 || param_decay != T(1); }
  PYGAN_HD bool divides_by_bc2() const { return bias_correction2_sqrt != T(1); }
};

// The optional ops an element update runs. Leaving one out is exact only where
// AdamCoeffs says it is an identity (scales_grad(), decays(), divides_by_bc2()).
template <bool SCALE_GRAD = true, bool DECAY = true, bool DIVIDE_BC2 = true>
struct AdamOps {
  static constexpr bool scale_grad = SCALE_GRAD, decay = DECAY, divide_bc2 = DIVIDE_BC2;
};

// Computes the coefficients in double, as torch.optim.Adam does in Python and
// its fused CPU kernel does in C++; the loops get them rounded to the op-math type.
// `step` is the step number after this update (1 for the first update).
PYGAN_HD AdamCoeffs<double> make_adam_coeffs(double lr, double beta1, double beta2, double eps,
                                            double weight_decay, bool decoupled, bool maximize,
                                            double grad_mult, double step) {
  AdamCoeffs<double> c;
  c.grad_shift = 1.0;
  c.grad_mult = maximize ? -grad_mult : grad_mult;
  c.beta2 = beta2;
  c.lerp_weight = 1.0 - beta1;
  c.one_minus_beta2 = 1.0 - beta2;
  c.eps = eps;
  c.l2_decay = decoupled ? 0.0 : weight_decay;
  // Without weight decay torch leaves the multiply out: 1 - inf * 0 would be NaN.
  c.param_decay = decoupled && weight_decay != 0.0 ? 1.0 - lr * weight_decay : 1.0;
  c.neg_step_size = -(lr / (1.0 - pow(beta1, step)));
  c.bias_correction2_sqrt = sqrt_of(1.0 - pow(beta2, step));
  c.inv_bias_correction2_sqrt = 1.0 / c.bias_correction2_sqrt;
  c.add_l2 = !decoupled && weight_decay != 0.0;
  return c;
}

// torch.lerp's vectorised formulation: one FMA from whichever end is nearer.
// `weight` is loop-invariant, so the compiler hoists the two selects on it.
template <typename T>
PYGAN_HD T lerp(T start, T end, T weight) {
  const bool from_start = weight < T(0.5);
  return mul_add(from_start ? weight : weight - T(1), end - start, from_start ? start : end);
}

// One Adam/AdamW element update in the op-math type T (float, or double for
// fp64 tensors). Operation order, rounding and FMA placement are those of
// torch's fused CPU Adam (and of its for-loop Adam, whose ops fuse the same
// way), so on the same instruction set the results are bit-identical to
// torch.optim.Adam(fused=True); NOTES.md has the measurements.
// BETA1_ZERO: with beta1 == 0, exp_avg becomes the grad and is not read
// (24 instead of 28 bytes per parameter). It differs from torch only when the
// stored exp_avg is not finite, where torch's lerp yields NaN, and in the sign
// of a zero: a -0.0 grad stays -0.0, torch's lerp makes it +0.0 when the old
// exp_avg was negative (and a zero parameter's sign follows).
// OPS: see AdamOps. T may also be a CPU vector type (kernels_impl.h) with
// these operators and overloads of sqrt_of, mul_add and divide_by_constant
// (not for AMSGRAD, nor beta1 != 0).
template <typename T, bool AMSGRAD, bool BETA1_ZERO, typename OPS = AdamOps<>>
PYGAN_HD void adam_update(T& param, T grad, T& exp_avg, T& exp_avg_sq, T& max_exp_avg_sq,
                          const AdamCoeffs<T>& c) {
  if (OPS::scale_grad) grad = grad * c.grad_shift * c.grad_mult;  // exact times 1
  if (OPS::decay) {
    if (c.add_l2) grad = mul_add(param, c.l2_decay, grad);
    param = param * c.param_decay;
  }
  if constexpr (BETA1_ZERO) {
    exp_avg = grad;
  } else {
    exp_avg = lerp(exp_avg, grad, c.lerp_weight);
  }
  exp_avg_sq = mul_add(c.one_minus_beta2 * grad, grad, exp_avg_sq * c.beta2);
  T second = exp_avg_sq;
  if constexpr (AMSGRAD) {
    // NaN from either side, as torch.maximum.
    const bool keep = max_exp_avg_sq > exp_avg_sq || max_exp_avg_sq != max_exp_avg_sq;
    max_exp_avg_sq = keep ? max_exp_avg_sq : exp_avg_sq;
    second = max_exp_avg_sq;
  }
  T root = sqrt_of(second);
  if (OPS::divide_bc2) {
    root = divide_by_constant(root, c.bias_correction2_sqrt, c.inv_bias_correction2_sqrt);
  }
  const T denom = root + c.eps;
  param = param + (c.neg_step_size * exp_avg) / denom;
}

// The step count an update uses: the stored count plus one, added in the
// count's own type, as torch adds 1 to its step tensor before reading it (a
// float32 count stays at 2^24 from there on; the bias corrections with it).
PYGAN_HD double next_step(double stored, bool is_double) {
  return is_double ? stored + 1.0 : static_cast<double>(static_cast<float>(stored) + 1.0f);
}

// The factor every grad is multiplied by before the update: 1/grad_scale (AMP
// unscale) times grad_mult (clip coefficient), each when given.
PYGAN_HD double grad_multiplier(bool has_grad_scale, double grad_scale, bool has_grad_mult,
                                double grad_mult) {
  double factor = 1.0;
  if (has_grad_scale) factor /= grad_scale;
  if (has_grad_mult) factor *= grad_mult;
  return factor;
}

// EMA: ema = ema * keep + param * take. `keep` is the weight of the old
// average (the ops' `momentum`), `take` that of the new parameters (MMagic's
// config momentum m). MMagic's `avg.mul_(1 - m).add_(param, alpha=m)` takes
// 1 - m computed in double and m itself, each rounded to the op-math type
// (float for fp32/bf16/fp16, double for fp64): a caller that knows m passes
// it as `take`. Given only `keep`, `take` is 1 - keep in double, which for some
// m rounds to a float one ulp away from float(m).
template <typename T>
struct EmaCoeffs {
  T keep;  // momentum
  T take;  // the new parameters' weight, as given or 1 - momentum in double

  template <typename U>
  PYGAN_HD EmaCoeffs<U> cast() const {
    return {U(keep), U(take)};
  }
};

// Both weights as the caller gave them.
PYGAN_HD EmaCoeffs<double> make_ema_coeffs(double momentum, double new_weight) {
  return {momentum, new_weight};
}
// Only the old average's weight: the new parameters' is derived from it.
PYGAN_HD EmaCoeffs<double> make_ema_coeffs(double momentum) {
  return make_ema_coeffs(momentum, 1.0 - momentum);
}

// The order of torch's `ema.mul_(keep).add_(param, alpha=take)` (MMagic's loop).
template <typename T>
PYGAN_HD T ema_update(T ema, T param, const EmaCoeffs<T>& c) {
  return mul_add(param, c.take, ema * c.keep);
}


}  // namespace pygan_optim
