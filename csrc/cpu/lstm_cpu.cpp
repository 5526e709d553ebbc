// The CPU library's registrations: the layer (layer_forward.cpp, layer_backward.cpp, planned by
// layer_plan.h), the LSTMCell step (cell_cpu.cpp) and the block cache's controls (block_cache.h).
// This library is built once per instruction set (setup.py: fastlstm._cpu_avx512, _cpu_avx2,
// _cpu_generic); fastlstm/_loader.py loads the one this CPU runs. Schemas: csrc/fastlstm.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/block_cache.h"
#include "cpu/cell.h"
#include "cpu/layer.h"
#include "cpu/layer_plan.h"
#include "lstm_checks.h"

namespace fastlstm::cpu {
namespace {

std::string layer_plan(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                       const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                       const std::optional<at::Tensor>& lengths, bool reverse, bool training) {
  const LayerSizes s = check_layer_args(input, h0, c0, w_ih, w_hh, std::nullopt, std::nullopt, w_hr, lengths);
  std::string out = make_forward_plan(s, input.scalar_type(), training, reverse).describe();
  if (training) out += "\n" + make_backward_plan(s, input.scalar_type(), reverse).describe();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlstm, CPU, m) {
  // training=None reaching a backend (a call below autograd) saves nothing: csrc/fastlstm.cpp.
  m.impl("lstm_layer_forward",
         [](const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
            const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
            const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
            const std::optional<at::Tensor>& lengths, bool reverse, std::optional<bool> training) {
           return lstm_layer_forward_cpu(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse,
                                         training.value_or(false));
         });
  m.impl("lstm_layer_backward", &lstm_layer_backward_cpu);
  m.impl("lstm_cell_forward", &lstm_cell_forward_cpu);
  m.impl("lstm_cell_backward", &lstm_cell_backward_cpu);
  m.impl("_lstm_layer_cpu_plan", &layer_plan);
}

// The ops without tensor arguments reach the CompositeExplicitAutograd kernel.
TORCH_LIBRARY_IMPL(fastlstm, CompositeExplicitAutograd, m) {
  m.impl("cpu_cache_release", [] { return static_cast<int64_t>(block_cache().release()); });
  m.impl("cpu_cache_bytes", [] { return static_cast<int64_t>(block_cache().cached_bytes()); });
  m.impl("_cpu_cached_empty",
         [](c10::IntArrayRef size, c10::ScalarType dtype) { return cached_empty(size, at::TensorOptions().dtype(dtype)); });
}

}  // namespace fastlstm::cpu
