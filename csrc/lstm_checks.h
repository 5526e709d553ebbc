// Argument checks of the layer and cell ops, shared by the CPU and CUDA bindings and the autograd. Each names the argument and what was expected,
// so a bad call fails with a message a user can act on instead of reading out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <utility>
#include <vector>

namespace fastlstm {

#define FASTLSTM_CHECK_SHAPE_NAMED(x, name, ...)                                           \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), name " must have shape ",       \
              at::IntArrayRef({__VA_ARGS__}), " = (" #__VA_ARGS__ "), got ", (x).sizes())
#define FASTLSTM_CHECK_SHAPE(x, ...) FASTLSTM_CHECK_SHAPE_NAMED(x, #x, __VA_ARGS__)

struct LayerSizes {
  int64_t T, B, I, H, P;
  bool has_proj;
};

// Checks the arguments of lstm_layer_forward (and the matching ones of the backward) against each
// other and returns the sizes. Shapes are documented in csrc/fastlstm.cpp.
inline LayerSizes check_layer_args(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                                   const at::Tensor& w_ih, const at::Tensor& w_hh,
                                   const std::optional<at::Tensor>& b_ih,
                                   const std::optional<at::Tensor>& b_hh,
                                   const std::optional<at::Tensor>& w_hr,
                                   const std::optional<at::Tensor>& lengths) {
  TORCH_CHECK(input.dim() == 3, "input must be 3-D [T, B, I], got ", input.dim(), "-D");
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % 4 == 0,
              "w_ih must be 2-D [4*hidden_size, input_size], got ", w_ih.sizes());
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  const int64_t H = w_ih.size(0) / 4;
  const bool has_proj = w_hr.has_value() && w_hr->defined();
  const int64_t P = has_proj ? w_hr->size(0) : H;
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), "input must be a floating point tensor, got ",
              input.scalar_type());
  FASTLSTM_CHECK_SHAPE(w_ih, 4 * H, I);
  FASTLSTM_CHECK_SHAPE(w_hh, 4 * H, P);
  FASTLSTM_CHECK_SHAPE(h0, B, P);
  FASTLSTM_CHECK_SHAPE(c0, B, H);
  if (has_proj) {
    FASTLSTM_CHECK_SHAPE_NAMED(*w_hr, "w_hr", P, H);
  }
  for (const auto& b : {b_ih, b_hh}) {
    if (b.has_value() && b->defined()) {
      TORCH_CHECK(b->dim() == 1 && b->size(0) == 4 * H, "bias must have shape (4 * H) = (", 4 * H,
                  "), got ", b->sizes());
      TORCH_CHECK(b->scalar_type() == input.scalar_type(), "bias must have dtype ",
                  input.scalar_type(), ", got ", b->scalar_type());
      TORCH_CHECK(b->device() == input.device(), "bias must be on ", input.device());
    }
  }
  std::vector<std::pair<const char*, const at::Tensor*>> same = {
      {"h0", &h0}, {"c0", &c0}, {"w_ih", &w_ih}, {"w_hh", &w_hh}};
  if (has_proj) same.push_back({"w_hr", &*w_hr});
  for (const auto& [name, t] : same) {
    TORCH_CHECK(t->scalar_type() == input.scalar_type(), name, " must have the input's dtype ",
                input.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == input.device(), name, " must be on the input's device ", input.device(),
                ", got ", t->device());
  }
  if (lengths.has_value() && lengths->defined()) {
    TORCH_CHECK(lengths->scalar_type() == at::kLong, "lengths must be int64, got ",
                lengths->scalar_type());
    FASTLSTM_CHECK_SHAPE_NAMED(*lengths, "lengths", B);
    TORCH_CHECK(lengths->device() == input.device(), "lengths must be on the input's device ",
                input.device(), ", got ", lengths->device());
  }
  return {T, B, I, H, P, has_proj};
}

inline at::ScalarType cell_dtype(at::ScalarType input_dtype) {
  return (input_dtype == at::kHalf || input_dtype == at::kBFloat16) ? at::kFloat : input_dtype;
}

// Checks the arguments of lstm_layer_backward: the forward's (as above) and the gradients and saved
// tensors against them.
inline LayerSizes check_backward_args(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                      const at::Tensor& grad_c_n, const at::Tensor& input,
                                      const at::Tensor& h0, const at::Tensor& c0,
                                      const at::Tensor& w_ih, const at::Tensor& w_hh,
                                      const std::optional<at::Tensor>& w_hr,
                                      const std::optional<at::Tensor>& lengths,
                                      const at::Tensor& output, const at::Tensor& gates,
                                      const at::Tensor& cells, const at::Tensor& hidden) {
  const LayerSizes s =
      check_layer_args(input, h0, c0, w_ih, w_hh, std::nullopt, std::nullopt, w_hr, lengths);
  const int64_t T = s.T, B = s.B, H = s.H, P = s.P;
  FASTLSTM_CHECK_SHAPE(grad_output, T, B, P);
  FASTLSTM_CHECK_SHAPE(grad_h_n, B, P);
  FASTLSTM_CHECK_SHAPE(grad_c_n, B, H);
  FASTLSTM_CHECK_SHAPE(output, T, B, P);
  FASTLSTM_CHECK_SHAPE(gates, T, B, 4 * H);
  FASTLSTM_CHECK_SHAPE(cells, T, B, H);
  if (s.has_proj) FASTLSTM_CHECK_SHAPE(hidden, T, B, H);
  TORCH_CHECK(cells.scalar_type() == cell_dtype(input.scalar_type()), "cells must have dtype ",
              cell_dtype(input.scalar_type()), ", got ", cells.scalar_type());
  return s;
}

