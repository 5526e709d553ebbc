// CUDA implementation of fastlstm::lstm_layer_forward / lstm_layer_backward (contract in
// csrc/fastlstm.cpp). This file checks arguments, picks the device, stream and dtype, allocates what
// the framework-free layer code (csrc/kernels/lstm_host.h) asks for and does its matrix products
// through ATen (cuBLAS). The layer code runs the per-timestep kernels (csrc/kernels/lstm_kernels.cuh).
//
// Forward: xg = input @ w_ih^T + b_ih + b_hh for all steps in one GEMM (in chunks of steps for
// inference), then one launch per step (two with a projection) in processing order. Backward: one
// launch per step (two with a projection) in reverse processing order produces the gate gradients
// dG [T, B, 4H]; the gradients of input, w_ih, w_hh, the bias and w_hr are then GEMMs/reductions
// over all T*B rows. Nothing uses atomics, so the results are bitwise reproducible for a given device
// and shape. With training=False nothing is saved: gates, cells and hidden are neither allocated nor
// written.
//
// lengths are not range-checked here (that would synchronise with the device and break CUDA-graph
// capture); the kernels only compare t < lengths[b], so out-of-range values cannot fault: a length
// above T acts as T, a negative one as 0.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <tuple>

#include "aten_math.h"
#include "kernels/lstm_host.h"
#include "lstm_checks.h"

