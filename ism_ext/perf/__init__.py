"""Measurement helpers shared by the benchmarks and the commands."""

from .timing import interleaved_median_ms, median_ms

__all__ = ["interleaved_median_ms", "median_ms"]
