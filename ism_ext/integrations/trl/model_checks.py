"""What a model must be to train under ISM / MAS masks: on the "ism" attention, and with no sliding window that
a training sequence could outgrow."""

from __future__ import annotations

from typing import Any

from ..hf import ATTN_IMPLEMENTATION, apply_ism

__all__ = ["base_model", "ensure_ism_model", "sliding_window"]


def base_model(model: Any) -> Any:
    """The transformers model under a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def sliding_window(config: Any) -> int | None:
    """The attention window of a config, or None when every layer attends all earlier keys.

    Mistral keeps ``sliding_window`` (4096 by default) on every layer; Qwen2/Qwen3 set it to None unless
    ``use_sliding_window`` is on, and then only their ``"sliding_attention"`` layers use it.
    """
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return int(window)


def ensure_ism_model(model: Any, max_length: int | None) -> Any:
    """Switches ``model`` to the ism attention in place if it is not on it yet, and refuses what cannot train.

    Raises:
        ValueError: a model family the ism attention does not support (from `apply_ism`), or a sliding window
            smaller than ``max_length`` (or any window when ``max_length`` is None): the ISM layout attends every
            earlier key of a dialogue, which a window would silently cut.
        NotImplementedError: attention dropout or a Qwen ``use_sliding_window`` config (from `apply_ism`).
    """
    base = base_model(model)
    if getattr(base.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        apply_ism(base)
    window = sliding_window(base.config)
    if window is not None and (max_length is None or max_length > window):
        raise ValueError(
            f"the model has sliding-window attention (window {window}) and max_length is {max_length}: a dialogue "
            f"longer than the window cannot be trained with ISM masks (the ism attention refuses it at run time); "
            f"set max_length <= {window}, or use a full-attention model"
        )
    return model
