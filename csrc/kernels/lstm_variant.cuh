// Host-facing launchers of the variant layer's row-wise kernels (issue 29: zoneout, cell clipping,
// layer normalisation; the op contract and the `saved` layout are in csrc/fastlstm.cpp, the
// plain-PyTorch definition in fastlstm/reference.py's lstm_variant_step). Framework-free, like
// lstm_kernels.cuh: raw device pointers, sizes and a stream in, a cudaError_t out.
//
// The layer code (lstm_variant_host.h) leaves every matrix product to its caller (cuBLAS through
// ATen in the binding): per step r = h_{t-1} @ w_hh^T and, with a projection, h~ = m @ w_hr^T before
// these kernels run, and dh_{t-1} = dr @ w_hh, dm = dh~ @ w_hr after/between them in the backward.
// What is left is row-wise: one thread block per batch row, so that the layer-norm statistics of a
// row are block reductions (in a fixed order: results are bitwise reproducible). Layer norm, cell
// clipping and zoneout are compile-time flags of the kernels, so a variant that is off costs nothing.
//
// T is double, float, __half or __nv_bfloat16; AccT<T> (lstm_kernels.cuh) is the arithmetic and cell
// type. Everything is computed and kept in AccT<T> (the matrix products too); only the layer's
// results are of type T: output and h_t (rounded once per step) and the gradients.
// Gate order i, f, g, o; K is the width of a saved row: 7H, or 16H + 3 with layer norm.
// Sequence b is active at time index t iff lengths == nullptr or t < lengths[b]. A step that is
// inactive for b leaves b's state unchanged, outputs 0 and saves a zero row.
#pragma once

#include "lstm_kernels.cuh"

namespace fastlstm {
namespace cuda {

constexpr double kLayerNormEps = 1e-5;

// Width of a row of `saved` (csrc/fastlstm.cpp): [0, 4H) post-activation i, f, g, o; [4H, 5H) c_t
// after zoneout; [5H, 6H) c~_t before clipping; [6H, 7H) y = tanh(c~_t) or tanh(LN(c~_t) * w_c + b_c);
// with layer norm also [7H, 11H) LN(x_t W_ih^T), [11H, 15H) LN(h_{t-1} W_hh^T), [15H, 16H) LN(c~_t)
// and [16H, 16H + 3) the three 1/std (input, recurrent, cell).
inline __host__ __device__ int64_t variant_saved_width(int64_t H, bool layer_norm) {
  return layer_norm ? 16 * H + 3 : 7 * H;
}

// The variant options of one layer call, shared by every step of the forward and the backward.
template <typename T>
struct VariantOptions {
  const AccT<T>* zoneout_c = nullptr;  // [T, B, H] masks (1 keeps c_{t-1}), or nullptr: zoneout_c_p
  const AccT<T>* zoneout_h = nullptr;  // [T, B, P] masks, or nullptr: zoneout_h_p
  double zoneout_c_p = 0;              // the mask's value at every element where zoneout_c is nullptr
  double zoneout_h_p = 0;
  bool has_clip = false;               // c~_t is clamped to [-cell_clip, cell_clip]
  double cell_clip = 0;
  const T* ln_ih = nullptr;            // [4H] gain of LN(x_t W_ih^T); the four are all set or none
  const T* ln_hh = nullptr;            // [4H] gain of LN(h_{t-1} W_hh^T)
  const T* ln_c_weight = nullptr;      // [H]
  const T* ln_c_bias = nullptr;        // [H]

