// The CPU LSTMCell step's entry points (contract in csrc/fastlstm.cpp), registered in lstm_cpu.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fastlstm::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_forward_cpu(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh);

std::tuple<at::Tensor, at::Tensor> lstm_cell_backward_cpu(const at::Tensor& grad_h, const at::Tensor& grad_c,
                                                          const at::Tensor& cx, const at::Tensor& c,
                                                          const at::Tensor& gates);

}  // namespace fastlstm::cpu
