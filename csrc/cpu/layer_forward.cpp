// The CPU layer's forward (fastlstm::lstm_layer_forward; contract in csrc/fastlstm.cpp), following
// the call's ForwardPlan (layer_plan.h).
//
// The input part of the pre-activations, x @ w_ih^T, is projected in large GEMMs (projection.h):
// for all steps up front where training keeps them as the saved gates, else a chunk of steps at a
// time, or block by block inside the step loop (block_proj) so that each block's pre-activations
// are still in its core's cache when it reads them. Each step is then one parallel loop over blocks
// of hidden units (unit_blocks.h): a thread multiplies h_{t-1} by its block's rows of w_hh (all four
// gates of those units) and runs the fused gate and cell update (gate_math.h) for the block. No
// thread waits for another between the matmul and the pointwise math; h is double-buffered so
// blocks never read a half-written state, and with the step barrier (barrier.h) the threads stay in
// one parallel region for all steps. The recurrent product's strategy (Recurrence) and the
// training/native-bfloat16 flags are template parameters of the step function, chosen once a call.
//
// h is rounded to the input dtype at each step, because that is the value the next step and the
// caller see. float16/bfloat16 keep the cell state and do the gate math in float32.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <vector>

#include "cpu/barrier.h"
#include "cpu/block_cache.h"
#include "cpu/gate_math.h"
#include "cpu/gemm/pack.h"
#include "cpu/gemm/parallel.h"
#include "cpu/gemm/serial.h"
#include "cpu/gemm/transpose.h"
#include "cpu/layer.h"
#include "cpu/layer_plan.h"
#include "cpu/lengths.h"
#include "cpu/projection.h"
#include "cpu/unit_blocks.h"

namespace fastlstm::cpu {
namespace {

// h rounded to the output dtype into out, and that rounded value into the carried state.
template <typename scalar_t, typename acc_t>
inline void store_h(int64_t n, const acc_t* h, acc_t* state, scalar_t* out) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::copy(h, h + n, out);
    std::copy(h, h + n, state);
  } else {
    at::vec::convert(h, out, n);
    at::vec::convert(out, state, n);
  }
}

// What the step loop reads and writes, set up once a call. Buffers [2, ...] are double-buffered by
// step parity: step s reads half s % 2 and writes half (s + 1) % 2.
template <typename scalar_t>
struct ForwardState {
  using acc_t = at::opmath_type<scalar_t>;
  const ForwardPlan& plan;
  const Activity& act;
  const at::Tensor& x_a;          // [T * B, I] the input (bfloat16 for native, else acc_t)
  const at::Tensor& w_ih_panels;  // block_proj: w_ih as per-block gate panels
  acc_t* gates;                   // [chunk, B, 4H] pre-activations, then post-activations
  const acc_t* bias;              // [4H] b_ih + b_hh, or null
  const acc_t* w_hh;              // [4H, P] acc_t copy (null where keep_w_hh)
  const scalar_t* w_hh_low;       // [4H, P] as given (keep_w_hh), else null
  const void* panels;             // [blocks, P, 4nb] w_hh's per-block panels (kPanels)
  acc_t* scratch;                 // [threads, 1 or 2, B, 4nb] per-thread recurrent products
  acc_t* hT;                      // [2, P, B] h transposed (kDirect)
  scalar_t* output;               // [T, B, P]
  acc_t* cells;                   // [T, B, H] (training)
  scalar_t* gates_low;            // [T, B, 4H] saved gates of a float16/bfloat16 call (low_gates)
  acc_t* hidden;                  // [T or 1, B, H] o * tanh(c) before the projection (has_proj)
  acc_t* h;                       // [2, B, P] h_{t-1} and h_t
  scalar_t* hb;                   // [2, B, P] h in bfloat16 (native)
  acc_t* c;                       // [B, H] the cell state, updated in place
  acc_t* m_step;                  // [B, H] o * tanh(c) of the step (no projection)

