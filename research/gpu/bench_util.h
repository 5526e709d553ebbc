// Helpers shared by the standalone GPU programs in research/gpu (latency_floor.cu,
// persistent_prototype.cu): a CUDA error check, strict integer options, a UTC timestamp, and the
// two primitives of their hand-made grid barrier. Include it after cuda_runtime.h, or after
// tests/emu/host_api.h under FASTLSTM_EMULATION.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <string>

#define CK(call)                                                                           \
  do {                                                                                     \
    cudaError_t e_ = (call);                                                               \
    if (e_ != cudaSuccess) {                                                               \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorName(e_), __FILE__, \
                   __LINE__, cudaGetErrorString(e_));                                      \
      std::exit(1);                                                                        \
    }                                                                                      \
  } while (0)

namespace bench_util {

// The option `name` as an integer in [lo, hi]; anything else exits with status 3 (bad argument).
inline int parse_int(const char* prog, const char* s, const char* name, int lo, int hi) {
  char* end = nullptr;
  const long v = std::strtol(s, &end, 10);
  if (end == s || *end != '\0' || v < lo || v > hi) {
    std::fprintf(stderr, "%s: %s must be an integer in [%d, %d], got '%s'\n", prog, name, lo, hi, s);
    std::exit(3);
  }
  return static_cast<int>(v);
}

inline std::string utc_now() {
  char buf[32];
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

}  // namespace bench_util

// The flag barrier's arrival (a GPU-scope release: it publishes the writes that came before it)
// and its poll (a GPU-scope acquire load of the arrival counter).
#ifdef FASTLSTM_EMULATION
inline void arrive_release(unsigned* counter) { ++*counter; }
inline unsigned load_acquire(const unsigned* counter) {
  fastlstm_emu::spin_wait();  // a spinning thread lets the others run
  return *counter;
}
#else
__device__ __forceinline__ void arrive_release(unsigned* counter) {
  asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(counter) : "memory");
}
__device__ __forceinline__ unsigned load_acquire(const unsigned* counter) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(counter) : "memory");
  return v;
}
#endif
