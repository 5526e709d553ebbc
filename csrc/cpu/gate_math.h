// The LSTM step's pointwise math, shared by the layer (layer_forward.cpp, layer_backward.cpp) and
// the cell (cell_cpu.cpp): gate nonlinearities, the fused gate and cell update and its backward.
// Compiled with each CPU build's instruction set.
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
// others.
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

// cnt values of v stored as post_t (rounded when post_t is float16/bfloat16).
template <typename acc_t, typename post_t>
inline void store_as(const Vectorized<acc_t>& v, post_t* dst, int64_t cnt) {
  if constexpr (std::is_same_v<post_t, acc_t>) {
    v.store(dst, cnt);
  } else {
    acc_t tmp[Vectorized<acc_t>::size()];
    v.store(tmp, cnt);
    at::vec::convert(tmp, dst, cnt);
  }
}

// Gate/cell update of n hidden units of one batch row at one step. Gate q of unit j is the sum of
// pre[q * pre_stride + j] (the input part, a pre-activation), rec[q * rec_stride + j] (the
// recurrent part) and bias[q * pre_stride + j] (bias may be null); its post-activation goes to
// post[q * pre_stride + j] (post may be pre itself; a float16/bfloat16 post is the saved gates of
// a low-precision call, written rounded, with no float32 copy of them).
//   c_prev: [n] c_{t-1}; c: [n] out: c_t (may be c_prev: the layer updates its state in place);
//   cell_out: [n] out: another copy of c_t (the layer's saved cells); m: [n] out: o * tanh(c_t)
// kSave = false (inference): neither the post-activations nor cell_out are written (post and cell_out
// may be null).
// kPaired (the layer): two vectors of units at a time where there are two full ones: each
// nonlinearity is a chain of dependent instructions, and two independent chains keep the core
// busier. Otherwise (the cell) one vector at a time. The arithmetic is the same, but the compiler
// may fuse a multiply and an add into an FMA differently in the two loops, so each user keeps the
// loop its results were defined with. (cell_backward_row has one loop: compiled into the cell, the
// float64 AVX2 build fuses one multiply-add that the cell's former copy did not, a last-bit
// difference recorded in benchmarks/NOTES.md entry 62. Its results depend on how the compiler
// contracts it where it is inlined.)
template <typename acc_t, typename post_t, bool kSave = true, bool kPaired = true>
inline void cell_forward(int64_t n, const acc_t* pre, int64_t pre_stride, const acc_t* rec,
                         int64_t rec_stride, const acc_t* bias, const acc_t* c_prev, acc_t* c,
                         acc_t* cell_out, acc_t* m, post_t* post) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t kV = Vec::size();
  int64_t j = 0;
  for (; kPaired && j + 2 * kV <= n; j += 2 * kV) {
    auto gate = [&](int q, int64_t jj) {
      Vec v = Vec::loadu(pre + q * pre_stride + jj) + Vec::loadu(rec + q * rec_stride + jj);
      return bias == nullptr ? v : v + Vec::loadu(bias + q * pre_stride + jj);
    };
    const int64_t j1 = j + kV;
    const Vec i0 = vsigmoid(gate(0, j)), i1 = vsigmoid(gate(0, j1));
    const Vec f0 = vsigmoid(gate(1, j)), f1 = vsigmoid(gate(1, j1));
    const Vec z0 = vtanh(gate(2, j)), z1 = vtanh(gate(2, j1));
    const Vec o0 = vsigmoid(gate(3, j)), o1 = vsigmoid(gate(3, j1));
    const Vec c0 = f0 * Vec::loadu(c_prev + j) + i0 * z0, c1 = f1 * Vec::loadu(c_prev + j1) + i1 * z1;
    if constexpr (kSave) {
      store_as(i0, post + j, kV);
      store_as(i1, post + j1, kV);
      store_as(f0, post + pre_stride + j, kV);
      store_as(f1, post + pre_stride + j1, kV);
      store_as(z0, post + 2 * pre_stride + j, kV);
      store_as(z1, post + 2 * pre_stride + j1, kV);
      store_as(o0, post + 3 * pre_stride + j, kV);
      store_as(o1, post + 3 * pre_stride + j1, kV);
      c0.store(cell_out + j);
      c1.store(cell_out + j1);
    }
    c0.store(c + j);
    c1.store(c + j1);
    (o0 * vtanh(c0)).store(m + j);
    (o1 * vtanh(c1)).store(m + j1);
  }
  for (; j < n; j += kV) {
    const int64_t cnt = std::min(kV, n - j);
    auto gate = [&](int q) {
      Vec v = Vec::loadu(pre + q * pre_stride + j, cnt) + Vec::loadu(rec + q * rec_stride + j, cnt);
      return bias == nullptr ? v : v + Vec::loadu(bias + q * pre_stride + j, cnt);
    };
    const Vec i = vsigmoid(gate(0)), f = vsigmoid(gate(1)), z = vtanh(gate(2)), o = vsigmoid(gate(3));
    const Vec cn = f * Vec::loadu(c_prev + j, cnt) + i * z;
    if constexpr (kSave) {
      store_as(i, post + j, cnt);
      store_as(f, post + pre_stride + j, cnt);
      store_as(z, post + 2 * pre_stride + j, cnt);
      store_as(o, post + 3 * pre_stride + j, cnt);
      cn.store(cell_out + j, cnt);
    }
    cn.store(c + j, cnt);
    (o * vtanh(cn)).store(m + j, cnt);
  }
}

