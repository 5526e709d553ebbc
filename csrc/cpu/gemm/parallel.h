// Products split among threads with at::parallel_for. The split (tiles.h) is fixed by the shapes, so
// results do not depend on the thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <utility>
#include <vector>

#include "cpu/gemm/pack.h"
#include "cpu/gemm/serial.h"
#include "cpu/gemm/tiles.h"
#include "cpu/gemm/transpose.h"

namespace fastlstm::cpu {

// C[M, N] (ldc) = A[M, K] (lda) @ B[K, N] (ldb), in parallel over column blocks of C.
template <typename T>
void gemm_nn_parallel(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
                 T* C, int64_t ldc) {
  constexpr int64_t nt = 64;
  const int64_t blocks = (N + nt - 1) / nt;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(1, M * nt * K));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * nt;
      gemm_nn_serial<T>(M, std::min(nt, N - n0), K, A, lda, B + n0, ldb, C + n0, ldc);
    }
  });
}

// C[M, N] (ldc) = A[M, K] (lda) @ w^T with w given as pack_panels_nt(w, nt) (or pack_panels_nn; nt a
// multiple of 16); in parallel over row tiles and column groups (for_column_runs: 16 columns on
// brgemm and for a single row, whole panels otherwise).
// With `rows` (segment_tiles), only the first rows[s] of each block of `stride` rows: the other rows
// of C are left as they were.
template <typename T>
void gemm_panels_parallel(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const at::Tensor& panels,
                   int64_t nt, T* C, int64_t ldc, int64_t stride = 0, const int64_t* rows = nullptr) {
  TORCH_INTERNAL_ASSERT(nt % 16 == 0);
  // A tile of A stays in L2.
  const std::vector<std::pair<int64_t, int64_t>> mtiles = segment_tiles(M, stride, rows, 256);
  bool fine = M == 1;  // gemm_nn_serial's gemv: each column summed alone
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if constexpr (std::is_same_v<T, float>) fine = fine || brgemm_usable();
#endif
  const int64_t unit = fine ? 16 : nt;
  const int64_t m_tiles = static_cast<int64_t>(mtiles.size()), groups = (N + unit - 1) / unit;
  const T* P = panels.data_ptr<T>();
  // A chunk of units should be worth a parallel fork: about 2^17 multiply-adds.
  const int64_t unit_work = (m_tiles > 0 ? mtiles[0].second : 1) * unit * K;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(1, unit_work));
  at::parallel_for(0, m_tiles * groups, grain, [&](int64_t begin, int64_t end) {
    for_column_runs(begin, end, groups, N, nt, unit, [&](int64_t m, int64_t n0, int64_t n) {
      const int64_t m0 = mtiles[m].first;
      gemm_nn_serial<T>(mtiles[m].second, n, K, A + m0 * lda, lda, P + (n0 / nt) * K * nt + n0 % nt, nt,
                     C + m0 * ldc + n0, ldc);
    });
  });
}

// C[M, N] (ldc, float) = A[M, K] (lda, bfloat16) @ w^T, w given as VNNI panels of nt columns
// (pack_vnni_panels_nt, K even, nt a multiple of 16); in parallel over row tiles and 16-column groups
// (for_column_runs), float32 accumulation.
// With `rows` (segment_tiles), only the first rows[s] of each block of `stride` rows: the other rows
// of C are left as they were.
inline void gemm_vnni_panels_parallel(int64_t M, int64_t N, int64_t K, const at::BFloat16* A, int64_t lda,
                               const at::Tensor& panels, int64_t nt, float* C, int64_t ldc,
                               int64_t stride = 0, const int64_t* rows = nullptr) {
  TORCH_INTERNAL_ASSERT(nt % 16 == 0);
  const std::vector<std::pair<int64_t, int64_t>> mtiles = segment_tiles(M, stride, rows, 256);
  const int64_t m_tiles = static_cast<int64_t>(mtiles.size()), groups = (N + 15) / 16;
  const at::BFloat16* P = panels.data_ptr<at::BFloat16>();
  at::parallel_for(0, m_tiles * groups, 1, [&](int64_t begin, int64_t end) {
    for_column_runs(begin, end, groups, N, nt, 16, [&](int64_t m, int64_t n0, int64_t n) {
      const int64_t m0 = mtiles[m].first;
      at::native::cpublas::brgemm(mtiles[m].second, n, K, lda, nt, ldc, false, A + m0 * lda,
                                  P + (n0 / nt) * K * nt + (n0 % nt) * 2, C + m0 * ldc + n0, true);
    });
  });
}

