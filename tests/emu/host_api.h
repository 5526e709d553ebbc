// The CUDA runtime API and device built-ins that the standalone programs in research/gpu use beyond
// what csrc/kernels needs (emu.h), so that they compile with g++ -DFASTLSTM_EMULATION and run their
// kernels on the emulator. Include it instead of <cuda_runtime.h>, <cuda_bf16.h> and
// <cooperative_groups.h>.
//
// Device memory is host memory, and every launch runs to completion before it returns: streams,
// events and graphs are synchronous stand-ins, and event times are the host's wall clock, which
// says nothing about a GPU. The device has FASTLSTM_EMU_SMS SMs (default 132) and
// FASTLSTM_EMU_SMEM_KB KB of shared memory per block (default 227); smaller values drive the
// programs onto their small-grid and chunked paths. Each SM holds one block.
#pragma once

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "emu.h"

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributeNonPortableClusterSizeAllowed = 12,
};
enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2 };
enum cudaStreamCaptureMode { cudaStreamCaptureModeThreadLocal = 1 };
constexpr unsigned cudaStreamNonBlocking = 1;

struct cudaDeviceProp {
  char name[256];
  int major, minor, multiProcessorCount, l2CacheSize;
  std::size_t sharedMemPerBlockOptin, sharedMemPerMultiprocessor;
};

enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension = 4 };
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  struct {
    struct {
      unsigned x, y, z;
    } clusterDim;
  } val;
};
// CUDA's member names, which emu.h's gridDim and blockDim macros would rewrite where they are
// used: a program builds it by position, {grid, block, dynamicSmemBytes, stream, attrs, numAttrs}.
#pragma push_macro("gridDim")
#pragma push_macro("blockDim")
#undef gridDim
#undef blockDim
struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  std::size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};
inline dim3 emu_grid_of(const cudaLaunchConfig_t* cfg) { return cfg->gridDim; }
inline dim3 emu_block_of(const cudaLaunchConfig_t* cfg) { return cfg->blockDim; }
#pragma pop_macro("blockDim")
#pragma pop_macro("gridDim")

struct CUstream_st {};
struct CUevent_st {
  std::chrono::steady_clock::time_point at;
};
typedef CUevent_st* cudaEvent_t;
// A graph and its executable form: the launches captured, in order.
struct CUgraph_st {
  std::vector<std::function<cudaError_t()>> launches;
};
typedef CUgraph_st* cudaGraph_t;
typedef CUgraph_st* cudaGraphExec_t;

inline const char* cudaGetErrorName(cudaError_t e) {
  return e == cudaSuccess ? "cudaSuccess" : cudaGetErrorString(e);
}

// ---- Device ----

inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int) {
  std::memset(p, 0, sizeof *p);
  std::snprintf(p->name, sizeof p->name, "CUDA emulator (tests/emu, no GPU)");
  p->major = 9;
  p->minor = 0;
  p->multiProcessorCount = static_cast<int>(fastlstm_emu::sm_count());
  const char* kb = std::getenv("FASTLSTM_EMU_SMEM_KB");
  const long k = kb ? std::strtol(kb, nullptr, 10) : 227;
  if (k < 1 || k > 227) {
    std::fprintf(stderr, "fastlstm_emu: FASTLSTM_EMU_SMEM_KB must be in [1, 227], got '%s'\n", kb);
    std::exit(86);
  }
  p->sharedMemPerBlockOptin = static_cast<std::size_t>(k) * 1024;
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
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
template <class F>
cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) {
  return cudaSuccess;
}
template <class F>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F, int, std::size_t smem) {
  cudaDeviceProp p;
  cudaGetDeviceProperties(&p, 0);
  *n = smem <= p.sharedMemPerBlockOptin ? 1 : 0;
  return cudaSuccess;
}

// ---- Memory, streams, events ----

