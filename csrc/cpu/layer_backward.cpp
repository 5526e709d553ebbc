// The CPU layer's backward (fastlstm::lstm_layer_backward; contract in csrc/fastlstm.cpp), following
// the call's BackwardPlan (layer_plan.h).
//
// Per step, from the last: the gate gradients dG_t row by row (gate_math.h's cell_backward_row, on
// the rows' threads, with each row's bias gradient summed as it goes), then
// dh_{t-1} = dG_t @ w_hh over column blocks (DhProduct). After the loop the input and weight
// gradients are large GEMMs over all T*B rows (WeightGrad), each computed in an order fixed by the
// shape, so that results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <utility>

#include "cpu/block_cache.h"
#include "cpu/gate_math.h"
#include "cpu/gemm/blas.h"
#include "cpu/gemm/pack.h"
#include "cpu/gemm/parallel.h"
#include "cpu/layer.h"
#include "cpu/layer_plan.h"
#include "cpu/lengths.h"

namespace fastlstm::cpu {
namespace {

// Rows [0, rows) are processed; below `grain` rows the work stays on one thread.
template <typename F>
inline void for_rows(int64_t rows, int64_t row_cost, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_cost));
  at::parallel_for(0, rows, grain, f);
}

template <typename scalar_t>
LayerBackwardOut backward_impl(const BackwardPlan& p, const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                               const at::Tensor& grad_c_n, const at::Tensor& input, const at::Tensor& h0,
                               const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                               const at::Tensor& w_hr, const at::Tensor& lengths, const at::Tensor& output,
                               const at::Tensor& gates, const at::Tensor& cells, const at::Tensor& hidden) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = p.T, B = p.B, I = p.I, H = p.H, P = p.P;
  const bool has_proj = p.has_proj, reverse = p.reverse;
  const auto acc = input.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const auto dtype = input.scalar_type();

  const at::Tensor gates_c = gates.contiguous();  // read in its own dtype (cell_backward_row)
  const at::Tensor cells_a = cells.to(acc).contiguous();
  const at::Tensor grad_out_c = grad_output.contiguous();
  const at::Tensor c0_a = c0.to(acc).contiguous();
  const at::Tensor w_hh_a = w_hh.to(acc).contiguous();
  // dh_{t-1} = dG_t @ w_hh: above batch 2, brgemm reads w_hh as contiguous column panels (cheap row
  // copies); read in place, a large w_hh's rows are too far apart for the micro-kernel's loads.
  constexpr int64_t kPanel = 64;
  // Native bfloat16: dG is also kept rounded to bfloat16 (dG_low), as torch.nn.LSTM's own bf16
  // backward rounds it for its GEMMs; float32 accumulation throughout.
  const bool native = p.native;
  at::Tensor dG_low = native ? cached_empty({T, B, 4 * H}, input.options()) : at::Tensor();
  const at::Tensor w_hh_panels =
      p.dh == DhProduct::kVnniPanels
          ? pack_vnni_panels_nn(reinterpret_cast<const at::BFloat16*>(w_hh.contiguous().data_ptr()), 4 * H, P, P,
                                kPanel)
      : p.dh == DhProduct::kPanels ? pack_panels_nn<acc_t>(w_hh_a.data_ptr<acc_t>(), 4 * H, P, kPanel, acc)
                                   : at::Tensor();
  const at::Tensor w_hr_a = has_proj ? w_hr.to(acc).contiguous() : at::Tensor();
  const bool proj_blocks = p.proj_blocks;
  const int64_t ldg = p.ldg;  // the padding past 4H is never read
  at::Tensor dG = cached_empty({T, B, ldg}, acc).narrow(2, 0, 4 * H);
  // Gradient of h_t (after the step) for every step: needed for grad_w_hr; one step's worth otherwise.
  at::Tensor dH = cached_empty({has_proj ? T : 1, B, P}, acc);
  at::Tensor dm_step = has_proj ? at::empty({B, H}, acc) : at::Tensor();
  at::Tensor dh = grad_h_n.to(acc).contiguous().clone();  // [B, P]
  at::Tensor dc = grad_c_n.to(acc).contiguous().clone();  // [B, H]
  at::Tensor dh_prev = at::empty({B, P}, acc);
  at::Tensor db_rows = at::zeros({B, 4 * H}, acc);  // per batch row: the sum of its dG over the steps
  acc_t* db_all = db_rows.data_ptr<acc_t>();
  using Vec = Vectorized<acc_t>;

  const Activity act = make_activity(lengths, B);
  const scalar_t* g_all = gates_c.data_ptr<scalar_t>();
  const acc_t* cell_all = cells_a.data_ptr<acc_t>();
  const scalar_t* go_all = grad_out_c.data_ptr<scalar_t>();
  acc_t* dG_all = dG.data_ptr<acc_t>();
  acc_t* dhp = dh.data_ptr<acc_t>();
  acc_t* dcp = dc.data_ptr<acc_t>();
  acc_t* dhq = dh_prev.data_ptr<acc_t>();

  for (int64_t step = T - 1; step >= 0; --step) {
    const int64_t t = reverse ? T - 1 - step : step;
    const int64_t t_prev = reverse ? t + 1 : t - 1;  // the step processed before t in the forward
    const bool first = step == 0;
    const int64_t rows = act.rows(t);
    acc_t* dH_t = dH.data_ptr<acc_t>() + (has_proj ? t * B * P : 0);
    // Row b of dH_t: the gradient of h_t, the carried dh plus the output's gradient (0 past a length).
    const auto grad_h_row = [&](int64_t b) {
      acc_t* dst = dH_t + b * P;
      if (!act.active(b, t)) {
        std::fill(dst, dst + P, acc_t(0));
        return;
      }
      const scalar_t* go = go_all + (t * B + b) * P;
      const acc_t* src = dhp + b * P;
      for (int64_t j = 0; j < P; j += Vec::size()) {
        const int64_t n = std::min<int64_t>(Vec::size(), P - j);
        (Vec::loadu(src + j, n) + load_widened<acc_t>(go + j, n)).store(dst + j, n);
      }
    };
    const acc_t* dm_t = dH_t;
    if (has_proj) {  // the projection's product reads every row of dH_t
      for (int64_t b = 0; b < B; ++b) grad_h_row(b);
      if (proj_blocks) {  // as in the forward: column blocks fixed by the shape
        gemm_nn_parallel<acc_t>(rows, H, P, dH_t, P, w_hr_a.data_ptr<acc_t>(), H,
                                dm_step.data_ptr<acc_t>(), H);
      } else {
        gemm_blas<acc_t>(false, false, rows, H, P, acc_t(1), dH_t, P, w_hr_a.data_ptr<acc_t>(), H,
                         acc_t(0), dm_step.data_ptr<acc_t>(), H);
      }
      dm_t = dm_step.data_ptr<acc_t>();
    }

    acc_t* dG_t = dG_all + t * B * ldg;
    for_rows(B, 8 * H, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        acc_t* dg = dG_t + b * ldg;
        if (!has_proj) grad_h_row(b);  // dm_t = dH_t: each row's own, on the row's thread
        if (!act.active(b, t)) {
          std::fill(dg, dg + 4 * H, acc_t(0));
        } else {
          // The previous cell state: the carried state of the previously processed step, or c0.
          const acc_t* c_prev = first ? c0_a.data_ptr<acc_t>() + b * H
                                      : cell_all + (t_prev * B + b) * H;
          cell_backward_row<acc_t, scalar_t>(H, dm_t + b * H, dcp + b * H, dcp + b * H, g_all + (t * B + b) * 4 * H,
                                   cell_all + (t * B + b) * H, c_prev, dg);
          // The bias gradient, summed per row over the steps (fixed order: independent of threads).
          acc_t* db = db_all + b * 4 * H;
          for (int64_t j = 0; j < 4 * H; j += Vec::size()) {
            const int64_t n = std::min<int64_t>(Vec::size(), 4 * H - j);
            (Vec::loadu(db + j, n) + Vec::loadu(dg + j, n)).store(db + j, n);
          }
        }
        if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
          if (native) at::vec::convert(dg, dG_low.data_ptr<scalar_t>() + (t * B + b) * 4 * H, 4 * H);
        }
      }
    });

    if (p.dh == DhProduct::kVnniPanels) {
      gemm_vnni_panels_parallel(rows, P, 4 * H,
                              reinterpret_cast<const at::BFloat16*>(dG_low.data_ptr()) + t * B * 4 * H,
                              4 * H, w_hh_panels, kPanel, reinterpret_cast<float*>(dhq), P);
    } else if (w_hh_panels.defined()) {
      gemm_panels_parallel<acc_t>(rows, P, 4 * H, dG_t, ldg, w_hh_panels, kPanel, dhq, P);
    } else {
      gemm_nn_parallel<acc_t>(rows, P, 4 * H, dG_t, ldg, w_hh_a.data_ptr<acc_t>(), P, dhq, P);
    }
    // dhq becomes the carried dh; a row not running at t (its product skipped, or computed from
    // dG = 0 where the rows are not sorted) carries its dh through.
    for (int64_t b = 0; b < B; ++b) {
      if (b < rows && act.active(b, t)) continue;
      std::copy(dhp + b * P, dhp + (b + 1) * P, dhq + b * P);
    }
    std::swap(dhp, dhq);
  }

  const at::Tensor dG2 = dG.view({T * B, 4 * H});
  // The input with zeros past each length: the forward never read those rows, and a NaN there
  // (padding is the caller's) must not reach grad_w_ih through dG's zero rows (0 * NaN).
  const at::Tensor x_in = lengths.defined()
      ? input.reshape({T * B, I}).masked_fill(
            (at::arange(T, lengths.options()).unsqueeze(1) >= lengths.unsqueeze(0)).view({T * B, 1}), 0)
      : input.reshape({T * B, I});
  at::Tensor grad_input, grad_w_ih, grad_w_hh;
  // Native bfloat16 (see above): at::mm in bfloat16 is oneDNN's matmul, float32 accumulation
  // inside, a bfloat16 result (the gradients' dtype).
  const bool native_mm = p.weights == WeightGrad::kNativeMm;
  const at::Tensor x2 = native_mm ? at::Tensor() : x_in.to(acc);  // native_mm reads x_in as it is
  // float32 on brgemm also below kBrgemmMinRows rows: MKL splits a product over a long K (4H) among
  // threads, so at::mm's grad_input changed in the last bit with the thread count; brgemm tiles
  // are fixed by the shape.
  const bool blocked = p.weights == WeightGrad::kBlocked;
  const at::Tensor dG_low2 = native ? dG_low.view({T * B, 4 * H}) : at::Tensor();
  if (native_mm) {
    grad_input = at::mm(dG_low2, w_ih.contiguous()).view({T, B, I});
    grad_w_ih = at::mm(dG_low2.t(), x_in);
  }
  if constexpr (std::is_same_v<acc_t, float>) {
    if (blocked) {
      // grad_input = dG @ w_ih (w_ih as column panels: cheap row copies). The weight gradients are
      // computed transposed, grad_w^T = in^T @ dG, so that dG (the larger operand) is read in place
      // and only chunks of the input are transposed.
      const at::Tensor w_ih_a = w_ih.to(acc).contiguous();
      const at::Tensor w_ih_panels = pack_panels_nn<float>(w_ih_a.data_ptr<float>(), 4 * H, I, kPanel, acc);
      grad_input = cached_empty({T, B, I}, acc);
      gemm_panels_parallel<float>(T * B, I, 4 * H, dG_all, ldg, w_ih_panels, kPanel,
                                grad_input.data_ptr<float>(), I);
      grad_w_ih = cached_empty({4 * H, I}, acc);
      const float* xp = x2.data_ptr<float>();
      weight_grad_parallel(I, 4 * H, T * B, [&](int64_t k) { return xp + k * I; }, dG_all, ldg,
                               grad_w_ih.data_ptr<float>(), I);
    }
  }
  if (!blocked && !native_mm) {
    grad_input = at::mm(dG2, w_ih.to(acc)).view({T, B, I});
    grad_w_ih = at::mm(dG2.t(), x2);
  }
  at::Tensor grad_bias = at::zeros({4 * H}, acc);  // the rows' sums added in row order
  acc_t* gb = grad_bias.data_ptr<acc_t>();
  for (int64_t b = 0; b < B; ++b) {
    const acc_t* db = db_all + b * 4 * H;
    for (int64_t j = 0; j < 4 * H; ++j) gb[j] += db[j];
  }

  // grad_w_hh = sum_t dG_t^T h_prev_t. For a step t after another active step h_prev is that step's
  // output; for each sequence's first step it is h0 (where output is zero past a length, so the
  // shifted product picks up nothing there).
  const at::Tensor out_a = native_mm ? at::Tensor() : output.to(acc);
  // The h that row k = t * B + b of dG was computed from (both one-product paths below pair them):
  // the output of the step processed before t, or h0 at each sequence's first processed step (in
  // reverse with lengths, step len - 1; rows past a length have dG = 0). {from h0, offset of the
  // row in h0 [B, P] or in the output [T, B, P]}.
  const int64_t* len = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  const auto h_read = [&](int64_t k) -> std::pair<bool, int64_t> {
    const int64_t t = k / B, b = k % B;
    const bool first = reverse ? (t == T - 1 || (len != nullptr && t + 1 >= len[b])) : t == 0;
    return {first, first ? b * P : ((reverse ? t + 1 : t - 1) * B + b) * P};
  };
  if (blocked) {
    // One product over all T*B rows, each dG row with the h it was computed from (h_read).
    grad_w_hh = cached_empty({4 * H, P}, acc);
    const at::Tensor h0_a = h0.to(acc).contiguous();
    const at::Tensor out_c = out_a.contiguous();
    const float* h0p = reinterpret_cast<const float*>(h0_a.data_ptr());
    const float* op = reinterpret_cast<const float*>(out_c.data_ptr());
    auto row = [&](int64_t k) -> const float* {
      const std::pair<bool, int64_t> r = h_read(k);
      return (r.first ? h0p : op) + r.second;
    };
    weight_grad_parallel(P, 4 * H, T * B, row, reinterpret_cast<const float*>(dG_all), ldg,
                             reinterpret_cast<float*>(grad_w_hh.data_ptr<acc_t>()), P);
  } else if (native_mm) {
    // One bfloat16 product over all T*B rows, dG^T @ h_prev, h_prev's row k the h of h_read(k).
    const at::Tensor h0_l = h0.to(dtype).contiguous();
    const at::Tensor out_l = output.contiguous();
    const scalar_t* h0p = h0_l.data_ptr<scalar_t>();
    const scalar_t* op = out_l.data_ptr<scalar_t>();
    at::Tensor h_prev = at::empty({T * B, P}, output.options());
    scalar_t* hp = h_prev.data_ptr<scalar_t>();
    at::parallel_for(0, T * B, 64, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const std::pair<bool, int64_t> r = h_read(k);
        const scalar_t* src = (r.first ? h0p : op) + r.second;
        std::copy(src, src + P, hp + k * P);
      }
    });
    grad_w_hh = at::mm(dG_low2.t(), h_prev);
  } else {
    at::Tensor gw_hh_t = cached_zeros({P, 4 * H}, acc);  // grad_w_hh^T
    if (T > 1) {
      const int64_t first_row = reverse ? 0 : B;  // dG rows of the steps that follow another
      const at::Tensor h_shift = (reverse ? out_a.narrow(0, 1, T - 1) : out_a.narrow(0, 0, T - 1))
                                     .reshape({(T - 1) * B, P});
      gw_hh_t.addmm_(h_shift.t(), dG2.narrow(0, first_row, (T - 1) * B));
    }
    if (T > 0) {
      at::Tensor dG_first;  // [B, 4H]: each sequence's gradient at its first processed step
      if (!reverse) {
        dG_first = dG[0];
      } else if (!lengths.defined()) {
        dG_first = dG[T - 1];
      } else {
        const at::Tensor idx = (lengths - 1).clamp_min(0).view({1, B, 1}).expand({1, B, 4 * H});
        dG_first = dG.gather(0, idx).squeeze(0).mul((lengths > 0).to(acc).unsqueeze(1));
      }
      gw_hh_t.addmm_(h0.to(acc).t(), dG_first);
    }
    grad_w_hh = gw_hh_t.t().contiguous();
  }

  at::Tensor grad_w_hr;
  if (proj_blocks) {  // grad_w_hr [P, H] = dH^T @ hidden, on brgemm tiles fixed by the shape
    grad_w_hr = cached_empty({P, H}, acc);
    const at::Tensor hidden_a = hidden.to(acc).contiguous();
    const float* hp = reinterpret_cast<const float*>(hidden_a.data_ptr());
    weight_grad_parallel(H, P, T * B, [&](int64_t k) { return hp + k * H; },
                             reinterpret_cast<const float*>(dH.data_ptr()), P,
                             reinterpret_cast<float*>(grad_w_hr.data_ptr()), H);
  } else {
    grad_w_hr = has_proj ? at::mm(dH.view({T * B, P}).t(), hidden.to(acc).reshape({T * B, H}))
                         : at::empty({0}, input.options());
  }
  // The carried dh is in whichever of dh and dh_prev dhp points to after the last swap.
  const at::Tensor dh_out = dhp == dh.data_ptr<acc_t>() ? dh : dh_prev;
  return {grad_input.to(dtype), dh_out.to(dtype), dc.to(dtype), grad_w_ih.to(dtype),
          grad_w_hh.to(dtype), grad_bias.to(dtype), grad_w_hr.to(dtype)};
}

}  // namespace

LayerBackwardOut lstm_layer_backward_cpu(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                         const at::Tensor& grad_c_n, const at::Tensor& input,
                                         const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                                         const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                                         const std::optional<at::Tensor>& lengths, const at::Tensor& output,
                                         const at::Tensor& gates, const at::Tensor& cells,
                                         const at::Tensor& hidden, bool reverse) {
  const LayerSizes s = check_backward_args(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh,
                                           w_hr, lengths, output, gates, cells, hidden);
  const at::Tensor len = lengths_on_cpu(lengths, s.T);
  const BackwardPlan plan = make_backward_plan(s, input.scalar_type(), reverse);
  LayerBackwardOut out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "lstm_layer_backward_cpu", [&] {
    out = backward_impl<scalar_t>(plan, grad_output, grad_h_n, grad_c_n, input.contiguous(), h0, c0, w_ih,
                                  w_hh, w_hr.has_value() ? *w_hr : at::Tensor(), len, output.contiguous(),
                                  gates, cells, hidden);
  });
  return out;
}

}  // namespace fastlstm::cpu
