"""`model.generate` on an ``"ism"`` model: ``block_sequence_ids`` accepted, the project's cache by default.

transformers' `generate` refuses keyword arguments its model's signature does not name, and builds a
`DynamicCache` (which concatenates the whole cache at every step). For models whose attention
implementation is ``"ism"`` — and for no other — two methods of `GenerationMixin` are wrapped:

* `_validate_model_kwargs` lets ``block_sequence_ids`` through. `generate` then hands the prompt's ids to
  every step; the attention reads ids of the first ``L`` positions as the prompt's layout, and every later
  (generated) position as causal (`layout.query_block_ids`).
* `_prepare_cache_for_generation` makes an `IsmCache` sized for the prompt plus ``max_new_tokens`` when
  the caller gave no cache and asked for no other (``cache_implementation``); beam search and several
  sequences per prompt keep transformers' `DynamicCache`, which the ``"ism"`` attention also serves.

`install` is idempotent and runs when `ism_ext.integrations.hf` is imported.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

from .attention import ATTN_IMPLEMENTATION
from .cache import IsmCache

__all__ = ["cache_argument_name", "install", "is_ism_model"]

_MARK = "_ism_ext_wrapped"


def is_ism_model(model: Any) -> bool:
    """True for a model whose attention implementation is ``"ism"``."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == ATTN_IMPLEMENTATION


def cache_argument_name(model: torch.nn.Module) -> str:
    """The forward's name for the cache: ``cache`` from transformers 5.24, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _validate_model_kwargs(original: Callable) -> Callable:
    @functools.wraps(original)
    def validate(self, model_kwargs: dict[str, Any]) -> None:
        if not is_ism_model(self) or "block_sequence_ids" not in model_kwargs:
            return original(self, model_kwargs)
        ids = model_kwargs.pop("block_sequence_ids")
        try:
            return original(self, model_kwargs)
        finally:
            model_kwargs["block_sequence_ids"] = ids

    return validate


def _prepare_cache_for_generation(original: Callable) -> Callable:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def prepare(self, *args: Any, **kwargs: Any) -> Any:
        if not is_ism_model(self):
            return original(self, *args, **kwargs)
        arguments = signature.bind(self, *args, **kwargs).arguments
        config, model_kwargs = arguments["generation_config"], arguments["model_kwargs"]
        name = cache_argument_name(self)
        if (model_kwargs.get(name) is not None or config.use_cache is False or config.cache_implementation is not None
                or config.num_beams > 1 or (config.num_return_sequences or 1) > 1):
            return original(self, *args, **kwargs)
        model_kwargs[name] = IsmCache.for_model(self, arguments["batch_size"], arguments["max_cache_length"] + 1)
        return None

    return prepare


def install() -> None:
    """Wraps the two `GenerationMixin` methods (once); models that are not ``"ism"`` see no change."""
    from transformers.generation.utils import GenerationMixin

    for method, wrap in (("_validate_model_kwargs", _validate_model_kwargs),
                         ("_prepare_cache_for_generation", _prepare_cache_for_generation)):
        current = getattr(GenerationMixin, method)
        if not getattr(current, _MARK, False):
            wrapped = wrap(current)
            setattr(wrapped, _MARK, True)
            setattr(GenerationMixin, method, wrapped)
