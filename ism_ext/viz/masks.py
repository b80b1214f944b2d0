"""Pictures of attention layouts (PNG), for docs, reports and debugging.

matplotlib is imported lazily inside the functions and drives an Agg canvas directly (no pyplot, no
display, no global backend switch), so importing this module costs nothing and works headless.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any

from ..masks import SCHEMES, check_scheme, check_turns, dense_mask, kv_limit_for_turns, turn_boundaries

__all__ = ["save_figure", "save_mask_picture", "save_scheme_comparison"]

# Tick label colours per role (tool shares the user hue family but stays distinguishable).
_ROLE_COLOURS = {"system": "#6a3d9a", "user": "#1f78b4", "assistant": "#33a02c", "tool": "#b15928"}
_ROLE_SHORT = {"system": "sys", "user": "u", "assistant": "a", "tool": "t"}
# Cell colours: masked, allowed on/below the diagonal (what causal attention also sees), allowed above
# it (what the scheme adds over causal). The split makes the bidirectional blocks stand out.
_CELL_COLOURS = ("#ffffff", "#4c72b0", "#ff9f1c")
_DPI = 100
_PANEL_INCHES = 6.0


def _turn_labels(turns: list[tuple[str, int]]) -> list[str]:
    """Short labels ``sys, u1, a1, u2, ...``; ``sys`` gets a number only when there are several."""
    n_system = sum(1 for role, _ in turns if role == "system")
    counts = dict.fromkeys(_ROLE_SHORT, 0)
    labels = []
    for role, _ in turns:
        counts[role] += 1
        if role == "system" and n_system == 1:
            labels.append("sys")
        else:
            labels.append(f"{_ROLE_SHORT[role]}{counts[role]}")
    return labels


def _draw_mask(ax: Any, turns: list[tuple[str, int]], scheme: str) -> None:
    """Draw the dense mask of ``turns`` under ``scheme`` on a matplotlib axes."""
    import numpy as np
    from matplotlib.colors import ListedColormap

    mask = dense_mask(kv_limit_for_turns(turns, scheme)).numpy()
    n = mask.shape[0]
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    cells = mask.astype(np.uint8) + (mask & upper).astype(np.uint8)
    ax.imshow(
        cells, cmap=ListedColormap(_CELL_COLOURS), vmin=0, vmax=2, interpolation="nearest", aspect="equal"
    )

    bounds = turn_boundaries(turns)
    # Thin lines between turns; the outer frame already marks 0 and n.
    linewidth = 0.6 if n <= 400 else 0.4
    for b in sorted(set(bounds[1:-1])):
        ax.axhline(b - 0.5, color="#888888", linewidth=linewidth)
        ax.axvline(b - 0.5, color="#888888", linewidth=linewidth)

    # Ticks at turn centres; zero-length turns take no space, so they get no tick.
    labels = _turn_labels(turns)
    visible = [k for k, (_, length) in enumerate(turns) if length > 0]
    centres = [(bounds[k] + bounds[k + 1] - 1) / 2 for k in visible]
    fontsize = max(4.0, min(9.0, 240.0 / max(len(visible), 1)))
    ax.set_xticks(centres)
    ax.set_yticks(centres)
    ax.set_xticklabels([labels[k] for k in visible], fontsize=fontsize, rotation=90)
    ax.set_yticklabels([labels[k] for k in visible], fontsize=fontsize)
    for tick_labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        for k, text in zip(visible, tick_labels, strict=True):
            text.set_color(_ROLE_COLOURS[turns[k][0]])
    ax.tick_params(length=0)
    ax.set_xlabel("key", fontsize=9)
    ax.set_ylabel("query", fontsize=9)


def _prepare(turns: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """Validate turns for drawing: a picture of zero tokens has nothing to show."""
    checked = check_turns(turns)
    if sum(length for _, length in checked) == 0:
        raise ValueError("turns contain no tokens; nothing to draw")
    return checked


def _legend(fig: Any) -> None:
    """Figure-level legend explaining the cell colours."""
    from matplotlib.patches import Patch

    handles = [
        Patch(facecolor=_CELL_COLOURS[1], label="allowed, j <= i (causal part)"),
        Patch(facecolor=_CELL_COLOURS[2], label="allowed, j > i (bidirectional)"),
        Patch(facecolor=_CELL_COLOURS[0], edgecolor="#999999", label="masked"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int | None = None) -> pathlib.Path:
    """Writes a matplotlib ``Figure`` as PNG through an Agg canvas (no pyplot, no display) and returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    try:
        # A fixed figure size (no bbox_inches="tight") keeps the pixel size predictable.
        fig.savefig(out, format="png", dpi=dpi or fig.dpi)
    finally:
        # The figure is not registered with pyplot; dropping its artists frees the image right away.
        fig.clear()
    return out