// A weight gradient, float32 on brgemm: G[N, M] (ldg) = sum over k < K of B[k, :]^T a_k, where
// B [K, N] (ldb, row-major) is the gate gradient dG read in place and a_k = row_of(k) [M] is the
// k-th row of the layer input (or of the previous outputs; row_of may pick rows from different
// tensors: h0 for each sequence's first step). That is G = B^T A, grad_w itself, computed as its
// transpose A^T B in tiles of 128 x 64 of A^T B: a task takes 128 columns of A, gathers them
// transposed for all K into a per-thread buffer [128, K] (so no transposed copy of the whole input
// exists), then for each of its 64-wide column tiles of B accumulates the whole sum over K into a
// tile that stays in cache and writes that tile, transposed, into G. Nothing is accumulated in
// memory across passes and there is no [M, N] scratch. Each tile's sum is computed the same way
// (the same K chunks) whichever task and thread computes it: the result does not depend on the
// thread count. (On AMD CPUs the MKL in torch's wheels runs float32 GEMMs well below brgemm's rate.)
template <typename RowOf>
void weight_grad_parallel(int64_t M, int64_t N, int64_t K, const RowOf& row_of, const float* B,
                         int64_t ldb, float* G, int64_t ldg) {
  constexpr int64_t mt = 128, nt = 64, kc = 512;  // mt: rows of a tile, at most
  if (M == 0 || N == 0) return;
  // Rows in tiles of at most mt, whole 16-row groups shared as evenly as they go (tile i
  // starts at group i * groups / m_tiles): full tiles and a short last one leave the thread
  // without the short tile with more work. A row's sums do not depend on its tile.
  const int64_t row_groups = (M + 15) / 16, m_tiles = (M + mt - 1) / mt;
  const auto tile_row = [&](int64_t i) { return std::min(M, i * row_groups / m_tiles * 16); };
  const int64_t n_tiles = (N + nt - 1) / nt;
  const int64_t threads = at::get_num_threads();
  // A group's column tiles share one transposed strip of A (all K rows), so the fewer groups the
  // less transposing: as few as make the task count a multiple of the thread count. A small M (one
  // strip: H = 128) still gets its column tiles split into a task per thread, or one thread would do
  // the whole product.
  const int64_t n_groups = std::min(n_tiles, threads / std::gcd(m_tiles, threads));
  std::vector<std::vector<float>> bufs(threads);
  at::parallel_for(0, m_tiles * n_groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float>& buf = bufs[at::get_thread_num() % threads];
    buf.resize(mt * std::max<int64_t>(K, 1));
    float tile[mt * nt];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t m0 = tile_row(task / n_groups), m = tile_row(task / n_groups + 1) - m0;
      const int64_t g = task % n_groups;
      const int64_t t0 = g * n_tiles / n_groups, t1 = (g + 1) * n_tiles / n_groups;  // its column tiles
      // buf[i, k] = A[k, m0 + i]: 16 rows of A at a time, transposed in registers.
      for (int64_t k0 = 0; k0 < K; k0 += 16) {
        const int64_t kk = std::min<int64_t>(16, K - k0);
        float rows[16 * mt];
        for (int64_t r = 0; r < kk; ++r) {
          const float* a = row_of(k0 + r) + m0;
          std::copy(a, a + m, rows + r * mt);
        }
        transpose_tile(kk, m, rows, mt, buf.data() + k0, K);
      }
      for (int64_t n_tile = t0; n_tile < t1; ++n_tile) {
        const int64_t n0 = n_tile * nt, n = std::min(nt, N - n0);
        if (K == 0) std::fill(tile, tile + mt * nt, 0.f);
        for (int64_t k0 = 0; k0 < K; k0 += kc) {
          at::native::cpublas::brgemm(m, n, std::min(kc, K - k0), K, ldb, nt, k0 > 0, buf.data() + k0,
                                      B + k0 * ldb + n0, tile, false);
        }
        transpose_tile(m, n, tile, nt, G + n0 * ldg + m0, ldg);
      }
    }
  });
}

}  // namespace fastlstm::cpu
