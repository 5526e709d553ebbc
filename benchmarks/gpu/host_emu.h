// A host-side stand-in for the CUDA runtime and device built-ins that persistent_prototype.cu and
// latency_floor.cu use, so that their kernels' logic (indexing, split-K, chunking, double buffering, the grid barrier, the
// mma fragment layouts) can be executed on a machine without a GPU:
//
//   g++ -O1 -std=c++17 -DPP_HOST_EMU -x c++ -I benchmarks/gpu -o /tmp/pp_emu
//       benchmarks/gpu/persistent_prototype.cu && /tmp/pp_emu --emu
//   g++ -O1 -std=c++17 -DPP_HOST_EMU -x c++ -I benchmarks/gpu -o /tmp/lf_emu
//       benchmarks/gpu/latency_floor.cu && PP_EMU_SMS=16 /tmp/lf_emu --check --threads 32 --smem-kb 0
//
// Environment: PP_EMU_SMS (SM count, default 132), PP_EMU_SMEM_KB (shared memory per block,
// default 227), PP_EMU_SEED (block scheduling). Clusters are consecutive blocks; the grid barrier
// (grid_group::sync) waits for every fiber of the launch; graphs replay captured launches.
//
// Every CUDA thread is a fiber (ucontext); one OS thread runs them, each pass a random half of the
// blocks (seeded by PP_EMU_SEED), so that blocks drift apart. __syncthreads,
// the warp-collective mma and the grid barrier's spin each yield to the scheduler until the others
// arrive, so a missing barrier shows up as a wrong result or a deadlock (reported), as on a GPU,
// but none of the GPU's memory-ordering hazards are modelled: the emulation checks logic, not the
// memory model, and says nothing about speed. The mma emulation implements the fragment layouts of
// the PTX ISA (mma.m16n8k16 bf16 and mma.m16n8k8 tf32, row.col, float accumulation), summing in
// float in k order.
#pragma once

#include <ucontext.h>

#include <chrono>
#include <cmath>
#include <functional>
#include <tuple>
#include <utility>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3() = default;
  dim3(unsigned a, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributeNonPortableClusterSizeAllowed = 12
};
enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2 };
enum cudaStreamCaptureMode { cudaStreamCaptureModeThreadLocal = 1 };
constexpr unsigned cudaStreamNonBlocking = 1;
struct cudaDeviceProp {
  char name[256];
  int major, minor, multiProcessorCount, l2CacheSize;
  size_t sharedMemPerBlockOptin, sharedMemPerMultiprocessor;
};
using cudaStream_t = void*;
enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension = 4 };
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  struct {
    struct {
      unsigned x, y, z;
    } clusterDim;
  } val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes = 0;
  cudaStream_t stream = nullptr;
  cudaLaunchAttribute* attrs = nullptr;
  unsigned numAttrs = 0;
};
struct EmuGraph;
using cudaGraph_t = EmuGraph*;
using cudaGraphExec_t = EmuGraph*;
using cudaEvent_t = std::chrono::steady_clock::time_point*;

struct __nv_bfloat16 {
  uint16_t bits = 0;
  __nv_bfloat16() = default;
  explicit __nv_bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x7FFFFFu)) {
      bits = 0x7FC0;  // NaN
    } else {
      bits = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
  }
  explicit operator float() const {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(h); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short s) {
  __nv_bfloat16 h;
  h.bits = s;
  return h;
}
inline void __stcg(float* p, float v) { *p = v; }
inline void __stcg(unsigned short* p, unsigned short v) { *p = v; }
inline float __ldcg(const float* p) { return *p; }
inline unsigned short __ldcg(const unsigned short* p) { return *p; }
inline void __stcg(unsigned* p, unsigned v) { *p = v; }
inline unsigned __ldcg(const unsigned* p) { return *p; }
inline unsigned atomicAdd(unsigned* p, unsigned v) {  // one OS thread: no race
  const unsigned old = *p;
  *p += v;
  return old;
}
inline long long clock64() {  // a stand-in that advances; the emulated clock is meaningless
  static long long c = 0;
  return c += 1000;
}