  struct StepView {
    int64_t t, t_lo, p_n;  // time index; first time index held by gates; steps this step projects
  };
  // What step `step` reads and writes: a function of the step alone, so that any thread can work it
  // out (the barrier loop).
  StepView view_of(int64_t step) const {
    const int64_t T = plan.T, chunk = plan.chunk;
    StepView v;
    v.t = plan.reverse ? T - 1 - step : step;
    const int64_t c_first = step - step % chunk, c_n = std::min(chunk, T - c_first);
    v.t_lo = plan.reverse ? T - c_first - c_n : c_first;
    // block_proj: the first step of a chunk projects all of its steps, which start
    // at t_lo in either direction.
    v.p_n = plan.block_proj && step == c_first ? c_n : 0;
    return v;
  }
};

// Blocks [k0, k1) of step `step`, on the calling thread: the block's input projection where this
// step projects (block_proj), its recurrent product, and the fused update of its units for every
// batch row.
template <typename scalar_t, Recurrence R, bool kNative, bool kTraining>
void step_blocks(const ForwardState<scalar_t>& st, int64_t step, int64_t k0, int64_t k1) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kLow = !std::is_same_v<acc_t, scalar_t>;
  constexpr bool kLowGates = kLow && kTraining;
  constexpr bool kDirect = R == Recurrence::kDirect;
  // Low-precision weights are read as they are by the batch <= 2 dot products and by native bf16.
  constexpr bool kKeepWhh = kLow && (R == Recurrence::kDotRows || kNative);
  const ForwardPlan& p = st.plan;
  const int64_t B = p.B, I = p.I, H = p.H, P = p.P, nb = p.ub.nb;
  const bool has_proj = p.has_proj;
  const Activity& act = st.act;
  const auto v = st.view_of(step);
  const int64_t t = v.t, t_lo = v.t_lo, p_n = v.p_n;
  const int64_t rows = act.rows(t);
  acc_t* g_t = st.gates + (t - t_lo) * B * 4 * H;
  acc_t* cp = st.c;
  acc_t* cell_t = kTraining ? st.cells + t * B * H : cp;
  scalar_t* out_t = st.output + t * B * P;
  acc_t* m_t = has_proj ? st.hidden + (kTraining ? t : 0) * B * H : st.m_step;
  const acc_t* h_cur = st.h + (step % 2) * B * P;
  acc_t* h_next = st.h + ((step + 1) % 2) * B * P;
  const acc_t* hT_cur = kDirect ? st.hT + (step % 2) * P * B : nullptr;
  acc_t* hT_next = kDirect ? st.hT + ((step + 1) % 2) * P * B : nullptr;
  const scalar_t* hb_cur = kNative ? st.hb + (step % 2) * B * P : nullptr;
  scalar_t* hb_next = kNative ? st.hb + ((step + 1) % 2) * B * P : nullptr;
  acc_t* rec = st.scratch + at::get_thread_num() * (kDirect ? 2 : 1) * B * 4 * nb;
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t j0 = p.ub.j0(k), n = p.ub.n(k);  // rec: [B, 4n], gate q at q * n
    if (p_n > 0 && act.sorted) {  // each step's running rows only (see project_input)
      for (int64_t i = 0; i < p_n; ++i) {
        project_block<acc_t>(kNative, act.rows(t_lo + i), n, I, st.x_a, (t_lo + i) * B, st.w_ih_panels, k,
                             nb, st.gates + i * B * 4 * H, H, j0);
      }
    } else if (p_n > 0) {
      project_block<acc_t>(kNative, p_n * B, n, I, st.x_a, t_lo * B, st.w_ih_panels, k, nb, st.gates, H, j0);
    }
    if constexpr (R == Recurrence::kDotRows) {
      for (int q = 0; q < 4 && rows > 0; ++q) {
#ifdef FASTLSTM_HAVE_DPBF16
        if constexpr (kNative) {
          gemm_nt_rows_bf16_serial(rows, n, P, reinterpret_cast<const at::BFloat16*>(hb_cur), P,
                                   reinterpret_cast<const at::BFloat16*>(st.w_hh_low) + (q * H + j0) * P,
                                   P, reinterpret_cast<float*>(rec) + q * n, 4 * n);
          continue;
        }
#endif
        if constexpr (kKeepWhh) {
          gemm_nt_rows_serial<acc_t, scalar_t>(rows, n, P, h_cur, P, st.w_hh_low + (q * H + j0) * P, P,
                                               rec + q * n, 4 * n);
        } else {
          gemm_nt_rows_serial<acc_t, acc_t>(rows, n, P, h_cur, P, st.w_hh + (q * H + j0) * P, P,
                                            rec + q * n, 4 * n);
        }
      }
    } else if constexpr (kDirect) {
      acc_t* recT = rec + B * 4 * nb;  // [4n, B]: row q * n + jj is gate q of unit j0 + jj
      for (int q = 0; q < 4 && rows > 0; ++q) {
        if constexpr (std::is_same_v<acc_t, double>) {  // no brgemm: not BLAS on small products
          gemm_nn_regtiles_serial<acc_t>(n, rows, P, st.w_hh + (q * H + j0) * P, P, hT_cur, B,
                                         recT + q * n * B, B);
        } else {
          gemm_nn_serial<acc_t>(n, rows, P, st.w_hh + (q * H + j0) * P, P, hT_cur, B, recT + q * n * B, B);
        }
      }
      transpose_tile(4 * n, rows, recT, B, rec, 4 * n);
    } else if constexpr (kNative) {
      if (rows > 0) {
        at::native::cpublas::brgemm(rows, 4 * n, P, P, 4 * nb, 4 * n, false,
                                    reinterpret_cast<const at::BFloat16*>(hb_cur),
                                    static_cast<const at::BFloat16*>(st.panels) + k * P * 4 * nb,
                                    reinterpret_cast<float*>(rec), true);
      }
    } else {
      gemm_nn_serial<acc_t>(rows, 4 * n, P, h_cur, P, static_cast<const acc_t*>(st.panels) + k * P * 4 * nb,
                            4 * nb, rec, 4 * n);
    }
    for (int64_t b = 0; b < B; ++b) {
      acc_t* g = g_t + b * 4 * H + j0;
      acc_t* m = m_t + b * H + j0;
      // The saved post-activations of this row (low_gates), else they go back into g.
      scalar_t* gl = kLowGates ? st.gates_low + (t * B + b) * 4 * H + j0 : nullptr;
      if (!act.active(b, t)) {
        if constexpr (kTraining) {  // the saved gates and cell of a finished row (inference saves neither)
          for (int q = 0; q < 4; ++q) {
            if constexpr (kLowGates) {
              std::fill(gl + q * H, gl + q * H + n, scalar_t(0));
            } else {
              std::fill(g + q * H, g + q * H + n, acc_t(0));
            }
          }
          std::copy(cp + b * H + j0, cp + b * H + j0 + n, cell_t + b * H + j0);
        }
        std::fill(m, m + n, acc_t(0));
        if constexpr (kNative) {  // h carried as bfloat16 only (see below)
          std::copy(hb_cur + b * P + j0, hb_cur + b * P + j0 + n, hb_next + b * P + j0);
        } else if (!has_proj) {
          std::copy(h_cur + b * P + j0, h_cur + b * P + j0 + n, h_next + b * P + j0);
        }
        if (!has_proj) {
          std::fill(out_t + b * P + j0, out_t + b * P + j0 + n, scalar_t(0));
        }
        continue;
      }
      const acc_t* bias = st.bias ? st.bias + j0 : nullptr;
      if constexpr (kLowGates) {
        cell_forward<acc_t, scalar_t>(n, g, H, rec + b * 4 * n, n, bias, cp + b * H + j0, cp + b * H + j0,
                                      cell_t + b * H + j0, m, gl);
      } else if constexpr (kTraining) {
        cell_forward<acc_t, acc_t>(n, g, H, rec + b * 4 * n, n, bias, cp + b * H + j0, cp + b * H + j0,
                                   cell_t + b * H + j0, m, g);
      } else {
        cell_forward<acc_t, acc_t, false>(n, g, H, rec + b * 4 * n, n, bias, cp + b * H + j0, cp + b * H + j0,
                                          nullptr, m, nullptr);
      }
      if constexpr (kNative) {  // the next step reads h as bfloat16 (hb_next); h is not read
        at::vec::convert(m, out_t + b * P + j0, n);
        std::copy(out_t + b * P + j0, out_t + b * P + j0 + n, hb_next + b * P + j0);
      } else if (!has_proj) {
        store_h<scalar_t, acc_t>(n, m, h_next + b * P + j0, out_t + b * P + j0);
      }
    }
    if (kDirect && !has_proj) transpose_tile(B, n, h_next + j0, P, hT_next + j0 * B, B);
  }
}

