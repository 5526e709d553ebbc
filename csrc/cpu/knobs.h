// Every environment variable the CPU kernels read, all read once per process (at the first call
// that needs any of them). All but FASTLSTM_CPU_CACHE_MB and FASTLSTM_CPU_PLAN are overrides for comparisons:
// they change which code runs, never what a correct result is.
//   FASTLSTM_CPU_WHH=direct|packed   the recurrent product: w_hh read in place, or packed panels
//   FASTLSTM_CPU_PROJ=block|whole    the input projection: per block in the step loop, or per chunk
//   FASTLSTM_CPU_SYNC=barrier|fork   the step loop: one parallel region with a barrier a step, or a
//                                    parallel_for a step
//   FASTLSTM_CPU_GEMM=blas           no oneDNN brgemm (the BLAS/ATen products instead)
//   FASTLSTM_CPU_BF16=float          bfloat16 computed on float32 copies, not natively
//   FASTLSTM_CPU_CACHE_MB=N          the block cache's cap in MiB (block_cache.h; default 256, 0: off)
//   FASTLSTM_CPU_PLAN=1              print each layer call's plan (layer_plan.h) to stderr
#pragma once

#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>

namespace fastlstm::cpu {

struct Knobs {
  enum class Choice { kAuto, kFirst, kSecond };  // unset, or forced to the first / second value
  Choice whh = Choice::kAuto;   // kFirst: direct, kSecond: packed
  Choice proj = Choice::kAuto;  // kFirst: block, kSecond: whole
  Choice sync = Choice::kAuto;  // kFirst: barrier, kSecond: fork
  bool no_brgemm = false;
  bool no_native_bf16 = false;
  long long cache_mb = 256;
  bool print_plan = false;

  std::string describe() const {
    const auto choice = [](Choice c, const char* first, const char* second) {
      return c == Choice::kAuto ? "auto" : c == Choice::kFirst ? first : second;
    };
    std::ostringstream s;
    s << "whh=" << choice(whh, "direct", "packed") << " proj=" << choice(proj, "block", "whole")
      << " sync=" << choice(sync, "barrier", "fork") << " gemm=" << (no_brgemm ? "blas" : "auto")
      << " bf16=" << (no_native_bf16 ? "float" : "auto") << " cache_mb=" << cache_mb;
    return s.str();
  }
};

namespace detail {
// The value of `name` as a Choice: kFirst if it is `first`, kSecond if `second`, else (unset or
// anything else) kAuto.
inline Knobs::Choice env_choice(const char* name, const char* first, const char* second) {
  const char* env = std::getenv(name);
  if (env == nullptr) return Knobs::Choice::kAuto;
  if (std::strcmp(env, first) == 0) return Knobs::Choice::kFirst;
  if (std::strcmp(env, second) == 0) return Knobs::Choice::kSecond;
  return Knobs::Choice::kAuto;
}

inline bool env_is(const char* name, const char* value) {
  const char* env = std::getenv(name);
  return env != nullptr && std::strcmp(env, value) == 0;
}

inline Knobs read_knobs() {
  Knobs k;
  k.whh = env_choice("FASTLSTM_CPU_WHH", "direct", "packed");
  k.proj = env_choice("FASTLSTM_CPU_PROJ", "block", "whole");
  k.sync = env_choice("FASTLSTM_CPU_SYNC", "barrier", "fork");
  k.no_brgemm = env_is("FASTLSTM_CPU_GEMM", "blas");
  k.no_native_bf16 = env_is("FASTLSTM_CPU_BF16", "float");
  if (const char* mb = std::getenv("FASTLSTM_CPU_CACHE_MB")) k.cache_mb = std::atoll(mb);
  k.print_plan = env_is("FASTLSTM_CPU_PLAN", "1");
  return k;
}
}  // namespace detail

inline const Knobs& knobs() {
  static const Knobs k = detail::read_knobs();
  return k;
}

}  // namespace fastlstm::cpu
