// How products are cut into tiles and shared among threads. Every cut depends on the shapes alone,
// never on the thread count, so each sum is computed the same way whichever thread computes it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace fastlstm::cpu {

// M rows in tiles of at most max_rows, the rows shared evenly among them: {tiles, rows per tile}.
// A short last tile would leave the thread that got it idle at the end. The tiles depend on M alone,
// never on the thread count.
inline std::pair<int64_t, int64_t> row_tiles(int64_t M, int64_t max_rows) {
  const int64_t tiles = (M + max_rows - 1) / max_rows;
  return {tiles, tiles > 0 ? (M + tiles - 1) / tiles : max_rows};
}

// The row tiles of a product of M rows as {first row, rows}: row_tiles(M, max_rows), or with `rows`
// (the M rows come in M / stride blocks of stride > 0 rows, of which only the first rows[s] of block
// s take part) the row tiles of each block's rows. A block's rows in its own tiles give each row the
// sums it gets in one tile list over all rows: a row's sum does not depend on its tile.
inline std::vector<std::pair<int64_t, int64_t>> segment_tiles(int64_t M, int64_t stride, const int64_t* rows,
                                                              int64_t max_rows) {
  const int64_t segments = rows != nullptr ? M / stride : 1;
  std::vector<std::pair<int64_t, int64_t>> out;
  for (int64_t s = 0; s < segments; ++s) {
    const int64_t m = rows != nullptr ? rows[s] : M;
    const std::pair<int64_t, int64_t> t = row_tiles(m, max_rows);
    for (int64_t i = 0; i < t.first; ++i) out.emplace_back(s * stride + i * t.second, std::min(t.second, m - i * t.second));
  }
  return out;
}

// The work of a product over panels of nt columns as units of (row tile, group of `unit` columns;
// unit divides nt), row tile major: units [begin, end) as calls f(row tile, first column, columns),
// one per run of units inside one tile and one panel. Threads share out units of 16 columns, not
// whole panels, where the product runs on brgemm, whose sums for a column do not depend on how the
// columns are cut (with N = 400 in panels of 64, whole panels would give two threads 256 and 144
// columns). BLAS (float64; float32 without brgemm) gets whole panels, as its sums may depend on N and
// the cuts on the thread count.
template <typename F>
inline void for_column_runs(int64_t begin, int64_t end, int64_t groups, int64_t N, int64_t nt, int64_t unit,
                            const F& f) {
  for (int64_t u = begin; u < end;) {
    const int64_t m = u / groups, g = u % groups;
    const int64_t panel_end = std::min(groups, (g * unit / nt + 1) * (nt / unit));  // first group past it
    const int64_t g_end = std::min(panel_end, g + (end - u));
    f(m, g * unit, std::min(N, g_end * unit) - g * unit);
    u += g_end - g;
  }
}

}  // namespace fastlstm::cpu