namespace emu {

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  unsigned block = 0, thread = 0;
  bool done = false;
};

struct State {
  std::vector<Fiber> fibers;
  ucontext_t sched;
  Fiber* cur = nullptr;
  unsigned nthreads = 0;
  std::vector<unsigned> bar_arrived, bar_gen;    // per block
  std::vector<unsigned> warp_arrived, warp_gen;  // per block x warp
  std::vector<std::vector<unsigned char>> smem;  // per block
  std::vector<uint32_t> mma_a, mma_b;            // per block x warp x lane: 4 and 2 words
  std::vector<unsigned> cl_arrived, cl_gen;      // per cluster
  std::vector<unsigned> grid_arrived, grid_gen;  // [1]
  unsigned cluster = 1;
  std::function<void()> body;
  bool capturing = false;
  std::vector<std::function<void()>> captured;
  uint64_t switches = 0;
};
inline State& st() {
  static State s;
  return s;
}

}  // namespace emu

inline dim3 threadIdx, blockIdx, gridDim, blockDim;

namespace emu {

inline void yield() {
  State& s = st();
  if (++s.switches > 4000000000ull) {
    std::fprintf(stderr, "host_emu: no progress after %llu switches (deadlock?)\n",
                 static_cast<unsigned long long>(s.switches));
    std::exit(1);
  }
  swapcontext(&s.cur->ctx, &s.sched);
}

inline unsigned char* block_smem() { return st().smem[st().cur->block].data(); }

// Waits until `count` fibers have arrived at barrier slot i (block or warp barrier).
inline void arrive_and_wait(std::vector<unsigned>& arrived, std::vector<unsigned>& gen, size_t i,
                            unsigned count) {
  if (++arrived[i] == count) {
    arrived[i] = 0;
    ++gen[i];
    return;
  }
  const unsigned g = gen[i];
  while (gen[i] == g) yield();
}

inline void warp_sync() {
  State& s = st();
  const size_t w = static_cast<size_t>(s.cur->block) * (s.nthreads / 32) + s.cur->thread / 32;
  arrive_and_wait(s.warp_arrived, s.warp_gen, w, 32);
}

inline float bf16_lo(uint32_t w) { return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(w & 0xFFFF))); }
inline float bf16_hi(uint32_t w) { return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(w >> 16))); }
inline float tf32_val(uint32_t w) {
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}

// Warp-collective D += A B. kBf16: m16n8k16, else m16n8k8 tf32. Each lane passes its fragments.
template <bool kBf16>
inline void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  State& s = st();
  const unsigned lane = s.cur->thread % 32;
  const size_t base = (static_cast<size_t>(s.cur->block) * (s.nthreads / 32) + s.cur->thread / 32) * 32;
  for (int i = 0; i < 4; ++i) s.mma_a[(base + lane) * 4 + i] = a[i];
  for (int i = 0; i < 2; ++i) s.mma_b[(base + lane) * 2 + i] = b[i];
  warp_sync();
  // Rebuild A [16][K] and B [K][8] from all lanes' fragments.
  constexpr int K = kBf16 ? 16 : 8;
  float A[16][16], B[16][8];
  for (unsigned l = 0; l < 32; ++l) {
    const unsigned gid = l >> 2, tig = l & 3;
    const uint32_t* fa = &s.mma_a[(base + l) * 4];
    const uint32_t* fb = &s.mma_b[(base + l) * 2];
    if (kBf16) {
      A[gid][2 * tig] = bf16_lo(fa[0]);
      A[gid][2 * tig + 1] = bf16_hi(fa[0]);
      A[gid + 8][2 * tig] = bf16_lo(fa[1]);
      A[gid + 8][2 * tig + 1] = bf16_hi(fa[1]);
      A[gid][2 * tig + 8] = bf16_lo(fa[2]);
      A[gid][2 * tig + 9] = bf16_hi(fa[2]);
      A[gid + 8][2 * tig + 8] = bf16_lo(fa[3]);
      A[gid + 8][2 * tig + 9] = bf16_hi(fa[3]);
      B[2 * tig][gid] = bf16_lo(fb[0]);
      B[2 * tig + 1][gid] = bf16_hi(fb[0]);
      B[2 * tig + 8][gid] = bf16_lo(fb[1]);
      B[2 * tig + 9][gid] = bf16_hi(fb[1]);
    } else {
      A[gid][tig] = tf32_val(fa[0]);
      A[gid + 8][tig] = tf32_val(fa[1]);
      A[gid][tig + 4] = tf32_val(fa[2]);
      A[gid + 8][tig + 4] = tf32_val(fa[3]);
      B[tig][gid] = tf32_val(fb[0]);
      B[tig + 4][gid] = tf32_val(fb[1]);
    }
  }
  warp_sync();  // every lane has read the fragments before any lane's next mma overwrites them
  const unsigned gid = lane >> 2, tig = lane & 3;
  const unsigned rows[4] = {gid, gid, gid + 8, gid + 8}, cols[4] = {2 * tig, 2 * tig + 1, 2 * tig, 2 * tig + 1};
  for (int e = 0; e < 4; ++e) {
    float acc = d[e];
    for (int k = 0; k < K; ++k) acc += A[rows[e]][k] * B[k][cols[e]];
    d[e] = acc;
  }
}

