// Autograd for fastlstm::lstm_layer_forward, registered in C++ at the Autograd dispatch key, so that it
// exists wherever the op library is loaded (a C++ program without Python included) and so that the
// decision to save activations is made at runtime, where it is known whether a gradient is needed.
//
// Arguments and shapes are those of the op (csrc/fastlstm.cpp). The route (no gradient / autograd Function / composite) is autograd_route.h's, shared with the
// cell. Without a gradient the op runs with training = false unless the caller asked for it
// explicitly: a graph captured above autograd (torch.jit.trace, torch.export's training IR) records
// training = None, so it saves nothing when it is later run for inference, whatever grad mode it
// was captured in. A graph captured below autograd (AOTAutograd, an inference export after
// decompositions) records the resolved flag. Plain vmap without a gradient uses the op's batching
// rule (fastlstm/ops.py).
// Double backward (backward with create_graph = true, e.g. torch.func.grad, gradient penalties)
// recomputes the layer with the composite and differentiates it, so the gradient is itself
// differentiable.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "autograd/autograd_route.h"
#include "autograd/composite.h"
#include "lstm_checks.h"

namespace fastlstm {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using ForwardOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }
Tensor value_or_undefined(const OptTensor& t) { return present(t) ? *t : Tensor(); }

const c10::TypedOperatorHandle<ForwardOut(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                          const Tensor&, const OptTensor&, const OptTensor&,
                                          const OptTensor&, const OptTensor&, bool,
                                          std::optional<bool>)>&
forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastlstm::lstm_layer_forward", "")
                             .typed<ForwardOut(const Tensor&, const Tensor&, const Tensor&,
                                               const Tensor&, const Tensor&, const OptTensor&,
                                               const OptTensor&, const OptTensor&, const OptTensor&,
                                               bool, std::optional<bool>)>();
  return op;
}

using BackwardOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
const c10::TypedOperatorHandle<BackwardOut(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, bool)>&
backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastlstm::lstm_layer_backward", "")
          .typed<BackwardOut(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                             const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                             const OptTensor&, const OptTensor&, const Tensor&, const Tensor&,
                             const Tensor&, const Tensor&, bool)>();
  return op;
}

