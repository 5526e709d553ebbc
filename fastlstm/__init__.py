"""fastlstm: a fused C++/CUDA drop-in replacement for torch.nn.LSTM.

    import fastlstm
    lstm = fastlstm.LSTM(10, 20, num_layers=2)     # same arguments as torch.nn.LSTM
    model = fastlstm.replace_lstm(model)           # swap every torch.nn.LSTM in a model
    fastlstm.backend("cpu")                        # "compiled" or "reference"
    fastlstm.library_path()                        # the op library, for C++ programs
"""
from . import ops, reference
from .lstm import LSTM, replace_lstm
from ._loader import library_path
from .ops import backend

__all__ = ["LSTM", "replace_lstm", "backend", "library_path", "ops", "reference"]
__version__ = "0.1.0"
