// Prototype for issue 14: a persistent LSTM forward (one layer, one direction, inference) in one
// launch for all T steps, timed against its own CPU reference. Standalone: CUDA runtime only, no
// torch, no fastlstm headers; the design is benchmarks/NOTES-gpu.md, section 3.1 (grid mode).
//
// STATUS: NEVER RUN ON A GPU. Compiled here for sm_90 and sm_80 without a GPU, and its kernel run
// under the CUDA emulator (all three math paths, H 64/128, B 1/3/8/20, chunked K, several
// tiles per warp: every configuration within its error bound; with the grid barrier removed,
// every one fails). Nothing about its speed, or its correctness on a GPU, is known. The first GPU session runs it through
// research/gpu/run_persistent_prototype.sh and records what it prints.
//
//   nvcc -O3 -std=c++17 -arch=sm_90 -o persistent_prototype research/gpu/persistent_prototype.cu
//   ./persistent_prototype [--check] [--steps T] [--reps R] [--csv FILE]
//
// Under the CUDA emulator of tests/emu (no GPU; checks the kernel's logic, not its speed or the
// memory model; research/gpu/README.md): bash research/gpu/emulate.sh persistent_prototype --emu
//
// What one launch does. Block k of G owns hidden units [k U, (k + 1) U) (U = H / G) and keeps the
// four gate rows of those units of w_hh in shared memory for the whole sequence. Each step it
// reads h_{t-1} [B, H] from global memory (L2; double-buffered by step parity) chunk by chunk into
// shared memory, computes its 4U x B pre-activations (float32 FMA, TF32 mma.sync m16n8k8, or bf16
// mma.sync m16n8k16, float32 accumulation), adds x_t W_ih^T + b (precomputed, as the real op does
// with one GEMM before the loop), updates c (kept in shared memory) and h, publishes its slice of
// h_t and waits at a grid barrier (arrival counter, release/acquire; cooperative launch so that
// every block is resident). Split-K across threads/warps when the block has fewer outputs than
// threads (small batch); partial sums are reduced in a fixed order, so the result is bitwise the
// same run to run.
//
// Checks (every configuration): the output y [T, B, H] is poisoned (NaN) before the checked run,
// so an unwritten element fails; the first min(T, 8) steps are compared with a float64 CPU
// recurrence on the same (rounded) weights and inputs: relative Frobenius error below 1e-5 for
// FMA, 2e-3 for TF32 and 2e-2 for bf16 (h is rounded to bf16 every step, as a bf16 LSTM does).
// Times: cudaEvent around one launch of T steps, the median of R launches, divided by T. They
// exclude the input projection (one GEMM before the loop); compare with cuDNN's whole-call time
// from bench_lstm.py only after adding that GEMM's time.
//
// Exit status: 0 all configurations passed their check; 1 a check failed or a CUDA error;
// 2 no CUDA device; 3 bad arguments.

#ifdef FASTLSTM_EMULATION
#include "host_api.h"  // tests/emu: runs the kernel's logic on the CPU; --emu picks its grid
#else
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#endif
#include "bench_util.h"  // CK, option parsing, UTC time, the flag barrier's primitives

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <random>
#include <string>
#include <vector>

namespace {

enum class Math { kFma, kTf32, kBf16 };

const char* math_name(Math m) {
  return m == Math::kFma ? "fp32-fma" : m == Math::kTf32 ? "fp32-tf32" : "bf16-mma";
}

template <Math M>
struct Cfg;
template <>
struct Cfg<Math::kFma> {
  using T = float;
  static constexpr int kPad = 1;  // odd pitch: consecutive batch rows in distinct banks
};
template <>
struct Cfg<Math::kTf32> {
  using T = float;
  static constexpr int kPad = 4;  // pitch = 4 mod 32 words: the 8 fragment rows in distinct banks
};
template <>
struct Cfg<Math::kBf16> {
  using T = __nv_bfloat16;
  static constexpr int kPad = 8;  // 16 bytes
};

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Split-K ways for a block of R gate rows and a batch width of Bp: FMA splits K over threads when
// the block has fewer outputs than threads, mma over warps when it has fewer 16x8 tiles than warps.
// Host and device must agree (the host sizes shared memory with it).
template <Math M>
__host__ __device__ inline int split_ways(int R, int Bp) {
  const int units = M == Math::kFma ? R * Bp : (R / 16) * (Bp / 8);
  const int workers = M == Math::kFma ? kThreads : kWarps;
  return units >= workers ? 1 : workers / units;
}

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + expf(-x)); }

