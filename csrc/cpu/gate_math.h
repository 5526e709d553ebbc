// Gate nonlinearities shared by the layer (lstm_cpu.cpp) and cell (lstm_cell_cpu.cpp) kernels,
// compiled with each CPU build's instruction set.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <limits>
#include <type_traits>

namespace fastlstm::cpu {

using at::vec::Vectorized;

// Gate nonlinearities. float32 uses a fast exp (about 1e-6 relative: far below float32 LSTM
// rounding noise) instead of Sleef's 1-ulp exp and tanh; float64 keeps the accurate functions.
// Forward and backward use the same functions, so the gradient is that of the function computed.
// Saturation and NaN follow float32's own arithmetic, as torch's do: a sigmoid whose exp(-x)
// overflows is exactly 0 (so its gradient factor s * (1 - s) is exactly 0), tanh saturates to
// exactly +-1, and NaN stays NaN.
#if defined(CPU_CAPABILITY_AVX512)
// AVX-512 float32 (the gate math is a tenth of a step or more at small sizes): exp as
// 2^n * p(r) with n = round(x log2 e), r = x - n ln 2 (ln 2 in two parts), p a degree-6 Taylor
// polynomial (|r| <= ln2 / 2: a few ulp), scaled by vscalefps, which overflows to inf and underflows
// to 0 on its own and keeps NaN; the reciprocal in sigmoid and tanh is vrcp14ps plus one Newton step
// (about 1 ulp) instead of a division.
namespace detail {
C10_ALWAYS_INLINE __m512 exp_ps(__m512 x) {
  // Clamped to +-100 (exp overflows or underflows well inside); min/max return their second
  // operand, x, when x is NaN, so NaN passes through.
  x = _mm512_max_ps(_mm512_set1_ps(-100.f), _mm512_min_ps(_mm512_set1_ps(100.f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln 2, high part
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);  // ln 2, low part
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// 1 / (1 + e) for e >= 0 or NaN; exactly 0 where 1 + e is inf (Newton's step would give NaN there).
C10_ALWAYS_INLINE __m512 recip_one_plus(__m512 e) {
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 d = _mm512_add_ps(one, e);
  __m512 r = _mm512_rcp14_ps(d);
  r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, one), r);
  const __mmask16 inf = _mm512_cmp_ps_mask(d, _mm512_set1_ps(std::numeric_limits<float>::infinity()),
                                           _CMP_EQ_OQ);
  return _mm512_mask_mov_ps(r, inf, _mm512_setzero_ps());
}
}  // namespace detail
#endif

// Always inlined: each is a chain of dependent instructions that the callers interleave with
// others (an out-of-line vtanh took 3% of a small inference call, NOTES.md entry 39).
template <typename acc_t>
C10_ALWAYS_INLINE Vectorized<acc_t> vexp(Vectorized<acc_t> x) {
  if constexpr (std::is_same_v<acc_t, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    return detail::exp_ps(x);
#else
    // at::vec's polynomial exp (20 ulp) is only valid on finite arguments and turns NaN into a
    // number: clamp, put NaN back, and overflow to +inf where float32's exp does (above
    // log(FLT_MAX)).
    const Vectorized<float> e =
        at::vec::clamp(x, Vectorized<float>(-80.f), Vectorized<float>(80.f)).exp_u20();
    const Vectorized<float> inf(std::numeric_limits<float>::infinity());
    const Vectorized<float> big = x > Vectorized<float>(88.7228391f);
    return Vectorized<float>::blendv(Vectorized<float>::blendv(e, inf, big), x, x.isnan());
#endif
  } else {
    return x.exp();
  }
}

template <typename acc_t>
C10_ALWAYS_INLINE Vectorized<acc_t> vsigmoid(Vectorized<acc_t> x) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    return detail::recip_one_plus(detail::exp_ps(x.neg()));
  }
#endif
  const Vectorized<acc_t> one(acc_t(1));
  return one / (one + vexp(x.neg()));
}

template <typename acc_t>
C10_ALWAYS_INLINE Vectorized<acc_t> vtanh(Vectorized<acc_t> x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    const Vectorized<acc_t> one(acc_t(1)), two(acc_t(2));
#if defined(CPU_CAPABILITY_AVX512)
    return one - two * Vectorized<float>(detail::recip_one_plus(detail::exp_ps(x + x)));
#else
    return one - two / (one + vexp(x + x));
#endif
  } else {
    return x.tanh();
  }
}

}  // namespace fastlstm::cpu
