// A step loop as one parallel region with a barrier a step, instead of one parallel_for (a fork and
// a join) a step. Each thread keeps its blocks for every step; h is double-buffered by the caller, so
// one barrier a step suffices. The blocks compute what they compute in a per-step loop: results are
// bitwise equal either way.
#pragma once

#include <ATen/Parallel.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace fastlstm::cpu {

// One wait of a spinning loop: a pause for the first 256, then a yield, so that more threads than
// cores still make progress.
inline void pause_or_yield(int64_t spins) {
  if (spins < 256) {
#if defined(__x86_64__) || defined(_M_X64)
    _mm_pause();
#endif
  } else {
    std::this_thread::yield();
  }
}

// Waits until `count` reaches `target` (acquiring what the other threads wrote before adding to it),
// or returns false once `failed` is set (another thread threw).
inline bool spin_until(const std::atomic<int64_t>& count, int64_t target, const std::atomic<bool>& failed) {
  for (int64_t spins = 0; count.load(std::memory_order_acquire) < target; ++spins) {
    if (failed.load(std::memory_order_relaxed)) return false;
    pause_or_yield(spins);
  }
  return true;
}

// Waits until `state` leaves 0 (all the chunks of a parallel_for have arrived: 1), for at most 100 ms;
// false if it is still 0 then, or if it is 2 (another chunk has taken over).
inline bool wait_for_all(const std::atomic<int>& state) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(100);
  for (int64_t spins = 0;; ++spins) {
    const int s = state.load(std::memory_order_acquire);
    if (s != 0) return s == 1;
    if (spins >= 256 && std::chrono::steady_clock::now() > deadline) return false;
    pause_or_yield(spins);
  }
}

// Whether run_steps_with_barrier can run here: with ATen's OpenMP backend (its parallel_for runs
// every chunk on its own thread at once, which a barrier needs; others may run chunks one after
// another), more than one thread, outside another parallel region.
inline bool step_barrier_available() {
#if AT_PARALLEL_OPENMP
  return at::get_num_threads() > 1 && !at::in_parallel_region();
#else
  return false;
#endif
}

// Runs step_blocks(step, k0, k1) for steps 0 .. steps - 1 and all `blocks` blocks, each thread its
// parallel_for chunk of blocks, all threads done with a step before any starts the next. The
// barrier needs every chunk running at once; that is checked, not assumed: the chunks first wait (up
// to 100 ms) until all blocks have arrived; if they have not, the first to give up runs every block
// of every step itself and the chunks that arrive later do nothing.
template <typename F>
void run_steps_with_barrier(int64_t steps, int64_t blocks, int64_t grain, const F& step_blocks) {
  std::atomic<int64_t> arrived{0}, done{0};
  std::atomic<int> state{0};  // 0 arriving, 1 all arrived (barrier steps), 2 one chunk runs all
  std::atomic<bool> failed{false};
  at::parallel_for(0, blocks, grain, [&](int64_t k0, int64_t k1) {
    try {
      if (arrived.fetch_add(k1 - k0, std::memory_order_acq_rel) + (k1 - k0) == blocks) {
        int expected = 0;
        state.compare_exchange_strong(expected, 1);
      }
      if (!wait_for_all(state)) {  // not all arrived in time
        int expected = 0;
        if (state.compare_exchange_strong(expected, 2)) {  // the first to give up runs every block
          for (int64_t step = 0; step < steps; ++step) step_blocks(step, 0, blocks);
          return;
        }
        if (expected == 2) return;  // another chunk took over; else all arrived meanwhile
      }
      for (int64_t step = 0; step < steps; ++step) {
        step_blocks(step, k0, k1);
        if (step + 1 == steps) break;  // the region's own join waits for the last step
        done.fetch_add(k1 - k0, std::memory_order_acq_rel);
        if (!spin_until(done, (step + 1) * blocks, failed)) return;
      }
    } catch (...) {
      failed.store(true);  // releases the other threads' waits; parallel_for rethrows
      throw;
    }
  });
}

}  // namespace fastlstm::cpu
