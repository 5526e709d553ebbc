// The CPU layer's entry points (contract in csrc/fastlstm.cpp), registered in lstm_cpu.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fastlstm::cpu {

// output, h_n, c_n, gates, cells, hidden
using LayerForwardOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr
using LayerBackwardOut =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

LayerForwardOut lstm_layer_forward_cpu(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                                       const at::Tensor& w_ih, const at::Tensor& w_hh,
                                       const std::optional<at::Tensor>& b_ih,
                                       const std::optional<at::Tensor>& b_hh,
                                       const std::optional<at::Tensor>& w_hr,
                                       const std::optional<at::Tensor>& lengths, bool reverse, bool training);

LayerBackwardOut lstm_layer_backward_cpu(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                         const at::Tensor& grad_c_n, const at::Tensor& input,
                                         const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                                         const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                                         const std::optional<at::Tensor>& lengths, const at::Tensor& output,
                                         const at::Tensor& gates, const at::Tensor& cells,
                                         const at::Tensor& hidden, bool reverse);

}  // namespace fastlstm::cpu
