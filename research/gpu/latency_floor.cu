// The per-step latency floor of a recurrent kernel on this GPU (issue 14): how long one timestep
// takes when it does nothing but synchronise the blocks that share a recurrence and exchange the
// h vector between them. Standalone: plain CUDA runtime, no torch, no fastlstm headers.
//
//   nvcc -O3 -std=c++17 -arch=sm_90 -o latency_floor research/gpu/latency_floor.cu
//   ./latency_floor [--check] [--csv FILE] [--steps T] [--reps R] [--threads N] [--smem-kb K]
//
// STATUS: compiled (sm_90, sm_80) but never run on a GPU when this was written; the first GPU session
// of issue 14 runs it through research/gpu/run_latency_floor.sh. Every number it prints is a
// measurement of that run, nothing here is a result. Its kernels' logic runs under the CUDA
// emulator of tests/emu (no timing meaning, no GPU memory model; research/gpu/README.md):
//   FASTLSTM_EMU_SMS=16 FASTLSTM_EMU_DRIFT=1 bash research/gpu/emulate.sh latency_floor
//       --check --threads 32 --smem-kb 0 --steps 16
// where every row saw its own step's values and the no-barrier control reported errors; with the
// flag barrier's wait or the cluster.sync() removed, every flag and cluster row reported errors.
//
// Variants (each row: one configuration, T steps, the median over R timed repetitions):
//   launch      T launches of an empty kernel on one stream (the per-step design's floor)
//   graph       the same T launches captured in one CUDA graph, replayed
//   coop        one cooperative launch, T x cooperative_groups grid.sync()
//   flag        one cooperative launch, T x a hand-rolled grid barrier: one arrival counter in global
//               memory, red.release.gpu to arrive, ld.acquire.gpu to spin (no reset: the counter
//               only grows, step t waits for (t + 1) * G arrivals)
//   cluster-C   thread-block clusters of C blocks (sm_90), T x cluster.sync(), grid = G / C
//               independent clusters, each exchanging its own h through distributed shared memory
// Each with "+h": every step, each block writes its slice of an h of B x H 4-byte words (B rows,
// H columns, block k owns columns [k H / G, (k + 1) H / G)), synchronises, then reads the WHOLE h
// into its own shared memory, which is what a persistent LSTM step must do before its matmul.
// Grid variants exchange through global memory / L2 (double-buffered, so one barrier a step is
// enough), cluster variants through the other blocks' shared memory (also double-buffered).
// Without "+h", each block still writes one word a step and reads a neighbour's after the
// barrier, so every barrier is checked.
//
// Every read is checked against the value the step must see (errors column; any error fails the
// run with exit status 1): a barrier that lets a block through early shows up as errors, not as a
// fast time. --check runs a small subset in well under a second, plus a negative control without
// a barrier (expected to show errors, though that is not guaranteed).
//
// Each block gets --smem-kb KB of dynamic shared memory (default 120: at most one block per SM, as
// a persistent LSTM with its w_hh slice in shared memory would be), and --threads threads
// (default 256).
//
// Output: a table (microseconds per step, median and min over the repetitions) and a CSV with a
// header of '#' lines (GPU, SMs, compute capability, driver and runtime API versions, measured SM
// clock, UTC date, command line). Exit status: 0 all rows ran without errors; 1 an error count or a
// CUDA error; 2 no CUDA device; 3 bad arguments.

#ifdef FASTLSTM_EMULATION
#include "host_api.h"  // tests/emu: runs the kernels' logic on the CPU
#else
#include <cooperative_groups.h>
#include <cuda_runtime.h>
#endif
#include "bench_util.h"  // CK, option parsing, UTC time, the flag barrier's primitives

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <utility>
#include <vector>

namespace cg = cooperative_groups;

namespace {

enum class Sync { kCoop, kFlag, kNoBarrier };

// The word block `writer` stores for h element (b, j) at step t. Distinct per step, row and column,
// so a stale or misplaced read cannot pass the check.
__host__ __device__ inline uint32_t h_value(int t, int b, int j) {
  return (static_cast<uint32_t>(t) * 2654435761u) ^ (static_cast<uint32_t>(b) << 20) ^
         static_cast<uint32_t>(j);
}

#ifdef FASTLSTM_EMULATION
#define DYNAMIC_SMEM(name) uint32_t* name = static_cast<uint32_t*>(fastlstm_emu::dynamic_shared())
#else
#define DYNAMIC_SMEM(name) extern __shared__ uint32_t name[]
#endif

// The hand-rolled grid barrier. Thread 0 arrives after the whole block has written (the
// __syncthreads before), with release semantics at GPU scope, so its arrival publishes the block's
// writes; it spins with acquire loads; the __syncthreads after hands that ordering to the block.
__device__ __forceinline__ void flag_barrier(unsigned* counter, unsigned target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    arrive_release(counter);
    while (load_acquire(counter) < target) {
    }
  }
  __syncthreads();
}

