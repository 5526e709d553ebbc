// Op schemas for fastlstm. Each backend registers its implementations in one place (csrc/cpu/lstm_cpu.cpp,
// csrc/cuda/lstm_cuda.cpp); the autograd kernels are in csrc/autograd/.
//
// One layer, one direction. Shapes (time-major; the module handles batch_first):
//   input    [T, B, I]
//   h0       [B, P]        P = proj_size if w_hr is given, else H
//   c0       [B, H]
//   w_ih     [4H, I]       gate rows in torch.nn.LSTM order: i, f, g, o
//   w_hh     [4H, P]
//   b_ih     [4H] or None
//   b_hh     [4H] or None
//   w_hr     [P, H] or None (projection: h_t = w_hr @ (o_t * tanh(c_t)))
//   lengths  [B] int64 on the input's device, values in [0, T], or None (all T).
//            A step t >= lengths[b] leaves sequence b's state unchanged and writes a zero output.
//   reverse  run t = T-1 .. 0 (the reverse direction of a bidirectional layer); with lengths,
//            sequence b starts at t = lengths[b] - 1.
//   training whether the backward will run: without it nothing is saved (gates, cells and hidden
//            come back with shape [0]) and the forward needs far less memory. None (the default):
//            decided by the Autograd kernel (csrc/autograd/layer_autograd.cpp), true exactly when a
//            gradient is needed; a backend kernel reached without it (below autograd) saves nothing.
//
// lstm_layer_forward returns
//   output   [T, B, P]     h_t at every step (zero past a sequence's length)
//   h_n      [B, P]        state after each sequence's last step
//   c_n      [B, H]
//   gates    [T, B, 4H]    post-activation i, f, g, o (input dtype), saved for backward
//   cells    [T, B, H]     c_t after step t, carried through inactive steps; float32 for
//                          float16/bfloat16 input (the cell state is kept in float32), else the
//                          input dtype
//   hidden   [T, B, H]     o_t * tanh(c_t) before the projection; shape [0] without w_hr
//
// lstm_layer_backward takes the gradients of output, h_n, c_n, the forward's inputs and the saved
// tensors, and returns the gradients of input, h0, c0, w_ih, w_hh, the bias (b_ih and b_hh get
// the same gradient; computed whether or not the layer has biases) and w_hr ([0] without w_hr).
#include <torch/library.h>

TORCH_LIBRARY(fastlstm, m) {
  m.def(
      "lstm_layer_forward(Tensor input, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? lengths, bool reverse, bool? training=None) "
      "-> (Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells, Tensor hidden)");
  m.def(
      "lstm_layer_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor input, "
      "Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor? lengths, "
      "Tensor output, Tensor gates, Tensor cells, Tensor hidden, bool reverse) "
      "-> (Tensor grad_input, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_bias, Tensor grad_w_hr)");
}

// The library has no Python entry point and no Python symbols: fastlstm/_loader.py loads it with
// torch.ops.load_library, and a C++ program can dlopen it (examples/cpp).

// One LSTMCell step (torch.nn.LSTMCell), CPU (csrc/cpu/cell_cpu.cpp; autograd in
// csrc/autograd/cell_autograd.cpp). Shapes:
//   input [B, I]; hx [B, H]; cx [B, H]; w_ih [4H, I]; w_hh [4H, H] (rows i, f, g, o);
//   b_ih, b_hh [4H] or None.
// lstm_cell_forward returns h [B, H], c [B, H] (input dtype) and gates [B, 4H], the post-activation
// i, f, g, o saved for backward (float32 for float16/bfloat16 input, else the input dtype).
// lstm_cell_backward takes the gradients of h and c, the step's cx and its c and gates, and returns
// the gradient of the pre-activation gates grad_gates [B, 4H] (gates' dtype; the input, state, weight
// and bias gradients are products of it) and grad_cx [B, H].
TORCH_LIBRARY_FRAGMENT(fastlstm, m) {
  m.def(
      "lstm_cell_forward(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh) -> (Tensor h, Tensor c, Tensor gates)");
  m.def(
      "lstm_cell_backward(Tensor grad_h, Tensor grad_c, Tensor cx, Tensor c, Tensor gates) "
      "-> (Tensor grad_gates, Tensor grad_cx)");
}

