// Row-major GEMM on raw pointers for the per-timestep matmuls, where a dispatcher round trip per step
// would cost as much as the matmul itself at small batch. Uses the Fortran BLAS that libtorch_cpu
// exports (MKL in the x86 wheels); weak symbols, so a torch without them falls back to ATen.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include "cpu/block_cache.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace fastlstm::cpu {

inline bool have_direct_blas() { return sgemm_ != nullptr && dgemm_ != nullptr; }

// C[M, N] = alpha * op(A) @ op(B) + beta * C, all row-major; op(A) is [M, K], op(B) is [K, N].
// A is [M, K] (lda >= K) or, transposed, [K, M] (lda >= M); likewise B.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
          int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {  // an empty sum; BLAS would reject the zero leading dimensions that come with it
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = 0; n < N; ++n) C[m * ldc + n] = beta == T(0) ? T(0) : beta * C[m * ldc + n];
    }
    return;
  }
  if (have_direct_blas() && M < INT32_MAX && N < INT32_MAX && K < INT32_MAX) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int m = N, n = M, k = K, la = ldb, lb = lda, lc = ldc;
    if constexpr (std::is_same_v<T, float>) {
      sgemm_(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    } else {
      dgemm_(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    }
    return;
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto a = trans_a ? at::from_blob(const_cast<T*>(A), {K, M}, {lda, 1}, opts).t()
                   : at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opts);
  auto b = trans_b ? at::from_blob(const_cast<T*>(B), {N, K}, {ldb, 1}, opts).t()
                   : at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opts);
  auto c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (beta == T(0)) {
    at::mm_out(c, a, b);
    if (alpha != T(1)) c.mul_(alpha);
  } else {
    c.addmm_(a, b, beta, alpha);
  }
}

// Whether torch's oneDNN batch-reduce GEMM micro-kernel runs fp32 here (it needs oneDNN's ukernel
// support: x86 with AVX-512 or AVX2 in torch 2.13; with ONEDNN_MAX_CPU_ISA=AVX2 it runs its AVX2
// kernels, at half the AVX-512 rate). Probed once on a small product; FASTLSTM_CPU_GEMM=blas turns
// it off (for comparisons).
inline bool brgemm_usable() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  static const bool usable = [] {
    const char* env = std::getenv("FASTLSTM_CPU_GEMM");
    if (env != nullptr && std::strcmp(env, "blas") == 0) return false;
    constexpr int n = 16;
    float a[n * n], b[n * n], c[n * n];
    for (int i = 0; i < n * n; ++i) a[i] = float(i % 7) - 3.f, b[i] = float(i % 5) - 2.f;
    try {
      at::native::cpublas::brgemm(n, n, n, n, n, n, false, a, b, c, false);
    } catch (...) {
      return false;
    }
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j < n; ++j) {
        float ref = 0;
        for (int k = 0; k < n; ++k) ref += a[i * n + k] * b[k * n + j];
        if (c[i * n + j] != ref) return false;
      }
    }
    return true;
  }();
  return usable;
#else
  return false;
#endif
}

// Whether brgemm multiplies bfloat16 natively here (oneDNN's micro-kernel with avx512_bf16 or AMX;
// elsewhere bfloat16 is computed in float32). Probed once on a small product with exact result;
// FASTLSTM_CPU_BF16=float turns it off (for comparisons).
inline bool brgemm_bf16_usable() {
  static const bool usable = [] {
    const char* env = std::getenv("FASTLSTM_CPU_BF16");
    if (env != nullptr && std::strcmp(env, "float") == 0) return false;
    // Without avx512_bf16 (or AMX) oneDNN would emulate the dot products: slower than float32.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (!__builtin_cpu_supports("avx512bf16")) return false;
#else
    return false;
#endif
    if (!brgemm_usable()) return false;
    constexpr int n = 16;
    at::BFloat16 a[n * n], b[n * n];
    float c[n * n];
    for (int i = 0; i < n; ++i) {
      for (int k = 0; k < n; ++k) {
        a[i * n + k] = float((i + k) % 7) - 3.f;
        b[(k / 2) * n * 2 + i * 2 + k % 2] = float((2 * i + k) % 5) - 2.f;  // B[k, i], VNNI layout
      }
    }
    try {
      at::native::cpublas::brgemm(n, n, n, n, n, n, false, a, b, c, true);
    } catch (...) {
      return false;
    }
    for (int i = 0; i < n; ++i) {
      for (int j = 0; j < n; ++j) {
        float ref = 0;
        for (int k = 0; k < n; ++k) ref += float((i + k) % 7 - 3) * float((2 * j + k) % 5 - 2);
        if (c[i * n + j] != ref) return false;
      }
    }
    return true;
  }();
  return usable;
}