def save_mask_picture(
    turns: Sequence[tuple[str, int]],
    scheme: str,
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
) -> pathlib.Path:
    """Save a PNG heatmap of the dense attention mask of a dialogue under ``scheme``.

    Rows are queries, columns keys; allowed cells are coloured (blue on/below the diagonal, orange above
    it, i.e. where the scheme sees more than a causal LM), masked cells white. Thin grey lines mark turn
    boundaries and ticks at turn centres carry role-coloured labels (``sys``, ``u1``, ``a1``, ...).
    The image is 600 x 640 pixels whatever the token count (fine for about 50..2000 tokens).

    Args:
        turns: ``(role, n_tokens)`` pairs, as for :func:`ism_ext.masks.segment_ids_for_turns`.
        scheme: one of :data:`ism_ext.masks.SCHEMES`.
        path: where to write the PNG (parent folders are created).
        title: figure title; defaults to one naming the scheme and token count.

    Returns:
        The path written.
    """
    check_scheme(scheme)
    checked = _prepare(turns)
    from matplotlib.figure import Figure

    n_tokens = sum(length for _, length in checked)
    fig = Figure(figsize=(_PANEL_INCHES, _PANEL_INCHES + 0.4), dpi=_DPI)
    ax = fig.add_axes((0.1, 0.12, 0.85, 0.78))
    _draw_mask(ax, checked, scheme)
    fig.suptitle(title if title is not None else f"{scheme} attention mask ({n_tokens} tokens)", fontsize=11)
    _legend(fig)
    return save_figure(fig, path)


def save_scheme_comparison(
    turns: Sequence[tuple[str, int]],
    path: str | os.PathLike[str],
    schemes: Sequence[str] = SCHEMES,
) -> pathlib.Path:
    """Save a PNG with the masks of one dialogue under several schemes, side by side.

    Each panel is drawn as in :func:`save_mask_picture` and titled with its scheme. The image is
    ``400 * len(schemes)`` x 460 pixels.

    Args:
        turns: ``(role, n_tokens)`` pairs.
        path: where to write the PNG (parent folders are created).
        schemes: schemes to draw, in order (default: all of :data:`ism_ext.masks.SCHEMES`).

    Returns:
        The path written.
    """
    schemes = list(schemes)
    if not schemes:
        raise ValueError("schemes must name at least one scheme")
    for scheme in schemes:
        check_scheme(scheme)
    checked = _prepare(turns)
    from matplotlib.figure import Figure

    n_tokens = sum(length for _, length in checked)
    panel = 4.0
    fig = Figure(figsize=(panel * len(schemes), panel + 0.6), dpi=_DPI)
    axes = fig.subplots(1, len(schemes), squeeze=False)[0]
    for ax, scheme in zip(axes, schemes, strict=True):
        _draw_mask(ax, checked, scheme)
        ax.set_title(scheme, fontsize=11)
    fig.suptitle(f"attention masks of one dialogue ({n_tokens} tokens)", fontsize=11)
    fig.subplots_adjust(left=0.06, right=0.98, top=0.86, bottom=0.2, wspace=0.3)
    _legend(fig)
    return save_figure(fig, path)
