// Transposes of small row-major tiles, in registers where the build's instruction set has them.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace fastlstm::cpu {

// dst[c, r] = src[r, c] for r < rows, c < cols (leading dimensions given), in 16 x 16 blocks whose
// rows and columns stay in L1; float through at::vec's in-register transposes where the build has
// them: 16 x 16 of any shape (AVX-512), full 8 x 8 blocks (AVX2). Either is several times faster
// than element by element.
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

}  // namespace fastlstm::cpu