template <typename T>
inline void transpose_tile(int64_t rows, int64_t cols, const T* src, int64_t lds, T* dst, int64_t ldd);

// bfloat16 column panels of B = w^T in brgemm's VNNI layout: [panels, K / 2, nt, 2] (K even),
// element (k, c) of panel p at ((k / 2) * nt + c) * 2 + k % 2, zero where row_of(p, c) is null.
// row_of(p, c) is the row of w ([*, K] row-major) that is column c of panel p. A pair of bfloat16 is
// one 32-bit word, so this is a transpose of 32-bit words: 16 columns' rows at a time, copied 16 words
// each into an L1 tile and transposed in registers (transpose_tile moves the words' bits unchanged).
template <typename RowOf>
at::Tensor pack_vnni_panels(int64_t panels, int64_t K, int64_t nt, const RowOf& row_of) {
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
// (the layout of pack_vnni_panels), zero past N: rows 2k and 2k + 1 interleaved.
inline at::Tensor pack_vnni_rows(const at::BFloat16* B, int64_t K, int64_t N, int64_t ldb, int64_t nt) {
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

// M rows in tiles of at most max_rows, the rows shared evenly among them: {tiles, rows per tile}.
// A short last tile left the thread that got it idle at the end (1600 rows, 2 threads: 446
// GFLOP/s, NOTES.md entry 39). The tiles depend on M alone, never on the thread count.
inline std::pair<int64_t, int64_t> row_tiles(int64_t M, int64_t max_rows) {
  const int64_t tiles = (M + max_rows - 1) / max_rows;
  return {tiles, tiles > 0 ? (M + tiles - 1) / tiles : max_rows};
}

// The row tiles of a product of M rows as {first row, rows}: row_tiles(M, max_rows), or with `rows`
// (the M rows come in M / stride blocks of stride > 0 rows, of which only the first rows[s] of block
// s take part) the row tiles of each block's rows. A block's rows in its own tiles give each row the
// sums it gets in one tile list over all rows: a row's sum does not depend on its tile.
inline std::vector<std::pair<int64_t, int64_t>> segment_tiles(int64_t M, int64_t stride, const int64_t* rows,
                                                              int64_t max_rows) {
  const int64_t segments = rows != nullptr ? M / stride : 1;
  std::vector<std::pair<int64_t, int64_t>> out;
  for (int64_t s = 0; s < segments; ++s) {
    const int64_t m = rows != nullptr ? rows[s] : M;
    const std::pair<int64_t, int64_t> t = row_tiles(m, max_rows);
    for (int64_t i = 0; i < t.first; ++i) out.emplace_back(s * stride + i * t.second, std::min(t.second, m - i * t.second));
  }
  return out;
}

// The work of a product over panels of nt columns as units of (row tile, group of `unit` columns;
// unit divides nt), row tile major: units [begin, end) as calls f(row tile, first column, columns),
// one per run of units inside one tile and one panel. Threads share out units of 16 columns, not
// whole panels, where the product runs on brgemm, whose sums for a column do not depend on how the
// columns are cut: with N = 400 in panels of 64 (six and one of 16), whole panels gave two threads
// 256 and 144 columns a step (NOTES.md entry 59). BLAS (float64; float32 without brgemm) gets whole
// panels, as its sums may depend on N and the cuts on the thread count.
template <typename F>
inline void for_column_runs(int64_t begin, int64_t end, int64_t groups, int64_t N, int64_t nt, int64_t unit,
                            const F& f) {
  for (int64_t u = begin; u < end;) {
    const int64_t m = u / groups, g = u % groups;
    const int64_t panel_end = std::min(groups, (g * unit / nt + 1) * (nt / unit));  // first group past it
    const int64_t g_end = std::min(panel_end, g + (end - u));
    f(m, g * unit, std::min(N, g_end * unit) - g * unit);
    u += g_end - g;
  }
}

// C[M, N] (ldc, float) = A[M, K] (lda, bfloat16) @ w^T, w given as VNNI panels of nt columns
// (pack_vnni_panels, K even, nt a multiple of 16); in parallel over row tiles and 16-column groups
// (for_column_runs), float32 accumulation.
// With `rows` (segment_tiles), only the first rows[s] of each block of `stride` rows: the other rows
// of C are left as they were.
inline void matmul_vnni_panels(int64_t M, int64_t N, int64_t K, const at::BFloat16* A, int64_t lda,
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

// U full vectors of c[n0, n0 + U * kV): one pass over B's rows with U independent accumulators.
template <typename T, int U>
inline void gemv_cols(int64_t K, const T* a, const T* B, int64_t ldb, T* c, int64_t n0) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t kV = Vec::size();
  Vec acc[U];
  for (int u = 0; u < U; ++u) acc[u] = Vec(T(0));
  for (int64_t k = 0; k < K; ++k) {
    const Vec ak(a[k]);
    const T* row = B + k * ldb + n0;
    for (int u = 0; u < U; ++u) acc[u] = at::vec::fmadd(ak, Vec::loadu(row + u * kV), acc[u]);
  }
  for (int u = 0; u < U; ++u) acc[u].store(c + n0 + u * kV);
}

// c[N] = a[K] @ B[K, N]: a batch-1 step. A GEMM micro-kernel spends most of its time on setup
// here; streaming B's rows once through eight vector accumulators runs at cache bandwidth.
template <typename T>
void gemv_row(int64_t N, int64_t K, const T* a, const T* B, int64_t ldb, T* c) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t kV = Vec::size();
  constexpr int kU = 8;
  int64_t n0 = 0;
  for (; n0 + kU * kV <= N; n0 += kU * kV) gemv_cols<T, kU>(K, a, B, ldb, c, n0);
  // The remaining full vectors in one pass too: a column block narrower than kU vectors (64
  // columns are 4 AVX-512 vectors) would otherwise run one latency-bound FMA chain per vector.
  switch ((N - n0) / kV) {
    case 7: gemv_cols<T, 7>(K, a, B, ldb, c, n0); break;
    case 6: gemv_cols<T, 6>(K, a, B, ldb, c, n0); break;
    case 5: gemv_cols<T, 5>(K, a, B, ldb, c, n0); break;
    case 4: gemv_cols<T, 4>(K, a, B, ldb, c, n0); break;
    case 3: gemv_cols<T, 3>(K, a, B, ldb, c, n0); break;
    case 2: gemv_cols<T, 2>(K, a, B, ldb, c, n0); break;
    case 1: gemv_cols<T, 1>(K, a, B, ldb, c, n0); break;
    default: break;
  }
  n0 += (N - n0) / kV * kV;
  if (n0 < N) {
    const int64_t cnt = N - n0;
    Vec acc(T(0));
    for (int64_t k = 0; k < K; ++k) acc = at::vec::fmadd(Vec(a[k]), Vec::loadu(B + k * ldb + n0, cnt), acc);
    acc.store(c + n0, cnt);
  }
}

// Depth of one brgemm call in gemm_serial (see there).
constexpr int64_t kKChunk = 1024;

// One register tile of gemm_tiles: C's first MR rows and columns [0, n), n <= 2 * Vec::size(), from
// MR rows of A and B's columns [0, n), k in order. kFull: n is exactly two vectors (no partial loads).
template <typename T, int MR, bool kFull>
inline void gemm_tile(int64_t n, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                      int64_t ldc) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t kV = Vec::size();
  const int64_t n0 = std::min(n, kV), n1 = n - n0;
  Vec acc0[MR], acc1[MR];
  for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = Vec(T(0));
  for (int64_t k = 0; k < K; ++k) {
    const T* b = B + k * ldb;
    const Vec b0 = kFull ? Vec::loadu(b) : Vec::loadu(b, n0);
    const Vec b1 = kFull ? Vec::loadu(b + kV) : (n1 > 0 ? Vec::loadu(b + kV, n1) : Vec(T(0)));
    for (int i = 0; i < MR; ++i) {
      const Vec a(A[i * lda + k]);
      acc0[i] = at::vec::fmadd(a, b0, acc0[i]);
      acc1[i] = at::vec::fmadd(a, b1, acc1[i]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    acc0[i].store(C + i * ldc, n0);
    if (n1 > 0) acc1[i].store(C + i * ldc + kV, n1);
  }
}

// C[M, N] (ldc) = A[M, K] (lda) @ B[K, N] (ldb) on the calling thread, in register tiles of 4 rows
// by two vectors, each sum over k in order. For float64's `direct` step products (forward_impl),
// which have no brgemm: MKL's dgemm packed both operands on every one of those small calls, a third
// of a float64 decoding step's time (NOTES.md entry 50). Fixed by the shape, so the results are too.
template <typename T>
void gemm_tiles(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
                T* C, int64_t ldc) {
  constexpr int64_t kW = 2 * at::vec::Vectorized<T>::size();
  for (int64_t c0 = 0; c0 < N; c0 += kW) {
    const int64_t n = std::min(kW, N - c0);
    int64_t r = 0;
    if (n == kW) {
      for (; r + 4 <= M; r += 4) gemm_tile<T, 4, true>(n, K, A + r * lda, lda, B + c0, ldb, C + r * ldc + c0, ldc);
    } else {
      for (; r + 4 <= M; r += 4) gemm_tile<T, 4, false>(n, K, A + r * lda, lda, B + c0, ldb, C + r * ldc + c0, ldc);
    }
    for (; r < M; ++r) gemm_tile<T, 1, false>(n, K, A + r * lda, lda, B + c0, ldb, C + r * ldc + c0, ldc);
  }
}

// C[M, N] = A[M, K] @ B[K, N] (row-major, leading dimensions given) on the calling thread: the
// building block of the parallel loops, each thread computing its own block of C.
template <typename T>
void gemm_serial(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
                 T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {  // an empty sum (the micro-kernel cannot take K = 0)
    for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, T(0));
    return;
  }
  if (M == 1) {
    gemv_row<T>(N, K, A, B, ldb, C);
    return;
  }
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if constexpr (std::is_same_v<T, float>) {
    if (brgemm_usable()) {
      // K in chunks, accumulating in C: a chunk of B's panel (kKChunk x N) stays in L1/L2 while the
      // micro-kernel sweeps the rows of A, instead of the whole panel being streamed again from L3
      // for every few rows (NOTES.md entry 23). Chunks are fixed by K alone.
      for (int64_t k0 = 0; k0 < K; k0 += kKChunk) {
        at::native::cpublas::brgemm(M, N, std::min(kKChunk, K - k0), lda, ldb, ldc, k0 > 0, A + k0,
                                    B + k0 * ldb, C, false);
      }
      return;
    }
  }
#endif
  gemm<T>(false, false, M, N, K, T(1), A, lda, B, ldb, T(0), C, ldc);  // BLAS runs serially when nested
}

// C[M, N] (ldc) = A[M, K] (lda) @ W^T for W [N, K] (ldw), M <= 2, on the calling thread: a batch-1
// or batch-2 step computed as dot products with the weight's own rows, so nothing has to be packed.
// W may be float16/bfloat16 with T = float: its rows are widened in registers, so a low-precision
// batch-1 step streams half the bytes and nothing is converted in advance.
template <typename T, typename W_t>
inline at::vec::Vectorized<T> load_weights(const W_t* w) {
  if constexpr (std::is_same_v<W_t, T>) {
    return at::vec::Vectorized<T>::loadu(w);
  } else if constexpr (std::is_same_v<W_t, at::BFloat16>) {
    at::vec::Vectorized<float> out;
    at::vec::load_fp32_from_bf16(w, out);
    return out;
  } else {
    at::vec::Vectorized<float> out;
    at::vec::load_fp32_from_fp16(w, out);
    return out;
  }
}

// The sum of a vector's lanes. float: ATen's in-register reduction. Others (double): halves added
// pairwise through a stack copy; ATen's generic vec_reduce_all for double reloads a whole vector
// per lane (a store-forwarding stall each), which made batch-1 float64 steps 0.82x torch's speed.
template <typename T>
inline T lane_sum(const at::vec::Vectorized<T>& v) {
  using Vec = at::vec::Vectorized<T>;
  if constexpr (std::is_same_v<T, float>) {
    return at::vec::vec_reduce_all<T>([](Vec x, Vec y) { return x + y; }, v);
  } else {
    alignas(64) T buf[Vec::size()];
    v.store(buf);
    for (int64_t w = Vec::size() / 2; w >= 1; w /= 2) {
      for (int64_t i = 0; i < w; ++i) buf[i] += buf[i + w];
    }
    return buf[0];
  }
}

template <typename T, int M, typename W_t>
void gemm_nt_small_impl(int64_t N, int64_t K, const T* A, int64_t lda, const W_t* W, int64_t ldw, T* C,
                        int64_t ldc) {
  using Vec = at::vec::Vectorized<T>;
  // Weight rows in flight: enough independent FMA chains to hide the FMA latency, within 16 registers.
  constexpr int64_t kV = Vec::size(), kR = M == 1 ? 8 : 4;
  const int64_t Kv = K - K % kV;
  auto dot_tail = [&](Vec acc, const T* a, const W_t* w) {
    T sum = lane_sum<T>(acc);
    for (int64_t k = Kv; k < K; ++k) sum += a[k] * static_cast<T>(w[k]);
    return sum;
  };
  int64_t n = 0;
  for (; n + kR <= N; n += kR) {
    Vec acc[M][kR];
    for (int m = 0; m < M; ++m)
      for (int64_t r = 0; r < kR; ++r) acc[m][r] = Vec(T(0));
    for (int64_t k = 0; k < Kv; k += kV) {
      Vec a[M];
      for (int m = 0; m < M; ++m) a[m] = Vec::loadu(A + m * lda + k);
      for (int64_t r = 0; r < kR; ++r) {
        const Vec w = load_weights<T>(W + (n + r) * ldw + k);
        for (int m = 0; m < M; ++m) acc[m][r] = at::vec::fmadd(a[m], w, acc[m][r]);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int64_t r = 0; r < kR; ++r)
        C[m * ldc + n + r] = dot_tail(acc[m][r], A + m * lda, W + (n + r) * ldw);
  }
  for (; n < N; ++n) {
    for (int m = 0; m < M; ++m) {
      Vec acc(T(0));
      for (int64_t k = 0; k < Kv; k += kV)
        acc = at::vec::fmadd(Vec::loadu(A + m * lda + k), load_weights<T>(W + n * ldw + k), acc);
      C[m * ldc + n] = dot_tail(acc, A + m * lda, W + n * ldw);
    }
  }
}

template <typename T, typename W_t>
void gemm_nt_small(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const W_t* W, int64_t ldw,
                   T* C, int64_t ldc) {
  TORCH_INTERNAL_ASSERT(M <= 2);
  if (M == 1) gemm_nt_small_impl<T, 1, W_t>(N, K, A, lda, W, ldw, C, ldc);
  if (M == 2) gemm_nt_small_impl<T, 2, W_t>(N, K, A, lda, W, ldw, C, ldc);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTLSTM_HAVE_DPBF16 1
// C[M, N] (ldc, float) = A[M, K] @ W^T for bfloat16 A (ldA) and W [N, K] (ldw), M <= 2, K even, on
// the calling thread: a batch-1/2 step of native bfloat16 as dot products with W's own rows, 32 pairs
// of bfloat16 per instruction (AVX512_BF16 vdpbf16ps: exact products, float32 sums), nothing packed
// or widened. Compiled for AVX512_BF16 whatever the build's instruction set; callers check
// brgemm_bf16_usable() (which checks the CPU for it) first.
// (No lambdas below: GCC does not give them the enclosing function's target. GCC 12's intrinsic
// headers warn about their own placeholder operands when inlined into a target function.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
template <int M, int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void dot_rows_bf16_block(
    int64_t K, const at::BFloat16* A, int64_t lda, const at::BFloat16* W, int64_t ldw, float* C,
    int64_t ldc) {
  __m512 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  const int64_t Kf = K - K % 32;
  for (int64_t k = 0; k < K; k += 32) {
    const __mmask32 mask = k < Kf ? ~__mmask32(0) : static_cast<__mmask32>((uint64_t(1) << (K - k)) - 1);
    __m512i a[M];
    for (int m = 0; m < M; ++m) a[m] = _mm512_maskz_loadu_epi16(mask, A + m * lda + k);
    for (int r = 0; r < R; ++r) {
      const __m512i w = _mm512_maskz_loadu_epi16(mask, W + r * ldw + k);
      for (int m = 0; m < M; ++m) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)a[m], (__m512bh)w);
    }
  }
  for (int m = 0; m < M; ++m) {
    for (int r = 0; r < R; ++r) {  // horizontal sum (_mm512_reduce_add_ps warns in GCC 12's headers)
      __m512 v = _mm512_add_ps(acc[m][r], _mm512_shuffle_f32x4(acc[m][r], acc[m][r], 0x4E));
      v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0xB1));
      __m128 x = _mm512_castps512_ps128(v);
      x = _mm_add_ps(x, _mm_movehl_ps(x, x));
      x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
      C[m * ldc + r] = _mm_cvtss_f32(x);
    }
  }
}