// The CPU library's controls and internals (csrc/cpu/lstm_cpu.cpp):
//   cpu_cache_release() frees the large blocks the CPU kernels keep for reuse (csrc/cpu/block_cache.h)
//     and returns how many bytes that was (fastlstm.empty_cpu_cache()); cpu_cache_bytes() returns how
//     many bytes are cached now (fastlstm.cpu_cache_bytes()).
//   _lstm_layer_cpu_plan returns how the CPU layer would run a call with these arguments (the forward
//     plan, and with training the backward's; csrc/cpu/layer_plan.h), for debugging.
//   _cpu_cached_empty(size, dtype) is an uninitialised CPU tensor from the block cache (the cell's
//     autograd puts its weight gradients there).
TORCH_LIBRARY_FRAGMENT(fastlstm, m) {
  m.def("cpu_cache_release() -> int");
  m.def("cpu_cache_bytes() -> int");
  m.def(
      "_lstm_layer_cpu_plan(Tensor input, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, "
      "Tensor? lengths, bool reverse, bool training) -> str");
  m.def("_cpu_cached_empty(int[] size, ScalarType dtype) -> Tensor");
}

// The variant layer (README "Variants"; plain-PyTorch definition: fastlstm/reference.py's
// lstm_variant_layer): one layer, one direction, with zoneout, cell clipping and layer
// normalisation, any of them (weight drop is the module's: it runs the layer with dropped w_hh).
// Arguments as lstm_layer_forward's, and:
//   zoneout_c [T, B, H] or None, zoneout_h [T, B, P] or None: per-step masks m (training; 1 keeps
//            the previous value: c_t = m * c_{t-1} + (1 - m) * c~_t, h_t likewise; any value in
//            [0, 1] is computed as written). Where a mask is None, zoneout_c_p / zoneout_h_p is
//            used as m at every step and element (evaluation: the expectation; 0 = off). Masks have
//            the cell dtype (float32 for float16/bfloat16 input, else the input's).
//   cell_clip  None, or c~_t is clamped to [-cell_clip, cell_clip] (gradient 0 outside).
//   ln_ih [4H], ln_hh [4H], ln_c_weight [H], ln_c_bias [H] (input dtype): all four or none. With
//            them the pre-activations are LN(x_t W_ih^T) * ln_ih + LN(h_{t-1} W_hh^T) * ln_hh + b_ih
//            + b_hh and the cell output tanh(LN(c~_t) * ln_c_weight + ln_c_bias), each LN over the
//            whole row (4H, H) without affine, eps 1e-5 (biased variance).
// One step: c~ = sigmoid(f) c_{t-1} + sigmoid(i) tanh(g), clipped; y = tanh(c~) (or the LN form);
// h~ = sigmoid(o) y, projected by w_hr; then zoneout of c~ and h~ against c_{t-1}, h_{t-1}.
// lstm_variant_forward returns output [T, B, P], h_n [B, P], c_n [B, H] and, with training, saved
// [T, B, K] in the cell dtype (else shape [0]), per row:
//   [0, 4H) post-activation i, f, g, o; [4H, 5H) c_t (after zoneout); [5H, 6H) c~_t before
//   clipping; [6H, 7H) y; with layer norm also [7H, 11H) the normalised x_t W_ih^T, [11H, 15H) the
//   normalised h_{t-1} W_hh^T, [15H, 16H) the normalised c~_t, [16H, 16H + 3) the three 1/std.
//   K = 7H, or 16H + 3 with layer norm. Rows of steps past a sequence's length are zero.
// lstm_variant_backward returns the gradients of input, h0, c0, w_ih, w_hh, the bias (both b_ih and
// b_hh), w_hr, ln_ih, ln_hh, ln_c_weight, ln_c_bias (shape [0] for an absent one). Masks get no
// gradient.
TORCH_LIBRARY_FRAGMENT(fastlstm, m) {
  m.def(
      "lstm_variant_forward(Tensor input, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? lengths, bool reverse, Tensor? zoneout_c, "
      "Tensor? zoneout_h, float zoneout_c_p, float zoneout_h_p, float? cell_clip, Tensor? ln_ih, "
      "Tensor? ln_hh, Tensor? ln_c_weight, Tensor? ln_c_bias, bool training) "
      "-> (Tensor output, Tensor h_n, Tensor c_n, Tensor saved)");
  m.def(
      "lstm_variant_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor input, "
      "Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor? lengths, bool reverse, "
      "Tensor? zoneout_c, Tensor? zoneout_h, float zoneout_c_p, float zoneout_h_p, float? cell_clip, "
      "Tensor? ln_ih, Tensor? ln_hh, Tensor? ln_c_weight, Tensor? ln_c_bias, Tensor output, "
      "Tensor saved) -> (Tensor grad_input, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, "
      "Tensor grad_w_hh, Tensor grad_bias, Tensor grad_w_hr, Tensor grad_ln_ih, Tensor grad_ln_hh, "
      "Tensor grad_ln_c_weight, Tensor grad_ln_c_bias)");
}
