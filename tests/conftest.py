"""Makes tests/reference.py importable as `reference` from every test module."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
