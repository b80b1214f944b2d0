"""Makes tests/reference.py importable as `reference` from every test module."""

import os
import random
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402

from ism_ext import config as _config  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_kernel_config():
    """Every test starts and ends with the process's kernel configuration as the environment set it."""
    before = _config.get_kernel_config()
    yield
    _config.set_kernel_config(before)


@pytest.fixture
def one_thread():
    """One thread for in-process runs, and the thread count and RNG states left as they were found."""
    n = torch.get_num_threads()
    py_state = random.getstate()
    torch.set_num_threads(1)
    with torch.random.fork_rng(devices=[]):
        yield
    torch.set_num_threads(n)
    random.setstate(py_state)
