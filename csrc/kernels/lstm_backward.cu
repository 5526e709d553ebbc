// Backward timestep kernels (declared and documented in lstm_kernels.cuh).
#include "lstm_device.cuh"
#include "lstm_launch.cuh"

#include <algorithm>

namespace fastlstm {
namespace cuda {
namespace {

using namespace detail;

// Gate gradients of one (b, j) from the total dh of the cell output o * tanh(c), and the carried dc.
template <typename T>
__device__ __forceinline__ void cell_backward(AccT<T> dh, int64_t bg, int64_t bj, int H,
                                              const T* __restrict__ gates,
                                              const AccT<T>* __restrict__ cells,
                                              const AccT<T>* __restrict__ c_prev,
                                              AccT<T>* __restrict__ dc_state, T* __restrict__ dG) {
  using Acc = AccT<T>;
  const Acc i = to_acc(gates[bg]);
  const Acc f = to_acc(gates[bg + H]);
  const Acc g = to_acc(gates[bg + 2 * H]);
  const Acc o = to_acc(gates[bg + 3 * H]);
  const Acc tc = tanh_(cells[bj]);
  const Acc dc = dc_state[bj] + dh * o * (Acc(1) - tc * tc);
  dG[bg] = from_acc<T>(dc * g * i * (Acc(1) - i));
  dG[bg + H] = from_acc<T>(dc * c_prev[bj] * f * (Acc(1) - f));
  dG[bg + 2 * H] = from_acc<T>(dc * i * (Acc(1) - g * g));
  dG[bg + 3 * H] = from_acc<T>(dh * tc * o * (Acc(1) - o));
  dc_state[bj] = dc * f;
}

template <typename T>
__device__ __forceinline__ void zero_gates(int64_t bg, int H, T* __restrict__ dG) {
  const T z = zero<T>();
  dG[bg] = z;
  dG[bg + H] = z;
  dG[bg + 2 * H] = z;
  dG[bg + 3 * H] = z;
}

// The cell's backward for the block's hidden units. Without projection it first forms the carried dh
// of those units, dG_next @ w_hh (K = 4H); with projection, d_hidden = dh_all_t @ w_hr (K = P), the
// total dh having been formed by lstm_backward_recurrent_kernel. t == -1 (no projection only): write
// grad_h0 from the carried dh and stop.
// Grid: (ceil(B / kBB), ceil(H / kTileN)).
template <typename T, int kBB, bool kHasLengths, bool kHasProj>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    lstm_backward_cell_kernel(int B, int H, int P, const T* __restrict__ w_hh,
                              const T* __restrict__ w_hr, const int64_t* __restrict__ lengths,
                              int64_t t, int64_t next_t, const T* __restrict__ dG_next,
                              const T* __restrict__ grad_output, const T* __restrict__ gates,
                              const AccT<T>* __restrict__ cells, const AccT<T>* __restrict__ c_prev,
                              AccT<T>* __restrict__ dh_state, AccT<T>* __restrict__ dc_state,
                              T* __restrict__ dG, const T* __restrict__ dh_all,
                              T* __restrict__ grad_h0, bool vec_a, bool vec_w) {
  using Acc = AccT<T>;
  const int b0 = blockIdx.x * kBB, n0 = blockIdx.y * kTileN;
  Acc acc[1][2][2];
  int col[2], row[2];
  bool owner;
  if constexpr (kHasProj) {
    owner = block_matmul<T, 1, kBB, false>(dh_all, w_hr, B, H, P, H, 0, b0, n0, vec_a, vec_w, acc,
                                           col, row);
  } else {
    owner = block_matmul<T, 1, kBB, false>(dG_next, w_hh, B, H, dG_next ? 4 * H : 0, P, 0, b0, n0,
                                           vec_a, vec_w, acc, col, row);
  }
  if (!owner) return;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int b = b0 + row[r];
    if (b >= B) continue;
    const bool active = !kHasLengths || t < lengths[b];
    const bool next_active = dG_next != nullptr && (!kHasLengths || next_t < lengths[b]);
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int j = n0 + col[c];
      if (j >= H) continue;
      const int64_t bj = static_cast<int64_t>(b) * H + j;
      const int64_t bg = static_cast<int64_t>(b) * 4 * H + j;
      Acc dh;
      if constexpr (kHasProj) {
        if (!active) {
          zero_gates(bg, H, dG);
          continue;
        }
        dh = acc[0][c][r];
      } else {
        const int64_t bp = static_cast<int64_t>(b) * P + j;
        dh = next_active ? acc[0][c][r] : dh_state[bp];
        if (t < 0) {
          grad_h0[bp] = from_acc<T>(dh);
          continue;
        }
        if (!active) {
          dh_state[bp] = dh;
          zero_gates(bg, H, dG);
          continue;
        }
        dh += to_acc(grad_output[bp]);
      }
      cell_backward<T>(dh, bg, bj, H, gates, cells, c_prev, dc_state, dG);
    }
  }
}

// With projection: the total gradient of h_t, dh = dG_next @ w_hh + grad_output_t where active (the
// carried dh elsewhere), over all P units; t == -1: write grad_h0 and stop.
// Grid: (ceil(B / kBB), ceil(P / kTileN)).
template <typename T, int kBB, bool kHasLengths>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    lstm_backward_recurrent_kernel(int B, int H, int P, const T* __restrict__ w_hh,
                                   const int64_t* __restrict__ lengths, int64_t t, int64_t next_t,
                                   const T* __restrict__ dG_next, const T* __restrict__ grad_output,
                                   AccT<T>* __restrict__ dh_state, T* __restrict__ dh_all,
                                   T* __restrict__ grad_h0, bool vec_a, bool vec_w) {
  using Acc = AccT<T>;
  const int b0 = blockIdx.x * kBB, n0 = blockIdx.y * kTileN;
  Acc acc[1][2][2];
  int col[2], row[2];
  if (!block_matmul<T, 1, kBB, false>(dG_next, w_hh, B, P, dG_next ? 4 * H : 0, P, 0, b0, n0, vec_a,
                                      vec_w, acc, col, row)) {
    return;
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int b = b0 + row[r];
    if (b >= B) continue;
    const bool active = !kHasLengths || t < lengths[b];
    const bool next_active = dG_next != nullptr && (!kHasLengths || next_t < lengths[b]);
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int p = n0 + col[c];
      if (p >= P) continue;
      const int64_t bp = static_cast<int64_t>(b) * P + p;
      Acc dh = next_active ? acc[0][c][r] : dh_state[bp];
      if (t < 0) {
        grad_h0[bp] = from_acc<T>(dh);
      } else if (active) {
        dh_all[bp] = from_acc<T>(dh + to_acc(grad_output[bp]));
      } else {
        dh_state[bp] = dh;
        dh_all[bp] = zero<T>();
      }
    }
  }
}

