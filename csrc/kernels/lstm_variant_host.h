// One layer and direction of the CUDA variant LSTM (issue 29) on the host side: the buffers it
// needs, the per-step matrix products and kernel calls in processing order, and the gradient GEMMs.
// Framework-free like lstm_host.h: the binding (csrc/cuda/variant_cuda.cpp) allocates what
// variant_forward_buffers and variant_backward_buffers ask for and does the products through ATen;
// the emulator tests (tests/emu, tests/test_emulator_variants.py) run the same code on the CPU.
//
// Shapes follow the op contract in csrc/fastlstm.cpp (lstm_variant_forward/backward; time-major,
// gate order i, f, g, o). Every pointer is device memory, dense and row-major.
//
// Precision (T the input dtype, Acc = AccT<T>): as the CPU op (csrc/cpu/variant_layer.cpp), every
// product is a GEMM in Acc on Acc copies of the input and the weights, and every intermediate is
// Acc; h_t is rounded to T once per step and carried as that rounded value (held in Acc), and the
// gradients are rounded to T once, at the end. For float and double Acc is T.
#pragma once

#include <algorithm>
#include <cstdint>

#include "lstm_host.h"
#include "lstm_variant.cuh"

namespace fastlstm {
namespace cuda {

struct VariantShape {
  int64_t T, B, I, H, P;
  bool has_proj, layer_norm;
  int64_t K() const { return variant_saved_width(H, layer_norm); }
};

// Element counts of the forward's buffers (output of T, the others of AccT<T>). Zero means none
// (pass nullptr).
struct VariantForwardBuffers {
  int64_t x;        // [T, B, I] the input
  int64_t xg;       // [chunk, B, 4H] x @ w_ih^T of `chunk` steps at a time
  int64_t chunk;    // steps per input projection (all of them when training)
  int64_t h_state;  // [2, B, P] the carried h, double-buffered
  int64_t c_state;  // [B, H]
  int64_t rec;      // [B, 4H] h_{t-1} @ w_hh^T
  int64_t m;        // [B, H] o * y, with projection
  int64_t h_cand;   // [B, P] m @ w_hr^T, with projection
  int64_t output;   // [T, B, P]
  int64_t saved;    // [T, B, K] when training; [B, K] scratch for inference
};

inline VariantForwardBuffers variant_forward_buffers(const VariantShape& s, bool training,
                                                     int64_t max_xg_elements = kInferenceXgElements) {
  const int64_t step_xg = s.B * 4 * s.H;
  int64_t chunk = s.T;
  if (!training && step_xg > 0) chunk = std::max<int64_t>(1, std::min(s.T, max_xg_elements / step_xg));
  VariantForwardBuffers b;
  b.x = s.T * s.B * s.I;
  b.chunk = chunk;
  b.xg = chunk * step_xg;
  b.h_state = 2 * s.B * s.P;
  b.c_state = s.B * s.H;
  b.rec = step_xg;
  b.m = s.has_proj ? s.B * s.H : 0;
  b.h_cand = s.has_proj ? s.B * s.P : 0;
  b.output = s.T * s.B * s.P;
  b.saved = (training ? s.T : 1) * s.B * s.K();
  return b;
}

template <typename T>
struct VariantForwardArgs {
  const T* x;                // [T, B, I]
  const AccT<T>* w_ih;       // [4H, I] in Acc (the weights themselves for float and double)
  const T* bias;             // [4H] b_ih + b_hh, or nullptr
  const AccT<T>* w_hh;       // [4H, P] in Acc
  const AccT<T>* w_hr;       // [P, H] in Acc, or nullptr
  const int64_t* lengths;    // [B] or nullptr
  bool reverse;
  bool training;             // saved holds every step's rows (else one step's scratch)
  VariantOptions<T> opt;
  // Buffers sized by variant_forward_buffers (nullptr where it says 0).
  AccT<T>* x_acc;
  AccT<T>* xg;
  AccT<T>* h_state;          // in: h0 in its first B * P elements
  AccT<T>* c_state;          // in: c0; out: c_n
  AccT<T>* rec;
  AccT<T>* m;
  AccT<T>* h_cand;
  T* output;
  AccT<T>* saved;
};

inline int64_t time_of_step(int64_t k, int64_t T_, bool reverse) { return reverse ? T_ - 1 - k : k; }

template <typename T>
ZoneoutStep<AccT<T>> zoneout_step(const AccT<T>* masks, double p, int64_t t, int64_t row) {
  return {masks != nullptr ? masks + t * row : nullptr, static_cast<AccT<T>>(p)};
}

// Runs the layer's forward. h_n receives the half of h_state that holds h_n [B, P] (Acc).
// T and B may be 0 (then nothing runs and h_n is h0).
template <typename T>
cudaError_t lstm_variant_layer_forward(const VariantShape& s, const VariantForwardBuffers& nb,
                                       const VariantForwardArgs<T>& a, DeviceMath<AccT<T>>& math,
                                       cudaStream_t stream, AccT<T>** h_n) {
  const int64_t T_ = s.T, B = s.B, I = s.I, H = s.H, P = s.P, K = s.K();
  AccT<T>* h[2] = {a.h_state, a.h_state + B * P};
  *h_n = h[0];
  if (T_ == 0 || B == 0) return cudaSuccess;
  const int Bi = static_cast<int>(B), Hi = static_cast<int>(H), Pi = static_cast<int>(P);
  const bool zone = a.opt.zoneout();
  cudaError_t err = lstm_variant_input<T>(T_, Bi, static_cast<int>(I), a.x, a.lengths, a.x_acc, stream);
  if (err != cudaSuccess) return err;
  for (int64_t k0 = 0; k0 < T_; k0 += nb.chunk) {
    const int64_t n = std::min(nb.chunk, T_ - k0);
    const int64_t t0 = a.reverse ? T_ - k0 - n : k0;
    math.gemm(false, true, n * B, 4 * H, I, a.x_acc + t0 * B * I, a.w_ih, nullptr, a.xg);
    for (int64_t k = k0; k < k0 + n; ++k) {
      const int64_t t = time_of_step(k, T_, a.reverse);
      AccT<T>* h_prev = h[k % 2];
      AccT<T>* h_next = h[(k + 1) % 2];
      math.gemm(false, true, B, 4 * H, P, h_prev, a.w_hh, nullptr, a.rec);
      const auto zc = zoneout_step<T>(a.opt.zoneout_c, a.opt.zoneout_c_p, t, B * H);
      const auto zh = zoneout_step<T>(a.opt.zoneout_h, a.opt.zoneout_h_p, t, B * P);
      AccT<T>* saved_t = a.saved + (a.training ? t * B * K : 0);
      T* output_t = a.output + t * B * P;
      err = lstm_variant_forward_cell<T>(
          Bi, Hi, Pi, t, a.lengths, a.xg + (t - t0) * B * 4 * H, a.rec, a.bias, a.opt, zc, zh,
          a.c_state, saved_t, s.has_proj ? nullptr : h_prev, s.has_proj ? nullptr : h_next,
          s.has_proj ? nullptr : output_t, s.has_proj ? a.m : nullptr, stream);
      if (err != cudaSuccess) return err;
      if (s.has_proj) {
        math.gemm(false, true, B, P, H, a.m, a.w_hr, nullptr, a.h_cand);
        err = lstm_variant_forward_output<T>(Bi, Pi, t, a.lengths, a.h_cand, zone, zh, h_prev,
                                             h_next, output_t, stream);
        if (err != cudaSuccess) return err;
      }
    }
  }
  *h_n = h[T_ % 2];
  return cudaSuccess;
}

// Element counts of the backward's workspaces, all of AccT<T>. Zero means none.
struct VariantBackwardBuffers {
  int64_t dpre;     // [T, B, 4H] gradient of the pre-activations (without layer norm also of
                    // x @ w_ih^T and of h @ w_hh^T)
  int64_t dxg;      // [T, B, 4H] gradient of x @ w_ih^T, with layer norm
  int64_t dr;       // [T, B, 4H] gradient of h_{t-1} @ w_hh^T, with layer norm
  int64_t dz;       // [T, B, H] with layer norm
  int64_t dh_cand;  // [T, B, P] gradient of h~, with projection
  int64_t dm;       // [B, H] with projection
  int64_t m;        // [T, B, H] with projection
  int64_t dh_keep;  // [B, P]
  int64_t dh_rec;   // [B, P]
  int64_t x;        // [T, B, I] the input, zero past each sequence's length
  int64_t h_prev;   // [T, B, P]
  int64_t partial;  // [variant_column_slices(T * B), 4H] the column sums' slices
  int64_t result;   // the largest weight or input gradient, before its rounding to T
};

inline VariantBackwardBuffers variant_backward_buffers(const VariantShape& s) {
  const int64_t TB = s.T * s.B, G = 4 * s.H;
  VariantBackwardBuffers b;
  b.dpre = TB * G;
  b.dxg = s.layer_norm ? TB * G : 0;
  b.dr = s.layer_norm ? TB * G : 0;
  b.dz = s.layer_norm ? TB * s.H : 0;
  b.dh_cand = s.has_proj ? TB * s.P : 0;
  b.dm = s.has_proj ? s.B * s.H : 0;
  b.m = s.has_proj ? TB * s.H : 0;
  b.dh_keep = s.B * s.P;
  b.dh_rec = s.B * s.P;
  b.x = TB * s.I;
  b.h_prev = TB * s.P;
  b.partial = variant_column_slices(TB) * G;
  b.result = std::max({TB * s.I, G * s.I, G * s.P, s.has_proj ? s.P * s.H : int64_t(0)});
  return b;
}

template <typename T>
struct VariantBackwardArgs {
  const T* grad_output;       // [T, B, P]
  const T* x;                 // [T, B, I]
  const T* h0;                // [B, P]
  const AccT<T>* c0;          // [B, H] in Acc
  const AccT<T>* w_ih;        // [4H, I] in Acc
  const AccT<T>* w_hh;        // [4H, P] in Acc
  const AccT<T>* w_hr;        // [P, H] in Acc, or nullptr
  const int64_t* lengths;     // [B] or nullptr
  bool reverse;
  VariantOptions<T> opt;
  const T* output;            // [T, B, P] the forward's
  const AccT<T>* saved;       // [T, B, K] the forward's
  // Workspaces sized by variant_backward_buffers.
  AccT<T>* dpre;
  AccT<T>* dxg;
  AccT<T>* dr;
  AccT<T>* dz;
  AccT<T>* dh_cand;
  AccT<T>* dm;
  AccT<T>* m;
  AccT<T>* dh_keep;           // in: grad_h_n
  AccT<T>* dh_rec;
  AccT<T>* dc_state;          // [B, H] in: grad_c_n; out: grad_c0
  AccT<T>* x_acc;
  AccT<T>* h_prev;
  AccT<T>* partial;
  AccT<T>* result;
  // Results (T).
  T* grad_input;              // [T, B, I]
  T* grad_h0;                 // [B, P]
  T* grad_w_ih;               // [4H, I]
  T* grad_w_hh;               // [4H, P]
  T* grad_bias;               // [4H]
  T* grad_w_hr;               // [P, H] with projection, else nullptr
  T* grad_ln_ih;              // [4H] with layer norm, else nullptr
  T* grad_ln_hh;              // [4H]
  T* grad_ln_c_weight;        // [H]
  T* grad_ln_c_bias;          // [H]
};

// Runs the layer's backward: per step in reverse processing order the row-wise kernels and the
// per-step products, then the input, weight, bias and gain gradients over all T * B rows.
// T and B must be positive.
template <typename T>
cudaError_t lstm_variant_layer_backward(const VariantShape& s, const VariantBackwardArgs<T>& a,
                                        DeviceMath<AccT<T>>& math, cudaStream_t stream) {
  const int64_t T_ = s.T, B = s.B, I = s.I, H = s.H, P = s.P, K = s.K(), G = 4 * H;
  const int Bi = static_cast<int>(B), Hi = static_cast<int>(H), Pi = static_cast<int>(P);
  const bool ln = s.layer_norm, zone = a.opt.zoneout();
  // Without layer norm the gradients of both products' outputs are those of the pre-activations.
  AccT<T>* dxg = ln ? a.dxg : a.dpre;
  AccT<T>* dr = ln ? a.dr : a.dpre;
  for (int64_t k = T_ - 1; k >= 0; --k) {
    const int64_t t = time_of_step(k, T_, a.reverse);
    const int64_t prev_t = k > 0 ? time_of_step(k - 1, T_, a.reverse) : -1;
    const AccT<T>* dh_rec = k + 1 < T_ ? a.dh_rec : nullptr;
    const auto zc = zoneout_step<T>(a.opt.zoneout_c, a.opt.zoneout_c_p, t, B * H);
    const auto zh = zoneout_step<T>(a.opt.zoneout_h, a.opt.zoneout_h_p, t, B * P);
    const T* grad_output_t = a.grad_output + t * B * P;
    cudaError_t err;
    if (s.has_proj) {
      AccT<T>* dh_cand_t = a.dh_cand + t * B * P;
      err = lstm_variant_backward_output<T>(Bi, Pi, t, a.lengths, grad_output_t, zone, zh,
                                            a.dh_keep, dh_rec, dh_cand_t, stream);
      if (err != cudaSuccess) return err;
      math.gemm(false, false, B, H, P, dh_cand_t, a.w_hr, nullptr, a.dm);
    }
    err = lstm_variant_backward_cell<T>(
        Bi, Hi, Pi, t, a.lengths, a.saved + t * B * K, prev_t >= 0 ? a.saved + prev_t * B * K : nullptr,
        prev_t, a.c0, a.opt, zc, zh, s.has_proj ? a.dm : nullptr, grad_output_t,
        s.has_proj ? nullptr : a.dh_keep, s.has_proj ? nullptr : dh_rec, a.dc_state,
        a.dpre + t * B * G, ln ? a.dxg + t * B * G : nullptr, ln ? a.dr + t * B * G : nullptr,
        ln ? a.dz + t * B * H : nullptr, s.has_proj ? a.m + t * B * H : nullptr, stream);
    if (err != cudaSuccess) return err;
    // dr @ w_hh: the recurrent part of dh_{t-1}, added by the next call (or below, for grad_h0).
    math.gemm(false, false, B, P, G, dr + t * B * G, a.w_hh, nullptr, a.dh_rec);
  }
  cudaError_t err = lstm_variant_add<T>(B * P, a.dh_keep, a.dh_rec, a.grad_h0, stream);
  if (err != cudaSuccess) return err;
  err = lstm_variant_input<T>(T_, Bi, static_cast<int>(I), a.x, a.lengths, a.x_acc, stream);
  if (err != cudaSuccess) return err;
  err = lstm_variant_recurrent_inputs<T>(T_, Bi, Pi, a.output, a.h0, a.lengths, a.reverse, a.h_prev,
                                         stream);
  if (err != cudaSuccess) return err;
  const int64_t TB = T_ * B;
  // Each product in Acc, then rounded to T.
  auto product = [&](bool trans_a, int64_t M, int64_t N, int64_t Kd, const AccT<T>* x,
                     const AccT<T>* y, T* out) {
    math.gemm(trans_a, false, M, N, Kd, x, y, nullptr, a.result);
    return lstm_variant_add<T>(M * N, a.result, nullptr, out, stream);
  };
  if ((err = product(false, TB, I, G, dxg, a.w_ih, a.grad_input)) != cudaSuccess) return err;
  if ((err = product(true, G, I, TB, dxg, a.x_acc, a.grad_w_ih)) != cudaSuccess) return err;
  if ((err = product(true, G, P, TB, dr, a.h_prev, a.grad_w_hh)) != cudaSuccess) return err;
  if (s.has_proj && (err = product(true, P, H, TB, a.dh_cand, a.m, a.grad_w_hr)) != cudaSuccess) {
    return err;
  }
  const int Gi = static_cast<int>(G);
  err = lstm_variant_column_sums<T>(TB, Gi, a.dpre, G, nullptr, 0, a.partial, a.grad_bias, stream);
  if (err != cudaSuccess || !ln) return err;
  err = lstm_variant_column_sums<T>(TB, Gi, a.dpre, G, a.saved + 7 * H, K, a.partial, a.grad_ln_ih,
                                    stream);
  if (err != cudaSuccess) return err;
  err = lstm_variant_column_sums<T>(TB, Gi, a.dpre, G, a.saved + 11 * H, K, a.partial, a.grad_ln_hh,
                                    stream);
  if (err != cudaSuccess) return err;
  err = lstm_variant_column_sums<T>(TB, Hi, a.dz, H, a.saved + 15 * H, K, a.partial,
                                    a.grad_ln_c_weight, stream);
  if (err != cudaSuccess) return err;
  return lstm_variant_column_sums<T>(TB, Hi, a.dz, H, nullptr, 0, a.partial, a.grad_ln_c_bias,
                                     stream);
}

}  // namespace cuda
}  // namespace fastlstm