#ifdef FASTLSTM_EMULATION
inline uint32_t tf32_bits(float x) {  // cvt.rna: nearest, ties away from zero, 10 mantissa bits
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return (u + 0x1000u) & 0xFFFFE000u;
}
#else
__device__ __forceinline__ uint32_t tf32_bits(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}
#endif

// Global memory, L2 only: h is written by one SM and read by all the others.
__device__ __forceinline__ void st_cg(float* p, float v) { __stcg(p, v); }
__device__ __forceinline__ void st_cg(__nv_bfloat16* p, __nv_bfloat16 v) {
  __stcg(reinterpret_cast<unsigned short*>(p), __bfloat16_as_ushort(v));
}
__device__ __forceinline__ float ld_cg(const float* p) { return __ldcg(p); }
__device__ __forceinline__ __nv_bfloat16 ld_cg(const __nv_bfloat16* p) {
  return __ushort_as_bfloat16(__ldcg(reinterpret_cast<const unsigned short*>(p)));
}

// Kernel arguments. Row-major; gate order i, f, g, o as in torch.nn.LSTM.
template <typename T>
struct Params {
  int T_steps, B, H;
  int U;        // hidden units per block; 4U is a multiple of 16 for the mma paths
  int KC;       // K chunk staged in shared memory per pass (divides H, multiple of 16)
  int Bp;       // batch width of the block's outputs: B (FMA), B rounded up to 8 (mma N tile);
                // rows >= B are zero
  const T* w_hh;       // [4H, H]
  const float* xg;     // [T, B, 4H] x_t W_ih^T + b_ih + b_hh
  const float* c0;     // [B, H]
  T* hbuf;             // [2, B, H] exchanged h; buffer 1 holds h0 at launch (step -1)
  T* y;                // [T, B, H] output
  float* c_n;          // [B, H] final c
  unsigned* counter;   // [1] barrier arrivals, zero at launch
};

