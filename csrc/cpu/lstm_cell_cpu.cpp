// CPU implementation of fastlstm::lstm_cell_forward / lstm_cell_backward (contract in
// csrc/fastlstm.cpp), and the autograd of lstm_cell_forward, in C++ so that one decoder step costs
// no Python round trip.
//
// Forward: two BLAS calls accumulate x @ w_ih^T + h @ w_hh^T into the [B, 4H] gates buffer, then one
// pass per batch row adds both biases, applies the nonlinearities, updates the cell and writes h, c
// and the post-activation gates (saved for backward). torch.nn.LSTMCell does the same work as about
// ten separate ATen ops, each allocating its result. Backward: the op is one pass for the
// pre-activation gradients dG [B, 4H] (and cx's); the autograd function then runs only the ATen GEMMs
// for the input, state and weight gradients that are needed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "cpu/blas.h"
#include "cpu/gate_math.h"
#include "lstm_checks.h"

namespace fastlstm {
namespace {

using at::vec::Vectorized;

template <typename T>
inline Vectorized<T> load_or_zero(const T* p, int64_t j, int64_t n) {
  return p == nullptr ? Vectorized<T>(T(0)) : Vectorized<T>::loadu(p + j, n);
}

// torch.nn.LSTMCell's checks, with its messages (aten/src/ATen/native/RNN.cpp and the matmul's dtype
// check), then ours for what it leaves to the matmul. Returns H.
int64_t check_cell_args(const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
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

const at::Tensor* defined_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

template <typename scalar_t>
void forward_impl(const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
                  const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor* b_ih,
                  const at::Tensor* b_hh, at::Tensor& h, at::Tensor& c, at::Tensor& gates) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = input.size(0), I = input.size(1), H = hx.size(1);
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    const at::Tensor x = input.contiguous(), hp = hx.contiguous();
    const at::Tensor wi = w_ih.contiguous(), wh = w_hh.contiguous();
    acc_t* g = gates.data_ptr<acc_t>();
    cpu::gemm<acc_t>(false, true, B, 4 * H, I, acc_t(1), x.data_ptr<acc_t>(), I,
                     wi.data_ptr<acc_t>(), I, acc_t(0), g, 4 * H);
    cpu::gemm<acc_t>(false, true, B, 4 * H, H, acc_t(1), hp.data_ptr<acc_t>(), H,
                     wh.data_ptr<acc_t>(), H, acc_t(1), g, 4 * H);
  } else {  // float16/bfloat16: ATen's reduced-precision GEMMs accumulate in float32
    gates.copy_(at::mm(input, w_ih.t()).addmm_(hx, w_hh.t()));
  }
  const at::Tensor bi = b_ih ? b_ih->to(gates.scalar_type()).contiguous() : at::Tensor();
  const at::Tensor bh = b_hh ? b_hh->to(gates.scalar_type()).contiguous() : at::Tensor();
  const at::Tensor cp = cx.to(gates.scalar_type()).contiguous();
  const acc_t* bip = bi.defined() ? bi.data_ptr<acc_t>() : nullptr;
  const acc_t* bhp = bh.defined() ? bh.data_ptr<acc_t>() : nullptr;
  const acc_t* c_prev = cp.data_ptr<acc_t>();
  acc_t* g_all = gates.data_ptr<acc_t>();
  scalar_t* h_out = h.data_ptr<scalar_t>();
  scalar_t* c_out = c.data_ptr<scalar_t>();

  using Vec = Vectorized<acc_t>;
  constexpr int64_t kV = Vec::size();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, 8 * H));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    acc_t cn_buf[kV], h_buf[kV];
    for (int64_t b = b0; b < b1; ++b) {
      acc_t* g = g_all + b * 4 * H;
      for (int64_t j = 0; j < H; j += kV) {
        const int64_t n = std::min(kV, H - j);
        auto pre = [&](int q) {
          return Vec::loadu(g + q * H + j, n) + load_or_zero(bip, q * H + j, n) +
                 load_or_zero(bhp, q * H + j, n);
        };
        const Vec i = cpu::vsigmoid(pre(0)), f = cpu::vsigmoid(pre(1)), z = cpu::vtanh(pre(2)),
                  o = cpu::vsigmoid(pre(3));
        const Vec cn = f * Vec::loadu(c_prev + b * H + j, n) + i * z;
        i.store(g + j, n);
        f.store(g + H + j, n);
        z.store(g + 2 * H + j, n);
        o.store(g + 3 * H + j, n);
        cn.store(cn_buf, n);
        (o * cpu::vtanh(cn)).store(h_buf, n);
        for (int64_t k = 0; k < n; ++k) {
          c_out[b * H + j + k] = static_cast<scalar_t>(cn_buf[k]);
          h_out[b * H + j + k] = static_cast<scalar_t>(h_buf[k]);
        }
      }
    }
  });
}