inline void fiber_main() {
  State& s = st();
  s.body();
  s.cur->done = true;
}

// Runs body() as every thread of a grid of G blocks of nthreads fibers (clusters of `cluster`
// consecutive blocks) until all finish.
inline cudaError_t launch_body(std::function<void()> body, unsigned G, unsigned nthreads, size_t smem,
                               unsigned cluster = 1) {
  State& s = st();
  if (G == 0 || nthreads == 0 || cluster == 0 || G % cluster != 0) return cudaErrorInvalidValue;
  const unsigned warps = (nthreads + 31) / 32;
  s.body = std::move(body);
  s.nthreads = nthreads;
  s.cluster = cluster;
  s.fibers.assign(static_cast<size_t>(G) * nthreads, Fiber{});
  s.bar_arrived.assign(G, 0);
  s.bar_gen.assign(G, 0);
  s.cl_arrived.assign(G / cluster, 0);
  s.cl_gen.assign(G / cluster, 0);
  s.grid_arrived.assign(1, 0);
  s.grid_gen.assign(1, 0);
  s.warp_arrived.assign(static_cast<size_t>(G) * warps, 0);
  s.warp_gen.assign(static_cast<size_t>(G) * warps, 0);
  s.mma_a.assign(static_cast<size_t>(G) * warps * 32 * 4, 0);
  s.mma_b.assign(static_cast<size_t>(G) * warps * 32 * 2, 0);
  s.smem.assign(G, std::vector<unsigned char>(smem + 16, 0xCD));  // poisoned
  gridDim = dim3(G);
  blockDim = dim3(nthreads);
  for (size_t i = 0; i < s.fibers.size(); ++i) {
    Fiber& f = s.fibers[i];
    f.block = static_cast<unsigned>(i / nthreads);
    f.thread = static_cast<unsigned>(i % nthreads);
    f.stack.resize(64 * 1024);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &s.sched;
    makecontext(&f.ctx, fiber_main, 0);
  }
  // Each pass runs every block with probability 1/2 (seeded: PP_EMU_SEED), so blocks drift apart
  // as they may on a GPU; a missing grid barrier then lets a block read another's stale data.
  const char* seed_env = std::getenv("PP_EMU_SEED");
  static uint64_t rng = seed_env ? std::strtoull(seed_env, nullptr, 10) : 1;
  std::vector<char> run_block(G);
  size_t live = s.fibers.size();
  while (live) {
    live = 0;
    bool any = false;
    for (unsigned b = 0; b < G; ++b) {
      rng = rng * 6364136223846793005ull + 1442695040888963407ull;
      run_block[b] = (rng >> 33) & 1;
      any |= run_block[b] != 0;
    }
    if (!any) run_block[0] = 1;
    for (Fiber& f : s.fibers) {
      if (f.done) continue;
      if (!run_block[f.block]) {
        live += 1;
        continue;
      }
      s.cur = &f;
      threadIdx = dim3(f.thread);
      blockIdx = dim3(f.block);
      swapcontext(&s.sched, &f.ctx);
      live += !f.done;
    }
  }
  s.fibers.clear();
  return cudaSuccess;
}