// Shared memory (host computes the same sizes in smem_bytes()):
//   w_s   [4U][H + pad]   T      this block's gate rows; local row q U + u = global row q H + k U + u
//   h_s   [Bp][KC + pad]  T      the current K chunk of h_{t-1}
//   red_s [S][4U * Bp]    float  split-K partial sums (S ways), then reduced in order
//   c_s   [U * Bp]        float  cell state of this block's units
template <Math M>
__global__ void __launch_bounds__(kThreads, 1) lstm_persistent_forward(Params<typename Cfg<M>::T> p) {
  using T = typename Cfg<M>::T;
  constexpr int kPad = Cfg<M>::kPad;
#ifdef FASTLSTM_EMULATION
  unsigned char* smem_raw = static_cast<unsigned char*>(fastlstm_emu::dynamic_shared());
#else
  extern __shared__ __align__(16) unsigned char smem_raw[];
#endif
  const int H = p.H, U = p.U, B = p.B, Bp = p.Bp, KC = p.KC, G = gridDim.x, k = blockIdx.x;
  const int R = 4 * U;  // gate rows of this block
  const int ldw = H + kPad, ldh = KC + kPad;
  T* w_s = reinterpret_cast<T*>(smem_raw);
  T* h_s = w_s + static_cast<size_t>(R) * ldw;
  float* red_s = reinterpret_cast<float*>(
      reinterpret_cast<uintptr_t>(h_s + static_cast<size_t>(Bp) * ldh + 3) & ~uintptr_t(3));
  const int O = R * Bp;  // outputs of the block per step
  const int S = split_ways<M>(R, Bp);
  float* c_s = red_s + static_cast<size_t>(S) * O;
  const int tid = threadIdx.x;

  for (int i = tid; i < R * H; i += kThreads) {
    const int r = i / H, kk = i % H;
    const int grow = (r / U) * H + k * U + r % U;
    w_s[r * ldw + kk] = p.w_hh[static_cast<size_t>(grow) * H + kk];
  }
  for (int i = tid; i < U * Bp; i += kThreads) {
    const int u = i / Bp, b = i % Bp;
    c_s[i] = b < B ? p.c0[static_cast<size_t>(b) * H + k * U + u] : 0.f;
  }
  __syncthreads();

  for (int t = 0; t < p.T_steps; ++t) {
    const T* hprev = p.hbuf + static_cast<size_t>((t + 1) & 1) * B * H;  // step t-1's buffer
    for (int k0 = 0; k0 < H; k0 += KC) {
      for (int i = tid; i < Bp * KC; i += kThreads) {
        const int b = i / KC, kk = i % KC;
        h_s[b * ldh + kk] = b < B ? ld_cg(hprev + static_cast<size_t>(b) * H + k0 + kk) : from_f<T>(0.f);
      }
      __syncthreads();
      const bool first = k0 == 0;
      if constexpr (M == Math::kFma) {
        const int slots = kThreads / S;
        const int s = tid / slots, oi = tid % slots;
        if (s < S) {
          for (int o = oi; o < O; o += slots) {
            const int r = o / Bp, b = o % Bp;
            float acc = 0.f;
            const T* wr = w_s + r * ldw + k0;
            const T* hr = h_s + b * ldh;
            for (int kk = s; kk < KC; kk += S) acc = fmaf(wr[kk], hr[kk], acc);
            float& dst = red_s[s * O + o];
            dst = first ? acc : dst + acc;
          }
        }
      } else {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(FASTLSTM_EMULATION)
        const int warp = tid / 32, lane = tid % 32, gid = lane >> 2, tig = lane & 3;
        const int tiles = (R / 16) * (Bp / 8);
        const int slots = kWarps / S;  // warps per K slice
        const int s = warp / slots, wi = warp % slots;
        constexpr int kK = M == Math::kBf16 ? 16 : 8;  // K per mma
        if (s < S) {
          for (int tile = wi; tile < tiles; tile += slots) {
            const int m0 = (tile / (Bp / 8)) * 16, n0 = (tile % (Bp / 8)) * 8;
            float d[4] = {0.f, 0.f, 0.f, 0.f};
            for (int kk = s * kK; kk < KC; kk += S * kK) {
              if constexpr (M == Math::kBf16) {
                const T* a = w_s + (m0 + gid) * ldw + k0 + kk + tig * 2;
                const T* bb = h_s + (n0 + gid) * ldh + kk + tig * 2;
                uint32_t af[4], bf[2];
                af[0] = *reinterpret_cast<const uint32_t*>(a);
                af[1] = *reinterpret_cast<const uint32_t*>(a + 8 * ldw);
                af[2] = *reinterpret_cast<const uint32_t*>(a + 8);
                af[3] = *reinterpret_cast<const uint32_t*>(a + 8 * ldw + 8);
                bf[0] = *reinterpret_cast<const uint32_t*>(bb);
                bf[1] = *reinterpret_cast<const uint32_t*>(bb + 8);
#ifdef FASTLSTM_EMULATION
                fastlstm_emu::mma_m16n8k16<__nv_bfloat16>(d, af, bf);
#else
                asm volatile(
                    "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
                    "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                    : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                    : "r"(af[0]), "r"(af[1]), "r"(af[2]), "r"(af[3]), "r"(bf[0]), "r"(bf[1]));
#endif
              } else {
                const float* a = reinterpret_cast<const float*>(w_s) + (m0 + gid) * ldw + k0 + kk + tig;
                const float* bb = reinterpret_cast<const float*>(h_s) + (n0 + gid) * ldh + kk + tig;
                uint32_t af[4], bf[2];
                af[0] = tf32_bits(a[0]);
                af[1] = tf32_bits(a[8 * ldw]);
                af[2] = tf32_bits(a[4]);
                af[3] = tf32_bits(a[8 * ldw + 4]);
                bf[0] = tf32_bits(bb[0]);
                bf[1] = tf32_bits(bb[4]);
#ifdef FASTLSTM_EMULATION
                fastlstm_emu::mma_m16n8k8_tf32(d, af, bf);
#else
                asm volatile(
                    "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, "
                    "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                    : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                    : "r"(af[0]), "r"(af[1]), "r"(af[2]), "r"(af[3]), "r"(bf[0]), "r"(bf[1]));
#endif
              }
            }
            // d[0], d[1]: row m0 + gid, batch n0 + 2 tig (+1); d[2], d[3]: row m0 + gid + 8.
            float* dst = red_s + s * O;
            const int o0 = (m0 + gid) * Bp + n0 + tig * 2, o1 = o0 + 8 * Bp;
            dst[o0] = first ? d[0] : dst[o0] + d[0];
            dst[o0 + 1] = first ? d[1] : dst[o0 + 1] + d[1];
            dst[o1] = first ? d[2] : dst[o1] + d[2];
            dst[o1 + 1] = first ? d[3] : dst[o1 + 1] + d[3];
          }
        }
#endif
      }
      __syncthreads();
    }

    // Cell update for (u, b); publish h_t.
    T* hnext = p.hbuf + static_cast<size_t>(t & 1) * B * H;
    const float* xg_t = p.xg + static_cast<size_t>(t) * B * 4 * H;
    for (int i = tid; i < U * B; i += kThreads) {
      const int b = i / U, u = i % U, j = k * U + u;  // consecutive threads: consecutive j
      float pre[4];
      for (int q = 0; q < 4; ++q) {
        const int o = (q * U + u) * Bp + b;
        float v = xg_t[static_cast<size_t>(b) * 4 * H + q * H + j];
        for (int s = 0; s < S; ++s) v += red_s[s * O + o];
        pre[q] = v;
      }
      const float ig = sigmoidf_(pre[0]), fg = sigmoidf_(pre[1]), gg = tanhf(pre[2]), og = sigmoidf_(pre[3]);
      const float c = fg * c_s[u * Bp + b] + ig * gg;
      c_s[u * Bp + b] = c;
      const T h = from_f<T>(og * tanhf(c));
      st_cg(hnext + static_cast<size_t>(b) * H + j, h);
      p.y[(static_cast<size_t>(t) * B + b) * H + j] = h;
    }
    // Grid barrier: the block's h_t stores happen before thread 0's release (bar.sync, then a
    // GPU-scope release is cumulative); other threads see the other blocks' stores after the
    // acquire and the second bar.sync.
    __syncthreads();
    if (tid == 0) {
      arrive_release(p.counter);
      const unsigned target = static_cast<unsigned>(t + 1) * static_cast<unsigned>(G);
      while (load_acquire(p.counter) < target) {
      }
    }
    __syncthreads();
  }
  for (int i = tid; i < U * B; i += kThreads) {
    const int u = i / B, b = i % B;
    p.c_n[static_cast<size_t>(b) * H + k * U + u] = c_s[u * Bp + b];
  }
}

// ---- host ----

// The cooperative launch (every block resident, which the grid barrier needs).
template <class P>
cudaError_t launch_coop(void (*kernel)(P), int G, void** args, size_t smem) {
#ifdef FASTLSTM_EMULATION
  return cudaLaunchCooperativeKernel(kernel, dim3(G), dim3(kThreads), args, smem);
#else
  return cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel), dim3(G), dim3(kThreads), args, smem,
                                     nullptr);
#endif
}