template <typename scalar_t>
using StepFn = void (*)(const ForwardState<scalar_t>&, int64_t, int64_t, int64_t);

template <typename scalar_t, bool kNative, bool kTraining>
StepFn<scalar_t> step_function(Recurrence r) {
  switch (r) {
    case Recurrence::kDotRows:
      return &step_blocks<scalar_t, Recurrence::kDotRows, kNative, kTraining>;
    case Recurrence::kDirect:
      if constexpr (!kNative) return &step_blocks<scalar_t, Recurrence::kDirect, false, kTraining>;
      break;
    case Recurrence::kPanels:
      return &step_blocks<scalar_t, Recurrence::kPanels, kNative, kTraining>;
  }
  TORCH_INTERNAL_ASSERT(false, "fastlstm: no step function for this plan");
  return nullptr;
}

// The step function of the plan: its recurrence strategy and flags as template arguments.
template <typename scalar_t>
StepFn<scalar_t> step_function(const ForwardPlan& p) {
  // What step_blocks derives from its template arguments must be what the plan allocated for.
  constexpr bool kLow = !std::is_same_v<at::opmath_type<scalar_t>, scalar_t>;
  TORCH_INTERNAL_ASSERT(p.low_gates == (kLow && p.training) &&
                        p.keep_w_hh == (kLow && (p.recurrence == Recurrence::kDotRows || p.native)));
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (p.native) {
      return p.training ? step_function<scalar_t, true, true>(p.recurrence)
                        : step_function<scalar_t, true, false>(p.recurrence);
    }
  }
  return p.training ? step_function<scalar_t, false, true>(p.recurrence)
                    : step_function<scalar_t, false, false>(p.recurrence);
}