template <int M>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void dot_rows_bf16_impl(
    int64_t N, int64_t K, const at::BFloat16* A, int64_t lda, const at::BFloat16* W, int64_t ldw,
    float* C, int64_t ldc) {
  constexpr int kR = M == 1 ? 8 : 4;  // weight rows in flight
  int64_t n = 0;
  for (; n + kR <= N; n += kR) dot_rows_bf16_block<M, kR>(K, A, lda, W + n * ldw, ldw, C + n, ldc);
  for (; n < N; ++n) dot_rows_bf16_block<M, 1>(K, A, lda, W + n * ldw, ldw, C + n, ldc);
}

#pragma GCC diagnostic pop

inline void dot_rows_bf16(int64_t M, int64_t N, int64_t K, const at::BFloat16* A, int64_t lda,
                          const at::BFloat16* W, int64_t ldw, float* C, int64_t ldc) {
  TORCH_INTERNAL_ASSERT(M <= 2 && K % 2 == 0);
  if (M == 1) dot_rows_bf16_impl<1>(N, K, A, lda, W, ldw, C, ldc);
  if (M == 2) dot_rows_bf16_impl<2>(N, K, A, lda, W, ldw, C, ldc);
}
#endif

// B [K, N] row-major as column panels [ceil(N / nt), K, nt] (zero past N): row copies, no transpose,
// in parallel over panels.
template <typename T>
at::Tensor column_panels(const T* B, int64_t K, int64_t N, int64_t nt, const at::TensorOptions& opts) {
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

// C[M, N] (ldc) = A[M, K] (lda) @ B[K, N] (ldb), in parallel over column blocks of C.
template <typename T>
void matmul_cols(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
                 T* C, int64_t ldc) {
  constexpr int64_t nt = 64;
  const int64_t blocks = (N + nt - 1) / nt;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(1, M * nt * K));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * nt;
      gemm_serial<T>(M, std::min(nt, N - n0), K, A, lda, B + n0, ldb, C + n0, ldc);
    }
  });
}