template <typename T, int kBB, bool kHasLengths>
cudaError_t backward_step(int B, int H, int P, const T* w_hh, const T* w_hr, const int64_t* lengths,
                          int64_t t, int64_t next_t, const T* dG_next, const T* grad_output_t,
                          const T* gates_t, const AccT<T>* cells_t, const AccT<T>* c_prev,
                          AccT<T>* dh_state, AccT<T>* dc_state, T* dG_t, T* dh_all_t, T* grad_h0,
                          cudaStream_t stream) {
  const bool vec_dG = vec_ok(dG_next, 4 * static_cast<int64_t>(H));
  const dim3 grid(blocks_for(B, kBB), blocks_for(H, kTileN));
  if (w_hr == nullptr) {
    return launch(lstm_backward_cell_kernel<T, kBB, kHasLengths, false>, grid, stream, B, H, P,
                  w_hh, nullptr, lengths, t, next_t, dG_next, grad_output_t, gates_t, cells_t,
                  c_prev, dh_state, dc_state, dG_t, nullptr, grad_h0, vec_dG, vec_ok(w_hh, P));
  }
  const dim3 rgrid(blocks_for(B, kBB), blocks_for(P, kTileN));
  const cudaError_t err =
      launch(lstm_backward_recurrent_kernel<T, kBB, kHasLengths>, rgrid, stream, B, H, P, w_hh,
             lengths, t, next_t, dG_next, grad_output_t, dh_state, dh_all_t, grad_h0, vec_dG,
             vec_ok(w_hh, P));
  if (err != cudaSuccess || t < 0) return err;
  return launch(lstm_backward_cell_kernel<T, kBB, kHasLengths, true>, grid, stream, B, H, P, w_hh,
                w_hr, lengths, t, next_t, nullptr, grad_output_t, gates_t, cells_t, c_prev,
                dh_state, dc_state, dG_t, dh_all_t, nullptr, vec_ok(dh_all_t, P), vec_ok(w_hr, H));
}