// Kernel with one by-value parameter, arguments as for cudaLaunchCooperativeKernel.
template <class P>
cudaError_t launch(void (*kernel)(P), unsigned G, unsigned nthreads, void** args, size_t smem) {
  P p = *static_cast<P*>(args[0]);
  return launch_body([kernel, p] { kernel(p); }, G, nthreads, smem);
}

// Any kernel, arguments as the void* array of cudaLaunchCooperativeKernel.
template <class... A, size_t... I>
cudaError_t launch_args(void (*kernel)(A...), dim3 g, dim3 b, void** args, size_t smem,
                        std::index_sequence<I...>) {
  std::tuple<A...> vals(*static_cast<A*>(args[I])...);
  return launch_body([kernel, vals] { std::apply(kernel, vals); }, g.x, b.x, smem);
}
template <class... A>
cudaError_t launch_args(void (*kernel)(A...), dim3 g, dim3 b, void** args, size_t smem) {
  return launch_args(kernel, g, b, args, smem, std::index_sequence_for<A...>{});
}

// Any kernel, arguments by value (the <<<>>> launch).
template <class... A, class... V>
cudaError_t launch_values(void (*kernel)(A...), dim3 g, dim3 b, size_t smem, unsigned cluster, V... v) {
  std::tuple<A...> vals(v...);
  auto call = [kernel, vals] { std::apply(kernel, vals); };
  if (st().capturing) {
    st().captured.push_back([call, g, b, smem, cluster] { launch_body(call, g.x, b.x, smem, cluster); });
    return cudaSuccess;
  }
  return launch_body(call, g.x, b.x, smem, cluster);
}

inline void grid_sync() {
  State& s = st();
  arrive_and_wait(s.grid_arrived, s.grid_gen, 0, static_cast<unsigned>(s.fibers.size()));
}
inline void cluster_sync() {
  State& s = st();
  arrive_and_wait(s.cl_arrived, s.cl_gen, s.cur->block / s.cluster, s.cluster * s.nthreads);
}

}  // namespace emu

inline void __syncthreads() {
  emu::State& s = emu::st();
  emu::arrive_and_wait(s.bar_arrived, s.bar_gen, s.cur->block, s.nthreads);
}

