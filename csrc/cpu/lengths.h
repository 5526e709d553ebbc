// Variable lengths (`lengths`, a PackedSequence's batch sizes): which rows run at each step.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace fastlstm::cpu {

// Per step, how many leading rows are active. With lengths sorted in decreasing order (what a
// PackedSequence gives) inactive rows are a suffix and the matmuls skip them; otherwise all rows
// take part and the row loops test each one.
struct Activity {
  const int64_t* len = nullptr;  // [B] or null: every row runs every step
  bool sorted = false;
  int64_t B = 0;
  int64_t rows(int64_t t) const {
    if (len == nullptr || !sorted) return B;
    int64_t lo = 0, hi = B;  // first row with len <= t
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (len[mid] > t) lo = mid + 1; else hi = mid;
    }
    return lo;
  }
  bool active(int64_t b, int64_t t) const { return len == nullptr || len[b] > t; }
};

inline Activity make_activity(const at::Tensor& lengths_cpu, int64_t B) {
  Activity a;
  a.B = B;
  if (!lengths_cpu.defined()) return a;
  a.len = lengths_cpu.data_ptr<int64_t>();
  a.sorted = B > 0;  // an empty batch has no rows to skip (and `rows` users divide by B)
  for (int64_t b = 1; b < B; ++b) a.sorted &= a.len[b] <= a.len[b - 1];
  return a;
}

inline at::Tensor lengths_on_cpu(const std::optional<at::Tensor>& lengths, int64_t T) {
  if (!lengths.has_value() || !lengths->defined()) return {};
  auto l = lengths->contiguous();
  TORCH_CHECK(l.numel() == 0 || (l.min().item<int64_t>() >= 0 && l.max().item<int64_t>() <= T),
              "lengths must lie in [0, T] = [0, ", T, "]");
  return l;
}

}  // namespace fastlstm::cpu
