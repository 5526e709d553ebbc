// The CPU LSTMCell step (fastlstm::lstm_cell_forward / lstm_cell_backward; contract in
// csrc/fastlstm.cpp; autograd in csrc/autograd/cell_autograd.cpp).
//
// Forward: two BLAS calls accumulate x @ w_ih^T + h @ w_hh^T into the [B, 4H] gates buffer, then one
// pass per batch row runs the layer's fused gate and cell update (gate_math.h) with both biases,
// writing h, c and the post-activation gates (saved for backward). torch.nn.LSTMCell does the same
// work as about ten separate ATen ops, each allocating its result. Backward: one pass for the
// pre-activation gradients dG [B, 4H] and cx's (the layer's cell_backward_row); the autograd runs
// the products for the input, state and weight gradients that are needed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "cpu/cell.h"
#include "cpu/gate_math.h"
#include "cpu/gemm/blas.h"
#include "lstm_checks.h"

namespace fastlstm::cpu {
namespace {

// Rows per task: about 16K values of work each.
int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, 8 * H)); }

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
    gemm_blas<acc_t>(false, true, B, 4 * H, I, acc_t(1), x.data_ptr<acc_t>(), I, wi.data_ptr<acc_t>(), I,
                     acc_t(0), g, 4 * H);
    gemm_blas<acc_t>(false, true, B, 4 * H, H, acc_t(1), hp.data_ptr<acc_t>(), H, wh.data_ptr<acc_t>(), H,
                     acc_t(1), g, 4 * H);
  } else {  // float16/bfloat16: ATen's reduced-precision GEMMs accumulate in float32
    gates.copy_(at::mm(input, w_ih.t()).addmm_(hx, w_hh.t()));
  }
  const auto acc = gates.options();
  // A missing bias adds zeros, so that every cell adds (g + b_ih) + b_hh in that order.
  const at::Tensor bi = b_ih ? b_ih->to(acc).contiguous() : at::zeros({4 * H}, acc);
  const at::Tensor bh = b_hh ? b_hh->to(acc).contiguous() : at::zeros({4 * H}, acc);
  const at::Tensor cp = cx.to(acc).contiguous();
  // The new state in acc_t: the outputs themselves where they are acc_t, else converted after.
  constexpr bool kSame = std::is_same_v<acc_t, scalar_t>;
  at::Tensor c_acc = kSame ? c : at::empty({B, H}, acc);
  at::Tensor h_acc = kSame ? h : at::empty({B, H}, acc);
  const acc_t *bip = bi.data_ptr<acc_t>(), *bhp = bh.data_ptr<acc_t>(), *c_prev = cp.data_ptr<acc_t>();
  acc_t *g_all = gates.data_ptr<acc_t>(), *c_all = c_acc.data_ptr<acc_t>(), *h_all = h_acc.data_ptr<acc_t>();
  scalar_t* h_out = h.data_ptr<scalar_t>();
  scalar_t* c_out = c.data_ptr<scalar_t>();
  at::parallel_for(0, B, row_grain(H), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      acc_t* g = g_all + b * 4 * H;
      acc_t* cn = c_all + b * H;
      // b_ih in the recurrent part's place; the post-activations overwrite the pre-activations.
      cell_forward<acc_t, acc_t, true, false>(H, g, H, bip, H, bhp, c_prev + b * H, cn, cn, h_all + b * H, g);
      if constexpr (!kSame) {  // element by element, as c10 converts a scalar (NaN as 0x7FC0 for bfloat16)
        for (int64_t j = 0; j < H; ++j) {
          c_out[b * H + j] = static_cast<scalar_t>(cn[j]);
          h_out[b * H + j] = static_cast<scalar_t>(h_all[b * H + j]);
        }
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
  const auto present = [](const std::optional<at::Tensor>& t) { return t.has_value() && t->defined() ? &*t : nullptr; };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "lstm_cell_forward_cpu", [&] {
    forward_impl<scalar_t>(input, hx, cx, w_ih, w_hh, present(b_ih), present(b_hh), h, c, gates);
  });
  return {h, c, gates};
}

std::tuple<at::Tensor, at::Tensor> lstm_cell_backward_cpu(const at::Tensor& grad_h, const at::Tensor& grad_c,
                                                          const at::Tensor& cx, const at::Tensor& c,
                                                          const at::Tensor& gates) {
  const std::pair<int64_t, int64_t> sizes = check_cell_backward_args(grad_h, grad_c, cx, c, gates);
  const int64_t B = sizes.first, H = sizes.second;
  const auto acc = c.options().dtype(cell_dtype(c.scalar_type()));
  at::Tensor dG = at::empty({B, 4 * H}, acc);
  at::Tensor dcx = at::empty({B, H}, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "lstm_cell_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor gh = grad_h.to(acc).contiguous(), gc = grad_c.to(acc).contiguous();
    const at::Tensor cp = cx.to(acc).contiguous(), cn = c.to(acc).contiguous();
    const at::Tensor ga = gates.contiguous();
    const acc_t *ghp = gh.data_ptr<acc_t>(), *gcp = gc.data_ptr<acc_t>(), *cpp = cp.data_ptr<acc_t>();
    const acc_t* cnp = cn.data_ptr<acc_t>();
    const acc_t* gp = ga.data_ptr<acc_t>();
    acc_t *dg = dG.data_ptr<acc_t>(), *dc = dcx.data_ptr<acc_t>();
    at::parallel_for(0, B, row_grain(H), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        cell_backward_row<acc_t, acc_t>(H, ghp + b * H, gcp + b * H, dc + b * H, gp + b * 4 * H, cnp + b * H,
                                        cpp + b * H, dg + b * 4 * H);
      }
    });
  });
  return {dG, dcx.to(cx.scalar_type())};
}

}  // namespace fastlstm::cpu
