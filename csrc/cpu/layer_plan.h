// How one call of the CPU layer runs: every decision the forward and backward make from the shapes,
// the dtype, the CPU and the knobs (knobs.h), made once per call, in one place, and printable
// (FASTLSTM_CPU_PLAN=1 prints each call's plan to stderr; the op fastlstm::_lstm_layer_cpu_plan
// returns it). The kernels (layer_forward.cpp, layer_backward.cpp) only follow the plan. Every
// decision that shapes a sum (blocks, tiles, products) depends on the shapes, the dtype and the
// build alone, never on the thread count; only how the threads synchronise (`barrier`) may.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

#include "cpu/gemm/probe.h"
#include "cpu/unit_blocks.h"
#include "lstm_checks.h"

namespace fastlstm::cpu {

// How a block's recurrent product h_{t-1} @ w_hh^T is computed each step.
enum class Recurrence {
  kDotRows,  // batch <= 2: dot products with w_hh's rows (nothing packed)
  kDirect,   // rec^T = w_hh[block rows] @ h^T with w_hh read in place and h kept transposed: for
             // calls with few steps (decoding) and where brgemm is unavailable
  kPanels,   // on per-block panels of w_hh packed once per call: keeps a wide batch in full
             // vectors and pays off over many steps
};

struct ForwardPlan {
  at::ScalarType dtype;
  int64_t T, B, I, H, P;
  bool has_proj, training, reverse;
  // bfloat16 multiplied natively by brgemm (avx512_bf16): bfloat16 operands, float32 sums; else
  // float16/bfloat16 run the float32 code on converted copies.
  bool native;
  UnitBlocks ub;
  Recurrence recurrence;
  int64_t grain;  // blocks per task of a step (a task is at least about 128K multiply-adds)
  // The input projection: every `chunk` steps each block projects its own gate columns inside the
  // step loop (block_proj), or one GEMM projects `chunk` steps; float32/float64 training projects
  // all steps up front (chunk = T: that buffer becomes the saved gates).
  bool block_proj;
  int64_t chunk;
  bool keep_w_hh;    // low-precision w_hh read as it is (dot rows, native), not a float32 copy
  bool proj_blocks;  // the projection h = m @ w_hr^T in column blocks on brgemm (else BLAS)
  bool barrier;      // one parallel region with a barrier a step (barrier.h), else a fork a step
  bool low_gates;    // the saved gates are a separate float16/bfloat16 tensor (low-precision training)

  std::string describe() const;
};

// How dh_{t-1} = dG_t @ w_hh is computed each step of the backward (split among threads by columns).
enum class DhProduct {
  kVnniPanels,  // native bfloat16, batch > 2: bfloat16 brgemm on VNNI column panels of w_hh
  kPanels,      // batch > 2: brgemm (or BLAS) on column panels of w_hh
  kInPlace,     // batch <= 2: w_hh read in place
};

// How grad_w_ih and grad_w_hh (and grad_w_hr) are computed after the step loop.
enum class WeightGrad {
  kBlocked,   // float32 arithmetic on brgemm (float16 and converted bfloat16 too, and native bfloat16
              // below kBrgemmMinRows rows), tiles fixed by the shape (weight_grad_parallel)
  kNativeMm,  // native bfloat16: oneDNN's bfloat16 matmul (float32 accumulation)
  kAten,      // float64, and float32 without brgemm: at::mm / addmm
};

struct BackwardPlan {
  at::ScalarType dtype;
  int64_t T, B, I, H, P;
  bool has_proj, reverse;
  bool native;      // bfloat16 on avx512_bf16: dG is also kept rounded to bfloat16 (dG_low)
  DhProduct dh;
  WeightGrad weights;
  bool proj_blocks;  // the projection's products on brgemm column blocks (else BLAS / at::mm)
  // dG's row stride: 4H, or 64 bytes more where 4H values fill a multiple of 4 KiB (rows 4 KiB
  // apart share their cache sets; the weight gradients read dG's rows one after another).
  int64_t ldg;

  std::string describe() const;
};

ForwardPlan make_forward_plan(const LayerSizes& s, at::ScalarType dtype, bool training, bool reverse);
BackwardPlan make_backward_plan(const LayerSizes& s, at::ScalarType dtype, bool reverse);

}  // namespace fastlstm::cpu
