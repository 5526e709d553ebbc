// The hidden units of a step in blocks (one matmul and one fused update each, on one thread), and
// the recurrent weights packed per block.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "cpu/block_cache.h"
#include "cpu/gemm/pack.h"
#include "cpu/gemm/transpose.h"

namespace fastlstm::cpu {

// The step's hidden units in `count` blocks of whole 16-unit groups, as even as the groups allow:
// block k holds groups [k * groups / count, (k + 1) * groups / count). The count is the even number
// nearest groups / per (per: the groups a block should hold; on a tie the smaller count if it is 4
// or more and its blocks stay within 3 groups: H = 81-96 in the AVX-512 build gets 4 blocks of 1-2
// groups, not 2 of 3), one block if groups <= per. An even count gives the two halves of the blocks
// that two threads take the same number of groups, give or take one, whatever H is
// (with equal-width blocks H = 96 had split 64/32 units, H = 160 96/64). Fixed by H and the build
// alone, never by the thread count: every block computes the same sums in the same order whichever
// thread runs it.
struct UnitBlocks {
  int64_t H, groups, count, nb;  // nb: the widest block's units (the panels' stride is 4 * nb)
  int64_t j0(int64_t k) const { return 16 * (k * groups / count); }
  // Units below H: also the block's columns per gate in its panels and products, so a last group
  // that H ends inside is not multiplied past H (results bitwise the same as with padded groups).
  int64_t n(int64_t k) const { return std::min(H, j0(k + 1)) - j0(k); }
};

inline UnitBlocks unit_blocks(int64_t H, int64_t units) {
  const int64_t groups = (H + 15) / 16, per = units / 16;
  if (groups == 0) return {H, 0, 0, 16};  // H = 0, which the op accepts: no blocks
  int64_t count = 1;
  if (groups > per) {
    const int64_t lo = 2 * (groups / (2 * per)), hi = lo + 2;  // the even counts around groups / per
    const bool tie = 2 * groups == per * (lo + hi);
    count = lo >= 2 && (2 * groups < per * (lo + hi) || (tie && lo >= 4 && (groups + lo - 1) / lo <= 3)) ? lo : hi;
  }
  return {H, groups, count, 16 * ((groups + count - 1) / count)};
}

// w_hh [4H, P] as per-block panels [blocks, P, 4 * nb]: block k's column q * n + jj (n = its units)
// is gate q of hidden unit j0 + jj, so one matmul over its first 4n columns gives a block all it
// needs for its update (columns past 4n are never read). Each gate's rows of a block are transposed into their columns
// in register tiles (rows_to_panel).
template <typename acc_t>
at::Tensor pack_gate_panels(const at::Tensor& w_hh, const UnitBlocks& ub) {
  const int64_t P = w_hh.size(1), H = ub.H, nb = ub.nb;
  at::Tensor panels = cached_empty({ub.count, P, 4 * nb}, w_hh.options());
  const acc_t* w = w_hh.data_ptr<acc_t>();
  acc_t* out = panels.data_ptr<acc_t>();
  at::parallel_for(0, ub.count, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t j0 = ub.j0(k), n = ub.n(k);
      acc_t* dst = out + k * P * 4 * nb;
      for (int64_t q = 0; q < 4; ++q) {
        rows_to_panel(n, n, P, w + (q * H + j0) * P, P, dst + q * n, 4 * nb);
      }
    }
  });
  return panels;
}

// pack_gate_panels' layout for native bfloat16 (pack_vnni_panels_nt: [blocks, K / 2, 4 * nb, 2]), for
// w_hh [4H, P] and, with the per-block projection, w_ih [4H, I].
inline at::Tensor pack_gate_panels_vnni(const at::Tensor& w_rows, const UnitBlocks& ub) {
  const int64_t K = w_rows.size(1), H = ub.H;
  const auto* w = reinterpret_cast<const at::BFloat16*>(w_rows.data_ptr());
  return pack_vnni_panels_nt(ub.count, K, 4 * ub.nb, [&](int64_t k, int64_t col) {
    const int64_t n = ub.n(k), q = col / n, jj = col % n;
    return q < 4 ? w + (q * H + ub.j0(k) + jj) * K : nullptr;
  });
}

}  // namespace fastlstm::cpu