template <Math M>
int batch_width(int B) {
  return M == Math::kFma ? B : (B + 7) / 8 * 8;
}

// Host-side conversions of the kernel's storage types.
inline float to_float(float x) { return x; }
inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
T from_float(float x);
template <>
float from_float<float>(float x) {
  return x;
}
template <>
__nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

float bf16_round(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;  // round to nearest even (finite inputs)
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

struct Config {
  Math math;
  int H, B;
};

struct Result {
  Config cfg;
  int G = 0, U = 0, KC = 0, S = 0;
  size_t smem = 0;
  double us_med = 0, us_min = 0, rel_err = -1;
  bool ok = false;
  std::string note;
};

struct Runner {
  cudaDeviceProp prop{};
  int steps = 100, reps = 5;

  // Block layout for (H, B): the fewest units per block (a multiple of 4, dividing H) such that
  // H / U blocks are resident, then the largest K chunk whose shared memory fits.
  template <Math M>
  bool layout(int H, int B, int& U, int& KC, int& S, size_t& smem) {
    using T = typename Cfg<M>::T;
    const int Bp = batch_width<M>(B);
    for (U = 4; U <= H; U += 4) {
      if (H % U == 0 && H / U <= prop.multiProcessorCount) break;
    }
    if (U > H) return false;
    const int R = 4 * U, O = R * Bp;
    S = split_ways<M>(R, Bp);
    for (KC = H; KC >= 16; KC /= 2) {
      if (H % KC != 0) continue;
      const size_t w = static_cast<size_t>(R) * (H + Cfg<M>::kPad) * sizeof(T);
      const size_t h = static_cast<size_t>(Bp) * (KC + Cfg<M>::kPad) * sizeof(T);
      smem = w + h + 16 + (static_cast<size_t>(S) * O + static_cast<size_t>(U) * Bp) * 4;
      if (smem <= prop.sharedMemPerBlockOptin) return true;
    }
    return false;
  }

  template <Math M>
  Result run(int H, int B) {
    using T = typename Cfg<M>::T;
    Result res;
    res.cfg = {M, H, B};
    int U, KC, S;
    size_t smem;
    if (H % 16 != 0 || !layout<M>(H, B, U, KC, S, smem)) {
      res.note = "SKIPPED: no layout fits shared memory";
      return res;
    }
    const int G = H / U, Bp = batch_width<M>(B);
    res.G = G;
    res.U = U;
    res.KC = KC;
    res.S = S;
    res.smem = smem;
    CK(cudaFuncSetAttribute(lstm_persistent_forward<M>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                            static_cast<int>(smem)));
    int per_sm = 0;
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, lstm_persistent_forward<M>, kThreads, smem));
    if (per_sm * prop.multiProcessorCount < G) {
      res.note = "SKIPPED: grid not co-resident";
      return res;
    }

    // Inputs drawn fresh per configuration, scaled so that the gates are neither saturated nor flat.
    std::mt19937 rng(1234u + static_cast<unsigned>(H * 131 + B));
    std::uniform_real_distribution<float> uni(-1.f, 1.f);
    const float ws = 1.f / std::sqrt(static_cast<float>(H));
    const bool bf = M == Math::kBf16;
    std::vector<float> w(static_cast<size_t>(4) * H * H), xg(static_cast<size_t>(steps) * B * 4 * H),
        h0(static_cast<size_t>(B) * H), c0(static_cast<size_t>(B) * H);
    for (auto& v : w) v = bf ? bf16_round(uni(rng) * ws) : uni(rng) * ws;
    for (auto& v : xg) v = uni(rng);
    for (auto& v : h0) v = bf ? bf16_round(uni(rng) * 0.5f) : uni(rng) * 0.5f;
    for (auto& v : c0) v = uni(rng) * 0.5f;
    std::vector<T> w_t(w.size()), h0_t(h0.size());
    for (size_t i = 0; i < w.size(); ++i) w_t[i] = from_float<T>(w[i]);
    for (size_t i = 0; i < h0.size(); ++i) h0_t[i] = from_float<T>(h0[i]);

    T *d_w, *d_hbuf, *d_y;
    float *d_xg, *d_c0, *d_cn;
    unsigned* d_counter;
    const size_t BH = static_cast<size_t>(B) * H;
    CK(cudaMalloc(&d_w, w_t.size() * sizeof(T)));
    CK(cudaMalloc(&d_hbuf, 2 * BH * sizeof(T)));
    CK(cudaMalloc(&d_y, steps * BH * sizeof(T)));
    CK(cudaMalloc(&d_xg, xg.size() * 4));
    CK(cudaMalloc(&d_c0, BH * 4));
    CK(cudaMalloc(&d_cn, BH * 4));
    CK(cudaMalloc(&d_counter, 4));
    CK(cudaMemcpy(d_w, w_t.data(), w_t.size() * sizeof(T), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_xg, xg.data(), xg.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_c0, c0.data(), BH * 4, cudaMemcpyHostToDevice));

    Params<T> prm{steps, B, H, U, KC, Bp, d_w, d_xg, d_c0, d_hbuf, d_y, d_cn, d_counter};
    void* args[] = {&prm};
    auto launch = [&] {
      CK(cudaMemset(d_counter, 0, 4));
      CK(cudaMemcpy(d_hbuf + BH, h0_t.data(), BH * sizeof(T), cudaMemcpyHostToDevice));
      CK(launch_coop(lstm_persistent_forward<M>, G, args, smem));
      CK(cudaGetLastError());
    };

    // Checked run: y poisoned with NaN (all-ones bits) first.
    CK(cudaMemset(d_y, 0xFF, steps * BH * sizeof(T)));
    launch();
    CK(cudaDeviceSynchronize());
    std::vector<T> y_t(steps * BH);
    CK(cudaMemcpy(y_t.data(), d_y, y_t.size() * sizeof(T), cudaMemcpyDeviceToHost));
    size_t nonfinite = 0;
    for (const T& v : y_t) nonfinite += !std::isfinite(to_float(v));

    // float64 reference of the first steps; h rounded to bf16 each step on the bf16 path.
    const int tref = std::min(steps, 8);
    std::vector<double> h(h0.begin(), h0.end()), c(c0.begin(), c0.end()), hn(BH);
    double num = 0, den = 0;
    for (int t = 0; t < tref; ++t) {
      for (int b = 0; b < B; ++b) {
        for (int j = 0; j < H; ++j) {
          double pre[4];
          for (int q = 0; q < 4; ++q) {
            double a = xg[(static_cast<size_t>(t) * B + b) * 4 * H + q * H + j];
            const float* wr = &w[static_cast<size_t>(q * H + j) * H];
            const double* hr = &h[static_cast<size_t>(b) * H];
            for (int kk = 0; kk < H; ++kk) a += static_cast<double>(wr[kk]) * hr[kk];
            pre[q] = a;
          }
          const double ig = 1 / (1 + std::exp(-pre[0])), fg = 1 / (1 + std::exp(-pre[1]));
          const double gg = std::tanh(pre[2]), og = 1 / (1 + std::exp(-pre[3]));
          const size_t bj = static_cast<size_t>(b) * H + j;
          c[bj] = fg * c[bj] + ig * gg;
          double hv = og * std::tanh(c[bj]);
          if (bf) hv = bf16_round(static_cast<float>(hv));
          hn[bj] = hv;
          const double got = to_float(y_t[static_cast<size_t>(t) * BH + bj]);
          num += (got - hv) * (got - hv);
          den += hv * hv;
        }
      }
      h.swap(hn);
    }
    res.rel_err = std::sqrt(num / std::max(den, 1e-300));
    const double tol = M == Math::kFma ? 1e-5 : M == Math::kTf32 ? 2e-3 : 2e-2;
    res.ok = nonfinite == 0 && std::isfinite(res.rel_err) && res.rel_err < tol;
    if (nonfinite) res.note = std::to_string(nonfinite) + " non-finite/unwritten outputs";

    // Timing.
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    std::vector<double> us;
    for (int r = 0; r < reps; ++r) {
      CK(cudaMemset(d_counter, 0, 4));
      CK(cudaEventRecord(e0));
      CK(launch_coop(lstm_persistent_forward<M>, G, args, smem));
      CK(cudaEventRecord(e1));
      CK(cudaEventSynchronize(e1));
      float ms = 0;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      us.push_back(1000.0 * ms / steps);
    }
    std::sort(us.begin(), us.end());
    res.us_med = us[us.size() / 2];
    res.us_min = us.front();
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
    CK(cudaFree(d_w));
    CK(cudaFree(d_hbuf));
    CK(cudaFree(d_y));
    CK(cudaFree(d_xg));
    CK(cudaFree(d_c0));
    CK(cudaFree(d_cn));
    CK(cudaFree(d_counter));
    return res;
  }
};

