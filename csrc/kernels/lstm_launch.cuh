// Host-side helpers of the launchers: the one kernel launch, grid sizes, the 16-byte load check, and
// the choice of the batch tile (a compile-time kernel parameter) from the run-time sizes.
#pragma once

#include <type_traits>

#include "lstm_device.cuh"

namespace fastlstm {
namespace cuda {
namespace detail {

// Every kernel is launched here, with kThreads threads and only static shared memory. Compiled as
// host C++ for the emulator (tests/emu), the same call runs the kernel on CPU fibers instead.
template <typename... Params, typename... Args>
inline cudaError_t launch(void (*kernel)(Params...), dim3 grid, cudaStream_t stream, Args... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "wrong number of kernel arguments");
#if defined(FASTLSTM_EMULATION)
  return ::fastlstm_emu::launch(kernel, grid, dim3(kThreads), stream, static_cast<Params>(args)...);
#else
  kernel<<<grid, kThreads, 0, stream>>>(static_cast<Params>(args)...);
  return cudaGetLastError();
#endif
}

inline unsigned blocks_for(int n, int tile) { return static_cast<unsigned>((n + tile - 1) / tile); }

// 16-byte loads of rows of length `ld` starting at p stay aligned and never straddle the end of a row.
template <typename T>
inline bool vec_ok(const T* p, int64_t ld) {
  return aligned16(p) && ld % TileK<T>::kVec == 0;
}

// Calls f(std::integral_constant<int, kBB>, std::bool_constant<kHasLengths>). Small batches get a
// small batch tile (fewer idle rows); larger ones the largest tile that still gives about one block
// per SM, since every batch tile re-reads the weights.
template <typename F>
cudaError_t with_config(int B, int N, bool has_lengths, F&& f) {
  auto with_bb = [&](auto has) -> cudaError_t {
    if (B <= 8) return f(std::integral_constant<int, 8>{}, has);
    if (B <= 16 || static_cast<int64_t>(blocks_for(B, 32)) * blocks_for(N, kTileN) < 128) {
      return f(std::integral_constant<int, 16>{}, has);
    }
    return f(std::integral_constant<int, 32>{}, has);
  };
  return has_lengths ? with_bb(std::true_type{}) : with_bb(std::false_type{});
}

}  // namespace detail
}  // namespace cuda
}  // namespace fastlstm
