"""The plugin's wrappers around vLLM (which functions, and why, in `internals.py`); each is a no-op for a
request without ranges and for an engine without ``additional_config["ism"]``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vllm.exceptions import VLLMValidationError

from .config import SCHEME_KEY, IsmServingConfig
from .ranges import RANGES_KEY, block_hash_keys, chunk_tokens, flatten, parse_ranges, request_ranges

__all__ = ["IsmRequestError", "check_request", "install"]


class IsmRequestError(VLLMValidationError, ValueError):
    """A request whose ISM arguments are malformed: HTTP 400 on the server, ValueError offline."""


def _extra_args(request: Any) -> dict | None:
    params = getattr(request, "sampling_params", None)
    return getattr(params, "extra_args", None)


def check_request(request: Any, vllm_config: Any) -> None:
    """Admission of an engine request (`EngineCoreRequest`): its ranges are checked against its prompt and the
    step budget and written back in canonical form; IsmRequestError (naming the argument) otherwise."""
    extra = _extra_args(request)
    if not extra or (RANGES_KEY not in extra and SCHEME_KEY not in extra):
        return
    if SCHEME_KEY in extra:
        raise IsmRequestError(f"{SCHEME_KEY} chooses the layout of a chat request (chat endpoint, LLM.chat); "
                              f"a token prompt gives {RANGES_KEY}", parameter=SCHEME_KEY)
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise IsmRequestError(f"{RANGES_KEY}: ISM serving runs on vLLM's CPU build only in this release (the "
                              f"project's CUDA path has not been verified under vLLM)", parameter=RANGES_KEY)
    if IsmServingConfig.from_vllm_config(vllm_config) is None:
        raise IsmRequestError(f"{RANGES_KEY} needs an engine started with additional_config={{'ism': {{}}}}: "
                              f"without it vLLM's own attention runs and would ignore the ranges",
                              parameter=RANGES_KEY)
    try:
        ranges = parse_ranges(extra[RANGES_KEY], len(request.prompt_token_ids or ()))
    except ValueError as e:
        raise IsmRequestError(str(e), parameter=RANGES_KEY) from None
    budget = vllm_config.scheduler_config.max_num_batched_tokens
    longest = max((end - start for start, end in ranges), default=0)
    if longest > budget:
        raise IsmRequestError(f"{RANGES_KEY}: a span of {longest} tokens is longer than one step's budget "
                              f"(max_num_batched_tokens={budget}); a span must be computed in one step, so this "
                              f"request cannot be served (raise max_num_batched_tokens)", parameter=RANGES_KEY)
    extra[RANGES_KEY] = flatten(ranges)


def _block_hash_keys(original: Callable) -> Callable:
    def generate_block_hash_extra_keys(request, start_token_idx, end_token_idx, start_mm_idx):
        keys, next_mm_idx = original(request, start_token_idx, end_token_idx, start_mm_idx)
        ranges = request_ranges(_extra_args(request))
        layout = block_hash_keys(ranges, request.all_token_ids, start_token_idx, end_token_idx) if ranges else None
        if layout:
            keys = (keys or ()) + layout
        return keys, next_mm_idx

    return generate_block_hash_extra_keys


def _chunk_cut(original: Callable) -> Callable:
    def _reserve_prefill_lookahead(self, request, num_computed_tokens, num_new_tokens):
        scheduled = original(self, request, num_computed_tokens, num_new_tokens)
        if scheduled and num_computed_tokens < request.num_prompt_tokens:
            ranges = request_ranges(_extra_args(request))
            if ranges:
                scheduled = chunk_tokens(ranges, num_computed_tokens, scheduled)
        return scheduled

    return _reserve_prefill_lookahead


def _admission(original: Callable) -> Callable:
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        request = original(self, request_id, prompt, params, *args, **kwargs)
        check_request(request, self.vllm_config)
        return request

    return process_inputs


def _batch_ranges(original: Callable) -> Callable:
    from .backend import IsmMetadataBuilder

    def _build_attention_metadata(self, *args, **kwargs):
        builders = [builder for groups in self.attn_groups for group in groups for builder in group.metadata_builders
                    if isinstance(builder, IsmMetadataBuilder) and builder.serving is not None]
        if builders:
            batch = [request_ranges(_extra_args(self.requests[req_id])) for req_id in self.input_batch.req_ids]
            for builder in builders:
                builder.set_batch_ranges(batch)
        return original(self, *args, **kwargs)

    return _build_attention_metadata


def install() -> None:
    """Wraps the engine-side functions (`internals.py`), once per process."""
    from . import internals

    internals.wrap(*internals.BLOCK_HASH_EXTRA_KEYS, _block_hash_keys)
    internals.wrap(internals.BLOCK_POOL_EXTRA_KEYS, internals.BLOCK_HASH_EXTRA_KEYS[1], _block_hash_keys)
    internals.wrap(*internals.CHUNK_CUT, _chunk_cut)
    internals.wrap(*internals.ADMISSION, _admission)
    internals.wrap(*internals.BUILD_METADATA, _batch_ranges)