template <typename scalar_t>
LayerForwardOut forward_impl(const ForwardPlan& p, const at::Tensor& input, const at::Tensor& h0,
                             const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                             const at::Tensor& bias, const at::Tensor& w_hr, const at::Tensor& lengths) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = p.T, B = p.B, I = p.I, H = p.H, P = p.P;
  const bool has_proj = p.has_proj, training = p.training, native = p.native;
  const auto acc = input.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const bool dot_rows = p.recurrence == Recurrence::kDotRows;
  const bool direct = p.recurrence == Recurrence::kDirect;
  const int64_t nb = p.ub.nb, blocks = p.ub.count;

  const at::Tensor x_a = native ? input.reshape({T * B, I}) : input.reshape({T * B, I}).to(acc).contiguous();
  const at::Tensor w_ih_a = native ? w_ih.contiguous() : w_ih.to(acc).contiguous();
  at::Tensor w_ih_panels;
  const at::Tensor bias_a = bias.defined() ? bias.to(acc).contiguous() : at::Tensor();
  at::Tensor gates_a = cached_empty({p.chunk, B, 4 * H}, acc);
  const at::Tensor w_hh_a = p.keep_w_hh ? w_hh.contiguous() : w_hh.to(acc).contiguous();
  // Packed on every call, never cached: a cache keyed on the weight's version counter would miss
  // in-place writes through `.data`, which do not bump it.
  at::Tensor panels;
  if (native && !dot_rows) {
    panels = pack_gate_panels_vnni(w_hh_a, p.ub);
  } else if (!dot_rows && !direct) {
    panels = pack_gate_panels<acc_t>(w_hh_a, p.ub);
  }
  // block_proj: w_ih as per-block panels like w_hh's ([blocks, I, 4nb]; VNNI for native bfloat16).
  if (p.block_proj && native) {
    w_ih_panels = pack_gate_panels_vnni(w_ih_a, p.ub);
  } else if (p.block_proj) {
    w_ih_panels = pack_gate_panels<acc_t>(w_ih_a, p.ub);
  }
  const at::Tensor w_hr_a = has_proj ? w_hr.to(acc).contiguous() : at::Tensor();
  const at::Tensor w_hr_t = p.proj_blocks ? w_hr_a.t().contiguous() : at::Tensor();  // [H, P]
  at::Tensor scratch = at::empty({at::get_num_threads(), direct ? 2 : 1, B, 4 * nb}, acc);
  at::Tensor hT_buf = direct ? at::empty({2, P, B}, acc) : at::Tensor();
  if (direct) hT_buf[0].copy_(h0.t());

  at::Tensor output = cached_empty({T, B, P}, input.options());
  at::Tensor cells = training ? cached_empty({T, B, H}, acc) : at::Tensor();
  at::Tensor gates_low = p.low_gates ? cached_empty({T, B, 4 * H}, input.options()) : at::Tensor();
  at::Tensor hidden = has_proj ? cached_empty({training ? T : 1, B, H}, acc) : at::Tensor();
  at::Tensor h_buf = at::empty({2, B, P}, acc);
  h_buf[0].copy_(h0);
  at::Tensor hb_buf = native ? at::empty({2, B, P}, input.options()) : at::Tensor();
  if (native) hb_buf[0].copy_(h0);
  at::Tensor c = c0.to(acc).contiguous().clone();  // [B, H]
  at::Tensor m_step = has_proj ? at::Tensor() : at::empty({B, H}, acc);
  at::Tensor h_proj = has_proj ? at::empty({B, P}, acc) : at::Tensor();

  const Activity act = make_activity(lengths, B);
  const auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; };
  const ForwardState<scalar_t> st{
      p, act, x_a, w_ih_panels, gates_a.data_ptr<acc_t>(),
      static_cast<const acc_t*>(ptr(bias_a)),
      p.keep_w_hh ? nullptr : w_hh_a.data_ptr<acc_t>(),
      p.keep_w_hh ? w_hh_a.data_ptr<scalar_t>() : nullptr,
      ptr(panels), scratch.data_ptr<acc_t>(), static_cast<acc_t*>(ptr(hT_buf)),
      output.data_ptr<scalar_t>(), static_cast<acc_t*>(ptr(cells)), static_cast<scalar_t*>(ptr(gates_low)),
      static_cast<acc_t*>(ptr(hidden)), h_buf.data_ptr<acc_t>(), static_cast<scalar_t*>(ptr(hb_buf)),
      c.data_ptr<acc_t>(), static_cast<acc_t*>(ptr(m_step))};
  const StepFn<scalar_t> step_fn = step_function<scalar_t>(p);

  if (p.barrier) {
    run_steps_with_barrier(T, blocks, p.grain,
                           [&](int64_t step, int64_t k0, int64_t k1) { step_fn(st, step, k0, k1); });
  } else {
    const int64_t chunk = p.chunk;
    std::vector<int64_t> chunk_rows(act.sorted ? chunk : 0);  // running rows of a chunk's steps
    for (int64_t step = 0; step < T; ++step) {
      const auto v = st.view_of(step);
      const int64_t t = v.t, t_lo = v.t_lo;
      if (!p.block_proj && step % chunk == 0) {
        const int64_t n = std::min(chunk, T - step);
        at::Tensor dst = gates_a.view({chunk * B, 4 * H}).narrow(0, 0, n * B);
        // With sorted lengths, the running rows of each of the n steps only (project_input).
        if (act.sorted) {
          for (int64_t i = 0; i < n; ++i) chunk_rows[i] = act.rows(t_lo + i);
        }
        const int64_t* rows_of = act.sorted ? chunk_rows.data() : nullptr;
        if (native) {
          if (!w_ih_panels.defined()) {
            const auto* w = reinterpret_cast<const at::BFloat16*>(w_ih_a.data_ptr());
            w_ih_panels = pack_vnni_panels_nt((4 * H + 63) / 64, I, 64, [&](int64_t q, int64_t col) {
              return q * 64 + col < 4 * H ? w + (q * 64 + col) * I : nullptr;
            });
          }
          gemm_vnni_panels_parallel(n * B, 4 * H, I,
                                    reinterpret_cast<const at::BFloat16*>(x_a.data_ptr()) + t_lo * B * I, I,
                                    w_ih_panels, 64, reinterpret_cast<float*>(dst.data_ptr()), 4 * H, B,
                                    rows_of);
        } else {
          project_input<acc_t>(x_a.narrow(0, t_lo * B, n * B), w_ih_a, w_ih_panels, dst, B, rows_of);
        }
      }
      at::parallel_for(0, blocks, p.grain, [&](int64_t k0, int64_t k1) { step_fn(st, step, k0, k1); });

      if (has_proj) {
        const int64_t rows = act.rows(t);
        const acc_t* m_t = hidden.data_ptr<acc_t>() + (training ? t : 0) * B * H;
        const acc_t* h_cur = h_buf.data_ptr<acc_t>() + (step % 2) * B * P;
        acc_t* h_next = h_buf.data_ptr<acc_t>() + ((step + 1) % 2) * B * P;
        scalar_t* out_t = output.data_ptr<scalar_t>() + t * B * P;
        acc_t* hq = h_proj.data_ptr<acc_t>();
        if (p.proj_blocks) {
          gemm_nn_parallel<acc_t>(rows, P, H, m_t, H, w_hr_t.data_ptr<acc_t>(), P, hq, P);
        } else {
          gemm_blas<acc_t>(false, true, rows, P, H, acc_t(1), m_t, H, w_hr_a.data_ptr<acc_t>(), H, acc_t(0), hq, P);
        }
        for (int64_t b = 0; b < B; ++b) {
          if (act.active(b, t)) {
            store_h<scalar_t, acc_t>(P, hq + b * P, h_next + b * P, out_t + b * P);
          } else {
            std::copy(h_cur + b * P, h_cur + (b + 1) * P, h_next + b * P);
            std::fill(out_t + b * P, out_t + (b + 1) * P, scalar_t(0));
          }
        }
        if (direct) {
          acc_t* hT_next = hT_buf.data_ptr<acc_t>() + ((step + 1) % 2) * P * B;
          transpose_tile(B, P, h_next, P, hT_next, B);
        }
      }
    }
  }

  // Native bfloat16 carries h only as bfloat16 (hb_buf), the value h_buf would hold rounded.
  at::Tensor h_n = native ? hb_buf[T % 2].clone()
                          : h_buf[T % 2].to(input.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
  at::Tensor c_n = c.to(input.scalar_type());
  if (!training) {  // distinct empty tensors: a custom op's outputs must not alias one another
    return {output, h_n, c_n, at::empty({0}, input.options()), at::empty({0}, acc),
            at::empty({0}, input.options())};
  }
  at::Tensor gates = p.low_gates ? gates_low : gates_a;
  at::Tensor hidden_out = has_proj ? hidden.to(input.scalar_type()) : at::empty({0}, input.options());
  return {output, h_n, c_n, gates, cells, hidden_out};
}

}  // namespace

LayerForwardOut lstm_layer_forward_cpu(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                                       const at::Tensor& w_ih, const at::Tensor& w_hh,
                                       const std::optional<at::Tensor>& b_ih,
                                       const std::optional<at::Tensor>& b_hh,
                                       const std::optional<at::Tensor>& w_hr,
                                       const std::optional<at::Tensor>& lengths, bool reverse, bool training) {
  const LayerSizes s = check_layer_args(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths);
  at::Tensor bias;
  if (b_ih.has_value() && b_ih->defined()) bias = *b_ih;
  if (b_hh.has_value() && b_hh->defined()) bias = bias.defined() ? bias + *b_hh : *b_hh;
  const at::Tensor len = lengths_on_cpu(lengths, s.T);
  const ForwardPlan plan = make_forward_plan(s, input.scalar_type(), training, reverse);
  LayerForwardOut out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "lstm_layer_forward_cpu", [&] {
    out = forward_impl<scalar_t>(plan, input.contiguous(), h0, c0, w_ih, w_hh, bias,
                                 w_hr.has_value() ? *w_hr : at::Tensor(), len);
  });
  return out;
}

}  // namespace fastlstm::cpu
