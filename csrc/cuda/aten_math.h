// What the CUDA bindings (lstm_cuda.cpp, variant_cuda.cpp) share: the mapping from ATen's scalar
// types to the kernels' (csrc/kernels), argument checks, and DeviceMath (the layer code's matrix
// products) through ATen on the current stream.
#pragma once

#include <ATen/ATen.h>

#include <climits>

#include "kernels/lstm_host.h"
#include "lstm_checks.h"

namespace fastlstm {

// ATen's 16-bit types and CUDA's share their layout; the kernels take CUDA's.
template <typename scalar_t>
struct DeviceType {
  using type = scalar_t;
};
template <>
struct DeviceType<at::Half> {
  using type = __half;
};
template <>
struct DeviceType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename scalar_t>
inline typename DeviceType<scalar_t>::type* dev_ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<typename DeviceType<scalar_t>::type*>(t.data_ptr<scalar_t>())
                     : nullptr;
}

template <typename scalar_t>
inline cuda::AccT<typename DeviceType<scalar_t>::type>* acc_ptr(const at::Tensor& t) {
  return t.data_ptr<cuda::AccT<typename DeviceType<scalar_t>::type>>();
}

// A new contiguous tensor of `options` holding a copy of t (the kernels update their state in place,
// and the caller's tensors must not change).
inline at::Tensor fresh_copy(const at::Tensor& t, const at::TensorOptions& options) {
  return at::empty(t.sizes(), options).copy_(t);
}

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
}

inline void check_same(const at::Tensor& t, const char* name, const at::Tensor& input,
                at::ScalarType dtype) {
  TORCH_CHECK(t.device() == input.device(), name, " must be on the input's device ",
              input.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
}

// The kernels index batch rows and units with int and put H and P tiles of 16 in gridDim.y.
inline void check_kernel_limits(const LayerSizes& s) {
  TORCH_CHECK(s.B <= INT_MAX && 4 * s.H <= INT_MAX && s.P <= INT_MAX,
              "fastlstm CUDA: batch size and 4 * hidden_size must fit in int32, got B = ", s.B,
              ", H = ", s.H);
  TORCH_CHECK(s.H <= 65535 * 16 && s.P <= 65535 * 16,
              "fastlstm CUDA: hidden_size and proj_size must be at most ", 65535 * 16);
  TORCH_CHECK(s.H > 0 && s.P > 0, "hidden_size and proj_size must be positive, got H = ", s.H,
              ", P = ", s.P);
}

// DeviceMath on the current stream through ATen, for one dtype.
template <typename scalar_t>
class AtenMath final : public cuda::DeviceMath<typename DeviceType<scalar_t>::type> {
 public:
  using Dev = typename DeviceType<scalar_t>::type;
  explicit AtenMath(const at::TensorOptions& opts) : opts_(opts) {}

  void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const Dev* a, const Dev* b,
            const Dev* bias, Dev* c) override {
    const at::Tensor at_ = trans_a ? view(a, {K, M}).t() : view(a, {M, K});
    const at::Tensor bt = trans_b ? view(b, {N, K}).t() : view(b, {K, N});
    at::Tensor ct = view(c, {M, N});
    if (bias != nullptr) {
      at::addmm_out(ct, view(bias, {N}), at_, bt);
    } else {
      at::mm_out(ct, at_, bt);
    }
  }

  void column_sums(int64_t M, int64_t N, const Dev* a, Dev* out) override {
    at::Tensor ot = view(out, {N});
    at::sum_out(ot, view(a, {M, N}), {0});
  }

 private:
  at::Tensor view(const Dev* p, at::IntArrayRef sizes) const {
    return at::from_blob(const_cast<Dev*>(p), sizes, opts_);
  }
  at::TensorOptions opts_;
};


}  // namespace fastlstm