// dst[c, r] = src[r, c] for r < rows, c < cols (leading dimensions given), in 16 x 16 blocks whose
// rows and columns stay in L1; float through at::vec's in-register transposes where the build has
// them: 16 x 16 of any shape (AVX-512), full 8 x 8 blocks (AVX2). Either is several times faster
// than element by element (on AVX2 the weight gradients' transposes had cost a third of the time of
// their GEMMs: NOTES.md entry 35).
template <typename T>
inline void transpose_tile(int64_t rows, int64_t cols, const T* src, int64_t lds, T* dst, int64_t ldd) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    if (rows < INT32_MAX && cols < INT32_MAX) {
      at::vec::transpose_mxn<float>(src, lds, dst, ldd, static_cast<int>(rows), static_cast<int>(cols));
      return;
    }
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    const int64_t r8 = rows / 8 * 8, c8 = cols / 8 * 8;
    for (int64_t r0 = 0; r0 < r8; r0 += 8) {
      for (int64_t c0 = 0; c0 < c8; c0 += 8) {
        at::vec::transpose_mxn<float, 8, 8>(src + r0 * lds + c0, lds, dst + c0 * ldd + r0, ldd);
      }
    }
    // The edges (a last partial block row or column), element by element.
    for (int64_t c = 0; c < cols; ++c) {
      for (int64_t r = c < c8 ? r8 : 0; r < rows; ++r) dst[c * ldd + r] = src[r * lds + c];
    }
    return;
  }
