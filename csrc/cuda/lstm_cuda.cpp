// CUDA implementation of fastlstm::lstm_layer_forward / lstm_layer_backward (contract in
// csrc/fastlstm.cpp). This file checks arguments, picks the device, stream and dtype, and does every
// large GEMM through ATen (cuBLAS); the per-timestep work is in csrc/kernels/ (lstm_kernels.cuh).
//
// Forward: xg = input @ w_ih^T + b_ih + b_hh for all steps in one GEMM, then one launch per step (two
// with a projection) in processing order. Backward: one launch per step (two with a projection) in
// reverse processing order produces the gate gradients dG [T, B, 4H]; the gradients of input, w_ih,
// w_hh, the bias and w_hr are then GEMMs/reductions over all T*B rows. Nothing uses atomics, so the
// results are bitwise reproducible for a given device and shape.
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

#include "kernels/lstm_kernels.cuh"
#include "lstm_checks.h"

namespace fastlstm {
namespace {

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
typename DeviceType<scalar_t>::type* dev_ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<typename DeviceType<scalar_t>::type*>(t.data_ptr<scalar_t>())
                     : nullptr;
}

template <typename scalar_t>
cuda::AccT<typename DeviceType<scalar_t>::type>* acc_ptr(const at::Tensor& t) {
  return t.data_ptr<cuda::AccT<typename DeviceType<scalar_t>::type>>();
}

at::Tensor opt_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

// A new contiguous tensor of `options` holding a copy of t (the kernels update their state in place,
// and the caller's tensors must not change).
at::Tensor fresh_copy(const at::Tensor& t, const at::TensorOptions& options) {
  return at::empty(t.sizes(), options).copy_(t);
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
}

void check_same(const at::Tensor& t, const char* name, const at::Tensor& input,
                at::ScalarType dtype) {
  TORCH_CHECK(t.device() == input.device(), name, " must be on the input's device ",
              input.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
}

// The kernels index batch rows and units with int and put H and P tiles of 16 in gridDim.y.
void check_kernel_limits(const LayerSizes& s) {
  TORCH_CHECK(s.B <= INT_MAX && 4 * s.H <= INT_MAX && s.P <= INT_MAX,
              "fastlstm CUDA: batch size and 4 * hidden_size must fit in int32, got B = ", s.B,
              ", H = ", s.H);
  TORCH_CHECK(s.H <= 65535 * 16 && s.P <= 65535 * 16,
              "fastlstm CUDA: hidden_size and proj_size must be at most ", 65535 * 16);
  TORCH_CHECK(s.H > 0 && s.P > 0, "hidden_size and proj_size must be positive, got H = ", s.H,
              ", P = ", s.P);
}

// Input of the recurrent matmul at each step, in time order: [T, B, P]. For a step whose previous
// processing step was active for b, that step's output; else (first step, or the first active step
// of a reverse-direction sequence) h0. Rows of inactive steps are not used (their dG is zero).
at::Tensor recurrent_inputs(const at::Tensor& output, const at::Tensor& h0, const at::Tensor& len,
                            bool reverse) {
  const int64_t T = output.size(0);
  const at::Tensor h0e = h0.unsqueeze(0);
  at::Tensor shifted = reverse ? at::cat({output.slice(0, 1, T), h0e})
                               : at::cat({h0e, output.slice(0, 0, T - 1)});
  if (!len.defined()) return shifted;
  const at::Tensor tt = at::arange(T, len.options());
  const at::Tensor prev_t = reverse ? tt + 1 : tt - 1;                      // [T]
  const at::Tensor valid = ((prev_t >= 0) & (prev_t < T)).unsqueeze(1);    // [T, 1]
  const at::Tensor prev_active = valid & (prev_t.unsqueeze(1) < len.unsqueeze(0));  // [T, B]
  return at::where(prev_active.unsqueeze(2), shifted, h0e);
}

}  // namespace

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
  at::Tensor output = at::empty({T, B, P}, opts);
  at::Tensor gates = at::empty({T, B, 4 * H}, opts);
  at::Tensor cells = at::empty({T, B, H}, cell_opts);
  at::Tensor hidden = has_proj ? at::empty({T, B, H}, opts) : at::empty({0}, opts);
  // Without training nothing is saved (contract in csrc/fastlstm.cpp). The kernels still write the
  // saved tensors; skipping those writes is left to the GPU-speed work.
  const auto result = [&](at::Tensor out, at::Tensor h_n, at::Tensor c_n)
      -> std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> {
    if (!training) {
      return {out, h_n, c_n, at::empty({0}, opts), at::empty({0}, cell_opts), at::empty({0}, opts)};
    }
    return {out, h_n, c_n, gates, cells, hidden};
  };
  if (T == 0 || B == 0) {
    return result(output, fresh_copy(h0, opts), fresh_copy(c0, opts));
  }

  const at::Tensor x = input.contiguous();
  const at::Tensor whh = w_hh.contiguous();
  const at::Tensor whr = has_proj ? w_hr->contiguous() : at::Tensor();
  const at::Tensor len = lengths.has_value() && lengths->defined() ? lengths->contiguous()
                                                                   : at::Tensor();

