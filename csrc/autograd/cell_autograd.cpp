// Autograd for fastlstm::lstm_cell_forward, registered in C++ at the Autograd dispatch key for every
// device, so that one decoder step costs no Python round trip and a C++ program without Python has
// it too. The backward calls lstm_cell_backward for the pre-activation gradients and then only the
// products autograd asks for; with create_graph (double backward) it recomputes the step with the
// composite (composite.h) and differentiates it.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_cell_forward(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastlstm::lstm_cell_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  return op.call(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
}

// Whether t is an ordinary dense CPU tensor, not a functional, fake, batched or other wrapper.
bool plain_cpu(const at::Tensor& t) {
  const c10::DispatchKeySet ks = t.key_set() - c10::autograd_dispatch_keyset - c10::autocast_dispatch_keyset -
                                 c10::DispatchKeySet(c10::DispatchKey::ADInplaceOrView);
  return ks.highestPriorityTypeId() == c10::DispatchKey::CPU;
}

// a @ b. The weight gradients (megabytes each step at large H) of ordinary CPU tensors go into a
// buffer from the CPU library's block cache (fastlstm::_cpu_cached_empty; csrc/cpu/block_cache.h):
// fresh pages would cost a page fault per 4 KiB on every step.
at::Tensor product(const at::Tensor& a, const at::Tensor& b) {
  static const auto empty_op = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("fastlstm::_cpu_cached_empty", "")
                                   .typed<at::Tensor(c10::IntArrayRef, c10::ScalarType)>();
  if (!plain_cpu(a) || !plain_cpu(b) ||
      !empty_op.hasKernelForDispatchKey(c10::DispatchKey::CompositeExplicitAutograd)) {
    return at::mm(a, b);
  }
  // Straight to the CPU kernel: an allocation is not something a dispatch mode should see.
  at::Tensor out = empty_op.redispatch(c10::DispatchKeySet(c10::DispatchKey::CPU), {a.size(0), b.size(1)},
                                       a.scalar_type());
  return at::mm_out(out, a, b);
}

// Autograd of lstm_cell_forward for every device. The backward calls lstm_cell_backward; with
// create_graph (double backward) it recomputes the step with composite_cell and differentiates it.
class LSTMCellFunction : public torch::autograd::Function<LSTMCellFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& hx,
                               const at::Tensor& cx, const at::Tensor& w_ih,
                               const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                               const std::optional<at::Tensor>& b_hh) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [h, c, gates] = call_cell_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
    const at::Tensor bi = b_ih.has_value() ? *b_ih : at::Tensor();
    const at::Tensor bh = b_hh.has_value() ? *b_hh : at::Tensor();
    ctx->save_for_backward({input, hx, cx, w_ih, w_hh, bi, bh, c, gates});
    ctx->mark_non_differentiable({gates});
    ctx->set_materialize_grads(false);  // gates never gets a gradient: no [B, 4H] zeros per step
    return {h, c, gates};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &hx = saved[1], &cx = saved[2], &w_ih = saved[3],
                     &w_hh = saved[4], &b_ih = saved[5], &b_hh = saved[6], &c = saved[7],
                     &gates = saved[8];
    at::Tensor grad_h = grads[0].defined() ? grads[0] : at::zeros_like(c);
    at::Tensor grad_c = grads[1].defined() ? grads[1] : at::zeros_like(c);
    if (at::GradMode::is_enabled()) return differentiable_backward(saved, grad_h, grad_c);
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fastlstm::lstm_cell_backward", "")
                               .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                         const at::Tensor&, const at::Tensor&,
                                                                         const at::Tensor&)>();
    auto [dG_acc, gcx] = op.call(grad_h, grad_c, cx, c, gates);
    // Only the products autograd asks for: a decoder's first state, or a frozen weight, needs none.
    const at::Tensor dG = dG_acc.to(input.scalar_type());
    auto need = [&](size_t i) { return ctx->needs_input_grad(i); };
    // Autograd has an input edge for each tensor given: a missing bias has none.
    const bool bias_needed = (b_ih.defined() && need(5)) ||
                             (b_hh.defined() && need(b_ih.defined() ? 6 : 5));
    const at::Tensor gb = bias_needed ? dG.sum(0) : at::Tensor();
    return {need(0) ? product(dG, w_ih) : at::Tensor(), need(1) ? product(dG, w_hh) : at::Tensor(),
            need(2) ? gcx : at::Tensor(), need(3) ? product(dG.t(), input) : at::Tensor(),
            need(4) ? product(dG.t(), hx) : at::Tensor(), b_ih.defined() ? gb : at::Tensor(),
            // Two tensors, as torch.nn.LSTMCell gives: a caller may scale one in place.
            b_hh.defined() ? (b_ih.defined() && gb.defined() ? gb.clone() : gb) : at::Tensor()};
  }

 private:
  static variable_list differentiable_backward(const variable_list& saved, const at::Tensor& gh,
                                               const at::Tensor& gc) {
    std::vector<at::Tensor> inputs(saved.begin(), saved.begin() + 7);
    std::vector<at::Tensor> wanted;
    for (const auto& t : inputs) {
      if (t.defined() && t.requires_grad()) wanted.push_back(t);
    }
    auto [h, c, gates] = composite_cell(inputs[0], inputs[1], inputs[2], inputs[3], inputs[4], inputs[5],
                                        inputs[6], cell_dtype(inputs[0].scalar_type()));
    const auto found = torch::autograd::grad({h, c}, wanted, {gh, gc}, /*retain_graph=*/true,
                                             /*create_graph=*/true, /*allow_unused=*/true);
    variable_list out(7);
    size_t k = 0;
    for (size_t n = 0; n < 7; ++n) {
      if (inputs[n].defined() && inputs[n].requires_grad()) out[n] = found[k++];
    }
    return out;
  }
};

// The route is autograd_route.h's, shared with the layer.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_forward_autograd(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh) {
  const at::Tensor bi = b_ih.has_value() ? *b_ih : at::Tensor();
  const at::Tensor bh = b_hh.has_value() ? *b_hh : at::Tensor();
  const AutogradRoute route = autograd_route({&input, &hx, &cx, &w_ih, &w_hh, &bi, &bh});
  if (route == AutogradRoute::kComposite) {
    check_cell_args(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
    return composite_cell(input, hx, cx, w_ih, w_hh, bi, bh, cell_dtype(input.scalar_type()));
  }
  if (route == AutogradRoute::kNoGrad) {
    at::AutoDispatchBelowADInplaceOrView below;
    return call_cell_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
  }
  auto out = LSTMCellFunction::apply(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlstm, Autograd, m) {
  m.impl("lstm_cell_forward", &lstm_cell_forward_autograd);
}

}  // namespace fastlstm
