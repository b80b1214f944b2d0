"""The one timer of the project: the median of repeated calls after warm-up, in milliseconds.

Benchmarks, `python -m ism_ext bench` and the `ops` demo all time through `median_ms`, so their figures
mean the same thing: on the CPU wall time around each call, on CUDA the time between two events recorded
on the current stream around each call (what the GPU spent, without launch jitter of the host).
`interleaved_median_ms` times several calls that are compared with each other the same way, the calls taking
turns inside every repeat: on a machine whose speed drifts over seconds (a shared virtual machine), a slow
spell then lands on every side of the comparison instead of on whichever ran during it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["interleaved_median_ms", "median_ms"]


def _cuda_ms(fn: Callable[[], Any]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _wall_ms(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def median_ms(fn: Callable[[], Any], repeats: int, *, warmup: int = 1, device: str | torch.device = "cpu") -> float:
    """Median time of ``fn()`` in milliseconds over ``repeats`` calls, after ``warmup`` untimed calls.

    ``device`` says where ``fn`` runs: ``"cuda"`` (or a CUDA device) times with CUDA events on the current
    stream, after a synchronisation that lets the warm-up finish; anything else times wall-clock.
    """
    return interleaved_median_ms({"fn": fn}, repeats, warmup=warmup, device=device)["fn"]


def interleaved_median_ms(calls: Mapping[str, Callable[[], Any]], repeats: int, *, warmup: int = 1,
                          device: str | torch.device = "cpu") -> dict[str, float]:
    """Median milliseconds of each of ``calls`` (name -> function), the calls taking turns inside every repeat.

    ``warmup`` untimed rounds of every call come first; ``device`` as for ``median_ms``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for call in calls.values():
            call()
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        torch.cuda.synchronize()
    time_one = _cuda_ms if on_cuda else _wall_ms
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(time_one(call))
    return {name: statistics.median(t) for name, t in times.items()}
