// How the layer's and the cell's Autograd kernels run a call: one decision for both.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>

#include <initializer_list>

namespace fastlstm {

enum class AutogradRoute {
  // No gradient needed (grad mode off, or no input requires grad): the op below autograd, nothing
  // recorded or saved.
  kNoGrad,
  // A gradient needed: the op inside a torch::autograd::Function whose backward is the backward op.
  kFunction,
  // Forward-mode AD (a tangent on any input: torch.func.jvp, jacfwd, torch.autograd.forward_ad), or
  // a gradient needed inside a torch.func transform (grad, vjp, jacrev, vmap of grad, ...), which
  // refuses C++ autograd Functions: the composite of ATen ops (composite.h), which have forward
  // derivatives, batching rules and functorch support. Slower, but correct under every transform.
  kComposite,
};

// The route for a call whose differentiable tensor arguments are `differentiable` (undefined ones,
// i.e. absent optional arguments, are skipped).
inline AutogradRoute autograd_route(std::initializer_list<const at::Tensor*> differentiable) {
  bool forward_ad = false, needs_grad = false;
  for (const at::Tensor* t : differentiable) {
    if (!t->defined()) continue;
    forward_ad = forward_ad || t->_fw_grad(/*level=*/0).defined();
    needs_grad = needs_grad || t->requires_grad();
  }
  needs_grad = needs_grad && torch::autograd::GradMode::is_enabled();
  // functorch refuses a C++ autograd Function whenever a transform is active (its stack of dynamic
  // layers is not empty), which is exactly when it includes its back-mode key in the TLS.
  // (ATen/functorch/DynamicLayer.h, which could ask directly, is not usable from the wheel.)
  const bool in_transform =
      c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerBackMode);
  if (forward_ad || (needs_grad && in_transform)) return AutogradRoute::kComposite;
  return needs_grad ? AutogradRoute::kFunction : AutogradRoute::kNoGrad;
}

}  // namespace fastlstm