// Columns [lo, hi) of h owned by block k of g.
__device__ __forceinline__ void slice_of(int k, int g, int H, int& lo, int& hi) {
  lo = static_cast<int>(static_cast<int64_t>(k) * H / g);
  hi = static_cast<int>(static_cast<int64_t>(k + 1) * H / g);
}

// This block's columns [lo, hi) of every row of h at step t, to buf [B, H] in global memory (L2:
// the readers are other SMs).
__device__ __forceinline__ void write_slice(uint32_t* buf, int t, int B, int H, int lo, int hi) {
  for (int b = 0; b < B; ++b) {
    for (int j = lo + static_cast<int>(threadIdx.x); j < hi; j += blockDim.x) {
      __stcg(buf + b * H + j, h_value(t, b, j));
    }
  }
}

// The whole h of step t from buf [B, H] into this block's shared copy local [B, H]; counts the
// words that are not step t's in `bad`, folds them into `acc` so the loads stay.
__device__ __forceinline__ void read_all(const uint32_t* buf, int t, int B, int H, uint32_t* local,
                                         unsigned& bad, uint32_t& acc) {
  for (int b = 0; b < B; ++b) {
    for (int j = threadIdx.x; j < H; j += blockDim.x) {
      const uint32_t v = __ldcg(buf + b * H + j);
      bad += v != h_value(t, b, j);
      local[b * H + j] = v;
      acc ^= v;
    }
  }
}

// Persistent step loop over steps [t0, t0 + T) with grid-level (or no) synchronisation.
//   counter: [1] arrival counter (kFlag), zero at launch
//   hbuf:    [2, B, H] the exchanged h (kExchange), double-buffered by step parity
//   flags:   [2, G] one word per block (without kExchange)
//   errors:  [1] count of reads that did not see the value of their step
//   sink:    [G] keeps the reads from being optimised away
// Dynamic shared memory: at least B * H words (the block's copy of h).
template <Sync kSync, bool kExchange>
__global__ void grid_steps(int t0, int T, int B, int H, unsigned* counter, uint32_t* hbuf,
                           uint32_t* flags, unsigned* errors, uint32_t* sink) {
  DYNAMIC_SMEM(smem);
  const int G = gridDim.x, k = blockIdx.x;
  int lo, hi;
  slice_of(k, G, H, lo, hi);
  const int total = B * H;
  unsigned bad = 0;
  uint32_t acc = 0;
  for (int t = t0; t < t0 + T; ++t) {
    uint32_t* buf = hbuf + static_cast<size_t>(t & 1) * total;
    if constexpr (kExchange) {
      write_slice(buf, t, B, H, lo, hi);
    } else if (threadIdx.x == 0) {
      __stcg(flags + (t & 1) * G + k, static_cast<uint32_t>(t));
    }
    if constexpr (kSync == Sync::kCoop) {
      cg::this_grid().sync();
    } else if constexpr (kSync == Sync::kFlag) {
      flag_barrier(counter, static_cast<unsigned>(t - t0 + 1) * static_cast<unsigned>(G));
    } else if constexpr (kSync == Sync::kNoBarrier) {
      __syncthreads();
    }
    if constexpr (kExchange) {
      read_all(buf, t, B, H, smem, bad, acc);
    } else if (threadIdx.x == 0) {
      const uint32_t v = __ldcg(flags + (t & 1) * G + (k + 1) % G);
      bad += v != static_cast<uint32_t>(t);
      acc ^= v;
    }
  }
  if (bad) atomicAdd(errors, bad);
  __syncthreads();
  smem[threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.x == 0) sink[k] = smem[0] ^ smem[blockDim.x - 1];
}