  bool layer_norm() const { return ln_ih != nullptr; }
  // Zoneout off (no masks, both probabilities 0) computes c_t = c~_t, h_t = h~_t without the mix.
  bool zoneout() const {
    return zoneout_c != nullptr || zoneout_h != nullptr || zoneout_c_p != 0 || zoneout_h_p != 0;
  }
};

// One step's zoneout of one state: m = mask[b * n + j] with a mask, else p everywhere.
template <typename Acc>
struct ZoneoutStep {
  const Acc* mask;  // [B, n] (this step's row of the [T, B, n] masks) or nullptr
  Acc p;
};

// The forward's row-wise stage of step t (after r = h_{t-1} @ w_hh^T): the pre-activations (with
// layer norm, of the input part and of r, each over its whole 4H row), the gates, c~ (clipped), y,
// m = o * y, c_t after zoneout; without projection also h_t after zoneout, rounded to T.
//   B, H, P      batch, hidden size, state size (P == H without projection)
//   t, lengths   time index and [B] int64 lengths or nullptr
//   xg:          [B, 4H] x_t @ w_ih^T (no bias), AccT<T>
//   rec:         [B, 4H] h_{t-1} @ w_hh^T
//   bias:        [4H] b_ih + b_hh, or nullptr
//   opt:         ln_* and has_clip/cell_clip from the layer's options
//   zc, zh:      this step's zoneout (zh: without projection only; masks [B, H])
//   c_state:     [B, H] in: c_{t-1}; out: c_t (unchanged where inactive)
//   saved:       [B, K] out: the step's saved rows (zero where inactive); a scratch buffer reused
//                by every step when nothing is saved
//   Without projection (m == nullptr):
//   h_prev:      [B, H] h_{t-1} (AccT<T> holding the T-rounded state)
//   h_next:      [B, H] out: h_t rounded to T, held in AccT<T> (h_prev where inactive); must not
//                alias h_prev
//   output:      [B, H] out: h_t (zero where inactive)
//   With projection:
//   m:           [B, H] out: o * y (zero where inactive), for h~ = m @ w_hr^T
template <typename T>
cudaError_t lstm_variant_forward_cell(int B, int H, int P, int64_t t, const int64_t* lengths,
                                      const AccT<T>* xg, const AccT<T>* rec, const T* bias,
                                      const VariantOptions<T>& opt, ZoneoutStep<AccT<T>> zc,
                                      ZoneoutStep<AccT<T>> zh, AccT<T>* c_state, AccT<T>* saved,
                                      const AccT<T>* h_prev, AccT<T>* h_next, T* output, AccT<T>* m,
                                      cudaStream_t stream);

// With projection, after h~ = m @ w_hr^T: h_t = zoneout(h_{t-1}, h~) rounded to T.
//   h_cand:      [B, P] h~ (AccT<T>)
//   zoneout:     whether zoneout is on (the layer's opt.zoneout()); zh: this step's [B, P] masks or p
//   h_prev, h_next, output: [B, P], as for lstm_variant_forward_cell without projection
template <typename T>
cudaError_t lstm_variant_forward_output(int B, int P, int64_t t, const int64_t* lengths,
                                        const AccT<T>* h_cand, bool zoneout, ZoneoutStep<AccT<T>> zh,
                                        const AccT<T>* h_prev, AccT<T>* h_next, T* output,
                                        cudaStream_t stream);

// Backward of lstm_variant_forward_output (with projection), step t in reverse processing order:
// dh = dh_keep + dh_rec + grad_output_t (the output's gradient only where active), then
// dh~ = (1 - m_h) dh and the part kept for h_{t-1}, m_h dh (all of dh where inactive).
//   grad_output: [B, P] gradient of output_t
//   dh_keep:     [B, P] in/out: the zoneout part of the gradient of the carried h (grad_h_n at first)
//   dh_rec:      [B, P] dr_{t'} @ w_hh of the step processed after t, or nullptr for the last one
//   dh_cand:     [B, P] out: dh~ (zero where inactive), for dm = dh~ @ w_hr and grad_w_hr
template <typename T>
cudaError_t lstm_variant_backward_output(int B, int P, int64_t t, const int64_t* lengths,
                                         const T* grad_output, bool zoneout, ZoneoutStep<AccT<T>> zh,
                                         AccT<T>* dh_keep, const AccT<T>* dh_rec,
                                         AccT<T>* dh_cand, cudaStream_t stream);

// The backward's row-wise stage of step t, in reverse processing order: from the gradient of m
// (or, without projection, of h_t) and the carried dc, the gradients of the pre-activations and of
// the two matrix products' outputs, and dc_{t-1}. dh_{t-1} = dr @ w_hh is the caller's product.
//   saved_t:     [B, K] the forward's saved rows of step t
//   saved_prev:  [B, K] those of the step processed just before t (prev_t), or nullptr
//   prev_t:      its time index, or -1; c_{t-1} is saved_prev's c_t where that step was active for
//                b, else c0
//   c0:          [B, H]
//   opt:         ln_ih, ln_hh, ln_c_weight and has_clip/cell_clip as in the forward
//   zc, zh:      this step's zoneout (zh only without projection)
//   dm:          [B, H] with projection: dh~ @ w_hr; nullptr without
//   Without projection (dm == nullptr): grad_output [B, H], dh_keep [B, H] in/out and dh_rec
//                [B, H] or nullptr as for lstm_variant_backward_output, done here
//   dc_state:    [B, H] in: gradient of c_t; out: of c_{t-1}
//   dpre:        [B, 4H] out: gradient of the pre-activations (the bias's), zero where inactive;
//                without layer norm also that of x_t @ w_ih^T and of h_{t-1} @ w_hh^T
//   dxg, dr:     [B, 4H] out with layer norm: gradients of x_t @ w_ih^T and of h_{t-1} @ w_hh^T
//                (zero where inactive); nullptr without
//   dz:          [B, H] out with layer norm: gradient of LN(c~) * w_c + b_c; nullptr without
//   m:           [B, H] out with projection: m = o * y (zero where inactive), for grad_w_hr;
//                nullptr without
template <typename T>
cudaError_t lstm_variant_backward_cell(int B, int H, int P, int64_t t, const int64_t* lengths,
                                       const AccT<T>* saved_t, const AccT<T>* saved_prev,
                                       int64_t prev_t, const AccT<T>* c0,
                                       const VariantOptions<T>& opt, ZoneoutStep<AccT<T>> zc,
                                       ZoneoutStep<AccT<T>> zh, const AccT<T>* dm,
                                       const T* grad_output, AccT<T>* dh_keep,
                                       const AccT<T>* dh_rec, AccT<T>* dc_state, AccT<T>* dpre,
                                       AccT<T>* dxg, AccT<T>* dr, AccT<T>* dz, AccT<T>* m,
                                       cudaStream_t stream);

// out[n] = sum over rows r of a[r * lda + n] * b[r * ldb + n] (or of a alone when b is nullptr), for
// n < N, summed in AccT<T> and rounded to T: the bias's and the layer-norm gains' gradients over all
// T * B rows. The rows are split into variant_column_slices(rows) slices summed in parallel into
// partial [slices, N] (AccT<T>), then the slices in order: the order depends on rows only, so the
// result is reproducible. rows may be 0 (out is zero).
inline int64_t variant_column_slices(int64_t rows) {
  constexpr int64_t kSliceRows = 32, kMaxSlices = 1024;
  const int64_t s = (rows + kSliceRows - 1) / kSliceRows;
  return s < 1 ? 1 : (s > kMaxSlices ? kMaxSlices : s);
}
template <typename T>
cudaError_t lstm_variant_column_sums(int64_t rows, int N, const AccT<T>* a, int64_t lda,
                                     const AccT<T>* b, int64_t ldb, AccT<T>* partial, T* out,
                                     cudaStream_t stream);

// out[i] = a[i] + b[i] (b may be nullptr), rounded to T, for i < n.
template <typename T>
cudaError_t lstm_variant_add(int64_t n, const AccT<T>* a, const AccT<T>* b, T* out,
                             cudaStream_t stream);

// The input in AccT<T> for the products: out [T_, B, I] = x, zero at steps past a sequence's
// length (so that whatever the padding holds, NaN included, cannot reach grad_w_ih through the zero
// gradient rows of those steps).
template <typename T>
cudaError_t lstm_variant_input(int64_t T_, int B, int I, const T* x, const int64_t* lengths,
                               AccT<T>* out, cudaStream_t stream);

// lstm_recurrent_inputs (lstm_kernels.cuh) with the result in AccT<T>: h_prev [T_, B, P] is the h
// that the step at each time index started from, for grad_w_hh.
template <typename T>
cudaError_t lstm_variant_recurrent_inputs(int64_t T_, int B, int P, const T* output, const T* h0,
                                          const int64_t* lengths, bool reverse, AccT<T>* h_prev,
                                          cudaStream_t stream);

}  // namespace cuda
}  // namespace fastlstm
