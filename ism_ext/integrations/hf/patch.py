"""Patch functions: one per model family, switching a loaded model to the ism attention in place."""

from __future__ import annotations

import torch

from .attention import ATTN_IMPLEMENTATION, register


def _set_implementation(model: torch.nn.Module, family: str, model_types: tuple[str, ...]) -> torch.nn.Module:
    """Checks the config of a ``family`` model and switches it to the ism attention."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in model_types:
        raise ValueError(f"apply_ism_to_{family} expects a {family} model, got model_type {model_type!r}")
    config = model.config
    if getattr(config, "attention_dropout", 0.0):
        raise NotImplementedError("the ism attention has no attention dropout: set config.attention_dropout = 0")
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None) is not None:
        raise NotImplementedError(f"{family} with use_sliding_window=True is not supported by the ism attention")
    register()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


def apply_ism_to_llama(model: torch.nn.Module) -> torch.nn.Module:
    """Switches a loaded Llama model (`LlamaModel`/`LlamaForCausalLM`) to the ism attention, in place."""
    return _set_implementation(model, "llama", ("llama",))


def apply_ism_to_qwen2(model: torch.nn.Module) -> torch.nn.Module:
    """Switches a loaded Qwen2 model to the ism attention, in place (sliding-window configs are refused)."""
    return _set_implementation(model, "qwen2", ("qwen2",))


def apply_ism_to_qwen3(model: torch.nn.Module) -> torch.nn.Module:
    """Switches a loaded Qwen3 model to the ism attention, in place (sliding-window configs are refused)."""
    return _set_implementation(model, "qwen3", ("qwen3",))


def apply_ism_to_mistral(model: torch.nn.Module) -> torch.nn.Module:
    """Switches a loaded Mistral model to the ism attention, in place.

    Mistral configs carry a `sliding_window`; sequences longer than it raise at run time rather than
    attend beyond the window.
    """
    return _set_implementation(model, "mistral", ("mistral",))


APPLY_FUNCTIONS = {
    "llama": apply_ism_to_llama,
    "qwen2": apply_ism_to_qwen2,
    "qwen3": apply_ism_to_qwen3,
    "mistral": apply_ism_to_mistral,
}


def apply_ism(model: torch.nn.Module) -> torch.nn.Module:
    """Switches a loaded causal LM of a supported family to the ism attention, in place; returns it."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in APPLY_FUNCTIONS:
        raise ValueError(
            f"ism_ext.integrations.hf supports the model families {tuple(APPLY_FUNCTIONS)}, "
            f"got model_type {model_type!r}"
        )
    return APPLY_FUNCTIONS[model_type](model)
