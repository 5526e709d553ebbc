"""fastlstm: a fused C++/CUDA drop-in replacement for torch.nn.LSTM.

    import fastlstm
    lstm = fastlstm.LSTM(10, 20, num_layers=2)     # same arguments as torch.nn.LSTM
    cell = fastlstm.LSTMCell(10, 20)               # same arguments as torch.nn.LSTMCell
    model = fastlstm.replace_lstm(model)           # swap every torch.nn.LSTM (and LSTMCell)
    fastlstm.backend("cpu")                        # "compiled" or "reference"
    fastlstm.library_paths()                       # the op libraries, for C++ programs
"""
from . import onnx, ops, reference
from .cell import LSTMCell
from .lstm import LSTM, replace_lstm
from ._loader import cpu_cache_bytes, empty_cpu_cache, library_paths
from .ops import backend

__all__ = ["LSTM", "LSTMCell", "replace_lstm", "backend", "cpu_cache_bytes", "empty_cpu_cache",
           "library_paths", "onnx", "ops", "reference"]
__version__ = "0.1.0"
