// Gate nonlinearities shared by the layer (lstm_cpu.cpp) and cell (lstm_cell_cpu.cpp) kernels,
// compiled with each CPU build's instruction set.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <limits>
#include <type_traits>

namespace fastlstm::cpu {

using at::vec::Vectorized;

// Gate nonlinearities. float32 uses at::vec's polynomial exp (20 ulp, about 1e-6 relative, inline)
// instead of Sleef's 1-ulp exp and tanh: the difference is far below float32 LSTM rounding noise and
// the gate math is a tenth of a step. float64 keeps the accurate functions. Forward and backward use
// the same functions, so the gradient is that of the function computed.
template <typename acc_t>
inline Vectorized<acc_t> vexp(Vectorized<acc_t> x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    // The polynomial is only valid on finite arguments and turns NaN into a number: clamp, put NaN
    // back, and overflow to +inf where float32's exp does (above log(FLT_MAX)), so that a saturated
    // sigmoid is exactly 0 and its gradient factor s * (1 - s) exactly 0, as in torch.
    const Vectorized<float> e =
        at::vec::clamp(x, Vectorized<float>(-80.f), Vectorized<float>(80.f)).exp_u20();
    const Vectorized<float> inf(std::numeric_limits<float>::infinity());
    const Vectorized<float> big = x > Vectorized<float>(88.7228391f);
    return Vectorized<float>::blendv(Vectorized<float>::blendv(e, inf, big), x, x.isnan());
  } else {
    return x.exp();
  }
}

template <typename acc_t>
inline Vectorized<acc_t> vsigmoid(Vectorized<acc_t> x) {
  const Vectorized<acc_t> one(acc_t(1));
  return one / (one + vexp(x.neg()));
}

template <typename acc_t>
inline Vectorized<acc_t> vtanh(Vectorized<acc_t> x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    const Vectorized<acc_t> one(acc_t(1)), two(acc_t(2));
    return one - two / (one + vexp(x + x));
  } else {
    return x.tanh();
  }
}

}  // namespace fastlstm::cpu