// Runtime API stand-ins (host memory; kernels run at launch, so everything is synchronous).
inline const char* cudaGetErrorName(cudaError_t e) { return e == cudaSuccess ? "cudaSuccess" : "cudaError"; }
inline const char* cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
// The emulated device: PP_EMU_SMS SMs (default 132) and PP_EMU_SMEM_KB KB of shared memory per
// block (default 227; smaller values force the K-chunked path).
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int) {
  std::memset(p, 0, sizeof *p);
  std::snprintf(p->name, sizeof p->name, "host emulator (no GPU)");
  p->major = 9;
  p->minor = 0;
  const char* sms = std::getenv("PP_EMU_SMS");
  const char* kb = std::getenv("PP_EMU_SMEM_KB");
  p->multiProcessorCount = sms ? std::atoi(sms) : 132;
  p->sharedMemPerBlockOptin = static_cast<size_t>(kb ? std::atoi(kb) : 227) * 1024;
  p->sharedMemPerMultiprocessor = 228 * 1024;
  p->l2CacheSize = 50 << 20;
  return cudaSuccess;
}
inline cudaError_t cudaDriverGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}
inline cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = 0;
  return cudaSuccess;
}
template <class F>
cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) {
  return cudaSuccess;
}
template <class F>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F, int, size_t) {
  *n = 1;
  return cudaSuccess;
}
template <class T>
cudaError_t cudaMalloc(T** p, size_t n) {
  *p = static_cast<T*>(std::malloc(n ? n : 1));
  return *p ? cudaSuccess : cudaErrorInvalidValue;
}
inline cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) {
  std::memcpy(d, s, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemset(void* d, int v, size_t n) {
  std::memset(d, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaEventCreate(cudaEvent_t* e) {
  *e = new std::chrono::steady_clock::time_point();
  return cudaSuccess;
}
inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete e;
  return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t = nullptr) {
  *e = std::chrono::steady_clock::now();
  return cudaSuccess;
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
  *ms = std::chrono::duration<float, std::milli>(*b - *a).count();
  return cudaSuccess;
}

// ---- more runtime stand-ins (latency_floor.cu) ----
struct EmuGraph {
  std::vector<std::function<void()>> launches;
};
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) {
  *s = nullptr;
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* d, int v, size_t n, cudaStream_t = nullptr) { return cudaMemset(d, v, n); }
inline cudaError_t cudaStreamBeginCapture(cudaStream_t, cudaStreamCaptureMode) {
  emu::st().capturing = true;
  emu::st().captured.clear();
  return cudaSuccess;
}
inline cudaError_t cudaStreamEndCapture(cudaStream_t, cudaGraph_t* g) {
  emu::st().capturing = false;
  *g = new EmuGraph{std::move(emu::st().captured)};
  emu::st().captured.clear();
  return cudaSuccess;
}
inline cudaError_t cudaGraphInstantiate(cudaGraphExec_t* e, cudaGraph_t g, unsigned long long) {
  *e = new EmuGraph(*g);
  return cudaSuccess;
}
inline cudaError_t cudaGraphLaunch(cudaGraphExec_t e, cudaStream_t) {
  for (auto& l : e->launches) l();
  return cudaSuccess;
}
inline cudaError_t cudaGraphExecDestroy(cudaGraphExec_t e) {
  delete e;
  return cudaSuccess;
}
inline cudaError_t cudaGraphDestroy(cudaGraph_t g) {
  delete g;
  return cudaSuccess;
}
inline unsigned emu_cluster_of(const cudaLaunchConfig_t* cfg) {
  for (unsigned i = 0; i < cfg->numAttrs; ++i) {
    if (cfg->attrs[i].id == cudaLaunchAttributeClusterDimension) return cfg->attrs[i].val.clusterDim.x;
  }
  return 1;
}
// The emulated chip holds PP_EMU_SMS / C clusters of C blocks.
template <class F>
cudaError_t cudaOccupancyMaxActiveClusters(int* n, F, const cudaLaunchConfig_t* cfg) {
  cudaDeviceProp p;
  cudaGetDeviceProperties(&p, 0);
  *n = p.multiProcessorCount / static_cast<int>(emu_cluster_of(cfg));
  return cudaSuccess;
}
template <class... A, class... V>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* cfg, void (*kernel)(A...), V... v) {
  return emu::launch_values(kernel, cfg->gridDim, cfg->blockDim, cfg->dynamicSmemBytes, emu_cluster_of(cfg), v...);
}

namespace cooperative_groups {
struct grid_group {
  void sync() const { emu::grid_sync(); }
};
inline grid_group this_grid() { return {}; }
struct cluster_group {
  unsigned num_blocks() const { return emu::st().cluster; }
  unsigned block_rank() const { return emu::st().cur->block % emu::st().cluster; }
  void sync() const { emu::cluster_sync(); }
  // The same offset in the shared memory of block `rank` of this cluster.
  template <class T>
  T* map_shared_rank(T* p, int rank) const {
    emu::State& s = emu::st();
    const size_t off = reinterpret_cast<unsigned char*>(p) - s.smem[s.cur->block].data();
    const unsigned target = s.cur->block / s.cluster * s.cluster + static_cast<unsigned>(rank);
    return reinterpret_cast<T*>(s.smem[target].data() + off);
  }
};
inline cluster_group this_cluster() { return {}; }
}  // namespace cooperative_groups
