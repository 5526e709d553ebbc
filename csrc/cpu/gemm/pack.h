// Weights packed as column panels of B in C = A @ B, the layouts the panel products (parallel.h)
// read: float32/float64 panels [ceil(N / nt), K, nt] and bfloat16 VNNI panels [ceil(N / nt), K / 2,
// nt, 2]. `_nt` packs from W [N, K] (B = W^T: the weight's rows become the panel's columns), `_nn`
// from B [K, N] itself. Panels come from the block cache (block_cache.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/block_cache.h"
#include "cpu/gemm/transpose.h"

namespace fastlstm::cpu {

// w [N, K] row-major (C = A @ w^T) as column panels of B = w^T: [ceil(N / nt), K, nt], zero past N.
// w float32 and contiguous; each panel is nt rows of w transposed in register tiles (transpose_tile),
// several times faster than ATen's strided copy.
inline at::Tensor pack_panels_nt(const at::Tensor& w, int64_t nt) {
  const int64_t N = w.size(0), K = w.size(1), blocks = (N + nt - 1) / nt;
  at::Tensor out = cached_empty({blocks, K, nt}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * nt, n = std::min(nt, N - n0);
      rows_to_panel(n, nt, K, src + n0 * K, K, dst + b * K * nt, nt);
    }
  });
  return out;
}

// B [K, N] row-major as column panels [ceil(N / nt), K, nt] (zero past N): row copies, no transpose,
// in parallel over panels.
template <typename T>
at::Tensor pack_panels_nn(const T* B, int64_t K, int64_t N, int64_t nt, const at::TensorOptions& opts) {
  const int64_t blocks = (N + nt - 1) / nt;
  at::Tensor panels = cached_empty({blocks, K, nt}, opts);
  T* out = panels.data_ptr<T>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * nt, n = std::min(nt, N - n0);
      for (int64_t k = 0; k < K; ++k) {
        T* dst = out + (blk * K + k) * nt;
        std::copy(B + k * N + n0, B + k * N + n0 + n, dst);
        std::fill(dst + n, dst + nt, T(0));
      }
    }
  });
  return panels;
}

// bfloat16 column panels of B = w^T in brgemm's VNNI layout: [panels, K / 2, nt, 2] (K even),
// element (k, c) of panel p at ((k / 2) * nt + c) * 2 + k % 2, zero where row_of(p, c) is null.
// row_of(p, c) is the row of w ([*, K] row-major) that is column c of panel p. A pair of bfloat16 is
// one 32-bit word, so this is a transpose of 32-bit words: 16 columns' rows at a time, copied 16 words
// each into an L1 tile and transposed in registers (transpose_tile moves the words' bits unchanged).
template <typename RowOf>
at::Tensor pack_vnni_panels_nt(int64_t panels, int64_t K, int64_t nt, const RowOf& row_of) {
  TORCH_INTERNAL_ASSERT(K % 2 == 0);
  const int64_t K2 = K / 2;
  at::Tensor out = cached_empty({panels, K2, nt, 2}, at::TensorOptions().dtype(at::kBFloat16));
  auto* o = reinterpret_cast<float*>(out.data_ptr());  // 32-bit words, moved as floats
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    constexpr int64_t kTile = 16;
    float tile[kTile * kTile];
    for (int64_t p = p0; p < p1; ++p) {
      float* dst = o + p * K2 * nt;
      for (int64_t c0 = 0; c0 < nt; c0 += kTile) {
        const int64_t cn = std::min(kTile, nt - c0);
        const char* src[kTile];
        for (int64_t c = 0; c < cn; ++c) src[c] = reinterpret_cast<const char*>(row_of(p, c0 + c));
        for (int64_t k0 = 0; k0 < K2; k0 += kTile) {
          const int64_t kk = std::min(kTile, K2 - k0);
          for (int64_t c = 0; c < cn; ++c) {
            if (src[c] == nullptr) {
              std::fill(tile + c * kTile, tile + c * kTile + kk, 0.f);
            } else {
              std::memcpy(tile + c * kTile, src[c] + k0 * 4, kk * 4);  // rows need only 2-byte alignment
            }
          }
          transpose_tile(cn, kk, tile, kTile, dst + k0 * nt + c0, nt);
        }
      }
    }
  });
  return out;
}

// B [K, N] (ldb, row-major) bfloat16, K even, as VNNI column panels [ceil(N / nt), K / 2, nt, 2]
// (the layout of pack_vnni_panels_nt), zero past N: rows 2k and 2k + 1 interleaved.
inline at::Tensor pack_vnni_panels_nn(const at::BFloat16* B, int64_t K, int64_t N, int64_t ldb, int64_t nt) {
  TORCH_INTERNAL_ASSERT(K % 2 == 0);
  const int64_t panels = (N + nt - 1) / nt, K2 = K / 2;
  at::Tensor out = cached_empty({panels, K2, nt, 2}, at::TensorOptions().dtype(at::kBFloat16));
  at::BFloat16* o = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * nt, n = std::min(nt, N - n0);
      for (int64_t k2 = 0; k2 < K2; ++k2) {
        at::BFloat16* dst = o + (p * K2 + k2) * nt * 2;
        const at::BFloat16* r0 = B + 2 * k2 * ldb + n0;
        const at::BFloat16* r1 = r0 + ldb;
        for (int64_t c = 0; c < n; ++c) {
          dst[2 * c] = r0[c];
          dst[2 * c + 1] = r1[c];
        }
        std::fill(dst + 2 * n, dst + 2 * nt, at::BFloat16(0.f));
      }
    }
  });
  return out;
}

}  // namespace fastlstm::cpu
