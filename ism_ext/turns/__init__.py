"""The turns layer: one renderer from chat messages to token ids, labels and segment ids.

Training (`ism_ext.training`) and inference (`ism_ext.inference`) both use it, so a dialogue has the same
layout when it is trained on and when it is answered.
"""

from .render import (
    IGNORE_INDEX,
    RenderedDialogue,
    TokenizedDialogue,
    TurnSpan,
    render_dialogue,
    tokenize_dialogue,
    tokenize_rendered,
)

__all__ = [
    "IGNORE_INDEX",
    "RenderedDialogue",
    "TokenizedDialogue",
    "TurnSpan",
    "render_dialogue",
    "tokenize_dialogue",
    "tokenize_rendered",
]