// One launch of the per-step design: read the h of step t - 1 (written by the previous launch),
// then write this block's slice of step t. Same arguments as grid_steps; T is 1.
template <bool kExchange>
__global__ void launch_step(int t, int B, int H, uint32_t* hbuf, uint32_t* flags, unsigned* errors,
                            uint32_t* sink) {
  DYNAMIC_SMEM(smem);
  const int G = gridDim.x, k = blockIdx.x, total = B * H;
  unsigned bad = 0;
  uint32_t acc = 0;
  if (t > 0) {
    const uint32_t* prev = hbuf + static_cast<size_t>((t - 1) & 1) * total;
    if constexpr (kExchange) {
      read_all(prev, t - 1, B, H, smem, bad, acc);
    } else if (threadIdx.x == 0) {
      const uint32_t v = __ldcg(flags + ((t - 1) & 1) * G + (k + 1) % G);
      bad += v != static_cast<uint32_t>(t - 1);
      acc ^= v;
    }
  }
  if constexpr (kExchange) {
    int lo, hi;
    slice_of(k, G, H, lo, hi);
    write_slice(hbuf + static_cast<size_t>(t & 1) * total, t, B, H, lo, hi);
  } else if (threadIdx.x == 0) {
    __stcg(flags + (t & 1) * G + k, static_cast<uint32_t>(t));
  }
  if (bad) atomicAdd(errors, bad);
  if (threadIdx.x == 0 && acc == 0x12345678u) sink[k] = acc;  // keeps the reads alive
}

// Thread-block clusters (sm_90): T steps, each cluster.sync() plus (kExchange) the h exchange
// through distributed shared memory. Cluster c of the grid exchanges its own h of B x H words; its
// block of rank r owns columns [r H / C, (r + 1) H / C).
// Dynamic shared memory layout (words): [2][B * ceil(H / C)] this block's published slice (double
// buffer), then [B * H] its full copy of h.
//   errors, sink: as for grid_steps; supported: [1] set to 1 when this was compiled for sm_90+.
template <bool kExchange>
__global__ void cluster_steps(int T, int B, int H, unsigned* errors, uint32_t* sink,
                              unsigned* supported) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900) || defined(FASTLSTM_EMULATION)
  DYNAMIC_SMEM(smem);
  cg::cluster_group cluster = cg::this_cluster();
  const int C = static_cast<int>(cluster.num_blocks());
  const int r = static_cast<int>(cluster.block_rank());
  const int maxslice = (H + C - 1) / C;
  uint32_t* pub = smem;                     // [2][B * maxslice]
  uint32_t* local = smem + 2 * B * maxslice;  // [B * H]
  int lo, hi;
  slice_of(r, C, H, lo, hi);
  unsigned bad = 0;
  uint32_t acc = 0;
  if (blockIdx.x == 0 && threadIdx.x == 0) *supported = 1;
  for (int t = 0; t < T; ++t) {
    uint32_t* mine = pub + (t & 1) * B * maxslice;
    if constexpr (kExchange) {
      for (int b = 0; b < B; ++b) {
        for (int j = lo + static_cast<int>(threadIdx.x); j < hi; j += blockDim.x) {
          mine[b * maxslice + (j - lo)] = h_value(t, b, j);
        }
      }
    } else if (threadIdx.x == 0) {
      mine[0] = static_cast<uint32_t>(t);
    }
    cluster.sync();
    if constexpr (kExchange) {
      // Rank by rank, so that a warp's reads go to one remote block at a time.
      for (int q = 0; q < C; ++q) {
        int qlo, qhi;
        slice_of(q, C, H, qlo, qhi);
        const uint32_t* remote = cluster.map_shared_rank(pub, q) + (t & 1) * B * maxslice;
        for (int b = 0; b < B; ++b) {
          for (int j = qlo + static_cast<int>(threadIdx.x); j < qhi; j += blockDim.x) {
            const uint32_t v = remote[b * maxslice + (j - qlo)];
            bad += v != h_value(t, b, j);
            local[b * H + j] = v;
            acc ^= v;
          }
        }
      }
    } else if (threadIdx.x == 0) {
      const uint32_t* remote = cluster.map_shared_rank(pub, (r + 1) % C) + (t & 1) * B * maxslice;
      const uint32_t v = remote[0];
      bad += v != static_cast<uint32_t>(t);
      acc ^= v;
    }
  }
  // No block may exit while another can still read its shared memory.
  cluster.sync();
  if (bad) atomicAdd(errors, bad);
  if (threadIdx.x == 0 && acc == 0x12345678u) sink[blockIdx.x] = acc;
#else
  (void)T;
  (void)B;
  (void)H;
  (void)errors;
  (void)sink;
  (void)supported;
#endif
}