#endif
  constexpr int64_t kT = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kT) {
    const int64_t r1 = std::min(rows, r0 + kT);
    for (int64_t c0 = 0; c0 < cols; c0 += kT) {
      const int64_t c1 = std::min(cols, c0 + kT);
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t r = r0; r < r1; ++r) dst[c * ldd + r] = src[r * lds + c];
      }
    }
  }
}

// n rows of a row-major matrix (K values each, lds apart) as the first n of `width` columns of a
// panel (ldd): dst[k, c] = src[c, k], and 0 in columns n to width (units past the end).
template <typename T>
inline void rows_to_panel(int64_t n, int64_t width, int64_t K, const T* src, int64_t lds, T* dst,
                          int64_t ldd) {
  transpose_tile(n, K, src, lds, dst, ldd);
  for (int64_t k = 0; n < width && k < K; ++k) std::fill(dst + k * ldd + n, dst + k * ldd + width, T(0));
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
// thread count. On AMD CPUs the MKL in torch's wheels runs float32 GEMMs at about half of brgemm's
// rate (cpu-limit.md, NOTES.md entries 12 and 24).
template <typename RowOf>
void weight_grad_blocked(int64_t M, int64_t N, int64_t K, const RowOf& row_of, const float* B,
                         int64_t ldb, float* G, int64_t ldg) {
  constexpr int64_t mt = 128, nt = 64, kc = 512;  // mt: rows of a tile, at most
  if (M == 0 || N == 0) return;
  // Rows in tiles of at most mt, whole 16-row groups shared as evenly as they go (tile i
  // starts at group i * groups / m_tiles): with full tiles and a short last one (M = 650: five of
  // 128 and one of 10) the thread without the short tile did a third more work (NOTES.md entry
  // 55); M = 400 went 112, 112, 112, 64 (two threads: 224 and 176 rows), now 112, 96, 96, 96 (entry
  // 59). Column tiles are grouped the same way. A row's sums do not depend on its tile.
  const int64_t row_groups = (M + 15) / 16, m_tiles = (M + mt - 1) / mt;
  const auto tile_row = [&](int64_t i) { return std::min(M, i * row_groups / m_tiles * 16); };
  const int64_t n_tiles = (N + nt - 1) / nt;
  const int64_t threads = at::get_num_threads();
  // A group's column tiles share one transposed strip of A (all K rows: 2.8 MB at M = 112,
  // K = 6400), so the fewer groups the less transposing: as few as make the task count a multiple
  // of the thread count (one group for an even number of row tiles at two threads, was up to 8
  // tiles a group: 2.5-5% of the backward, NOTES.md entry 59). A small M (one strip: H = 128) still
  // gets its column tiles split into a task per thread, or one thread would do the whole product
  // (entry 31).
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

// w [N, K] row-major (C = A @ w^T) as column panels of B = w^T: [ceil(N / nt), K, nt], zero past N.
// w float32 and contiguous; each panel is nt rows of w transposed in register tiles (transpose_tile:
// ATen's strided copy, which this was, took 2% of a small inference call, NOTES.md entry 39).
inline at::Tensor pack_panels(const at::Tensor& w, int64_t nt) {
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

// C[M, N] (ldc) = A[M, K] (lda) @ w^T with w given as pack_panels(w, nt) (or column_panels; nt a
// multiple of 16); in parallel over row tiles and column groups (for_column_runs: 16 columns on
// brgemm and for a single row, whole panels otherwise).
// With `rows` (segment_tiles), only the first rows[s] of each block of `stride` rows: the other rows
// of C are left as they were.
template <typename T>
void matmul_panels(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const at::Tensor& panels,
                   int64_t nt, T* C, int64_t ldc, int64_t stride = 0, const int64_t* rows = nullptr) {
  TORCH_INTERNAL_ASSERT(nt % 16 == 0);
  // A tile of A stays in L2.
  const std::vector<std::pair<int64_t, int64_t>> mtiles = segment_tiles(M, stride, rows, 256);
  bool fine = M == 1;  // gemm_serial's gemv: each column summed alone
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
      gemm_serial<T>(mtiles[m].second, n, K, A + m0 * lda, lda, P + (n0 / nt) * K * nt + n0 % nt, nt,
                     C + m0 * ldc + n0, ldc);
    });
  });
}

}  // namespace fastlstm::cpu
