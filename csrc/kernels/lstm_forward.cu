// Forward timestep kernels (declared and documented in lstm_kernels.cuh).
#include "lstm_device.cuh"
#include "lstm_launch.cuh"

namespace fastlstm {
namespace cuda {
namespace {

using namespace detail;

// Recurrent matmul for the four gates of the block's hidden units, then the cell update in registers.
// Without kTraining, gates and cells are not written (they may be nullptr).
// Grid: (ceil(B / kBB), ceil(H / kTileN)).
template <typename T, int kBB, bool kHasLengths, bool kHasProj, bool kTraining>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    lstm_forward_cell_kernel(int B, int H, int P, const T* __restrict__ w_hh,
                             const T* __restrict__ xg, const int64_t* __restrict__ lengths,
                             int64_t t, const T* __restrict__ h_prev, T* __restrict__ h_next,
                             AccT<T>* __restrict__ c_state, T* __restrict__ output,
                             T* __restrict__ gates, AccT<T>* __restrict__ cells,
                             T* __restrict__ hidden, bool vec_a, bool vec_w) {
  using Acc = AccT<T>;
  const int b0 = blockIdx.x * kBB, n0 = blockIdx.y * kTileN;
  Acc acc[4][2][2];
  int col[2], row[2];
  // h_prev [B, P] @ w_hh^T; group g of column j is row g * H + j of w_hh.
  if (!block_matmul<T, 4, kBB, true>(h_prev, w_hh, B, H, P, P, H, b0, n0, vec_a, vec_w, acc, col,
                                     row)) {
    return;
  }
  const T tzero = zero<T>();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int b = b0 + row[r];
    if (b >= B) continue;
    const bool active = !kHasLengths || t < lengths[b];
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int j = n0 + col[c];
      if (j >= H) continue;
      const int64_t bj = static_cast<int64_t>(b) * H + j;
      const int64_t bg = static_cast<int64_t>(b) * 4 * H + j;
      const int64_t bp = static_cast<int64_t>(b) * P + j;
      if (active) {
        const Acc i = sigmoid(acc[0][c][r] + to_acc(xg[bg]));
        const Acc f = sigmoid(acc[1][c][r] + to_acc(xg[bg + H]));
        const Acc g = tanh_(acc[2][c][r] + to_acc(xg[bg + 2 * H]));
        const Acc o = sigmoid(acc[3][c][r] + to_acc(xg[bg + 3 * H]));
        const Acc cn = f * c_state[bj] + i * g;
        const Acc hn = o * tanh_(cn);
        c_state[bj] = cn;
        if constexpr (kTraining) {
          cells[bj] = cn;
          gates[bg] = from_acc<T>(i);
          gates[bg + H] = from_acc<T>(f);
          gates[bg + 2 * H] = from_acc<T>(g);
          gates[bg + 3 * H] = from_acc<T>(o);
        }
        if constexpr (kHasProj) {
          hidden[bj] = from_acc<T>(hn);
        } else {
          const T h = from_acc<T>(hn);
          output[bp] = h;
          h_next[bp] = h;
        }
      } else {
        if constexpr (kTraining) {
          cells[bj] = c_state[bj];
          gates[bg] = tzero;
          gates[bg + H] = tzero;
          gates[bg + 2 * H] = tzero;
          gates[bg + 3 * H] = tzero;
        }
        if constexpr (kHasProj) {
          hidden[bj] = tzero;
        } else {
          output[bp] = tzero;
          h_next[bp] = h_prev[bp];
        }
      }
    }
  }
}

// h_t = hidden_t @ w_hr^T where active; the carried h elsewhere. Grid: (ceil(B / kBB), ceil(P / kTileN)).
template <typename T, int kBB, bool kHasLengths>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    lstm_forward_projection_kernel(int B, int H, int P, const T* __restrict__ w_hr,
                                   const int64_t* __restrict__ lengths, int64_t t,
                                   const T* __restrict__ hidden, const T* __restrict__ h_prev,
                                   T* __restrict__ h_next, T* __restrict__ output, bool vec_a,
                                   bool vec_w) {
  using Acc = AccT<T>;
  const int b0 = blockIdx.x * kBB, n0 = blockIdx.y * kTileN;
  Acc acc[1][2][2];
  int col[2], row[2];
  if (!block_matmul<T, 1, kBB, true>(hidden, w_hr, B, P, H, H, 0, b0, n0, vec_a, vec_w, acc, col,
                                     row)) {
    return;
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int b = b0 + row[r];
    if (b >= B) continue;
    const bool active = !kHasLengths || t < lengths[b];
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int p = n0 + col[c];
      if (p >= P) continue;
      const int64_t bp = static_cast<int64_t>(b) * P + p;
      if (active) {
        const T h = from_acc<T>(acc[0][c][r]);
        output[bp] = h;
        h_next[bp] = h;
      } else {
        output[bp] = zero<T>();
        h_next[bp] = h_prev[bp];
      }
    }
  }
}

