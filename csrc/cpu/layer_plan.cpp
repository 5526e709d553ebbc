// The decisions of layer_plan.h. Why each is made the way it is; the measurements behind them are in
// benchmarks/NOTES.md and docs/cpu-design.md.
#include "cpu/layer_plan.h"

#include <algorithm>
#include <cstdio>
#include <sstream>

#include "cpu/barrier.h"
#include "cpu/gemm/probe.h"
#include "cpu/knobs.h"

namespace fastlstm::cpu {
namespace {

using Choice = Knobs::Choice;

// Blocks of about 32 units (128 columns) in the AVX-512 build, 64 otherwise: with AVX-512 the
// smaller blocks keep small-H inference faster when the machine is busy; the AVX2 build runs
// slower with them. The sums are bitwise those of 64-unit blocks.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kBlockUnits = 32;
#else
constexpr int64_t kBlockUnits = 64;
#endif

bool is_low_precision(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// Whether the recurrent product reads w_hh in place rather than from panels packed for the call.
// Packing costs about one strided pass over w_hh; the panels repay it when there are many steps.
// float64 (no brgemm) reads w_hh in place up to 32 rows at any length: there the in-place product
// runs in register tiles (gemm_nn_regtiles_serial), while a packed block's product is a BLAS call
// that copies h on every call.
bool use_direct_recurrence(int64_t T, int64_t B, bool float64) {
  if (knobs().whh != Choice::kAuto) return knobs().whh == Choice::kFirst;
  if (!brgemm_usable()) return true;
  return T <= 4 || (float64 && B <= 32);
}

// Whether a call projects its input block by block inside the step loop: where the recurrence runs
// on packed panels in at least two tasks a step and w_ih and w_hh together take at most 8 MB (above
// that, the steps' weights and w_ih evict each other from L3). float32/float64 training keeps the
// projection of all steps up front (`all_steps`: its buffer becomes the saved gates); float16 and
// bfloat16 training, whose saved gates are a separate tensor, projects block by block as inference
// does. The knob overrides the choice among the calls that can take either; results are bitwise
// the same.
bool use_block_projection(bool all_steps, bool unpacked, int64_t blocks, int64_t grain,
                          int64_t weight_bytes) {
  if (all_steps || unpacked || blocks < 2 * grain) return false;
  if (knobs().proj != Choice::kAuto) return knobs().proj == Choice::kFirst;
  return weight_bytes <= (int64_t(8) << 20);
}

const char* name(Recurrence r) {
  switch (r) {
    case Recurrence::kDotRows: return "dot-rows";
    case Recurrence::kDirect: return "direct";
    case Recurrence::kPanels: return "panels";
  }
  return "?";
}

const char* name(DhProduct d) {
  switch (d) {
    case DhProduct::kVnniPanels: return "vnni-panels";
    case DhProduct::kPanels: return "panels";
    case DhProduct::kInPlace: return "in-place";
  }
  return "?";
}

const char* name(WeightGrad w) {
  switch (w) {
    case WeightGrad::kBlocked: return "blocked";
    case WeightGrad::kNativeMm: return "native-mm";
    case WeightGrad::kAten: return "aten";
  }
  return "?";
}

}  // namespace

ForwardPlan make_forward_plan(const LayerSizes& s, at::ScalarType dtype, bool training, bool reverse) {
  ForwardPlan p;
  p.dtype = dtype;
  p.T = s.T, p.B = s.B, p.I = s.I, p.H = s.H, p.P = s.P;
  p.has_proj = s.has_proj, p.training = training, p.reverse = reverse;
  const bool low = is_low_precision(dtype);
  const bool float32 = dtype == at::kFloat || low;  // the arithmetic's dtype
  const int64_t acc_bytes = dtype == at::kDouble ? 8 : 4;
  p.native = dtype == at::kBFloat16 && !s.has_proj && s.I % 2 == 0 && s.P % 2 == 0 && brgemm_bf16_usable();
  p.ub = unit_blocks(s.H, kBlockUnits);
  const bool dot_rows = s.B <= 2;
  const bool direct = !dot_rows && !p.native && use_direct_recurrence(s.T, s.B, dtype == at::kDouble);
  p.recurrence = dot_rows ? Recurrence::kDotRows : direct ? Recurrence::kDirect : Recurrence::kPanels;
  p.grain = std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(1, s.B * 4 * p.ub.nb * s.P));
  const int64_t weight_bytes = (s.I + s.P) * 4 * s.H * (p.native ? 2 : acc_bytes);
  p.block_proj = use_block_projection(training && !low, dot_rows || direct, p.ub.count, p.grain, weight_bytes) &&
                 (p.native || (float32 && brgemm_usable()));
  const int64_t T1 = std::max<int64_t>(s.T, 1), B1 = std::max<int64_t>(1, s.B);
  const int64_t row_values = std::max<int64_t>(1, s.B * 4 * s.H);
  // A block-projection chunk: about 1 MB of pre-activations for all blocks, at least 256 rows.
  const int64_t pchunk =
      p.block_proj ? std::clamp<int64_t>(std::max<int64_t>((int64_t(1) << 18) / row_values, (256 + s.B - 1) / B1), 1, T1)
                   : 1;
  // Else a chunk of about 16 MB of pre-activations.
  p.chunk = training && !low ? s.T
          : p.block_proj     ? pchunk
                             : std::clamp<int64_t>((int64_t(1) << 22) / row_values, 1, T1);
  p.keep_w_hh = low && (dot_rows || p.native);
  p.proj_blocks = s.has_proj && float32 && brgemm_usable();
  // The barrier for the calls that do all their work in the blocks.
  p.barrier = p.block_proj && !s.has_proj && s.T > 1 && knobs().sync != Choice::kSecond &&
              step_barrier_available();
  p.low_gates = low && training;
  if (knobs().print_plan) fprintf(stderr, "fastlstm: %s\n", p.describe().c_str());
  return p;
}

BackwardPlan make_backward_plan(const LayerSizes& s, at::ScalarType dtype, bool reverse) {
  BackwardPlan p;
  p.dtype = dtype;
  p.T = s.T, p.B = s.B, p.I = s.I, p.H = s.H, p.P = s.P;
  p.has_proj = s.has_proj, p.reverse = reverse;
  const bool float32 = dtype != at::kDouble;
  const int64_t acc_bytes = dtype == at::kDouble ? 8 : 4;
  p.native = dtype == at::kBFloat16 && brgemm_bf16_usable();
  p.dh = p.native && s.B > 2 ? DhProduct::kVnniPanels : s.B > 2 ? DhProduct::kPanels : DhProduct::kInPlace;
  p.weights = p.native && s.T * s.B >= kBrgemmMinRows ? WeightGrad::kNativeMm
            : float32 && brgemm_usable()              ? WeightGrad::kBlocked
                                                      : WeightGrad::kAten;
  p.proj_blocks = s.has_proj && float32 && brgemm_usable();
  p.ldg = (4 * s.H * acc_bytes) % 4096 == 0 ? 4 * s.H + 64 / acc_bytes : 4 * s.H;
  if (knobs().print_plan) fprintf(stderr, "fastlstm: %s\n", p.describe().c_str());
  return p;
}

std::string ForwardPlan::describe() const {
  std::ostringstream s;
  s << "forward " << c10::toString(dtype) << " T=" << T << " B=" << B << " I=" << I << " H=" << H
    << " P=" << P << (has_proj ? " proj" : "") << (training ? " training" : " inference")
    << (reverse ? " reverse" : "") << ": recurrence=" << name(recurrence)
    << (native ? " native-bf16" : "") << " blocks=" << ub.count << "x" << ub.nb
    << " grain=" << grain << " projection=" << (block_proj ? "block" : "chunk")
    << " chunk=" << chunk << " sync=" << (barrier ? "barrier" : "fork")
    << (keep_w_hh ? " w_hh-as-is" : "") << (proj_blocks ? " proj-blocks" : "")
    << (low_gates ? " low-gates" : "") << " [" << knobs().describe() << "]";
  return s.str();
}

std::string BackwardPlan::describe() const {
  std::ostringstream s;
  s << "backward " << c10::toString(dtype) << " T=" << T << " B=" << B << " I=" << I << " H=" << H
    << " P=" << P << (has_proj ? " proj" : "") << (reverse ? " reverse" : "")
    << ": dh=" << name(dh) << " weights=" << name(weights) << (native ? " native-bf16" : "")
    << (proj_blocks ? " proj-blocks" : "") << " ldg=" << ldg << " [" << knobs().describe() << "]";
  return s.str();
}

}  // namespace fastlstm::cpu