// Spins for about `ns` nanoseconds of %globaltimer and reports the SM cycles that took: the clock
// the SMs actually ran at (they idle far below their maximum between runs).
__device__ __forceinline__ uint64_t globaltimer_ns() {
#ifdef FASTLSTM_EMULATION
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch())
                                   .count());
#else
  uint64_t g;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g));
  return g;
#endif
}

__global__ void clock_probe(uint64_t ns, unsigned long long* out) {
  const uint64_t g0 = globaltimer_ns();
  uint64_t g1;
  const long long c0 = clock64();
  do {
    g1 = globaltimer_ns();
  } while (g1 - g0 < ns);
  const long long c1 = clock64();
  out[0] = static_cast<unsigned long long>(c1 - c0);
  out[1] = g1 - g0;
}

// Launch helpers: the device build uses the runtime; the host emulation runs the kernel's logic.
template <class... A>
cudaError_t launch_coop(void (*kernel)(A...), dim3 grid, dim3 block, void** args, size_t smem,
                        cudaStream_t stream) {
#ifdef FASTLSTM_EMULATION
  return cudaLaunchCooperativeKernel(kernel, grid, block, args, smem, stream);
#else
  return cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel), grid, block, args, smem, stream);
#endif
}
template <class... A, class... V>
cudaError_t launch_plain(void (*kernel)(A...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, V... v) {
#ifdef FASTLSTM_EMULATION
  return fastlstm_emu::launch_on(stream, kernel, grid, block, smem, v...);
#else
  kernel<<<grid, block, smem, stream>>>(v...);
  return cudaGetLastError();
#endif
}

struct Options {
  bool check = false;
  int steps = 1000;
  int reps = 7;
  int threads = 256;
  int smem_kb = 120;
  std::string csv;
};

struct Row {
  Row(std::string v, int g, int c, int h, int b, int s)
      : variant(std::move(v)), grid(g), cluster(c), H(h), B(b), steps(s) {}
  std::string variant;
  int grid, cluster, H, B, steps;
  double us_med = 0, us_min = 0;
  unsigned errors = 0;
  std::string note;
};

struct Bench {
  Options opt;
  cudaDeviceProp prop{};
  int dev = 0;
  bool cluster_ok = false;
  unsigned* counter = nullptr;
  unsigned* errors = nullptr;
  uint32_t* hbuf = nullptr;
  uint32_t* flags = nullptr;
  uint32_t* sink = nullptr;
  unsigned* supported = nullptr;
  cudaStream_t stream{};
  cudaEvent_t e0{}, e1{};
  std::vector<Row> rows;
  bool failed = false;

  static constexpr int kMaxB = 8, kMaxH = 1024, kMaxG = 1024;

  size_t smem_bytes(int B, int H, int C) const {
    size_t need = static_cast<size_t>(B) * H * 4;
    if (C > 0) need += 2 * static_cast<size_t>(B) * ((H + C - 1) / C) * 4;
    need = std::max(need, static_cast<size_t>(opt.threads) * 4);
    return std::max(need, static_cast<size_t>(opt.smem_kb) * 1024);
  }

  void init() {
    CK(cudaGetDevice(&dev));
    CK(cudaGetDeviceProperties(&prop, dev));
    CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    CK(cudaMalloc(&counter, sizeof(unsigned)));
    CK(cudaMalloc(&errors, sizeof(unsigned)));
    CK(cudaMalloc(&supported, sizeof(unsigned)));
    CK(cudaMalloc(&hbuf, 2ull * kMaxB * kMaxH * 4));
    CK(cudaMalloc(&flags, 2ull * kMaxG * 4));
    CK(cudaMalloc(&sink, kMaxG * 4));
    // Every kernel may take the large dynamic shared memory.
    const int max_optin = static_cast<int>(prop.sharedMemPerBlockOptin);
    CK(cudaFuncSetAttribute(grid_steps<Sync::kCoop, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, max_optin));
    CK(cudaFuncSetAttribute(grid_steps<Sync::kCoop, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, max_optin));
    CK(cudaFuncSetAttribute(grid_steps<Sync::kFlag, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, max_optin));
    CK(cudaFuncSetAttribute(grid_steps<Sync::kFlag, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, max_optin));
    CK(cudaFuncSetAttribute(grid_steps<Sync::kNoBarrier, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, max_optin));
    CK(cudaFuncSetAttribute(launch_step<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, max_optin));
    CK(cudaFuncSetAttribute(launch_step<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, max_optin));
    if (prop.major >= 9) {
      CK(cudaFuncSetAttribute(cluster_steps<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, max_optin));
      CK(cudaFuncSetAttribute(cluster_steps<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, max_optin));
      CK(cudaFuncSetAttribute(cluster_steps<false>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
      CK(cudaFuncSetAttribute(cluster_steps<true>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    }
  }

  void reset(int B, int H) {
    CK(cudaMemsetAsync(counter, 0, sizeof(unsigned), stream));
    CK(cudaMemsetAsync(errors, 0, sizeof(unsigned), stream));
    // Poison: a read that sees memory no step wrote fails the check.
    CK(cudaMemsetAsync(hbuf, 0xA5, 2ull * B * H * 4, stream));
    CK(cudaMemsetAsync(flags, 0xA5, 2ull * kMaxG * 4, stream));
  }

  unsigned read_errors() {
    unsigned e = 0;
    CK(cudaStreamSynchronize(stream));
    CK(cudaMemcpy(&e, errors, sizeof e, cudaMemcpyDeviceToHost));
    return e;
  }

  // Times `body` (enqueues T steps on `stream`) opt.reps times after one warm-up; fills the row.
  template <typename F>
  void time_row(Row& row, int B, int H, F&& body) {
    std::vector<double> us;
    unsigned errs = 0;
    for (int rep = 0; rep <= opt.reps; ++rep) {
      reset(B, H);
      CK(cudaEventRecord(e0, stream));
      body();
      CK(cudaEventRecord(e1, stream));
      CK(cudaGetLastError());
      errs += read_errors();
      float ms = 0;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      if (rep > 0) us.push_back(1000.0 * ms / row.steps);
    }
    std::sort(us.begin(), us.end());
    row.us_med = us[us.size() / 2];
    row.us_min = us.front();
    row.errors = errs;
    if (errs && row.variant != "nobarrier+h(control)") failed = true;
    rows.push_back(row);
    print_row(row);
  }

  template <typename K>
  bool coop_fits(K kernel, int G, size_t smem) {
    int per_sm = 0;
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, opt.threads, smem));
    return G <= per_sm * prop.multiProcessorCount;
  }

  template <Sync kSync, bool kExchange>
  void run_grid(const char* name, int G, int B, int H) {
    Row row(name, G, 0, kExchange ? H : 0, kExchange ? B : 0, opt.steps);
    const size_t smem = smem_bytes(B, H, 0);
    auto kernel = grid_steps<kSync, kExchange>;
    if (!coop_fits(kernel, G, smem)) {
      skip(row, "grid does not fit co-resident");
      return;
    }
    time_row(row, B, H, [&] {
      int t0 = 0, T = opt.steps;
      void* args[] = {&t0, &T, &B, &H, &counter, &hbuf, &flags, &errors, &sink};
      // The flag barrier needs co-residency as much as grid.sync() does; a cooperative launch
      // makes the runtime refuse a grid that would not be.
      CK(launch_coop(kernel, dim3(G), dim3(opt.threads), args, smem, stream));
    });
  }

  template <bool kExchange>
  void enqueue_launches(int G, int B, int H, size_t smem) {
    for (int t = 0; t < opt.steps; ++t) {
      CK(launch_plain(launch_step<kExchange>, dim3(G), dim3(opt.threads), smem, stream, t, B, H, hbuf,
                      flags, errors, sink));
    }
  }

  template <bool kExchange>
  void run_launch(int G, int B, int H) {
    Row row(kExchange ? "launch+h" : "launch", G, 0, kExchange ? H : 0, kExchange ? B : 0, opt.steps);
    const size_t smem = smem_bytes(B, H, 0);
    time_row(row, B, H, [&] { enqueue_launches<kExchange>(G, B, H, smem); });
  }

  template <bool kExchange>
  void run_graph(int G, int B, int H) {
    Row row(kExchange ? "graph+h" : "graph", G, 0, kExchange ? H : 0, kExchange ? B : 0, opt.steps);
    const size_t smem = smem_bytes(B, H, 0);
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    enqueue_launches<kExchange>(G, B, H, smem);
    CK(cudaStreamEndCapture(stream, &graph));
    CK(cudaGraphInstantiate(&exec, graph, 0));
    time_row(row, B, H, [&] { CK(cudaGraphLaunch(exec, stream)); });
    CK(cudaGraphExecDestroy(exec));
    CK(cudaGraphDestroy(graph));
  }

  // A launch of G blocks in clusters of C, with attr[0] set to the cluster size. Built by
  // position: under the emulator gridDim and blockDim are macros (tests/emu/emu.h), so the
  // config's members cannot be named.
  cudaLaunchConfig_t cluster_config(int G, int C, size_t smem, cudaStream_t s, cudaLaunchAttribute* attr) const {
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = C;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    return cudaLaunchConfig_t{dim3(G), dim3(opt.threads), smem, s, attr, 1};
  }

  template <bool kExchange>
  void run_cluster(int C, int G, int B, int H) {
    Row row("cluster-" + std::to_string(C) + (kExchange ? "+h" : ""), G, C,
            kExchange ? H : 0, kExchange ? B : 0, opt.steps);
    if (!cluster_ok) {
      skip(row, "no sm_90 cluster support in this build or GPU");
      return;
    }
    const size_t smem = smem_bytes(B, H, C);
    cudaLaunchAttribute attr[1];
    cudaLaunchConfig_t cfg = cluster_config(G > 0 ? G : C, C, smem, stream, attr);
    int max_clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&max_clusters, cluster_steps<kExchange>, &cfg) != cudaSuccess) {
      (void)cudaGetLastError();
      skip(row, "cudaOccupancyMaxActiveClusters refused this cluster size");
      return;
    }
    if (G <= 0) {
      // Fill the chip: as many clusters of C as can be resident at once (GPCs have different SM
      // counts, so this can be fewer than SMs / C).
      G = max_clusters * C;
      row.grid = G;
      cfg = cluster_config(G, C, smem, stream, attr);
      if (G == C) {
        skip(row, "one cluster fills the chip (the single-cluster row)");
        return;
      }
    }
    if (G / C > max_clusters || max_clusters == 0) {
      skip(row, "only " + std::to_string(max_clusters) + " clusters co-resident");
      return;
    }
    time_row(row, B, H, [&] {
      CK(cudaLaunchKernelEx(&cfg, cluster_steps<kExchange>, opt.steps, B, H, errors, sink, supported));
    });
  }

  void probe_cluster_support() {
    if (prop.major < 9) return;
    CK(cudaMemset(supported, 0, sizeof(unsigned)));
    cudaLaunchAttribute attr[1];
    const cudaLaunchConfig_t cfg = cluster_config(2, 2, smem_bytes(1, 256, 2), nullptr, attr);
    CK(cudaLaunchKernelEx(&cfg, cluster_steps<false>, 2, 1, 256, errors, sink, supported));
    CK(cudaDeviceSynchronize());
    unsigned s = 0;
    CK(cudaMemcpy(&s, supported, sizeof s, cudaMemcpyDeviceToHost));
    cluster_ok = s == 1;
  }

  void skip(Row& row, const std::string& why) {
    row.note = "SKIPPED: " + why;
    rows.push_back(row);
    print_row(row);
  }

  static void print_header_line() {
    std::printf("%-22s %5s %4s %5s %2s %8s %8s %6s  %s\n", "variant", "grid", "clus", "H", "B",
                "us/step", "min", "errors", "note");
  }
  static void print_row(const Row& r) {
    if (!r.note.empty()) {
      std::printf("%-22s %5d %4d %5d %2d %8s %8s %6s  %s\n", r.variant.c_str(), r.grid, r.cluster,
                  r.H, r.B, "-", "-", "-", r.note.c_str());
    } else {
      std::printf("%-22s %5d %4d %5d %2d %8.3f %8.3f %6u  %s\n", r.variant.c_str(), r.grid, r.cluster,
                  r.H, r.B, r.us_med, r.us_min, r.errors, r.errors ? "ERRORS" : "");
    }
    std::fflush(stdout);
  }

  // SM clock in MHz over a ~20 ms spin of one block.
  double measure_clock_mhz() {
    unsigned long long* d;
    unsigned long long h[2];
    CK(cudaMalloc(&d, sizeof h));
    CK(launch_plain(clock_probe, dim3(1), dim3(1), 0, stream, uint64_t{20000000ull}, d));
    CK(cudaStreamSynchronize(stream));
    CK(cudaMemcpy(h, d, sizeof h, cudaMemcpyDeviceToHost));
    CK(cudaFree(d));
    return h[1] ? 1000.0 * static_cast<double>(h[0]) / static_cast<double>(h[1]) : 0.0;
  }
};

int parse_int(const char* s, const char* name, int lo, int hi) {
  return bench_util::parse_int("latency_floor", s, name, lo, hi);
}

}  // namespace

