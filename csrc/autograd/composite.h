// The LSTM in plain, differentiable ATen ops: what the Autograd kernels run for forward-mode AD,
// inside torch.func transforms, and to make a backward differentiable again (double backward).
// The same contract as fastlstm.reference (the Python oracle).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fastlstm {

// One step's pointwise part: pre [B, 4H] pre-activations (gates i, f, g, o), c [B, H] c_{t-1}.
// Returns (o * tanh(c_t), c_t, the post-activations i, f, g, o).
inline std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> composite_pointwise(const at::Tensor& pre,
                                                                                       const at::Tensor& c) {
  const auto g = pre.chunk(4, 1);
  const at::Tensor i = g[0].sigmoid(), f = g[1].sigmoid(), z = g[2].tanh(), o = g[3].sigmoid();
  at::Tensor c_new = f * c + i * z;
  at::Tensor h_new = o * c_new.tanh();
  return {h_new, c_new, {i, f, z, o}};
}

// One layer, one direction: input [T, B, I], h0 [B, P], c0 [B, H] -> output [T, B, P], h_n [B, P],
// c_n [B, H] (csrc/fastlstm.cpp; undefined tensors for absent optional arguments).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> composite_layer(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& b_ih, const at::Tensor& b_hh, const at::Tensor& w_hr,
    const at::Tensor& lengths, bool reverse) {
  const int64_t T = input.size(0);
  at::Tensor x = at::linear(input, w_ih, b_ih.defined() ? std::optional<at::Tensor>(b_ih) : std::nullopt);
  if (b_hh.defined()) x = x + b_hh;
  at::Tensor h = h0, c = c0;
  std::vector<at::Tensor> outputs(T);
  for (int64_t k = 0; k < T; ++k) {
    const int64_t t = reverse ? T - 1 - k : k;
    auto [h_new, c_new, gates] = composite_pointwise(x[t] + at::linear(h, w_hh), c);
    if (w_hr.defined()) h_new = at::linear(h_new, w_hr);
    if (!lengths.defined()) {
      h = h_new;
      c = c_new;
      outputs[t] = h_new;
    } else {
      const at::Tensor active = lengths.gt(t).unsqueeze(1);
      h = at::where(active, h_new, h);
      c = at::where(active, c_new, c);
      outputs[t] = at::where(active, h_new, at::zeros_like(h_new));
    }
  }
  at::Tensor output = T > 0 ? at::stack(outputs) : input.new_zeros({0, input.size(1), h0.size(1)});
  return {output, h, c};
}

// One LSTMCell step: input [B, I], hx [B, H], cx [B, H] -> h, c [B, H] and the post-activation
// gates [B, 4H] (detached; in the cell op's gates dtype `gates_dtype`).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> composite_cell(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& b_ih, const at::Tensor& b_hh, at::ScalarType gates_dtype) {
  at::Tensor pre = at::mm(input, w_ih.t()) + at::mm(hx, w_hh.t());
  if (b_ih.defined()) pre = pre + b_ih;
  if (b_hh.defined()) pre = pre + b_hh;
  auto [h, c, gates] = composite_pointwise(pre, cx);
  return {h, c, at::cat(gates, 1).detach().to(gates_dtype)};
}

}  // namespace fastlstm
