import pytest
import torch

import fastlstm


def pytest_report_header(config):
    return [
        f"torch {torch.__version__}, fastlstm backend: cpu={fastlstm.backend('cpu')}, "
        f"cuda={fastlstm.backend('cuda') if torch.cuda.is_available() else 'no GPU'}"
    ]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