// dG [B, 4H] (acc dtype) from the gradients of h and c and the saved gates, c and cx; grad_cx
// [B, H] (acc dtype) is written alongside.
template <typename scalar_t>
void gate_grads(const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& cx,
                const at::Tensor& c, const at::Tensor& gates, at::Tensor& dG, at::Tensor& dcx) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t kV = Vec::size();
  const int64_t B = c.size(0), H = c.size(1);
  const auto acc = gates.scalar_type();
  const at::Tensor gh = grad_h.to(acc).contiguous(), gc = grad_c.to(acc).contiguous();
  const at::Tensor cp = cx.to(acc).contiguous(), cn = c.to(acc).contiguous();
  const at::Tensor ga = gates.contiguous();
  const acc_t *ghp = gh.data_ptr<acc_t>(), *gcp = gc.data_ptr<acc_t>();
  const acc_t *cpp = cp.data_ptr<acc_t>(), *cnp = cn.data_ptr<acc_t>(), *gp = ga.data_ptr<acc_t>();
  acc_t *dg = dG.data_ptr<acc_t>(), *dc = dcx.data_ptr<acc_t>();
  const Vec one(acc_t(1));
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, 8 * H));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const acc_t* g = gp + b * 4 * H;
      acc_t* d = dg + b * 4 * H;
      for (int64_t j = 0; j < H; j += kV) {
        const int64_t n = std::min(kV, H - j);
        const Vec i = Vec::loadu(g + j, n), f = Vec::loadu(g + H + j, n);
        const Vec z = Vec::loadu(g + 2 * H + j, n), o = Vec::loadu(g + 3 * H + j, n);
        const Vec tc = cpu::vtanh(Vec::loadu(cnp + b * H + j, n));
        const Vec dh = Vec::loadu(ghp + b * H + j, n);
        const Vec dct = Vec::loadu(gcp + b * H + j, n) + dh * o * (one - tc * tc);
        (dct * z * i * (one - i)).store(d + j, n);
        (dct * Vec::loadu(cpp + b * H + j, n) * f * (one - f)).store(d + H + j, n);
        (dct * i * (one - z * z)).store(d + 2 * H + j, n);
        (dh * tc * o * (one - o)).store(d + 3 * H + j, n);
        (dct * f).store(dc + b * H + j, n);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_forward_cpu(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh) {
  const int64_t H = check_cell_args(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
  const int64_t B = input.size(0);
  at::Tensor h = at::empty({B, H}, input.options());
  at::Tensor c = at::empty({B, H}, input.options());
  at::Tensor gates = at::empty({B, 4 * H}, input.options().dtype(cell_dtype(input.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "lstm_cell_forward_cpu", [&] {
    forward_impl<scalar_t>(input, hx, cx, w_ih, w_hh, defined_or_null(b_ih), defined_or_null(b_hh),
                           h, c, gates);
  });
  return {h, c, gates};
}

std::tuple<at::Tensor, at::Tensor> lstm_cell_backward_cpu(const at::Tensor& grad_h,
                                                          const at::Tensor& grad_c,
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
  const auto opts = c.options().dtype(acc);
  at::Tensor dG = at::empty({B, 4 * H}, opts);
  at::Tensor dcx = at::empty({B, H}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(),
                                  "lstm_cell_backward_cpu", [&] {
    gate_grads<scalar_t>(grad_h, grad_c, cx, c, gates, dG, dcx);
  });
  return {dG, dcx.to(cx.scalar_type())};
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_cell_forward(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastlstm::lstm_cell_forward", "")
                             .typed<decltype(lstm_cell_forward_cpu)>();
  return op.call(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
}

// The step in differentiable ATen ops (forward-mode AD, torch.func, double backward): (h, c, gates).
std::tuple<at::Tensor, at::Tensor, at::Tensor> composite_cell(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& b_ih, const at::Tensor& b_hh) {
  at::Tensor pre = at::mm(input, w_ih.t()) + at::mm(hx, w_hh.t());
  if (b_ih.defined()) pre = pre + b_ih;
  if (b_hh.defined()) pre = pre + b_hh;
  const auto g = pre.chunk(4, 1);
  const at::Tensor i = g[0].sigmoid(), f = g[1].sigmoid(), z = g[2].tanh(), o = g[3].sigmoid();
  const at::Tensor c = f * cx + i * z;
  const at::Tensor h = o * c.tanh();
  const at::Tensor gates = at::cat({i, f, z, o}, 1).detach();
  return {h, c, gates.to(cell_dtype(input.scalar_type()))};
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
                               .typed<decltype(lstm_cell_backward_cpu)>();
    auto [dG_acc, gcx] = op.call(grad_h, grad_c, cx, c, gates);
    // Only the products autograd asks for: a decoder's first state, or a frozen weight, needs none.
    const at::Tensor dG = dG_acc.to(input.scalar_type());
    auto need = [&](size_t i) { return ctx->needs_input_grad(i); };
    // Autograd has an input edge for each tensor given: a missing bias has none.
    const bool bias_needed = (b_ih.defined() && need(5)) ||
                             (b_hh.defined() && need(b_ih.defined() ? 6 : 5));
    const at::Tensor gb = bias_needed ? dG.sum(0) : at::Tensor();
    // The weight gradients (megabytes each step at large H) come from the block cache for ordinary
    // CPU tensors: fresh pages would cost a page fault per 4 KiB (cpu/block_cache.h).
    auto mm = [](const at::Tensor& a, const at::Tensor& b) {
      if (!cpu::plain_cpu(a) || !cpu::plain_cpu(b)) return at::mm(a, b);
      at::Tensor out = cpu::cached_empty({a.size(0), b.size(1)}, a.options());
      return at::mm_out(out, a, b);
    };
    return {need(0) ? mm(dG, w_ih) : at::Tensor(), need(1) ? mm(dG, w_hh) : at::Tensor(),
            need(2) ? gcx : at::Tensor(), need(3) ? mm(dG.t(), input) : at::Tensor(),
            need(4) ? mm(dG.t(), hx) : at::Tensor(), b_ih.defined() ? gb : at::Tensor(),
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
    auto [h, c, gates] = composite_cell(inputs[0], inputs[1], inputs[2], inputs[3], inputs[4],
                                        inputs[5], inputs[6]);
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

// No gradient needed: the op below autograd, nothing recorded. A tangent on any input (forward-mode
// AD: torch.func.jvp, jacfwd) or a gradient inside a torch.func transform, which refuses C++
// autograd Functions (grad, vjp, jacrev, vmap of grad): composite_cell, whose ATen ops support
// them all. Otherwise LSTMCellFunction.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_forward_autograd(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh) {
  const at::Tensor bi = b_ih.has_value() ? *b_ih : at::Tensor();
  const at::Tensor bh = b_hh.has_value() ? *b_hh : at::Tensor();
  bool forward_ad = false, needs_grad = false;
  for (const at::Tensor* t : {&input, &hx, &cx, &w_ih, &w_hh, &bi, &bh}) {
    if (!t->defined()) continue;
    forward_ad = forward_ad || t->_fw_grad(/*level=*/0).defined();
    needs_grad = needs_grad || t->requires_grad();
  }
  needs_grad = needs_grad && at::GradMode::is_enabled();
  // functorch refuses a C++ autograd Function exactly when a transform is active, which is when it
  // includes its back-mode key in the thread-local dispatch state.
  const bool in_transform =
      c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerBackMode);
  if (forward_ad || (needs_grad && in_transform)) {
    check_cell_args(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
    return composite_cell(input, hx, cx, w_ih, w_hh, bi, bh);
  }
  if (!needs_grad) {
    at::AutoDispatchBelowADInplaceOrView below;
    return call_cell_forward(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
  }
  auto out = LSTMCellFunction::apply(input, hx, cx, w_ih, w_hh, b_ih, b_hh);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlstm, CPU, m) {
  m.impl("lstm_cell_forward", &lstm_cell_forward_cpu);
  m.impl("lstm_cell_backward", &lstm_cell_backward_cpu);
}

TORCH_LIBRARY_IMPL(fastlstm, Autograd, m) {
  m.impl("lstm_cell_forward", &lstm_cell_forward_autograd);
}

}  // namespace fastlstm
