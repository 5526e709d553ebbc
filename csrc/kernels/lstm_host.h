// One layer and direction of the CUDA LSTM on the host side: the buffers it needs, the input
// projection, the per-step kernel calls in processing order and the gradient GEMMs. Framework-free,
// like the kernels: the binding (csrc/cuda/lstm_cuda.cpp) allocates what forward_buffers and
// backward_buffers ask for and does the matrix products through ATen (DeviceMath); the emulator
// tests (tests/emu) call the same functions with CPU buffers, so both run this code.
//
// Shapes follow the op contract in csrc/fastlstm.cpp (time-major, gate order i, f, g, o). Every
// pointer is device memory, dense and row-major; every call is asynchronous on `stream`.
#pragma once

#include <algorithm>
#include <cstdint>

#include "lstm_kernels.cuh"

namespace fastlstm {
namespace cuda {

// The matrix products of a layer, done by the caller on `stream` (cuBLAS through ATen in the binding,
// CPU loops in the emulator). Errors are the caller's to report (the binding throws).
template <typename T>
class DeviceMath {
 public:
  virtual ~DeviceMath() = default;
  // c [M, N] = op(a) @ op(b) (+ bias [N] on every row when bias != nullptr), where op(a) is a as
  // stored [M, K], or the transpose of a stored [K, M] when trans_a; op(b) is b stored [K, N], or
  // the transpose of b stored [N, K] when trans_b. K may be 0 (c = bias or zero).
  virtual void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* a,
                    const T* b, const T* bias, T* c) = 0;
  // out [N] = the sum of the M rows of a [M, N].
  virtual void column_sums(int64_t M, int64_t N, const T* a, T* out) = 0;
};

struct LayerShape {
  int64_t T, B, I, H, P;
  bool has_proj;
};

// Element counts of the forward's buffers: xg, h_state, output, gates and hidden hold T;
// c_state and cells hold AccT<T>. Zero means none (pass nullptr).
struct ForwardBuffers {
  int64_t xg;           // [chunk, B, 4H] input projection of `chunk` steps at a time
  int64_t chunk;        // steps per input projection
  int64_t h_state;      // [2, B, P] the carried h, double-buffered
  int64_t c_state;      // [B, H] the carried c
  int64_t output;       // [T, B, P]
  int64_t gates;        // [T, B, 4H] saved (training only)
  int64_t cells;        // [T, B, H] saved (training only)
  int64_t hidden;       // [T, B, H] saved with projection (training); [B, H] scratch (inference)
};

// Inference projects the input in chunks of steps so that its workspace stays near this many
// elements however long the sequence; training projects all steps in one GEMM.
constexpr int64_t kInferenceXgElements = int64_t(1) << 24;

inline ForwardBuffers forward_buffers(const LayerShape& s, bool training,
                                      int64_t max_xg_elements = kInferenceXgElements) {
  const int64_t step_xg = s.B * 4 * s.H;
  int64_t chunk = s.T;
  if (!training && step_xg > 0) chunk = std::max<int64_t>(1, std::min(s.T, max_xg_elements / step_xg));
  ForwardBuffers b;
  b.chunk = chunk;
  b.xg = chunk * step_xg;
  b.h_state = 2 * s.B * s.P;
  b.c_state = s.B * s.H;
  b.output = s.T * s.B * s.P;
  b.gates = training ? s.T * step_xg : 0;
  b.cells = training ? s.T * s.B * s.H : 0;
  b.hidden = s.has_proj ? (training ? s.T : 1) * s.B * s.H : 0;
  return b;
}

template <typename T>
struct ForwardArgs {
  const T* x;               // [T, B, I]
  const T* w_ih;            // [4H, I]
  const T* bias;            // [4H] b_ih + b_hh, or nullptr
  const T* w_hh;            // [4H, P]
  const T* w_hr;            // [P, H] or nullptr
  const int64_t* lengths;   // [B] or nullptr
  bool reverse;
  // Buffers sized by forward_buffers (nullptr where it says 0).
  T* xg;
  T* h_state;               // in: h0 in its first B * P elements
  AccT<T>* c_state;         // in: c0; out: c_n
  T* output;
  T* gates;
  AccT<T>* cells;
  T* hidden;
};

// Runs the layer's forward. `h_n` receives the half of h_state that holds h_n [B, P].
// B and T may be 0 (then nothing runs and h_n is h0).
template <typename T>
cudaError_t lstm_layer_forward(const LayerShape& s, const ForwardBuffers& nb, const ForwardArgs<T>& a,
                               DeviceMath<T>& math, cudaStream_t stream, T** h_n) {
  const int64_t T_ = s.T, B = s.B, I = s.I, H = s.H, P = s.P;
  T* h[2] = {a.h_state, a.h_state + B * P};
  *h_n = h[0];
  if (T_ == 0 || B == 0) return cudaSuccess;
  const bool training = a.gates != nullptr;
  for (int64_t k0 = 0; k0 < T_; k0 += nb.chunk) {
    const int64_t n = std::min(nb.chunk, T_ - k0);
    // The chunk's steps in time order: [t0, t0 + n).
    const int64_t t0 = a.reverse ? T_ - k0 - n : k0;
    math.gemm(false, true, n * B, 4 * H, I, a.x + t0 * B * I, a.w_ih, a.bias, a.xg);
    for (int64_t k = k0; k < k0 + n; ++k) {
      const int64_t t = a.reverse ? T_ - 1 - k : k;
      const cudaError_t err = lstm_forward_step<T>(
          static_cast<int>(B), static_cast<int>(H), static_cast<int>(P), a.w_hh, a.w_hr,
          a.xg + (t - t0) * B * 4 * H, a.lengths, t, h[k % 2], h[(k + 1) % 2], a.c_state,
          a.output + t * B * P, training ? a.gates + t * B * 4 * H : nullptr,
          training ? a.cells + t * B * H : nullptr,
          s.has_proj ? a.hidden + (training ? t * B * H : 0) : nullptr, stream);
      if (err != cudaSuccess) return err;
    }
  }
  *h_n = h[T_ % 2];
  return cudaSuccess;
}

// Element counts of the backward's workspaces, all T: the gate gradients, the total dh of every
// step (projection only) and the recurrent matmul's inputs.
struct BackwardBuffers {
  int64_t dG;      // [T, B, 4H]
  int64_t dh_all;  // [T, B, P] with projection, else 0
  int64_t h_prev;  // [T, B, P]
};

inline BackwardBuffers backward_buffers(const LayerShape& s) {
  return {s.T * s.B * 4 * s.H, s.has_proj ? s.T * s.B * s.P : 0, s.T * s.B * s.P};
}

template <typename T>
struct BackwardArgs {
  const T* grad_output;      // [T, B, P]
  const T* x;                // [T, B, I]
  const T* h0;               // [B, P]
  const AccT<T>* c0;         // [B, H] in the cell type
  const T* w_ih;             // [4H, I]
  const T* w_hh;             // [4H, P]
  const T* w_hr;             // [P, H] or nullptr
  const int64_t* lengths;    // [B] or nullptr
  bool reverse;
  const T* output;           // [T, B, P] saved by the forward
  const T* gates;            // [T, B, 4H]
  const AccT<T>* cells;      // [T, B, H]
  const T* hidden;           // [T, B, H] with projection, else nullptr
  AccT<T>* dh_state;         // [B, P] in: grad_h_n (cell type); scratch
  AccT<T>* dc_state;         // [B, H] in: grad_c_n; out: grad_c0
  // Workspaces sized by backward_buffers.
  T* dG;
  T* dh_all;
  T* h_prev;
  // Results.
  T* grad_input;             // [T, B, I]
  T* grad_h0;                // [B, P]
  T* grad_w_ih;              // [4H, I]
  T* grad_w_hh;              // [4H, P]
  T* grad_bias;              // [4H]
  T* grad_w_hr;              // [P, H] with projection, else nullptr
};

// Runs the layer's backward: the step kernels in reverse processing order, then the gradients of
// the input and the weights as GEMMs over all T * B rows. T and B must be positive.
template <typename T>
cudaError_t lstm_layer_backward(const LayerShape& s, const BackwardArgs<T>& a, DeviceMath<T>& math,
                                cudaStream_t stream) {
  const int64_t T_ = s.T, B = s.B, I = s.I, H = s.H, P = s.P;
  auto time_of = [&](int64_t step) { return a.reverse ? T_ - 1 - step : step; };
  // k: processing index of the step, from the last to the first; k == -1 is the final call, which
  // writes grad_h0.
  for (int64_t k = T_ - 1; k >= -1; --k) {
    const bool final_call = k < 0;
    const int64_t t = final_call ? -1 : time_of(k);
    const int64_t next_t = k + 1 < T_ ? time_of(k + 1) : -1;
    const AccT<T>* c_prev = final_call ? nullptr : k > 0 ? a.cells + time_of(k - 1) * B * H : a.c0;
    const cudaError_t err = lstm_backward_step<T>(
        static_cast<int>(B), static_cast<int>(H), static_cast<int>(P), a.w_hh, a.w_hr, a.lengths, t,
        next_t, next_t >= 0 ? a.dG + next_t * B * 4 * H : nullptr,
        final_call ? nullptr : a.grad_output + t * B * P,
        final_call ? nullptr : a.gates + t * B * 4 * H, final_call ? nullptr : a.cells + t * B * H,
        c_prev, a.dh_state, a.dc_state, final_call ? nullptr : a.dG + t * B * 4 * H,
        (final_call || !s.has_proj) ? nullptr : a.dh_all + t * B * P, a.grad_h0, stream);
    if (err != cudaSuccess) return err;
  }
  const cudaError_t err = lstm_recurrent_inputs<T>(T_, static_cast<int>(B), static_cast<int>(P),
                                                   a.output, a.h0, a.lengths, a.reverse, a.h_prev,
                                                   stream);
  if (err != cudaSuccess) return err;
  const int64_t TB = T_ * B;
  math.gemm(false, false, TB, I, 4 * H, a.dG, a.w_ih, nullptr, a.grad_input);
  math.gemm(true, false, 4 * H, I, TB, a.dG, a.x, nullptr, a.grad_w_ih);
  math.gemm(true, false, 4 * H, P, TB, a.dG, a.h_prev, nullptr, a.grad_w_hh);
  math.column_sums(TB, 4 * H, a.dG, a.grad_bias);
  if (s.has_proj) math.gemm(true, false, P, H, TB, a.dh_all, a.hidden, nullptr, a.grad_w_hr);
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace fastlstm
