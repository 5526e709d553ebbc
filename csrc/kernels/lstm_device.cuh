// Device-side pieces shared by the forward and backward kernels: conversions, activations, and the
// block-level matmul tile whose per-thread result layout lets each kernel finish its work (the cell
// update, the gate gradients) in registers. Framework-free, like everything under csrc/kernels/.
#pragma once

#include <cstdint>
#include <cstring>

#include "lstm_kernels.cuh"

namespace fastlstm {
namespace cuda {
namespace detail {

// A block's static __shared__ array, 16-byte aligned: `FASTLSTM_SHARED(float, x, [4][8]);` declares
// `x` as float[4][8]. The emulator (tests/emu) gives each block its own heap arena instead, so that
// out-of-bounds shared accesses are visible to AddressSanitizer.
#if defined(FASTLSTM_EMULATION)
#define FASTLSTM_SHARED(type, name, dims) \
  typedef type name##_array_type dims;     \
  auto& name = *::fastlstm_emu::shared_array<name##_array_type>()
#else
#define FASTLSTM_SHARED(type, name, dims) __shared__ __align__(16) type name dims
#endif

// Every kernel runs 128 threads and owns kTileN output columns (hidden or state units) of each of its
// kG column groups (the four gates in the forward) for kBB batch rows.
constexpr int kThreads = 128;
constexpr int kTileN = 16;
// Lets ptxas use up to 255 registers: the per-step grids are a few blocks per SM at most, and the
// default budget for 128-thread blocks made it spill the accumulators.
constexpr int kMinBlocks = 1;

// Tensor cores (mma.sync m16n8k16, float accumulation) for 16-bit types on sm_80 and newer; plain
// FMA in AccT<T> otherwise. The choice is made per compiled architecture, never at run time.
template <typename T>
struct UsesMma {
  static constexpr bool value = false;
};
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
template <>
struct UsesMma<__half> {
  static constexpr bool value = true;
};
template <>
struct UsesMma<__nv_bfloat16> {
  static constexpr bool value = true;
};
#endif

// K-slice held in shared memory per iteration, and the row pitch. The pitch keeps rows 16-byte
// aligned (vector stores) and spreads the rows one warp reads at a time over distinct banks.
template <typename T>
struct TileK {
  static constexpr int kBK = sizeof(T) == 2 ? 64 : 32;
  static constexpr int kLd = kBK + 16 / static_cast<int>(sizeof(T));
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte load
};

__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }

template <typename T>
__device__ __forceinline__ T from_acc(AccT<T> x);
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ float from_acc<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ double from_acc<double>(double x) {
  return x;
}

template <typename T>
__device__ __forceinline__ T zero() {
  return from_acc<T>(AccT<T>(0));
}

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }
__device__ __forceinline__ double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
__device__ __forceinline__ float tanh_(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_(double x) { return tanh(x); }

// The emulator (tests/emu) stands in for the tensor-core instruction with a warp collective that
// computes the same fragments on the CPU.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2]) {
#if defined(FASTLSTM_EMULATION)
  ::fastlstm_emu::mma_m16n8k16<__half>(d, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
#if defined(FASTLSTM_EMULATION)
  ::fastlstm_emu::mma_m16n8k16<__nv_bfloat16>(d, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

template <typename T>
__device__ __forceinline__ uint32_t load_pair(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// Whether a 16-byte vector load from p is aligned.
template <typename T>
__host__ __device__ inline bool aligned16(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// The block's share of an out = a @ W product, restricted to its tile: kBB batch rows from b0 and
// kTileN columns from n0 in each of kG column groups (column n of group g is global column
// g * gstride + n). Sums over k in a fixed order, so results are bitwise reproducible.
//
//   a: [B, K] row-major
//   w: kWRowsAreN: [*, ldw], W(g, n, k) = w[(g * gstride + n) * ldw + k]  (out = a @ w^T)
//      otherwise:  [K, ldw], W(g, n, k) = w[k * ldw + g * gstride + n]    (out = a @ w)
//   vec_a, vec_w: 16-byte loads are allowed (alignment and divisibility checked by the launcher)
//   K may be 0 (all sums zero).
//
// On return the thread owns the 2x2 positions (column n0 + col[c], batch row b0 + row[r]), with
// acc[g][c][r] the sum for group g. Returns false for threads that hold no final sums (an intra-block
// split over K leaves the totals with the first slice of threads); those must not write results.
template <typename T, int kG, int kBB, bool kWRowsAreN>
__device__ __forceinline__ bool block_matmul(const T* __restrict__ a, const T* __restrict__ w, int B,
                                             int N, int K, int64_t ldw, int64_t gstride, int b0,
                                             int n0, bool vec_a, bool vec_w,
                                             AccT<T> (&acc)[kG][2][2], int (&col)[2], int (&row)[2]) {
  using Acc = AccT<T>;
  constexpr int kBK = TileK<T>::kBK;
  constexpr int kLd = TileK<T>::kLd;
  constexpr int kVec = TileK<T>::kVec;
  constexpr int kRows = kG * kTileN;
  // Each slice of 4 * kBB threads covers the whole tile; small batches get several slices that split
  // the K range, so that a block always has 128 threads loading and multiplying.
  constexpr int kSliceThreads = 4 * kBB;
  constexpr int kSplit = kThreads / kSliceThreads;
  static_assert(kSplit * kSliceThreads == kThreads, "kBB must divide 32");
  constexpr bool kMma = UsesMma<T>::value;
  static_assert(kMma ? (kBK / 16) % kSplit == 0 : kBK % kSplit == 0, "K tile too small for the split");

  FASTLSTM_SHARED(T, a_s, [kBB][kLd]);
  FASTLSTM_SHARED(T, w_s, [kRows][kLd]);
  FASTLSTM_SHARED(Acc, red, [kSplit > 1 ? (kSplit - 1) * kG * 4 : 1][kSliceThreads]);

  const int tid = threadIdx.x;
  const int slice = tid / kSliceThreads;
  const int ls = tid % kSliceThreads;
  int gid = 0, tig = 0, wrow = 0;
  if constexpr (kMma) {
    // mma.m16n8k16: rows of A are our columns (w rows), columns of B are batch rows.
    const int lane = ls % 32;
    gid = lane >> 2;
    tig = lane & 3;
    wrow = (ls / 32) * 8;
    col[0] = gid;
    col[1] = gid + 8;
    row[0] = wrow + tig * 2;
    row[1] = wrow + tig * 2 + 1;
  } else {
    col[0] = ls % 8;
    col[1] = ls % 8 + 8;
    row[0] = (ls / 8) * 2;
    row[1] = (ls / 8) * 2 + 1;
  }

  float dm[kG][4];
  if constexpr (kMma) {
#pragma unroll
    for (int g = 0; g < kG; ++g)
#pragma unroll
      for (int e = 0; e < 4; ++e) dm[g][e] = 0.f;
  }
#pragma unroll
  for (int g = 0; g < kG; ++g)
#pragma unroll
    for (int c = 0; c < 2; ++c)
#pragma unroll
      for (int r = 0; r < 2; ++r) acc[g][c][r] = Acc(0);

  const T tzero = zero<T>();
  for (int k0 = 0; k0 < K; k0 += kBK) {
    if (vec_a) {
      for (int i = tid; i < kBB * (kBK / kVec); i += kThreads) {
        const int r = i / (kBK / kVec), kk = (i % (kBK / kVec)) * kVec;
        const int b = b0 + r, k = k0 + kk;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (b < B && k < K) v = *reinterpret_cast<const uint4*>(a + static_cast<int64_t>(b) * K + k);
        *reinterpret_cast<uint4*>(&a_s[r][kk]) = v;
      }
    } else {
      for (int i = tid; i < kBB * kBK; i += kThreads) {
        const int r = i / kBK, kk = i % kBK;
        const int b = b0 + r, k = k0 + kk;
        a_s[r][kk] = (b < B && k < K) ? a[static_cast<int64_t>(b) * K + k] : tzero;
      }
    }
    if constexpr (kWRowsAreN) {
      if (vec_w) {
        for (int i = tid; i < kRows * (kBK / kVec); i += kThreads) {
          const int r = i / (kBK / kVec), kk = (i % (kBK / kVec)) * kVec;
          const int g = r / kTileN, n = n0 + r % kTileN, k = k0 + kk;
          uint4 v = make_uint4(0, 0, 0, 0);
          if (n < N && k < K) v = *reinterpret_cast<const uint4*>(w + (g * gstride + n) * ldw + k);
          *reinterpret_cast<uint4*>(&w_s[r][kk]) = v;
        }
      } else {
        for (int i = tid; i < kRows * kBK; i += kThreads) {
          const int r = i / kBK, kk = i % kBK;
          const int g = r / kTileN, n = n0 + r % kTileN, k = k0 + kk;
          w_s[r][kk] = (n < N && k < K) ? w[(g * gstride + n) * ldw + k] : tzero;
        }
      }
    } else {
      // w is [K, *]: read along n (contiguous), store transposed so that the compute loop below is
      // the same for both layouts.
      if (vec_w) {
        for (int i = tid; i < (kRows / kVec) * kBK; i += kThreads) {
          const int rr = (i % (kRows / kVec)) * kVec, kk = i / (kRows / kVec);
          const int g = rr / kTileN, n = n0 + rr % kTileN, k = k0 + kk;
          uint4 v = make_uint4(0, 0, 0, 0);
          if (n < N && k < K) v = *reinterpret_cast<const uint4*>(w + k * ldw + g * gstride + n);
          T e[kVec];
          memcpy(e, &v, sizeof(v));  // not a pointer cast: that would break strict aliasing
#pragma unroll
          for (int x = 0; x < kVec; ++x) w_s[rr + x][kk] = e[x];
        }
      } else {
        for (int i = tid; i < kRows * kBK; i += kThreads) {
          const int r = i % kRows, kk = i / kRows;
          const int g = r / kTileN, n = n0 + r % kTileN, k = k0 + kk;
          w_s[r][kk] = (n < N && k < K) ? w[static_cast<int64_t>(k) * ldw + g * gstride + n] : tzero;
        }
      }
    }
    __syncthreads();

    if constexpr (kMma) {
#pragma unroll
      for (int ks0 = 0; ks0 < kBK / 16; ks0 += kSplit) {
        const int kk = (ks0 + slice) * 16 + tig * 2;
        uint32_t bf[2];
        bf[0] = load_pair(&a_s[wrow + gid][kk]);
        bf[1] = load_pair(&a_s[wrow + gid][kk + 8]);
#pragma unroll
        for (int g = 0; g < kG; ++g) {
          uint32_t af[4];
          af[0] = load_pair(&w_s[g * kTileN + gid][kk]);
          af[1] = load_pair(&w_s[g * kTileN + gid + 8][kk]);
          af[2] = load_pair(&w_s[g * kTileN + gid][kk + 8]);
          af[3] = load_pair(&w_s[g * kTileN + gid + 8][kk + 8]);
          mma_16816<T>(dm[g], af, bf);
        }
      }
    } else {
#pragma unroll 4
      for (int kk0 = 0; kk0 < kBK; kk0 += kSplit) {
        const int kk = kk0 + slice;
        const Acc a0 = to_acc(a_s[row[0]][kk]);
        const Acc a1 = to_acc(a_s[row[1]][kk]);
#pragma unroll
        for (int g = 0; g < kG; ++g)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const Acc wv = to_acc(w_s[g * kTileN + col[c]][kk]);
            acc[g][c][0] += wv * a0;
            acc[g][c][1] += wv * a1;
          }
      }
    }
    __syncthreads();
  }

  if constexpr (kMma) {
    // d[0], d[1]: column gid, batch rows tig*2 + 0/1; d[2], d[3]: column gid + 8.
#pragma unroll
    for (int g = 0; g < kG; ++g)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[g][e / 2][e % 2] = dm[g][e];
  }

  if constexpr (kSplit > 1) {
    if (slice > 0) {
#pragma unroll
      for (int g = 0; g < kG; ++g)
#pragma unroll
        for (int e = 0; e < 4; ++e) red[((slice - 1) * kG + g) * 4 + e][ls] = acc[g][e / 2][e % 2];
    }
    __syncthreads();
    if (slice == 0) {
      for (int s = 1; s < kSplit; ++s)
#pragma unroll
        for (int g = 0; g < kG; ++g)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[g][e / 2][e % 2] += red[((s - 1) * kG + g) * 4 + e][ls];
    }
  }
  return slice == 0;
}

}  // namespace detail
}  // namespace cuda
}  // namespace fastlstm
