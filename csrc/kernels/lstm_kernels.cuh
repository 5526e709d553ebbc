// Host-facing launchers of the CUDA LSTM kernels. Framework-free: raw device pointers, sizes and a
// stream in, a cudaError_t out (the launch's cudaGetLastError()). The layer code (lstm_host.h) calls
// these once per timestep, in processing order, and leaves every large GEMM to its caller (ATen in
// the binding, csrc/cuda/lstm_cuda.cpp).
//
// T is double, float, __half or __nv_bfloat16. AccT<T> is the type the kernels accumulate in and keep
// the cell state in: double for double, float otherwise.
//
// All matrices are dense and row-major. Gate blocks are in torch.nn.LSTM order i, f, g, o: row q*H + j
// of a [4H, *] matrix (column q*H + j of a [*, 4H] one) belongs to gate q of hidden unit j.
// Sequence b is active at time index t iff t < lengths[b] (or always, when lengths is nullptr); this
// holds in both directions, because the reverse direction processes t = T-1 .. 0.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fastlstm {
namespace cuda {

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using AccT = typename AccType<T>::type;

// One forward step at time index t: the recurrent matmul h_prev @ w_hh^T for all four gates, the cell
// update, and (with w_hr) the projection h_t = hidden_t @ w_hr^T. One kernel launch, two with w_hr.
// Where sequence b is inactive, its h and c are carried unchanged and output/gates/hidden are zero.
//
//   B, H, P    batch, hidden size, state size (P = proj_size with w_hr, else H); B may be 0
//   w_hh:      [4H, P] recurrent weights
//   w_hr:      [P, H] projection weights, or nullptr for none (then P == H)
//   xg_t:      [B, 4H] input part of the pre-activations at step t: x_t @ w_ih^T + b_ih + b_hh
//   lengths:   [B] int64 sequence lengths, or nullptr (every sequence active at every step)
//   t:         time index of this step
//   h_prev:    [B, P] h state before the step
//   h_next:    [B, P] h state after the step; must not alias h_prev (other blocks still read it)
//   c_state:   [B, H] c state, read and updated in place
//   output_t:  [B, P] out: h_t, zero where inactive
//   gates_t:   [B, 4H] out: post-activation i, f, g, o, zero where inactive; nullptr for inference
//              (then nothing is saved: cells_t must be nullptr too)
//   cells_t:   [B, H] out: c_t, the carried c where inactive; nullptr for inference
//   hidden_t:  [B, H] out with w_hr: o * tanh(c_t) before the projection, zero where inactive
//              (for inference a scratch buffer, reused by every step); nullptr without w_hr
template <typename T>
cudaError_t lstm_forward_step(int B, int H, int P, const T* w_hh, const T* w_hr, const T* xg_t,
                              const int64_t* lengths, int64_t t, const T* h_prev, T* h_next,
                              AccT<T>* c_state, T* output_t, T* gates_t, AccT<T>* cells_t,
                              T* hidden_t, cudaStream_t stream);

// One backward step at time index t, the steps called in reverse processing order, then once more
// with t == -1 to finish. Computes the gate gradients dG_t (pre-activation) and carries dh, dc to
// the step before. dh_{t-1} = dG_t @ w_hh is not formed at step t but by the next call, inside its
// kernel, for the hidden units that kernel's blocks own (so one launch per step without w_hr, two
// with it: dh over P first, then the cell). The final call (t == -1) does that matmul for the first
// processed step and writes grad_h0.
//
//   B, H, P, w_hh, w_hr, lengths: as for lstm_forward_step
//   t:             time index of this step, or -1 for the final call
//   next_t:        time index of the step processed right after t in the forward pass (the one whose
//                  gradients the previous call produced), or -1 if t is the last processed step
//   dG_next:       [B, 4H] gate gradients of step next_t; nullptr iff next_t == -1
//   grad_output_t: [B, P] gradient of output at step t
//   gates_t:       [B, 4H] saved post-activation gates of step t
//   cells_t:       [B, H] saved c_t
//   c_prev:        [B, H] c state before step t (cells of the previous processed step, or c0)
//   dh_state:      [B, P] in/out: gradient of the carried h where it is not pending in dG_next;
//                  initialise with grad_h_n
//   dc_state:      [B, H] in/out: gradient of the carried c; initialise with grad_c_n, holds grad_c0
//                  after the final call
//   dG_t:          [B, 4H] out: gradients of the pre-activations of step t, zero where inactive
//   dh_all_t:      [B, P] out with w_hr: total gradient of h_t (for grad_w_hr), zero where inactive;
//                  nullptr without w_hr
//   grad_h0:       [B, P] out, written by the final call only
// For the final call, grad_output_t, gates_t, cells_t, c_prev, dG_t and dh_all_t are unused (nullptr).
template <typename T>
cudaError_t lstm_backward_step(int B, int H, int P, const T* w_hh, const T* w_hr,
                               const int64_t* lengths, int64_t t, int64_t next_t, const T* dG_next,
                               const T* grad_output_t, const T* gates_t, const AccT<T>* cells_t,
                               const AccT<T>* c_prev, AccT<T>* dh_state, AccT<T>* dc_state, T* dG_t,
                               T* dh_all_t, T* grad_h0, cudaStream_t stream);

// The input of the recurrent matmul at every step, for grad_w_hh = dG^T @ h_prev:
//   T_, B, P:  steps, batch, state size
//   output:    [T_, B, P] the forward's output
//   h0:        [B, P]
//   lengths:   [B] int64 or nullptr, as for lstm_forward_step
//   reverse:   the direction the forward ran in
//   h_prev:    [T_, B, P] out: output[prev_t, b] where the step processed just before t exists and
//              was active for b, else h0[b] (the first active step of a reverse-direction sequence
//              starts from h0; rows of inactive steps are h0 too, their dG being zero)
template <typename T>
cudaError_t lstm_recurrent_inputs(int64_t T_, int B, int P, const T* output, const T* h0,
                                  const int64_t* lengths, bool reverse, T* h_prev,
                                  cudaStream_t stream);

}  // namespace cuda
}  // namespace fastlstm
