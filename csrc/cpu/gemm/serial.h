// Products on the calling thread: the building blocks of the parallel loops and of the recurrence's
// per-block step products.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu/gemm/blas.h"
#include "cpu/gemm/probe.h"

namespace fastlstm::cpu {

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
void gemv_nn_serial(int64_t N, int64_t K, const T* a, const T* B, int64_t ldb, T* c) {
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

// Depth of one brgemm call in gemm_nn_serial (see there).
constexpr int64_t kKChunk = 1024;

// One register tile of gemm_nn_regtiles_serial: C's first MR rows and columns [0, n), n <= 2 * Vec::size(), from
// MR rows of A and B's columns [0, n), k in order. kFull: n is exactly two vectors (no partial loads).
template <typename T, int MR, bool kFull>
inline void register_tile(int64_t n, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
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
// by two vectors, each sum over k in order. For float64's `direct` step products, which have no
// brgemm: MKL's dgemm packs both operands on every one of those small calls. Fixed by the shape, so
// the results are too.
template <typename T>
void gemm_nn_regtiles_serial(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
                T* C, int64_t ldc) {
  constexpr int64_t kW = 2 * at::vec::Vectorized<T>::size();
  for (int64_t c0 = 0; c0 < N; c0 += kW) {
    const int64_t n = std::min(kW, N - c0);
    int64_t r = 0;
    if (n == kW) {
      for (; r + 4 <= M; r += 4) register_tile<T, 4, true>(n, K, A + r * lda, lda, B + c0, ldb, C + r * ldc + c0, ldc);
    } else {
      for (; r + 4 <= M; r += 4) register_tile<T, 4, false>(n, K, A + r * lda, lda, B + c0, ldb, C + r * ldc + c0, ldc);
    }
    for (; r < M; ++r) register_tile<T, 1, false>(n, K, A + r * lda, lda, B + c0, ldb, C + r * ldc + c0, ldc);
  }
}

// C[M, N] = A[M, K] @ B[K, N] (row-major, leading dimensions given) on the calling thread: the
// building block of the parallel loops, each thread computing its own block of C.
template <typename T>
void gemm_nn_serial(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
                 T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {  // an empty sum (the micro-kernel cannot take K = 0)
    for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, T(0));
    return;
  }
  if (M == 1) {
    gemv_nn_serial<T>(N, K, A, B, ldb, C);
    return;
  }
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if constexpr (std::is_same_v<T, float>) {
    if (brgemm_usable()) {
      // K in chunks, accumulating in C: a chunk of B's panel (kKChunk x N) stays in L1/L2 while the
      // micro-kernel sweeps the rows of A, instead of the whole panel being streamed again from L3
      // for every few rows. Chunks are fixed by K alone.
      for (int64_t k0 = 0; k0 < K; k0 += kKChunk) {
        at::native::cpublas::brgemm(M, N, std::min(kKChunk, K - k0), lda, ldb, ldc, k0 > 0, A + k0,
                                    B + k0 * ldb, C, false);
      }
      return;
    }
  }
#endif
  gemm_blas<T>(false, false, M, N, K, T(1), A, lda, B, ldb, T(0), C, ldc);  // BLAS runs serially when nested
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
// per lane (a store-forwarding stall each).
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
void gemm_nt_rows_impl(int64_t N, int64_t K, const T* A, int64_t lda, const W_t* W, int64_t ldw, T* C,
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
void gemm_nt_rows_serial(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const W_t* W, int64_t ldw,
                   T* C, int64_t ldc) {
  TORCH_INTERNAL_ASSERT(M <= 2);
  if (M == 1) gemm_nt_rows_impl<T, 1, W_t>(N, K, A, lda, W, ldw, C, ldc);
  if (M == 2) gemm_nt_rows_impl<T, 2, W_t>(N, K, A, lda, W, ldw, C, ldc);
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

inline void gemm_nt_rows_bf16_serial(int64_t M, int64_t N, int64_t K, const at::BFloat16* A, int64_t lda,
                          const at::BFloat16* W, int64_t ldw, float* C, int64_t ldc) {
  TORCH_INTERNAL_ASSERT(M <= 2 && K % 2 == 0);
  if (M == 1) dot_rows_bf16_impl<1>(N, K, A, lda, W, ldw, C, ldc);
  if (M == 2) dot_rows_bf16_impl<2>(N, K, A, lda, W, ldw, C, ldc);
}
#endif

}  // namespace fastlstm::cpu