// torch.nn.LSTMCell's checks, with its messages (aten/src/ATen/native/RNN.cpp and the matmul's dtype
// check), then ours for what it leaves to the matmul. Returns H.
inline int64_t check_cell_args(const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
                        const at::Tensor& w_ih, const at::Tensor& w_hh,
                        const std::optional<at::Tensor>& b_ih,
                        const std::optional<at::Tensor>& b_hh) {
  TORCH_CHECK(input.dim() == 2, "input must be 2-D [B, I], got ", input.dim(), "-D");
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % 4 == 0,
              "w_ih must be 2-D [4*hidden_size, input_size], got ", w_ih.sizes());
  const int64_t H = w_ih.size(0) / 4;
  TORCH_CHECK(input.size(1) == w_ih.size(1), "input has inconsistent input_size: got ",
              input.size(1), " expected ", w_ih.size(1));
  int label = 0;
  for (const at::Tensor* t : {&hx, &cx}) {
    if (t->dim() >= 2) {  // torch checks sizes 0 and 1 only, before any rank check
      TORCH_CHECK(input.size(0) == t->size(0), "Input batch size ", input.size(0),
                  " doesn't match hidden", label, " batch size ", t->size(0));
      TORCH_CHECK(t->size(1) == H, "hidden", label, " has inconsistent hidden_size: got ",
                  t->size(1), ", expected ", H);
    }
    ++label;
  }
  TORCH_CHECK(hx.dim() == 2, "hx must be 2-D [B, H], got ", hx.dim(), "-D");
  TORCH_CHECK(cx.dim() == 2, "cx must be 2-D [B, H], got ", cx.dim(), "-D");
  FASTLSTM_CHECK_SHAPE(w_hh, 4 * H, H);
  for (const auto& [a, w] : {std::pair{&input, &w_ih}, std::pair{&hx, &w_hh}}) {
    TORCH_CHECK(a->scalar_type() == w->scalar_type(),
                "mat1 and mat2 must have the same dtype, but got ", a->scalar_type(), " and ",
                w->scalar_type());
  }
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "input must be a floating point tensor, got ", input.scalar_type());
  std::vector<std::pair<const char*, const at::Tensor*>> same = {
      {"hx", &hx}, {"cx", &cx}, {"w_ih", &w_ih}, {"w_hh", &w_hh}};
  for (const auto& [name, b] : {std::pair{"b_ih", &b_ih}, std::pair{"b_hh", &b_hh}}) {
    if (b->has_value() && (*b)->defined()) {
      TORCH_CHECK((*b)->dim() == 1 && (*b)->size(0) == 4 * H, name, " must have shape (4 * H) = (",
                  4 * H, "), got ", (*b)->sizes());
      same.push_back({name, &**b});
    }
  }
  for (const auto& [name, t] : same) {
    TORCH_CHECK(t->scalar_type() == input.scalar_type(), name, " must have the input's dtype ",
                input.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == input.device(), name, " must be on the input's device ",
                input.device(), ", got ", t->device());
  }
  return H;
}

// Checks the arguments of lstm_cell_backward against each other; returns {B, H}.
inline std::pair<int64_t, int64_t> check_cell_backward_args(const at::Tensor& grad_h, const at::Tensor& grad_c,
                                                            const at::Tensor& cx, const at::Tensor& c,
                                                            const at::Tensor& gates) {
  TORCH_CHECK(c.dim() == 2, "c must be 2-D [B, H], got ", c.dim(), "-D");
  const int64_t B = c.size(0), H = c.size(1);
  FASTLSTM_CHECK_SHAPE(grad_h, B, H);
  FASTLSTM_CHECK_SHAPE(grad_c, B, H);
  FASTLSTM_CHECK_SHAPE(cx, B, H);
  FASTLSTM_CHECK_SHAPE(gates, B, 4 * H);
  TORCH_CHECK(at::isFloatingType(c.scalar_type()), "c must be a floating point tensor, got ",
              c.scalar_type());
  const auto acc = cell_dtype(c.scalar_type());
  TORCH_CHECK(gates.scalar_type() == acc, "gates must have dtype ", acc, ", got ",
              gates.scalar_type());
  for (const auto& [name, t] : {std::pair{"grad_h", &grad_h}, std::pair{"grad_c", &grad_c},
                                std::pair{"cx", &cx}, std::pair{"gates", &gates}}) {
    TORCH_CHECK(t->device() == c.device(), name, " must be on c's device ", c.device(), ", got ",
                t->device());
  }
  return {B, H};
}

}  // namespace fastlstm
