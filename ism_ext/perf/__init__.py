"""Measurement helpers shared by the benchmarks and the commands."""

from .timing import median_ms

__all__ = ["median_ms"]