int main(int argc, char** argv) {
  Bench bench;
  Options& opt = bench.opt;
  std::string cmdline;
  for (int i = 0; i < argc; ++i) cmdline += std::string(i ? " " : "") + argv[i];
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&](const char* name) -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "latency_floor: %s needs a value\n", name);
        std::exit(3);
      }
      return argv[++i];
    };
    if (a == "--check") {
      opt.check = true;
    } else if (a == "--csv") {
      opt.csv = next("--csv");
    } else if (a == "--steps") {
      opt.steps = parse_int(next("--steps"), "--steps", 2, 1000000);
    } else if (a == "--reps") {
      opt.reps = parse_int(next("--reps"), "--reps", 1, 1000);
    } else if (a == "--threads") {
      opt.threads = parse_int(next("--threads"), "--threads", 32, 1024);
    } else if (a == "--smem-kb") {
      opt.smem_kb = parse_int(next("--smem-kb"), "--smem-kb", 0, 227);
    } else {
      std::fprintf(stderr, "usage: latency_floor [--check] [--csv FILE] [--steps T] [--reps R] "
                           "[--threads N] [--smem-kb K]\n");
      return 3;
    }
  }
  if (opt.check) {
    opt.steps = std::min(opt.steps, 64);
    opt.reps = std::min(opt.reps, 2);
  }

  int ndev = 0;
  const cudaError_t derr = cudaGetDeviceCount(&ndev);
  if (derr != cudaSuccess || ndev == 0) {
    std::fprintf(stderr, "latency_floor: no CUDA device (%s)\n",
                 derr != cudaSuccess ? cudaGetErrorString(derr) : "device count 0");
    return 2;
  }
  bench.init();
  const cudaDeviceProp& p = bench.prop;
  if (static_cast<size_t>(opt.smem_kb) * 1024 > p.sharedMemPerBlockOptin) {
    std::fprintf(stderr, "latency_floor: --smem-kb %d exceeds this GPU's %zu bytes per block\n",
                 opt.smem_kb, p.sharedMemPerBlockOptin);
    return 3;
  }
  int drv = 0, rt = 0;
  CK(cudaDriverGetVersion(&drv));
  CK(cudaRuntimeGetVersion(&rt));
  const int sms = p.multiProcessorCount;

  // Warm-up: the SMs idle at a low clock; a few hundred ms of barriers bring them up before the
  // clock is read and anything is timed.
  {
    const int G = std::min(sms, 64);
#ifdef FASTLSTM_EMULATION
    int t0 = 0, T = 4, B = 1, H = 256;  // the emulation has no clock to warm up
#else
    int t0 = 0, T = 100000, B = 1, H = 256;
#endif
    void* args[] = {&t0, &T, &B, &H, &bench.counter, &bench.hbuf, &bench.flags, &bench.errors, &bench.sink};
    bench.reset(B, H);
    CK(launch_coop(grid_steps<Sync::kCoop, false>, dim3(G), dim3(opt.threads), args,
                   bench.smem_bytes(B, H, 0), bench.stream));
    CK(cudaStreamSynchronize(bench.stream));
  }
  const double mhz_before = bench.measure_clock_mhz();
  bench.probe_cluster_support();

  std::vector<std::string> header = {
      "gpu: " + std::string(p.name),
      "compute capability: " + std::to_string(p.major) + "." + std::to_string(p.minor),
      "SMs: " + std::to_string(sms) + ", L2: " + std::to_string(p.l2CacheSize >> 20) +
          " MiB, shared memory per block (opt-in): " + std::to_string(p.sharedMemPerBlockOptin) +
          " B, per SM: " + std::to_string(p.sharedMemPerMultiprocessor) + " B",
      "driver API version: " + std::to_string(drv) + ", runtime version: " + std::to_string(rt) +
          " (the driver's own version: nvidia-smi, in the run script's log)",
      "date (UTC): " + bench_util::utc_now(),
      "command: " + cmdline,
      "steps per timing: " + std::to_string(opt.steps) + ", repetitions: " + std::to_string(opt.reps) +
          " (median and min reported), threads per block: " + std::to_string(opt.threads) +
          ", dynamic shared memory per block: >= " + std::to_string(opt.smem_kb) + " KB",
      "cluster barriers: " + std::string(bench.cluster_ok ? "available" : "not available (needs sm_90 code)"),
      "SM clock measured after warm-up: " + std::to_string(static_cast<int>(mhz_before)) + " MHz",
  };
  for (const auto& h : header) std::printf("# %s\n", h.c_str());
  Bench::print_header_line();

  std::vector<int> grids = {8, 16, 32, 64, 128, 132};
  std::vector<int> Hs = {256, 512, 1024};
  std::vector<int> Bs = {1, 8};
  std::vector<int> clusters = {2, 4, 8, 16};
  if (opt.check) {
    grids = {8, std::min(sms, 132)};
    Hs = {256, 1024};
    Bs = {1, 8};
    clusters = {2, 8};
  }
  grids.erase(std::remove_if(grids.begin(), grids.end(), [&](int g) { return g > sms; }), grids.end());
  if (std::find(grids.begin(), grids.end(), sms) == grids.end() && !opt.check) grids.push_back(sms);

  for (int G : grids) {
    bench.run_launch<false>(G, 1, 256);
    bench.run_graph<false>(G, 1, 256);
    bench.run_grid<Sync::kCoop, false>("coop", G, 1, 256);
    bench.run_grid<Sync::kFlag, false>("flag", G, 1, 256);
  }
  for (int H : Hs) {
    for (int B : Bs) {
      for (int G : grids) {
        bench.run_launch<true>(G, B, H);
        bench.run_graph<true>(G, B, H);
        bench.run_grid<Sync::kCoop, true>("coop+h", G, B, H);
        bench.run_grid<Sync::kFlag, true>("flag+h", G, B, H);
      }
    }
  }
  // Clusters: one cluster (the smallest grid that can hold a whole recurrence), and as many
  // co-resident clusters as fill the chip (independent recurrences side by side: batch tiles or
  // directions). cluster.sync() does not depend on H: measured once per size without exchange.
  // G = 0 asks run_cluster to fill the chip.
  for (int C : clusters) {
    for (int G : {C, 0}) bench.run_cluster<false>(C, G, 1, 256);
    for (int H : Hs) {
      for (int B : Bs) {
        for (int G : {C, 0}) bench.run_cluster<true>(C, G, B, H);
      }
    }
  }
  if (opt.check) {
    // Negative control: the same exchange with no grid barrier. Errors are expected (and do not
    // fail the run); none would mean the check cannot see a missing barrier at this size.
    bench.run_grid<Sync::kNoBarrier, true>("nobarrier+h(control)", std::min(sms, 132), 8, 1024);
  }
  const double mhz_after = bench.measure_clock_mhz();
  std::printf("# SM clock measured at the end: %d MHz\n", static_cast<int>(mhz_after));

  if (!opt.csv.empty()) {
    FILE* f = std::fopen(opt.csv.c_str(), "w");
    if (!f) {
      std::fprintf(stderr, "latency_floor: cannot write %s\n", opt.csv.c_str());
      return 1;
    }
    for (const auto& h : header) std::fprintf(f, "# %s\n", h.c_str());
    std::fprintf(f, "# SM clock measured at the end: %d MHz\n", static_cast<int>(mhz_after));
    std::fprintf(f, "variant,grid_blocks,cluster,H,B,steps,us_per_step_median,us_per_step_min,errors,note\n");
    for (const auto& r : bench.rows) {
      std::fprintf(f, "%s,%d,%d,%d,%d,%d,%.4f,%.4f,%u,%s\n", r.variant.c_str(), r.grid, r.cluster, r.H,
                   r.B, r.steps, r.us_med, r.us_min, r.errors, r.note.c_str());
    }
    std::fclose(f);
  }

  // Summary: the floor per regime, for NOTES-gpu.md.
  auto best = [&](const std::string& prefix, int H, int B) {
    double b = 1e30;
    for (const auto& r : bench.rows) {
      if (r.note.empty() && r.errors == 0 && r.variant.rfind(prefix, 0) == 0 && r.H == H && r.B == B) {
        b = std::min(b, r.us_med);
      }
    }
    return b;
  };
  std::printf("# summary: best median us/step per family (H, B)\n");
  for (int H : Hs) {
    for (int B : Bs) {
      std::printf("#   H=%4d B=%d  launch+h %.3f  graph+h %.3f  coop+h %.3f  flag+h %.3f  cluster+h %.3f\n", H,
                  B, best("launch+h", H, B), best("graph+h", H, B), best("coop+h", H, B),
                  best("flag+h", H, B), best("cluster-", H, B));
    }
  }
  if (bench.failed) {
    std::printf("# FAILED: some rows saw errors (a barrier let a block read a stale h)\n");
    return 1;
  }
  std::printf("# OK: every row saw the values of its own step\n");
  return 0;
}
