"""An ONNX function (onnxscript, domain ``fastlstm``) for one direction of an LSTM layer with a
projection (proj_size), forward in time, used by fastlstm.onnx.translation_table(). ONNX's LSTM
operator has no projection; this loops over time with Scan. A function call, unlike a bare Scan
node, tells torch's exporter how many outputs the Scan has: it counts them from the return
annotation (hence this module, without ``from __future__ import annotations``).

h0 [B, P]; c0 [B, H]; gates_x [T, B, 4H] = the input's share of the gates (x W_ih^T + biases),
gate order i, f, g, o; w_hh_t [P, 4H] = W_hh^T; w_hr_t [H, P] = W_hr^T; active [T, B, 1] bool
= t < lengths[b] (all true without lengths). Returns output [T, B, P], h_n [B, P], c_n [B, H]."""
import onnxscript
from onnxscript import BOOL
from onnxscript import opset18 as op
from onnxscript.onnx_types import TensorType

_fastlstm = onnxscript.values.Opset("fastlstm", 1)


@onnxscript.script(_fastlstm, default_opset=op)
def lstm_projected_scan(h0: TensorType, c0: TensorType, gates_x: TensorType, active: BOOL,
                        w_hh_t: TensorType,
                        w_hr_t: TensorType) -> tuple[TensorType, TensorType, TensorType]:
    # A step at t >= length keeps the state and outputs zeros (fastlstm.reference.lstm_layer);
    # without lengths every step is active.
    @onnxscript.graph()
    def step(h, c, g_x, a):
        i, f, g, o = op.Split(op.Add(g_x, op.MatMul(h, w_hh_t)), axis=1, num_outputs=4)
        c_new = op.Add(op.Mul(op.Sigmoid(f), c), op.Mul(op.Sigmoid(i), op.Tanh(g)))
        h_new = op.MatMul(op.Mul(op.Sigmoid(o), op.Tanh(c_new)), w_hr_t)
        zero = op.CastLike(0.0, h_new)
        return op.Where(a, h_new, h), op.Where(a, c_new, c), op.Where(a, h_new, zero)

    h_n, c_n, y = op.Scan(h0, c0, gates_x, active, body=step, num_scan_inputs=2)
    return y, h_n, c_n