// n values of p (float16/bfloat16 saved gates, or acc_t itself) widened to a vector of acc_t: the
// backward reads the saved low-precision gates in place instead of a converted copy of all of them.
template <typename acc_t, typename T>
inline Vectorized<acc_t> load_widened(const T* p, int64_t n) {
  using Vec = Vectorized<acc_t>;
  if constexpr (std::is_same_v<T, acc_t>) {
    return Vec::loadu(p, n);
  } else {
    if (n == Vec::size()) {
      Vec out;
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        at::vec::load_fp32_from_bf16(p, out);
      } else {
        at::vec::load_fp32_from_fp16(p, out);
      }
      return out;
    }
    acc_t tmp[Vec::size()];
    for (int64_t k = 0; k < n; ++k) tmp[k] = static_cast<acc_t>(p[k]);
    return Vec::loadu(tmp, n);
  }
}

// Backward of cell_forward for one batch row (all H units; gates in the standard layout).
//   dm: [H] gradient of o * tanh(c); dc: [H] gradient of c_t; dc_prev: [H] out: gradient of c_{t-1}
//   (may be dc: the layer carries it in place); gates: [4H] saved post-activations (the input
//   dtype); c: [H] saved c_t; c_prev: [H] c_{t-1}; dg: [4H] out: gradient of the pre-activations
template <typename acc_t, typename gate_t>
inline void cell_backward_row(int64_t H, const acc_t* dm, const acc_t* dc, acc_t* dc_prev,
                              const gate_t* gates, const acc_t* c, const acc_t* c_prev, acc_t* dg) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t kV = Vec::size();
  const Vec one(acc_t(1));
  for (int64_t j = 0; j < H; j += kV) {
    const int64_t n = std::min(kV, H - j);
    const Vec i = load_widened<acc_t>(gates + j, n), f = load_widened<acc_t>(gates + H + j, n);
    const Vec z = load_widened<acc_t>(gates + 2 * H + j, n);
    const Vec o = load_widened<acc_t>(gates + 3 * H + j, n);
    const Vec tc = vtanh(Vec::loadu(c + j, n));
    const Vec dmv = Vec::loadu(dm + j, n);
    const Vec dct = Vec::loadu(dc + j, n) + dmv * o * (one - tc * tc);
    (dct * z * i * (one - i)).store(dg + j, n);
    (dct * Vec::loadu(c_prev + j, n) * f * (one - f)).store(dg + H + j, n);
    (dct * i * (one - z * z)).store(dg + 2 * H + j, n);
    (dmv * tc * o * (one - o)).store(dg + 3 * H + j, n);
    (dct * f).store(dc_prev + j, n);
  }
}

}  // namespace fastlstm::cpu
