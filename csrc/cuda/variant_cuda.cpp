// CUDA implementation of fastlstm::lstm_variant_forward / lstm_variant_backward (issue 29; contract
// and the `saved` layout in csrc/fastlstm.cpp). This file checks arguments, picks the device, stream
// and dtype, allocates what the framework-free layer code (csrc/kernels/lstm_variant_host.h) asks for
// and does its matrix products through ATen (cuBLAS), all in the cell type on cell-type copies of
// the weights, as the CPU op (float32 for float16/bfloat16: TF32 only if
// torch.backends.cuda.matmul.allow_tf32 says so). The row-wise work is in
// csrc/kernels/lstm_variant.cu. Nothing synchronises with the host and nothing uses atomics.
//
// lengths are not range-checked (as in lstm_cuda.cpp): the kernels only compare t < lengths[b].
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>

#include "aten_math.h"
#include "kernels/lstm_variant_host.h"
#include "lstm_checks.h"

namespace fastlstm {
namespace {

using OptTensor = std::optional<at::Tensor>;

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

// The variant arguments checked against the layer's sizes; returns whether layer norm is on.
bool check_variant_args(const LayerSizes& s, const at::Tensor& input, const OptTensor& zoneout_c,
                        const OptTensor& zoneout_h, double zoneout_c_p, double zoneout_h_p,
                        const std::optional<double>& cell_clip, const OptTensor& ln_ih, const OptTensor& ln_hh, const OptTensor& ln_c_weight,
                        const OptTensor& ln_c_bias) {
  const at::ScalarType cell = cell_dtype(input.scalar_type());
  if (present(zoneout_c)) {
    FASTLSTM_CHECK_SHAPE_NAMED(*zoneout_c, "zoneout_c", s.T, s.B, s.H);
    check_same(*zoneout_c, "zoneout_c", input, cell);
  }
  if (present(zoneout_h)) {
    FASTLSTM_CHECK_SHAPE_NAMED(*zoneout_h, "zoneout_h", s.T, s.B, s.P);
    check_same(*zoneout_h, "zoneout_h", input, cell);
  }
  TORCH_CHECK(zoneout_c_p >= 0 && zoneout_c_p < 1, "zoneout_c_p must lie in [0, 1), got ",
              zoneout_c_p);
  TORCH_CHECK(zoneout_h_p >= 0 && zoneout_h_p < 1, "zoneout_h_p must lie in [0, 1), got ",
              zoneout_h_p);
  if (cell_clip.has_value()) {
    TORCH_CHECK(*cell_clip > 0, "cell_clip must be positive, got ", *cell_clip);
  }
  const int n = present(ln_ih) + present(ln_hh) + present(ln_c_weight) + present(ln_c_bias);
  TORCH_CHECK(n == 0 || n == 4,
              "ln_ih, ln_hh, ln_c_weight and ln_c_bias must be given all four or none, got ", n);
  if (n == 4) {
    FASTLSTM_CHECK_SHAPE_NAMED(*ln_ih, "ln_ih", 4 * s.H);
    FASTLSTM_CHECK_SHAPE_NAMED(*ln_hh, "ln_hh", 4 * s.H);
    FASTLSTM_CHECK_SHAPE_NAMED(*ln_c_weight, "ln_c_weight", s.H);
    FASTLSTM_CHECK_SHAPE_NAMED(*ln_c_bias, "ln_c_bias", s.H);
    check_same(*ln_ih, "ln_ih", input, input.scalar_type());
    check_same(*ln_hh, "ln_hh", input, input.scalar_type());
    check_same(*ln_c_weight, "ln_c_weight", input, input.scalar_type());
    check_same(*ln_c_bias, "ln_c_bias", input, input.scalar_type());
  }
  return n == 4;
}

// Contiguous tensors that the options point into; kept alive for the layer call.
struct OptionTensors {
  at::Tensor zoneout_c, zoneout_h, ln_ih, ln_hh, ln_c_weight, ln_c_bias;
};

OptionTensors contiguous_options(const OptTensor& zoneout_c, const OptTensor& zoneout_h,
                                 const OptTensor& ln_ih, const OptTensor& ln_hh,
                                 const OptTensor& ln_c_weight, const OptTensor& ln_c_bias) {
  auto c = [](const OptTensor& t) { return present(t) ? t->contiguous() : at::Tensor(); };
  return {c(zoneout_c), c(zoneout_h), c(ln_ih), c(ln_hh), c(ln_c_weight), c(ln_c_bias)};
}

template <typename scalar_t>
cuda::VariantOptions<typename DeviceType<scalar_t>::type> variant_options(
    const OptionTensors& t, double zoneout_c_p, double zoneout_h_p,
    const std::optional<double>& cell_clip) {
  cuda::VariantOptions<typename DeviceType<scalar_t>::type> o;
  o.zoneout_c = t.zoneout_c.defined() ? acc_ptr<scalar_t>(t.zoneout_c) : nullptr;
  o.zoneout_h = t.zoneout_h.defined() ? acc_ptr<scalar_t>(t.zoneout_h) : nullptr;
  o.zoneout_c_p = zoneout_c_p;
  o.zoneout_h_p = zoneout_h_p;
  o.has_clip = cell_clip.has_value();
  o.cell_clip = cell_clip.value_or(0.0);
  o.ln_ih = dev_ptr<scalar_t>(t.ln_ih);
  o.ln_hh = dev_ptr<scalar_t>(t.ln_hh);
  o.ln_c_weight = dev_ptr<scalar_t>(t.ln_c_weight);
  o.ln_c_bias = dev_ptr<scalar_t>(t.ln_c_bias);
  return o;
}

// The cell type's ATen scalar type for scalar_t (float for the 16-bit types).
template <typename scalar_t>
using AccScalar = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t>
AccScalar<scalar_t>* acc_data(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<AccScalar<scalar_t>>() : nullptr;
}

at::Tensor maybe_empty(int64_t n, const at::TensorOptions& o) {
  return n > 0 ? at::empty({n}, o) : at::Tensor();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_variant_forward_cuda(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
    const OptTensor& lengths, bool reverse, const OptTensor& zoneout_c, const OptTensor& zoneout_h,
    double zoneout_c_p, double zoneout_h_p, std::optional<double> cell_clip, const OptTensor& ln_ih,
    const OptTensor& ln_hh, const OptTensor& ln_c_weight, const OptTensor& ln_c_bias,
    bool training) {
  check_cuda(input, "input");
  const LayerSizes s = check_layer_args(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths);
  check_kernel_limits(s);
  const bool layer_norm =
      check_variant_args(s, input, zoneout_c, zoneout_h, zoneout_c_p, zoneout_h_p, cell_clip, ln_ih,
                         ln_hh, ln_c_weight, ln_c_bias);
  const int64_t T = s.T, B = s.B, H = s.H, P = s.P;
  const c10::cuda::CUDAGuard guard(input.device());
  const at::ScalarType dtype = input.scalar_type();
  const auto opts = input.options();
  const auto cell_opts = opts.dtype(cell_dtype(dtype));
  const cuda::VariantShape shape{T, B, s.I, H, P, s.has_proj, layer_norm};
  const int64_t K = shape.K();

  at::Tensor output = at::empty({T, B, P}, opts);
  at::Tensor h_state = at::empty({2, B, P}, cell_opts);
  h_state[0].copy_(h0);
  at::Tensor c_state = fresh_copy(c0, cell_opts);
  if (T == 0 || B == 0) {
    return {output, h0.clone(at::MemoryFormat::Contiguous), c0.clone(at::MemoryFormat::Contiguous),
            training ? at::zeros({T, B, K}, cell_opts) : at::empty({0}, cell_opts)};
  }
  const cuda::VariantForwardBuffers nb = cuda::variant_forward_buffers(shape, training);
  at::Tensor saved = at::empty({nb.saved}, cell_opts);
  at::Tensor x_acc = at::empty({nb.x}, cell_opts);
  at::Tensor xg = at::empty({nb.xg}, cell_opts);
  at::Tensor rec = at::empty({nb.rec}, cell_opts);
  at::Tensor m = maybe_empty(nb.m, cell_opts);
  at::Tensor h_cand = maybe_empty(nb.h_cand, cell_opts);

  const at::Tensor x = input.contiguous();
  const at::Tensor wih = w_ih.to(cell_opts.dtype()).contiguous();
  const at::Tensor whh = w_hh.to(cell_opts.dtype()).contiguous();
  const at::Tensor whr = s.has_proj ? w_hr->to(cell_opts.dtype()).contiguous() : at::Tensor();
  const at::Tensor len = present(lengths) ? lengths->contiguous() : at::Tensor();
  at::Tensor bias;
  for (const auto& b : {b_ih, b_hh}) {
    if (present(b)) bias = bias.defined() ? bias + *b : *b;
  }
  if (bias.defined()) bias = bias.contiguous();
  const OptionTensors ot =
      contiguous_options(zoneout_c, zoneout_h, ln_ih, ln_hh, ln_c_weight, ln_c_bias);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  int64_t h_n_index = 0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lstm_variant_forward_cuda", [&] {
    using Dev = typename DeviceType<scalar_t>::type;
    using Acc = AccScalar<scalar_t>;
    cuda::VariantForwardArgs<Dev> a{};
    a.x = dev_ptr<scalar_t>(x);
    a.w_ih = acc_data<scalar_t>(wih);
    a.bias = dev_ptr<scalar_t>(bias);
    a.w_hh = acc_data<scalar_t>(whh);
    a.w_hr = acc_data<scalar_t>(whr);
    a.lengths = len.defined() ? len.data_ptr<int64_t>() : nullptr;
    a.reverse = reverse;
    a.training = training;
    a.opt = variant_options<scalar_t>(ot, zoneout_c_p, zoneout_h_p, cell_clip);
    a.x_acc = acc_data<scalar_t>(x_acc);
    a.xg = acc_data<scalar_t>(xg);
    a.h_state = acc_data<scalar_t>(h_state);
    a.c_state = acc_data<scalar_t>(c_state);
    a.rec = acc_data<scalar_t>(rec);
    a.m = acc_data<scalar_t>(m);
    a.h_cand = acc_data<scalar_t>(h_cand);
    a.output = dev_ptr<scalar_t>(output);
    a.saved = acc_data<scalar_t>(saved);
    AtenMath<Acc> math(cell_opts);
    Acc* h_n = nullptr;
    C10_CUDA_CHECK(cuda::lstm_variant_layer_forward<Dev>(shape, nb, a, math, stream, &h_n));
    h_n_index = h_n == a.h_state ? 0 : 1;
  });
  at::Tensor h_n = h_state[h_n_index].to(dtype, /*non_blocking=*/false, /*copy=*/true);
  at::Tensor c_n = c_state.to(dtype, /*non_blocking=*/false, /*copy=*/true);
  return {output, h_n, c_n, training ? saved.view({T, B, K}) : at::empty({0}, cell_opts)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_variant_backward_cuda(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                           const at::Tensor& grad_c_n, const at::Tensor& input, const at::Tensor& h0,
                           const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                           const OptTensor& w_hr, const OptTensor& lengths, bool reverse,
                           const OptTensor& zoneout_c, const OptTensor& zoneout_h,
                           double zoneout_c_p, double zoneout_h_p, std::optional<double> cell_clip,
                           const OptTensor& ln_ih, const OptTensor& ln_hh,
                           const OptTensor& ln_c_weight, const OptTensor& ln_c_bias,
                           const at::Tensor& output, const at::Tensor& saved) {
  check_cuda(input, "input");
  const LayerSizes s =
      check_layer_args(input, h0, c0, w_ih, w_hh, std::nullopt, std::nullopt, w_hr, lengths);
  check_kernel_limits(s);
  const bool layer_norm =
      check_variant_args(s, input, zoneout_c, zoneout_h, zoneout_c_p, zoneout_h_p, cell_clip, ln_ih,
                         ln_hh, ln_c_weight, ln_c_bias);
  const int64_t T = s.T, B = s.B, I = s.I, H = s.H, P = s.P;
  const cuda::VariantShape shape{T, B, I, H, P, s.has_proj, layer_norm};
  const int64_t K = shape.K();
  const at::ScalarType dtype = input.scalar_type();
  FASTLSTM_CHECK_SHAPE(grad_output, T, B, P);
  FASTLSTM_CHECK_SHAPE(grad_h_n, B, P);
  FASTLSTM_CHECK_SHAPE(grad_c_n, B, H);
  FASTLSTM_CHECK_SHAPE(output, T, B, P);
  FASTLSTM_CHECK_SHAPE(saved, T, B, K);
  check_same(grad_output, "grad_output", input, dtype);
  check_same(grad_h_n, "grad_h_n", input, dtype);
  check_same(grad_c_n, "grad_c_n", input, dtype);
  check_same(output, "output", input, dtype);
  check_same(saved, "saved", input, cell_dtype(dtype));
  const c10::cuda::CUDAGuard guard(input.device());
  const auto opts = input.options();
  const auto cell_opts = opts.dtype(cell_dtype(dtype));
  auto none = [&] { return at::empty({0}, opts); };
  at::Tensor grad_w_hr = s.has_proj ? at::zeros({P, H}, opts) : none();
  at::Tensor grad_ln_ih = layer_norm ? at::zeros({4 * H}, opts) : none();
  at::Tensor grad_ln_hh = layer_norm ? at::zeros({4 * H}, opts) : none();
  at::Tensor grad_ln_c_weight = layer_norm ? at::zeros({H}, opts) : none();
  at::Tensor grad_ln_c_bias = layer_norm ? at::zeros({H}, opts) : none();
  if (T == 0 || B == 0) {
    return {at::zeros({T, B, I}, opts), fresh_copy(grad_h_n, opts), fresh_copy(grad_c_n, opts),
            at::zeros({4 * H, I}, opts), at::zeros({4 * H, P}, opts), at::zeros({4 * H}, opts),
            grad_w_hr, grad_ln_ih, grad_ln_hh, grad_ln_c_weight, grad_ln_c_bias};
  }

  const at::Tensor x = input.contiguous();
  const at::Tensor h0c = h0.contiguous();
  const at::Tensor wih = w_ih.to(cell_opts.dtype()).contiguous();
  const at::Tensor whh = w_hh.to(cell_opts.dtype()).contiguous();
  const at::Tensor whr = s.has_proj ? w_hr->to(cell_opts.dtype()).contiguous() : at::Tensor();
  const at::Tensor len = present(lengths) ? lengths->contiguous() : at::Tensor();
  const at::Tensor go = grad_output.contiguous();
  const at::Tensor out = output.contiguous();
  const at::Tensor sv = saved.contiguous();
  const at::Tensor c0_cell = fresh_copy(c0, cell_opts);
  const OptionTensors ot =
      contiguous_options(zoneout_c, zoneout_h, ln_ih, ln_hh, ln_c_weight, ln_c_bias);

  const cuda::VariantBackwardBuffers nb = cuda::variant_backward_buffers(shape);
  auto work = [&](int64_t n) { return maybe_empty(n, cell_opts); };
  at::Tensor dpre = work(nb.dpre), dxg = work(nb.dxg), dr = work(nb.dr), dz = work(nb.dz);
  at::Tensor dh_cand = work(nb.dh_cand), dm = work(nb.dm), m = work(nb.m);
  at::Tensor dh_rec = work(nb.dh_rec), x_acc = work(nb.x), h_prev = work(nb.h_prev);
  at::Tensor partial = work(nb.partial), result = work(nb.result);
  at::Tensor dh_keep = fresh_copy(grad_h_n, cell_opts);
  at::Tensor dc_state = fresh_copy(grad_c_n, cell_opts);
  at::Tensor grad_input = at::empty({T, B, I}, opts);
  at::Tensor grad_h0 = at::empty({B, P}, opts);
  at::Tensor grad_w_ih = at::empty({4 * H, I}, opts);
  at::Tensor grad_w_hh = at::empty({4 * H, P}, opts);
  at::Tensor grad_bias = at::empty({4 * H}, opts);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lstm_variant_backward_cuda", [&] {
    using Dev = typename DeviceType<scalar_t>::type;
    using Acc = AccScalar<scalar_t>;
    cuda::VariantBackwardArgs<Dev> a{};
    a.grad_output = dev_ptr<scalar_t>(go);
    a.x = dev_ptr<scalar_t>(x);
    a.h0 = dev_ptr<scalar_t>(h0c);
    a.c0 = acc_data<scalar_t>(c0_cell);
    a.w_ih = acc_data<scalar_t>(wih);
    a.w_hh = acc_data<scalar_t>(whh);
    a.w_hr = acc_data<scalar_t>(whr);
    a.lengths = len.defined() ? len.data_ptr<int64_t>() : nullptr;
    a.reverse = reverse;
    a.opt = variant_options<scalar_t>(ot, zoneout_c_p, zoneout_h_p, cell_clip);
    a.output = dev_ptr<scalar_t>(out);
    a.saved = acc_data<scalar_t>(sv);
    a.dpre = acc_data<scalar_t>(dpre);
    a.dxg = acc_data<scalar_t>(dxg);
    a.dr = acc_data<scalar_t>(dr);
    a.dz = acc_data<scalar_t>(dz);
    a.dh_cand = acc_data<scalar_t>(dh_cand);
    a.dm = acc_data<scalar_t>(dm);
    a.m = acc_data<scalar_t>(m);
    a.dh_keep = acc_data<scalar_t>(dh_keep);
    a.dh_rec = acc_data<scalar_t>(dh_rec);
    a.dc_state = acc_data<scalar_t>(dc_state);
    a.x_acc = acc_data<scalar_t>(x_acc);
    a.h_prev = acc_data<scalar_t>(h_prev);
    a.partial = acc_data<scalar_t>(partial);
    a.result = acc_data<scalar_t>(result);
    a.grad_input = dev_ptr<scalar_t>(grad_input);
    a.grad_h0 = dev_ptr<scalar_t>(grad_h0);
    a.grad_w_ih = dev_ptr<scalar_t>(grad_w_ih);
    a.grad_w_hh = dev_ptr<scalar_t>(grad_w_hh);
    a.grad_bias = dev_ptr<scalar_t>(grad_bias);
    a.grad_w_hr = s.has_proj ? dev_ptr<scalar_t>(grad_w_hr) : nullptr;
    a.grad_ln_ih = layer_norm ? dev_ptr<scalar_t>(grad_ln_ih) : nullptr;
    a.grad_ln_hh = layer_norm ? dev_ptr<scalar_t>(grad_ln_hh) : nullptr;
    a.grad_ln_c_weight = layer_norm ? dev_ptr<scalar_t>(grad_ln_c_weight) : nullptr;
    a.grad_ln_c_bias = layer_norm ? dev_ptr<scalar_t>(grad_ln_c_bias) : nullptr;
    AtenMath<Acc> math(cell_opts);
    C10_CUDA_CHECK(cuda::lstm_variant_layer_backward<Dev>(shape, a, math, stream));
  });

  at::Tensor grad_c0 = dc_state.to(dtype, /*non_blocking=*/false, /*copy=*/true);
  return {grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr,
          grad_ln_ih, grad_ln_hh, grad_ln_c_weight, grad_ln_c_bias};
}

TORCH_LIBRARY_IMPL(fastlstm, CUDA, m) {
  m.impl("lstm_variant_forward", &lstm_variant_forward_cuda);
  m.impl("lstm_variant_backward", &lstm_variant_backward_cuda);
}

}  // namespace fastlstm
