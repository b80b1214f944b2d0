"""Makes tests/reference.py importable as `reference` from every test module."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

from ism_ext import config as _config  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_kernel_config():
    """Every test starts and ends with the process's kernel configuration as the environment set it."""
    before = _config.get_kernel_config()
    yield
    _config.set_kernel_config(before)