template <class T>
cudaError_t cudaMalloc(T** p, std::size_t n) {
  *p = static_cast<T*>(std::malloc(n ? n : 1));
  return *p ? cudaSuccess : cudaErrorInvalidValue;
}
inline cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* d, const void* s, std::size_t n, cudaMemcpyKind) {
  std::memcpy(d, s, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemset(void* d, int v, std::size_t n) {
  std::memset(d, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* d, int v, std::size_t n, cudaStream_t = nullptr) {
  return cudaMemset(d, v, n);
}
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) {
  *s = new CUstream_st;
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaEventCreate(cudaEvent_t* e) {
  *e = new CUevent_st;
  return cudaSuccess;
}
inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete e;
  return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t = nullptr) {
  e->at = std::chrono::steady_clock::now();
  return cudaSuccess;
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
  *ms = std::chrono::duration<float, std::milli>(b->at - a->at).count();
  return cudaSuccess;
}

// ---- Launches and graphs ----

namespace fastlstm_emu {

// The stream being captured into a graph (cudaStreamBeginCapture), and the graph.
struct Capture {
  cudaStream_t stream = nullptr;
  CUgraph_st* graph = nullptr;
};
inline Capture g_capture;

// Runs kernel(params...) as a launch of this shape, or records it when `stream` is being captured.
template <typename... P>
cudaError_t launch_params(cudaStream_t stream, dim3 grid, dim3 block, std::size_t smem, unsigned cluster,
                          bool cooperative, void (*kernel)(P...), std::tuple<std::decay_t<P>...> params) {
  auto run = [=] {
    return launch_ex(grid, block, cooperative, smem, cluster, [&] { std::apply(kernel, params); },
                     reinterpret_cast<const void*>(kernel));
  };
  if (g_capture.graph != nullptr && stream == g_capture.stream) {
    g_capture.graph->launches.push_back(run);
    return cudaSuccess;
  }
  return run();
}

// kernel<<<grid, block, smem, stream>>>(args...)
template <typename... P, typename... A>
cudaError_t launch_on(cudaStream_t stream, void (*kernel)(P...), dim3 grid, dim3 block, std::size_t smem,
                      A... args) {
  static_assert(sizeof...(P) == sizeof...(A), "wrong number of kernel arguments");
  return launch_params(stream, grid, block, smem, 1, false, kernel,
                       std::tuple<std::decay_t<P>...>(static_cast<P>(args)...));
}

}  // namespace fastlstm_emu

namespace fastlstm_emu {
template <typename... P, std::size_t... I>
std::tuple<std::decay_t<P>...> unpack(void** args, std::index_sequence<I...>) {
  return {*static_cast<std::decay_t<P>*>(args[I])...};
}
}  // namespace fastlstm_emu

// The typed form of the runtime's C++ API: args[i] points to the i-th kernel argument.
template <typename... P>
cudaError_t cudaLaunchCooperativeKernel(void (*kernel)(P...), dim3 grid, dim3 block, void** args,
                                        std::size_t smem = 0, cudaStream_t stream = nullptr) {
  return fastlstm_emu::launch_params(stream, grid, block, smem, 1, true, kernel,
                                     fastlstm_emu::unpack<P...>(args, std::index_sequence_for<P...>{}));
}

inline unsigned emu_cluster_of(const cudaLaunchConfig_t* cfg) {
  for (unsigned i = 0; i < cfg->numAttrs; ++i) {
    if (cfg->attrs[i].id == cudaLaunchAttributeClusterDimension) return cfg->attrs[i].val.clusterDim.x;
  }
  return 1;
}
template <typename... P, typename... A>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* cfg, void (*kernel)(P...), A... args) {
  static_assert(sizeof...(P) == sizeof...(A), "wrong number of kernel arguments");
  return fastlstm_emu::launch_params(cfg->stream, emu_grid_of(cfg), emu_block_of(cfg), cfg->dynamicSmemBytes,
                                     emu_cluster_of(cfg), false, kernel,
                                     std::tuple<std::decay_t<P>...>(static_cast<P>(args)...));
}
// Clusters of C blocks: the device holds SMs / C of them.
template <class F>
cudaError_t cudaOccupancyMaxActiveClusters(int* n, F, const cudaLaunchConfig_t* cfg) {
  *n = static_cast<int>(fastlstm_emu::sm_count() / emu_cluster_of(cfg));
  return cudaSuccess;
}

inline cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode) {
  fastlstm_emu::g_capture = {s, new CUgraph_st};
  return cudaSuccess;
}
inline cudaError_t cudaStreamEndCapture(cudaStream_t, cudaGraph_t* g) {
  *g = fastlstm_emu::g_capture.graph;
  fastlstm_emu::g_capture = {};
  return cudaSuccess;
}
inline cudaError_t cudaGraphInstantiate(cudaGraphExec_t* e, cudaGraph_t g, unsigned long long) {
  *e = new CUgraph_st(*g);
  return cudaSuccess;
}
inline cudaError_t cudaGraphLaunch(cudaGraphExec_t e, cudaStream_t) {
  for (auto& launch : e->launches) {
    const cudaError_t err = launch();
    if (err != cudaSuccess) return err;
  }
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

// ---- Device built-ins ----

// Cache-hinted loads and stores: plain ones here.
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}
template <typename T>
inline void __stcg(T* p, T v) {
  *p = v;
}
// One thread runs at a time, and none is switched out inside an expression: a plain add is atomic.
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p += v;
  return old;
}
// A counter that advances on every read: it measures nothing.
inline long long clock64() {
  static long long c = 0;
  return c += 1000;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short s) { return __nv_bfloat16{s}; }

namespace cooperative_groups {
struct grid_group {
  void sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) const {
    fastlstm_emu::grid_sync(file, line);
  }
};
inline grid_group this_grid() { return {}; }
struct cluster_group {
  unsigned num_blocks() const { return fastlstm_emu::cluster_size(); }
  unsigned block_rank() const { return fastlstm_emu::cluster_rank(); }
  void sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) const {
    fastlstm_emu::cluster_sync(file, line);
  }
  // The same offset of dynamic shared memory in the cluster's block of rank `rank`.
  template <class T>
  T* map_shared_rank(T* p, int rank) const {
    return static_cast<T*>(fastlstm_emu::cluster_shared(const_cast<void*>(static_cast<const void*>(p)),
                                                        static_cast<unsigned>(rank)));
  }
};
inline cluster_group this_cluster() { return {}; }
}  // namespace cooperative_groups