void print_result(const Result& r) {
  std::printf("%-10s %5d %3d %4d %3d %5d %2d %7zu %9.3f %9.3f %10.2e %s %s\n", math_name(r.cfg.math), r.cfg.H,
              r.cfg.B, r.G, r.U, r.KC, r.S, r.smem / 1024, r.us_med, r.us_min, r.rel_err,
              r.note.rfind("SKIPPED", 0) == 0 ? "-" : (r.ok ? "ok" : "FAIL"), r.note.c_str());
  std::fflush(stdout);
}

int parse_int(const char* s, const char* name, int lo, int hi) {
  return bench_util::parse_int("persistent_prototype", s, name, lo, hi);
}

}  // namespace

int main(int argc, char** argv) {
  Runner run;
  bool check = false, emu_grid = false;
  std::string csv;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "persistent_prototype: %s needs a value\n", a.c_str());
        std::exit(3);
      }
      return argv[++i];
    };
    if (a == "--check") {
      check = true;
    } else if (a == "--emu") {
      emu_grid = true;
    } else if (a == "--steps") {
      run.steps = parse_int(next(), "--steps", 1, 100000);
    } else if (a == "--reps") {
      run.reps = parse_int(next(), "--reps", 1, 1000);
    } else if (a == "--csv") {
      csv = next();
    } else {
      std::fprintf(stderr, "usage: persistent_prototype [--check] [--emu] [--steps T] [--reps R] [--csv FILE]\n");
      return 3;
    }
  }
  int ndev = 0;
  const cudaError_t derr = cudaGetDeviceCount(&ndev);
  if (derr != cudaSuccess || ndev == 0) {
    std::fprintf(stderr, "persistent_prototype: no CUDA device (%s)\n",
                 derr != cudaSuccess ? cudaGetErrorString(derr) : "device count 0");
    return 2;
  }
  CK(cudaGetDeviceProperties(&run.prop, 0));
  int drv = 0, rt = 0;
  CK(cudaDriverGetVersion(&drv));
  CK(cudaRuntimeGetVersion(&rt));
  const std::string date = bench_util::utc_now();
  std::printf("# gpu: %s, sm_%d%d, %d SMs; driver API %d, runtime %d; %s\n", run.prop.name, run.prop.major,
              run.prop.minor, run.prop.multiProcessorCount, drv, rt, date.c_str());
  std::vector<int> Hs = {256, 512, 1024}, Bs = {1, 8, 64};
  if (check) {
    Hs = {256};
    Bs = {1, 8};
    run.steps = std::min(run.steps, 16);
    run.reps = std::min(run.reps, 2);
  }
  if (emu_grid) {
    // For the host emulation (slow: one fiber per thread): small H, ragged and full mma tiles, a
    // batch above one FMA output per thread, few steps.
    Hs = {64, 128};
    Bs = {1, 3, 8, 20};
    run.steps = std::min(run.steps, 6);
    run.reps = 1;
  }
  std::printf("# T=%d steps per launch, median/min over %d launches; recurrent part only (no input GEMM)\n",
              run.steps, run.reps);
  std::printf("%-10s %5s %3s %4s %3s %5s %2s %7s %9s %9s %10s %s\n", "math", "H", "B", "grid", "U", "KC", "S",
              "smem_KB", "us/step", "min", "rel_err", "check");
  std::vector<Result> all;
  for (int H : Hs) {
    for (int B : Bs) {
      all.push_back(run.run<Math::kFma>(H, B));
      print_result(all.back());
      all.push_back(run.run<Math::kTf32>(H, B));
      print_result(all.back());
      all.push_back(run.run<Math::kBf16>(H, B));
      print_result(all.back());
    }
  }
  bool failed = false;
  for (const auto& r : all) failed |= r.note.rfind("SKIPPED", 0) != 0 && !r.ok;
  if (!csv.empty()) {
    FILE* f = std::fopen(csv.c_str(), "w");
    if (f) {
      std::fprintf(f, "# gpu: %s; %d SMs; driver API %d; runtime %d; %s; T=%d\n", run.prop.name,
                   run.prop.multiProcessorCount, drv, rt, date.c_str(), run.steps);
      std::fprintf(f, "math,H,B,grid,U,KC,S,smem_bytes,us_per_step_median,us_per_step_min,rel_err,ok,note\n");
      for (const auto& r : all) {
        std::fprintf(f, "%s,%d,%d,%d,%d,%d,%d,%zu,%.4f,%.4f,%.3e,%d,%s\n", math_name(r.cfg.math), r.cfg.H, r.cfg.B,
                     r.G, r.U, r.KC, r.S, r.smem, r.us_med, r.us_min, r.rel_err, r.ok ? 1 : 0, r.note.c_str());
      }
      std::fclose(f);
    } else {
      std::fprintf(stderr, "persistent_prototype: cannot write %s\n", csv.c_str());
      failed = true;
    }
  }
  std::printf(failed ? "# FAILED: some configuration missed its error bound\n" : "# OK\n");
  return failed ? 1 : 0;
}
