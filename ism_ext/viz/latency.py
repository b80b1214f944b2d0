"""Pictures of chat latency: time to first token per round, one line per scheme (PNG)."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence

from .masks import save_figure

__all__ = ["save_ttft_plot"]


def save_ttft_plot(
    ttft_ms: Mapping[str, Sequence[float]],
    path: str | os.PathLike[str],
    *,
    title: str,
    log_y: bool = False,
) -> pathlib.Path:
    """Saves a PNG of the time to first token of every round (round ``k + 1`` is ``ttft_ms[scheme][k]``).

    The x axis shows whole rounds only; ``log_y`` puts the milliseconds on a log scale (useful when a
    recomputing baseline grows far above the others). Returns the path written.
    """
    if not ttft_ms or not any(len(v) for v in ttft_ms.values()):
        raise ValueError("ttft_ms has no rounds to draw")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.5, 4.2), dpi=110)
    ax = fig.add_subplot()
    for scheme, values in ttft_ms.items():
        ax.plot(range(1, len(values) + 1), list(values), marker="o", label=scheme)
    ax.set(xlabel="round", ylabel="time to first token (ms)", title=title)
    if log_y:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return save_figure(fig, path)