  // Input part of every step's pre-activations, biases folded in: [T, B, 4H].
  at::Tensor bias;
  for (const auto& b : {b_ih, b_hh}) {
    if (b.has_value() && b->defined()) bias = bias.defined() ? bias + *b : *b;
  }
  const at::Tensor x2 = x.view({T * B, I});
  const at::Tensor xg = (bias.defined() ? at::addmm(bias, x2, w_ih.t()) : at::mm(x2, w_ih.t()))
                            .contiguous();

  at::Tensor h_state[2] = {fresh_copy(h0, opts), at::empty({B, P}, opts)};
  at::Tensor c_state = fresh_copy(c0, cell_opts);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t* len_p = len.defined() ? len.data_ptr<int64_t>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lstm_layer_forward_cuda", [&] {
    using Dev = typename DeviceType<scalar_t>::type;
    for (int64_t step = 0; step < T; ++step) {
      const int64_t t = reverse ? T - 1 - step : step;
      C10_CUDA_CHECK(cuda::lstm_forward_step<Dev>(
          static_cast<int>(B), static_cast<int>(H), static_cast<int>(P), dev_ptr<scalar_t>(whh),
          dev_ptr<scalar_t>(whr), dev_ptr<scalar_t>(xg) + t * B * 4 * H, len_p, t,
          dev_ptr<scalar_t>(h_state[step % 2]), dev_ptr<scalar_t>(h_state[(step + 1) % 2]),
          acc_ptr<scalar_t>(c_state), dev_ptr<scalar_t>(output) + t * B * P,
          dev_ptr<scalar_t>(gates) + t * B * 4 * H, acc_ptr<scalar_t>(cells) + t * B * H,
          has_proj ? dev_ptr<scalar_t>(hidden) + t * B * H : nullptr, stream));
    }
  });

  at::Tensor c_n = c_state.scalar_type() == dtype ? c_state : c_state.to(dtype);
  return result(output, h_state[T % 2], c_n);
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
  const at::Tensor whh = w_hh.contiguous();
  const at::Tensor whr = has_proj ? w_hr->contiguous() : at::Tensor();
  const at::Tensor len = lengths.has_value() && lengths->defined() ? lengths->contiguous()
                                                                   : at::Tensor();
  const at::Tensor go = grad_output.contiguous();
  const at::Tensor gts = gates.contiguous();
  const at::Tensor cls = cells.contiguous();

  at::Tensor dG = at::empty({T, B, 4 * H}, opts);
  at::Tensor dh_all = has_proj ? at::empty({T, B, P}, opts) : at::Tensor();
  at::Tensor dh_state = fresh_copy(grad_h_n, cell_opts);
  at::Tensor dc_state = fresh_copy(grad_c_n, cell_opts);
  const at::Tensor c0_cell = fresh_copy(c0, cell_opts);
  at::Tensor grad_h0 = at::empty({B, P}, opts);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t* len_p = len.defined() ? len.data_ptr<int64_t>() : nullptr;
  auto time_of = [&](int64_t step) { return reverse ? T - 1 - step : step; };

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lstm_layer_backward_cuda", [&] {
    using Dev = typename DeviceType<scalar_t>::type;
    Dev* dG_p = dev_ptr<scalar_t>(dG);
    // k: processing index of the step, from the last to the first; k == -1 is the final call,
    // which writes grad_h0.
    for (int64_t k = T - 1; k >= -1; --k) {
      const bool final_call = k < 0;
      const int64_t t = final_call ? -1 : time_of(k);
      const int64_t next_t = k + 1 < T ? time_of(k + 1) : -1;
      const cuda::AccT<Dev>* c_prev = final_call ? nullptr
                                      : k > 0    ? acc_ptr<scalar_t>(cls) + time_of(k - 1) * B * H
                                                 : acc_ptr<scalar_t>(c0_cell);
      C10_CUDA_CHECK(cuda::lstm_backward_step<Dev>(
          static_cast<int>(B), static_cast<int>(H), static_cast<int>(P), dev_ptr<scalar_t>(whh),
          dev_ptr<scalar_t>(whr), len_p, t, next_t,
          next_t >= 0 ? dG_p + next_t * B * 4 * H : nullptr,
          final_call ? nullptr : dev_ptr<scalar_t>(go) + t * B * P,
          final_call ? nullptr : dev_ptr<scalar_t>(gts) + t * B * 4 * H,
          final_call ? nullptr : acc_ptr<scalar_t>(cls) + t * B * H, c_prev,
          acc_ptr<scalar_t>(dh_state), acc_ptr<scalar_t>(dc_state),
          final_call ? nullptr : dG_p + t * B * 4 * H,
          (final_call || !has_proj) ? nullptr : dev_ptr<scalar_t>(dh_all) + t * B * P,
          dev_ptr<scalar_t>(grad_h0), stream));
    }
  });

  const at::Tensor dG2 = dG.view({T * B, 4 * H});
  at::Tensor grad_input = at::mm(dG2, w_ih).view({T, B, I});
  at::Tensor grad_w_ih = at::mm(dG2.t(), x.view({T * B, I}));
  const at::Tensor h_prev = recurrent_inputs(output, h0, len, reverse);
  at::Tensor grad_w_hh = at::mm(dG2.t(), h_prev.reshape({T * B, P}));
  at::Tensor grad_bias = dG2.sum(0);
  at::Tensor grad_w_hr =
      has_proj ? at::mm(dh_all.view({T * B, P}).t(), hidden.contiguous().view({T * B, H}))
               : at::empty({0}, opts);
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