namespace fastlstm {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_layer_forward_cuda(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                        const at::Tensor& w_ih, const at::Tensor& w_hh,
                        const std::optional<at::Tensor>& b_ih,
                        const std::optional<at::Tensor>& b_hh,
                        const std::optional<at::Tensor>& w_hr,
                        const std::optional<at::Tensor>& lengths, bool reverse, bool training) {
  check_cuda(input, "input");
  const LayerSizes s = check_layer_args(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths);
  check_kernel_limits(s);
  const int64_t T = s.T, B = s.B, I = s.I, H = s.H, P = s.P;
  const bool has_proj = s.has_proj;
  const c10::cuda::CUDAGuard guard(input.device());

  const at::ScalarType dtype = input.scalar_type();
  const auto opts = input.options();
  const auto cell_opts = opts.dtype(cell_dtype(dtype));
  const cuda::LayerShape shape{T, B, I, H, P, has_proj};
  const cuda::ForwardBuffers nb = cuda::forward_buffers(shape, training);
  auto maybe = [](int64_t n, const at::TensorOptions& o) {
    return n > 0 ? at::empty({n}, o) : at::Tensor();
  };
  at::Tensor output = at::empty({T, B, P}, opts);
  at::Tensor gates = maybe(nb.gates, opts);
  at::Tensor cells = maybe(nb.cells, cell_opts);
  at::Tensor hidden = maybe(nb.hidden, opts);
  at::Tensor h_state = at::empty({2, B, P}, opts);
  h_state[0].copy_(h0);
  at::Tensor c_state = fresh_copy(c0, cell_opts);
  const auto result = [&](const at::Tensor& h_n)
      -> std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> {
    at::Tensor c_n = c_state.scalar_type() == dtype ? c_state : c_state.to(dtype);
    if (!training) {
      return {output, h_n, c_n, at::empty({0}, opts), at::empty({0}, cell_opts),
              at::empty({0}, opts)};
    }
    return {output, h_n, c_n, gates.view({T, B, 4 * H}), cells.view({T, B, H}),
            has_proj ? hidden.view({T, B, H}) : at::empty({0}, opts)};
  };
  if (T == 0 || B == 0) {
    if (training) {
      gates = at::empty({T, B, 4 * H}, opts);
      cells = at::empty({T, B, H}, cell_opts);
      hidden = has_proj ? at::empty({T, B, H}, opts) : at::Tensor();
    }
    return result(h_state[0].clone());
  }

  const at::Tensor x = input.contiguous();
  const at::Tensor whh = w_hh.contiguous();
  const at::Tensor wih = w_ih.contiguous();
  const at::Tensor whr = has_proj ? w_hr->contiguous() : at::Tensor();
  const at::Tensor len = lengths.has_value() && lengths->defined() ? lengths->contiguous()
                                                                   : at::Tensor();
  at::Tensor bias;
  for (const auto& b : {b_ih, b_hh}) {
    if (b.has_value() && b->defined()) bias = bias.defined() ? bias + *b : *b;
  }
  if (bias.defined()) bias = bias.contiguous();
  at::Tensor xg = at::empty({nb.xg}, opts);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  int64_t h_n_index = 0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lstm_layer_forward_cuda", [&] {
    using Dev = typename DeviceType<scalar_t>::type;
    cuda::ForwardArgs<Dev> a{};
    a.x = dev_ptr<scalar_t>(x);
    a.w_ih = dev_ptr<scalar_t>(wih);
    a.bias = dev_ptr<scalar_t>(bias);
    a.w_hh = dev_ptr<scalar_t>(whh);
    a.w_hr = dev_ptr<scalar_t>(whr);
    a.lengths = len.defined() ? len.data_ptr<int64_t>() : nullptr;
    a.reverse = reverse;
    a.xg = dev_ptr<scalar_t>(xg);
    a.h_state = dev_ptr<scalar_t>(h_state);
    a.c_state = acc_ptr<scalar_t>(c_state);
    a.output = dev_ptr<scalar_t>(output);
    a.gates = dev_ptr<scalar_t>(gates);
    a.cells = cells.defined() ? acc_ptr<scalar_t>(cells) : nullptr;
    a.hidden = dev_ptr<scalar_t>(hidden);
    AtenMath<scalar_t> math(opts);
    Dev* h_n = nullptr;
    C10_CUDA_CHECK(cuda::lstm_layer_forward<Dev>(shape, nb, a, math, stream, &h_n));
    h_n_index = h_n == a.h_state ? 0 : 1;
  });
  return result(h_state[h_n_index].clone());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_layer_backward_cuda(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                         const at::Tensor& grad_c_n, const at::Tensor& input, const at::Tensor& h0,
                         const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                         const std::optional<at::Tensor>& w_hr,
                         const std::optional<at::Tensor>& lengths, const at::Tensor& output,
                         const at::Tensor& gates, const at::Tensor& cells,
                         const at::Tensor& hidden, bool reverse) {
  check_cuda(input, "input");
  const LayerSizes s = check_backward_args(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh,
                                           w_hr, lengths, output, gates, cells, hidden);
  check_kernel_limits(s);
  const int64_t T = s.T, B = s.B, I = s.I, H = s.H, P = s.P;
  const bool has_proj = s.has_proj;
  const at::ScalarType dtype = input.scalar_type();
  check_same(grad_output, "grad_output", input, dtype);
  check_same(grad_h_n, "grad_h_n", input, dtype);
  check_same(grad_c_n, "grad_c_n", input, dtype);
  check_same(output, "output", input, dtype);
  check_same(gates, "gates", input, dtype);
  check_same(cells, "cells", input, cell_dtype(dtype));
  if (has_proj) check_same(hidden, "hidden", input, dtype);
  const c10::cuda::CUDAGuard guard(input.device());

  const auto opts = input.options();
  const auto cell_opts = opts.dtype(cell_dtype(dtype));
  if (T == 0 || B == 0) {
    return {at::zeros({T, B, I}, opts), fresh_copy(grad_h_n, opts), fresh_copy(grad_c_n, opts),
            at::zeros({4 * H, I}, opts), at::zeros({4 * H, P}, opts), at::zeros({4 * H}, opts),
            has_proj ? at::zeros({P, H}, opts) : at::empty({0}, opts)};
  }

  const at::Tensor x = input.contiguous();
  const at::Tensor h0c = h0.contiguous();
  const at::Tensor wih = w_ih.contiguous();
  const at::Tensor whh = w_hh.contiguous();
  const at::Tensor whr = has_proj ? w_hr->contiguous() : at::Tensor();
  const at::Tensor len = lengths.has_value() && lengths->defined() ? lengths->contiguous()
                                                                   : at::Tensor();
  const at::Tensor go = grad_output.contiguous();
  const at::Tensor out = output.contiguous();
  const at::Tensor gts = gates.contiguous();
  const at::Tensor cls = cells.contiguous();
  const at::Tensor hid = has_proj ? hidden.contiguous() : at::Tensor();

  const cuda::LayerShape shape{T, B, I, H, P, has_proj};
  const cuda::BackwardBuffers nb = cuda::backward_buffers(shape);
  at::Tensor dG = at::empty({nb.dG}, opts);
  at::Tensor dh_all = has_proj ? at::empty({nb.dh_all}, opts) : at::Tensor();
  at::Tensor h_prev = at::empty({nb.h_prev}, opts);
  at::Tensor dh_state = fresh_copy(grad_h_n, cell_opts);
  at::Tensor dc_state = fresh_copy(grad_c_n, cell_opts);
  const at::Tensor c0_cell = fresh_copy(c0, cell_opts);
  at::Tensor grad_input = at::empty({T, B, I}, opts);
  at::Tensor grad_h0 = at::empty({B, P}, opts);
  at::Tensor grad_w_ih = at::empty({4 * H, I}, opts);
  at::Tensor grad_w_hh = at::empty({4 * H, P}, opts);
  at::Tensor grad_bias = at::empty({4 * H}, opts);
  at::Tensor grad_w_hr = has_proj ? at::empty({P, H}, opts) : at::empty({0}, opts);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lstm_layer_backward_cuda", [&] {
    using Dev = typename DeviceType<scalar_t>::type;
    cuda::BackwardArgs<Dev> a{};
    a.grad_output = dev_ptr<scalar_t>(go);
    a.x = dev_ptr<scalar_t>(x);
    a.h0 = dev_ptr<scalar_t>(h0c);
    a.c0 = acc_ptr<scalar_t>(c0_cell);
    a.w_ih = dev_ptr<scalar_t>(wih);
    a.w_hh = dev_ptr<scalar_t>(whh);
    a.w_hr = dev_ptr<scalar_t>(whr);
    a.lengths = len.defined() ? len.data_ptr<int64_t>() : nullptr;
    a.reverse = reverse;
    a.output = dev_ptr<scalar_t>(out);
    a.gates = dev_ptr<scalar_t>(gts);
    a.cells = acc_ptr<scalar_t>(cls);
    a.hidden = dev_ptr<scalar_t>(hid);
    a.dh_state = acc_ptr<scalar_t>(dh_state);
    a.dc_state = acc_ptr<scalar_t>(dc_state);
    a.dG = dev_ptr<scalar_t>(dG);
    a.dh_all = dev_ptr<scalar_t>(dh_all);
    a.h_prev = dev_ptr<scalar_t>(h_prev);
    a.grad_input = dev_ptr<scalar_t>(grad_input);
    a.grad_h0 = dev_ptr<scalar_t>(grad_h0);
    a.grad_w_ih = dev_ptr<scalar_t>(grad_w_ih);
    a.grad_w_hh = dev_ptr<scalar_t>(grad_w_hh);
    a.grad_bias = dev_ptr<scalar_t>(grad_bias);
    a.grad_w_hr = has_proj ? dev_ptr<scalar_t>(grad_w_hr) : nullptr;
    AtenMath<scalar_t> math(opts);
    C10_CUDA_CHECK(cuda::lstm_layer_backward<Dev>(shape, a, math, stream));
  });

  at::Tensor grad_c0 = dc_state.scalar_type() == dtype ? dc_state : dc_state.to(dtype);
  return {grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}

TORCH_LIBRARY_IMPL(fastlstm, CUDA, m) {
  // training=None reaching a backend (a call below autograd) saves nothing: csrc/fastlstm.cpp.
  m.impl("lstm_layer_forward",
         [](const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
            const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
            const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
            const std::optional<at::Tensor>& lengths, bool reverse, std::optional<bool> training) {
           return lstm_layer_forward_cuda(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse,
                                         training.value_or(false));
         });
  m.impl("lstm_layer_backward", &lstm_layer_backward_cuda);
}

}  // namespace fastlstm