// h_prev[t, b] = output[prev_t, b] where the step processed before t (prev_t) exists and was active
// for b, else h0[b]. One thread per element, grid-stride.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    lstm_recurrent_inputs_kernel(int64_t T_, int B, int P, const T* __restrict__ output,
                                 const T* __restrict__ h0, const int64_t* __restrict__ lengths,
                                 bool reverse, T* __restrict__ h_prev) {
  const int64_t BP = static_cast<int64_t>(B) * P;
  const int64_t n = T_ * BP;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t t = i / BP, bp = i % BP;
    const int64_t prev_t = reverse ? t + 1 : t - 1;
    const bool prev_active =
        prev_t >= 0 && prev_t < T_ && (lengths == nullptr || prev_t < lengths[bp / P]);
    h_prev[i] = prev_active ? output[prev_t * BP + bp] : h0[bp];
  }
}

}  // namespace

template <typename T>
cudaError_t lstm_backward_step(int B, int H, int P, const T* w_hh, const T* w_hr,
                               const int64_t* lengths, int64_t t, int64_t next_t, const T* dG_next,
                               const T* grad_output_t, const T* gates_t, const AccT<T>* cells_t,
                               const AccT<T>* c_prev, AccT<T>* dh_state, AccT<T>* dc_state, T* dG_t,
                               T* dh_all_t, T* grad_h0, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  return with_config(B, H, lengths != nullptr, [&](auto bb, auto has_lengths) {
    return backward_step<T, decltype(bb)::value, decltype(has_lengths)::value>(
        B, H, P, w_hh, w_hr, lengths, t, next_t, dG_next, grad_output_t, gates_t, cells_t, c_prev,
        dh_state, dc_state, dG_t, dh_all_t, grad_h0, stream);
  });
}

template <typename T>
cudaError_t lstm_recurrent_inputs(int64_t T_, int B, int P, const T* output, const T* h0,
                                  const int64_t* lengths, bool reverse, T* h_prev,
                                  cudaStream_t stream) {
  const int64_t n = T_ * B * P;
  if (n == 0) return cudaSuccess;
  // Enough blocks to fill a GPU; the grid-stride loop does the rest.
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 1024));
  return launch(lstm_recurrent_inputs_kernel<T>, dim3(blocks), stream, T_, B, P, output, h0, lengths,
                reverse, h_prev);
}

#define FASTLSTM_INSTANTIATE_BACKWARD(T)                                                          \
  template cudaError_t lstm_backward_step<T>(int, int, int, const T*, const T*, const int64_t*,   \
                                             int64_t, int64_t, const T*, const T*, const T*,      \
                                             const AccT<T>*, const AccT<T>*, AccT<T>*, AccT<T>*,  \
                                             T*, T*, T*, cudaStream_t);                           \
  template cudaError_t lstm_recurrent_inputs<T>(int64_t, int, int, const T*, const T*,            \
                                                const int64_t*, bool, T*, cudaStream_t);
FASTLSTM_INSTANTIATE_BACKWARD(double)
FASTLSTM_INSTANTIATE_BACKWARD(float)
FASTLSTM_INSTANTIATE_BACKWARD(__half)
FASTLSTM_INSTANTIATE_BACKWARD(__nv_bfloat16)
#undef FASTLSTM_INSTANTIATE_BACKWARD

}  // namespace cuda
}  // namespace fastlstm
