// What the CPU and torch offer, probed once per process: oneDNN's brgemm micro-kernel for float32,
// and for bfloat16 natively (avx512_bf16). Either can be turned off for comparisons (knobs.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include "cpu/knobs.h"

namespace fastlstm::cpu {

// From this many rows on, the float32 input projection runs on brgemm tiles rather than at::mm (and
// native bfloat16's backward products on oneDNN's matmul): the MKL in torch's wheels runs float32
// well below brgemm's rate on AMD CPUs; below this, packing w_ih would cost more than the product (a
// decoding step). The float32 backward runs on brgemm at every size.
constexpr int64_t kBrgemmMinRows = 64;

// Whether torch's oneDNN batch-reduce GEMM micro-kernel runs fp32 here (it needs oneDNN's ukernel
// support: x86 with AVX-512 or AVX2 in torch 2.13; with ONEDNN_MAX_CPU_ISA=AVX2 it runs its AVX2
// kernels, at half the AVX-512 rate). Probed once on a small product.
inline bool brgemm_usable() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  static const bool usable = [] {
    if (knobs().no_brgemm) return false;
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
// elsewhere bfloat16 is computed in float32). Probed once on a small product with exact result.
inline bool brgemm_bf16_usable() {
  static const bool usable = [] {
    if (knobs().no_native_bf16) return false;
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

}  // namespace fastlstm::cpu
