// The input projection x @ w_ih^T, for all steps at once or a block's gate columns at a time.
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <cstdint>
#include <cstring>
#include <utility>

#include "cpu/block_cache.h"
#include "cpu/gemm/pack.h"
#include "cpu/gemm/parallel.h"
#include "cpu/gemm/serial.h"
#include "cpu/gemm/tiles.h"

namespace fastlstm::cpu {

// Input projection: c[M, 4H] = a[M, I] @ w^T for w [4H, I], a and c in M / B steps of B rows. With
// `rows` (sorted lengths: step s runs rows[s] rows, the rest is padding) only each step's running
// rows: the others are left unwritten (inference reads none of them; training writes them in the
// step loop). Products of kBrgemmMinRows rows or more (padding included, so that the choice does
// not depend on the lengths) go through brgemm on weight panels packed once per call (`panels`,
// filled on first use), tiles within each step's rows. The others go through ATen: with `rows`, one
// product over the running rows gathered together (a product a step ran at a few rows each, at
// half the rate: float64, B = 16, H = 1024), its rows then moved to their steps' places in c.
template <typename acc_t>
void project_input(const at::Tensor& a, const at::Tensor& w, at::Tensor& panels, at::Tensor c, int64_t B,
                   const int64_t* rows) {
  constexpr int64_t nt = 64;
  const int64_t M = a.size(0);
  if constexpr (std::is_same_v<acc_t, float>) {
    if (brgemm_usable() && M >= kBrgemmMinRows) {
      if (!panels.defined()) panels = pack_panels_nt(w, nt);
      gemm_panels_parallel<float>(M, w.size(0), a.size(1), a.data_ptr<float>(), a.size(1), panels, nt,
                                c.data_ptr<float>(), c.size(1), B, rows);
      return;
    }
  }
  if (rows == nullptr) {
    at::mm_out(c, a, w.t());
    return;
  }
  const int64_t steps = M / B, I = a.size(1), N = c.size(1);
  int64_t running = 0;
  for (int64_t s = 0; s < steps; ++s) running += rows[s];
  at::Tensor packed = cached_empty({running, I}, a.options());
  const auto* src = static_cast<const char*>(a.data_ptr());
  auto* dst = static_cast<char*>(packed.data_ptr());
  const int64_t row_bytes = I * static_cast<int64_t>(a.element_size());
  for (int64_t s = 0, r = 0; s < steps; r += rows[s], ++s) {
    std::memcpy(dst + r * row_bytes, src + s * B * row_bytes, rows[s] * row_bytes);
  }
  at::Tensor head = c.narrow(0, 0, running);
  at::mm_out(head, packed, w.t());
  // Step s's rows from [r_s, r_s + rows[s]) to [s * B, ...): r_s <= s * B, so moved from the last
  // step back, no row is overwritten before it has moved.
  auto* out = static_cast<char*>(c.data_ptr());
  const int64_t out_bytes = N * static_cast<int64_t>(c.element_size());
  for (int64_t s = steps - 1, r = running; s >= 0; --s) {
    r -= rows[s];
    if (r != s * B) std::memmove(out + s * B * out_bytes, out + r * out_bytes, rows[s] * out_bytes);
  }
}

// block_proj (forward_impl): rows [r0, r0 + M) of the input projection for block k's gate columns:
// gate q of units [j0, j0 + n) into dst[m, q * H + j0 ...] (row stride 4H), from w_ih's per-block
// panels [blocks, I, 4nb] (gate q at column q * n; VNNI pairs for native
// bfloat16, x then bfloat16). Tiles of at most 256 rows, fixed by M.
template <typename acc_t>
void project_block(bool native, int64_t M, int64_t n, int64_t I, const at::Tensor& x, int64_t r0,
                   const at::Tensor& panels, int64_t k, int64_t nb, acc_t* dst, int64_t H,
                   int64_t j0) {
  const std::pair<int64_t, int64_t> tiles = row_tiles(M, 256);
  for (int64_t tile = 0; tile < tiles.first; ++tile) {
    const int64_t m0 = tile * tiles.second, mt = std::min(tiles.second, M - m0);
    for (int64_t q = 0; q < 4; ++q) {
      acc_t* c = dst + m0 * 4 * H + q * H + j0;
      if (native) {
        const auto* a = reinterpret_cast<const at::BFloat16*>(x.data_ptr()) + (r0 + m0) * I;
        const auto* b = reinterpret_cast<const at::BFloat16*>(panels.data_ptr()) + k * I * 4 * nb + q * n * 2;
        at::native::cpublas::brgemm(mt, n, I, I, 4 * nb, 4 * H, false, a, b, reinterpret_cast<float*>(c),
                                    true);
      } else {
        gemm_nn_serial<acc_t>(mt, n, I, x.data_ptr<acc_t>() + (r0 + m0) * I, I,
                                panels.data_ptr<acc_t>() + k * I * 4 * nb + q * n, 4 * nb, c, 4 * H);
      }
    }
  }
}

}  // namespace fastlstm::cpu
