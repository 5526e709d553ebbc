// The CUDA subset csrc/kernels uses, as host C++, so that the real kernels and launchers compile with
// g++ (-DFASTLSTM_EMULATION -Itests/emu/include) and run on the CPU.
//
// Each CUDA thread is a fiber (runtime.cpp) that runs until it reaches a barrier; then the others
// run. Within one barrier interval threads run one after another, in an order chosen per run
// (forward, reverse or shuffled), so a missing barrier changes the results. What this proves and
// what it cannot: docs/cuda.md, "Running the CUDA kernels without a GPU".
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <typeinfo>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorLaunchOutOfResources = 7,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorCooperativeLaunchTooLarge = 720,
};
typedef struct CUstream_st* cudaStream_t;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t err);

// 16-bit floating-point types: storage only, converted with round-to-nearest-even like CUDA's _rn.
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float x) {
  const _Float16 f = static_cast<_Float16>(x);
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(u >> 16)};
}
// Truncation (round toward zero): not used by the kernels; tests/emu/mutate.py plants it.
inline __nv_bfloat16 __float2bfloat16_rz(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40u)};
  return {static_cast<uint16_t>(u >> 16)};
}

namespace fastlstm_emu {

struct ThreadIndex {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
};
// The running CUDA thread's indices (set by the scheduler at every switch).
extern ThreadIndex* g_index;

// Runs body once per CUDA thread of the grid. Returns launch-configuration errors as CUDA does;
// stops the process with a message on a kernel defect (divergent barrier, non-converged warp
// collective, shared memory over the static limit). `kernel` only names the launch in the log
// that FASTLSTM_EMU_LAUNCH_LOG asks for (runtime.cpp).
cudaError_t launch_body(dim3 grid, dim3 block, bool cooperative, const std::function<void()>& body,
                        const void* kernel = nullptr);

template <typename... Params, typename... Args>
cudaError_t launch_kernel(bool cooperative, void (*kernel)(Params...), dim3 grid, dim3 block,
                          Args... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "wrong number of kernel arguments");
  // By value, like kernel parameters: every thread sees the same copies.
  const std::tuple<std::decay_t<Params>...> params(args...);
  return launch_body(grid, block, cooperative, [&] { std::apply(kernel, params); },
                     reinterpret_cast<const void*>(kernel));
}

template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t, Args... args) {
  return launch_kernel(false, kernel, grid, block, args...);
}

// A cooperative launch: every block is resident at once (or the launch fails, as
// cudaLaunchCooperativeKernel does), so kernels may call grid_sync().
template <typename... Params, typename... Args>
cudaError_t launch_cooperative(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t,
                               Args... args) {
  return launch_kernel(true, kernel, grid, block, args...);
}

// The calling block's next static shared array (one arena allocation per declaration and block,
// filled with NaN bytes, freed when the block ends).
void* shared_alloc(std::size_t bytes, std::size_t align, const std::type_info& type);
template <typename A>
A* shared_array() {
  return static_cast<A*>(shared_alloc(sizeof(A), alignof(A), typeid(A)));
}

// Grid-wide barrier of a cooperative launch (cooperative_groups::this_grid().sync()).
void grid_sync(const char* file = __builtin_FILE(), int line = __builtin_LINE());

// Barriers and collectives are identified by their source location (file and line of the call),
// not by a code address: the compiler may duplicate a call, never its line.
struct Site {
  const char* file;
  int line;
};

// Warp collectives: every lane of the warp must reach the same call, or the run stops.
void mma_m16n8k16_f32(float* d, const uint32_t* a, const uint32_t* b, bool bf16, Site site);
template <typename T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "16-bit");
  mma_m16n8k16_f32(d, a, b, std::is_same<T, __nv_bfloat16>::value, Site{file, line});
}
uint32_t shfl_u32(unsigned mask, uint32_t value, int src_lane, Site site);

// ---- What the standalone programs in research/gpu use besides (tests/emu/host_api.h) ----

// A launch with `dynamic_shared_bytes` of dynamic shared memory per block and thread-block clusters
// of `cluster` consecutive blocks along x (1: none). A cluster launch runs one cluster at a time.
cudaError_t launch_ex(dim3 grid, dim3 block, bool cooperative, std::size_t dynamic_shared_bytes,
                      unsigned cluster, const std::function<void()>& body, const void* kernel = nullptr);
// The emulated GPU's SM count: FASTLSTM_EMU_SMS, default 132 (a cooperative launch's block limit).
unsigned sm_count();
// The calling block's dynamic shared memory (`extern __shared__`), nullptr when the launch has none.
void* dynamic_shared();
// Thread-block clusters: size, the calling block's rank, the address p (in the calling block's
// dynamic shared memory) in the block of rank `rank` (map_shared_rank), and the cluster's barrier.
unsigned cluster_size();
unsigned cluster_rank();
void* cluster_shared(void* p, unsigned rank);
void cluster_sync(const char* file = __builtin_FILE(), int line = __builtin_LINE());
// Called by a thread each time it polls memory that other threads write (a hand-made barrier):
// every other runnable thread runs before it polls again.
void spin_wait(const char* file = __builtin_FILE(), int line = __builtin_LINE());
// mma.m16n8k8 with TF32 A/B (fp32 bit patterns, the low 13 bits ignored) and fp32 C/D.
void mma_m16n8k8_tf32_f32(float* d, const uint32_t* a, const uint32_t* b, Site site);
inline void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  mma_m16n8k8_tf32_f32(d, a, b, Site{file, line});
}

}  // namespace fastlstm_emu

#define threadIdx (::fastlstm_emu::g_index->thread_idx)
#define blockIdx (::fastlstm_emu::g_index->block_idx)
#define blockDim (::fastlstm_emu::g_index->block_dim)
#define gridDim (::fastlstm_emu::g_index->grid_dim)

// Block barrier: threads waiting at different __syncthreads() calls, or at the same call a different
// number of times, are reported as divergent.
void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE());
void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                int line = __builtin_LINE());

template <typename V>
inline V __shfl_sync(unsigned mask, V value, int src_lane, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  static_assert(sizeof(V) == 4, "32-bit shuffles only");
  uint32_t u;
  std::memcpy(&u, &value, 4);
  u = ::fastlstm_emu::shfl_u32(mask, u, src_lane, ::fastlstm_emu::Site{file, line});
  std::memcpy(&value, &u, 4);
  return value;
}
