import os

import pytest
import torch

import fastlstm


def pytest_report_header(config):
    return [
        f"torch {torch.__version__}, fastlstm backend: cpu={fastlstm.backend('cpu')}, "
        f"cuda={fastlstm.backend('cuda') if torch.cuda.is_available() else 'no GPU'}",
        # Which fastlstm the tests import: a checkout's, or an installed wheel's (.ci/package_check.sh).
        f"fastlstm imported from {os.path.dirname(os.path.abspath(fastlstm.__file__))}",
    ]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """torch's intra-op threads set to 1 for the test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