struct LstmLayerFunction : public torch::autograd::Function<LstmLayerFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& h0,
                               const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
                               const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
                               const OptTensor& lengths, bool reverse, bool training) {
    ForwardOut out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = forward_op().call(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse,
                              training);
    }
    auto [output, h_n, c_n, gates, cells, hidden] = out;
    ctx->saved_data["training"] = training;
    ctx->saved_data["reverse"] = reverse;
    // The biases are needed only to recompute the layer for double backward, so they are not saved
    // variables (which would make backward fail after an in-place edit of a bias, as torch.nn.LSTM
    // does not); their versions are recorded so that double backward can refuse a modified bias.
    for (const auto& [name, b] : {std::pair{"b_ih", &b_ih}, std::pair{"b_hh", &b_hh}}) {
      const Tensor t = value_or_undefined(*b);
      ctx->saved_data[name] = t;
      ctx->saved_data[std::string(name) + "_version"] =
          static_cast<int64_t>(t.defined() ? t._version() : 0);
    }
    ctx->save_for_backward(
        {input, h0, c0, w_ih, w_hh, value_or_undefined(w_hr), output, gates, cells, hidden,
         value_or_undefined(lengths)});
    ctx->mark_non_differentiable({gates, cells, hidden});
    // gates, cells and hidden never get a gradient, and output, h_n or c_n may not: without this the
    // engine would hand backward zero tensors for all of them, a [T, B, 4H] fill and allocation
    // alone (52 MB at fastrnns' shape, and as much on the step's peak memory).
    ctx->set_materialize_grads(false);
    return {output, h_n, c_n, gates, cells, hidden};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(ctx->saved_data["training"].toBool(),
                "fastlstm: backward through lstm_layer_forward called with training=False, which "
                "saves nothing for backward; call it with training=True or None");
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &h0 = saved[1], &c0 = saved[2], &w_ih = saved[3],
                 &w_hh = saved[4], &w_hr = saved[5], &output = saved[6], &gates = saved[7],
                 &cells = saved[8], &hidden = saved[9], &lengths = saved[10];
    const bool reverse = ctx->saved_data["reverse"].toBool();
    const Tensor b_ih = ctx->saved_data["b_ih"].toTensor();
    const Tensor b_hh = ctx->saved_data["b_hh"].toTensor();
    // The biases are released with the saved variables, which the engine frees after a backward
    // that does not retain the graph: held longer, a bias would have a reference beyond its
    // module's, and swapping it (Module.to with swapped tensors, FSDP2, load_state_dict(assign=True))
    // fails. Only once the backward has succeeded: after an exception the graph is kept.
    const auto release_biases = [ctx] {
      if (!torch::autograd::get_current_graph_task_keep_graph()) {
        ctx->saved_data.erase("b_ih");
        ctx->saved_data.erase("b_hh");
      }
    };
    const Tensor grad_output = grads[0].defined() ? grads[0] : at::zeros_like(output);
    const Tensor grad_h_n = grads[1].defined() ? grads[1] : at::zeros_like(h0);
    const Tensor grad_c_n = grads[2].defined() ? grads[2] : at::zeros_like(c0);
    const OptTensor opt_w_hr = w_hr.defined() ? OptTensor(w_hr) : std::nullopt;
    const OptTensor opt_lengths = lengths.defined() ? OptTensor(lengths) : std::nullopt;

    variable_list result(11);
    if (torch::autograd::GradMode::is_enabled()) {
      // create_graph = true: differentiate the composite, whose graph can be differentiated again.
      for (const auto& [name, b] : {std::pair{"b_ih", &b_ih}, std::pair{"b_hh", &b_hh}}) {
        TORCH_CHECK(!b->defined() ||
                        b->_version() == ctx->saved_data[std::string(name) + "_version"].toInt(),
                    "one of the variables needed for gradient computation has been modified by an "
                    "inplace operation: fastlstm's double backward (create_graph=True) recomputes "
                    "the layer and needs ", name, " as it was in the forward (version ",
                    ctx->saved_data[std::string(name) + "_version"].toInt(), ", now ",
                    b->_version(), ")");
      }
      const std::vector<Tensor> inputs = {input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr};
      variable_list diff_inputs;
      for (size_t i = 0; i < inputs.size(); ++i) {
        if (inputs[i].defined() && inputs[i].requires_grad()) {
          diff_inputs.push_back(inputs[i]);
        }
      }
      if (diff_inputs.empty()) {
        release_biases();
        return result;
      }
      auto [o, h, c] = composite_layer(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
                                       reverse);
      const variable_list found = torch::autograd::grad(
          {o, h, c}, diff_inputs, {grad_output, grad_h_n, grad_c_n}, /*retain_graph=*/std::nullopt,
          /*create_graph=*/true, /*allow_unused=*/true);
      size_t k = 0;
      for (size_t i = 0; i < inputs.size(); ++i) {
        if (inputs[i].defined() && inputs[i].requires_grad()) result[i] = found[k++];
      }
      release_biases();
      return result;
    }

    auto [g_input, g_h0, g_c0, g_w_ih, g_w_hh, g_bias, g_w_hr] =
        backward_op().call(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, opt_w_hr,
                           opt_lengths, output, gates, cells, hidden, reverse);
    result[0] = g_input;
    result[1] = g_h0;
    result[2] = g_c0;
    result[3] = g_w_ih;
    result[4] = g_w_hh;
    // Both biases get the same gradient, but as two tensors: a caller may scale or clip one of them
    // in place (torch._foreach_mul_ over torch.autograd.grad's results).
    if (b_ih.defined()) result[5] = g_bias;
    if (b_hh.defined()) result[6] = b_ih.defined() ? g_bias.clone() : g_bias;
    if (w_hr.defined()) result[7] = g_w_hr;
    release_biases();
    return result;
  }
};

ForwardOut lstm_layer_forward_autograd(const Tensor& input, const Tensor& h0, const Tensor& c0,
                                       const Tensor& w_ih, const Tensor& w_hh,
                                       const OptTensor& b_ih, const OptTensor& b_hh,
                                       const OptTensor& w_hr, const OptTensor& lengths,
                                       bool reverse, std::optional<bool> training) {
  const Tensor bi = value_or_undefined(b_ih), bh = value_or_undefined(b_hh), hr = value_or_undefined(w_hr);
  const AutogradRoute route = autograd_route({&input, &h0, &c0, &w_ih, &w_hh, &bi, &bh, &hr});
  if (route == AutogradRoute::kComposite) {
    // Nothing is saved in the op's sense, so gates, cells and hidden come back empty.
    TORCH_CHECK(!training.value_or(false),
                "fastlstm: lstm_layer_forward with training=True does not support forward-mode AD "
                "or torch.func transforms; pass training=None (the default)");
    auto [o, h, c] = composite_layer(input, h0, c0, w_ih, w_hh, bi, bh, hr, value_or_undefined(lengths),
                                     reverse);
    const auto empty = input.new_empty({0});
    const auto cell_empty = input.new_empty({0}, input.options().dtype(cell_dtype(input.scalar_type())));
    return {o, h, c, empty, cell_empty, input.new_empty({0})};
  }
  if (route == AutogradRoute::kNoGrad) {
    at::AutoDispatchBelowADInplaceOrView below;
    return forward_op().call(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse,
                             training.value_or(false));
  }
  const variable_list out = LstmLayerFunction::apply(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                                                     lengths, reverse, training.value_or(true));
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlstm, Autograd, m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward_autograd);
}

}  // namespace fastlstm