template <typename T, int kBB, bool kHasLengths, bool kTraining>
cudaError_t forward_step(int B, int H, int P, const T* w_hh, const T* w_hr, const T* xg_t,
                         const int64_t* lengths, int64_t t, const T* h_prev, T* h_next,
                         AccT<T>* c_state, T* output_t, T* gates_t, AccT<T>* cells_t, T* hidden_t,
                         cudaStream_t stream) {
  const dim3 grid(blocks_for(B, kBB), blocks_for(H, kTileN));
  const bool vec_a = vec_ok(h_prev, P);
  const bool vec_w = vec_ok(w_hh, P);
  if (w_hr == nullptr) {
    return launch(lstm_forward_cell_kernel<T, kBB, kHasLengths, false, kTraining>, grid, stream, B,
                  H, P, w_hh, xg_t, lengths, t, h_prev, h_next, c_state, output_t, gates_t, cells_t,
                  nullptr, vec_a, vec_w);
  }
  const cudaError_t err =
      launch(lstm_forward_cell_kernel<T, kBB, kHasLengths, true, kTraining>, grid, stream, B, H, P,
             w_hh, xg_t, lengths, t, h_prev, nullptr, c_state, nullptr, gates_t, cells_t, hidden_t,
             vec_a, vec_w);
  if (err != cudaSuccess) return err;
  const dim3 pgrid(blocks_for(B, kBB), blocks_for(P, kTileN));
  return launch(lstm_forward_projection_kernel<T, kBB, kHasLengths>, pgrid, stream, B, H, P, w_hr,
                lengths, t, hidden_t, h_prev, h_next, output_t, vec_ok(hidden_t, H),
                vec_ok(w_hr, H));
}

}  // namespace

template <typename T>
cudaError_t lstm_forward_step(int B, int H, int P, const T* w_hh, const T* w_hr, const T* xg_t,
                              const int64_t* lengths, int64_t t, const T* h_prev, T* h_next,
                              AccT<T>* c_state, T* output_t, T* gates_t, AccT<T>* cells_t,
                              T* hidden_t, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if ((gates_t == nullptr) != (cells_t == nullptr)) return cudaErrorInvalidValue;
  return with_config(B, H, lengths != nullptr, [&](auto bb, auto has_lengths) {
    constexpr int kBB = decltype(bb)::value;
    constexpr bool kHasLengths = decltype(has_lengths)::value;
    if (gates_t == nullptr) {
      return forward_step<T, kBB, kHasLengths, false>(B, H, P, w_hh, w_hr, xg_t, lengths, t, h_prev,
                                                      h_next, c_state, output_t, nullptr, nullptr,
                                                      hidden_t, stream);
    }
    return forward_step<T, kBB, kHasLengths, true>(B, H, P, w_hh, w_hr, xg_t, lengths, t, h_prev,
                                                   h_next, c_state, output_t, gates_t, cells_t,
                                                   hidden_t, stream);
  });
}

#define FASTLSTM_INSTANTIATE_FORWARD(T)                                                          \
  template cudaError_t lstm_forward_step<T>(int, int, int, const T*, const T*, const T*,         \
                                            const int64_t*, int64_t, const T*, T*, AccT<T>*, T*, \
                                            T*, AccT<T>*, T*, cudaStream_t);
FASTLSTM_INSTANTIATE_FORWARD(double)
FASTLSTM_INSTANTIATE_FORWARD(float)
FASTLSTM_INSTANTIATE_FORWARD(__half)
FASTLSTM_INSTANTIATE_FORWARD(__nv_bfloat16)
#undef FASTLSTM_INSTANTIATE_FORWARD

}  // namespace cuda
}  // namespace fastlstm
