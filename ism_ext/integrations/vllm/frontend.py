"""Chat requests on an ISM engine: the OpenAI chat endpoint and offline ``LLM.chat`` render with `chat.py`.

Both wrappers (listed in `internals.py`) leave an engine without ``additional_config["ism"]`` untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .chat import chat_extra_args
from .config import IsmServingConfig

__all__ = ["install"]

# Chat arguments the project's renderer does not take (it renders text dialogues with the model's own template
# and the generation prompt), with the value that means "not used": request fields on the server, LLM.chat's
# keyword arguments offline (which also take multimodal processor options).
_RENDERER_FIXED = {"chat_template": None, "tools": None, "continue_final_message": False, "add_generation_prompt": True}
_OFFLINE_UNSUPPORTED = {**_RENDERER_FIXED, "mm_processor_kwargs": None}


def _server_template_kwargs(serving_chat: Any, request: Any) -> dict:
    """The template variables of a chat request (server defaults, then the request's own); ValueError for request
    fields the project's renderer does not take."""
    given = [name for name, default in _RENDERER_FIXED.items()
             if getattr(request, name, default) not in (default, None, [])]
    if given:
        raise ValueError(f"an ISM chat request is rendered with the model's chat template and the project's turn "
                         f"renderer; it does not take {', '.join(given)}")
    return {**serving_chat.default_chat_template_kwargs, **(request.chat_template_kwargs or {})}


def _server_chat(original: Callable) -> Callable:
    async def render_chat_request(self, request):
        result = await original(self, request)
        serving = IsmServingConfig.from_vllm_config(getattr(self.engine_client, "vllm_config", None))
        if serving is None or not isinstance(result, tuple):
            return result  # no ISM, or vLLM's own error response
        conversation, engine_inputs = result
        try:
            kwargs = _server_template_kwargs(self, request)
            token_ids, extra = chat_extra_args(self.renderer.tokenizer, request.messages, request.vllm_xargs,
                                               serving, kwargs)
        except ValueError as e:
            return self.create_error_response(str(e))
        if len(engine_inputs) != 1 or engine_inputs[0].get("type") != "token":
            return self.create_error_response("ISM serving renders text chats only")
        engine_inputs[0]["prompt_token_ids"] = token_ids
        engine_inputs[0].pop("prompt_token_offsets", None)
        request.vllm_xargs = extra
        return conversation, engine_inputs

    return render_chat_request


def _offline_chat(original: Callable) -> Callable:
    def _add_chat_requests(self, messages, params, *, use_tqdm=True, lora_request=None, priority=None, **kwargs):
        serving = IsmServingConfig.from_vllm_config(self.llm_engine.vllm_config)
        if serving is None:
            return original(self, messages, params, use_tqdm=use_tqdm, lora_request=lora_request, priority=priority,
                            **kwargs)
        given = [name for name, default in _OFFLINE_UNSUPPORTED.items() if kwargs.get(name, default) != default]
        if given:
            raise ValueError(f"LLM.chat on an ISM engine renders with the model's chat template and the project's "
                             f"turn renderer; it does not take {', '.join(given)}")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(conversations)
        if len(params_list) != len(conversations):
            raise ValueError(f"sampling_params: {len(params_list)} given for {len(conversations)} conversations")
        tokenizer = self.get_tokenizer()
        prompts, request_params = [], []
        for conversation, sampling in zip(conversations, params_list, strict=True):
            token_ids, extra = chat_extra_args(tokenizer, conversation, sampling.extra_args, serving,
                                               kwargs.get("chat_template_kwargs"))
            request = sampling.clone()
            request.extra_args = extra
            prompts.append({"prompt_token_ids": token_ids})
            request_params.append(request)
        return self._add_completion_requests(prompts=prompts, params=request_params, use_tqdm=use_tqdm,
                                             lora_request=lora_request, priority=priority)

    return _add_chat_requests


def install() -> None:
    """Wraps the chat entry points (`internals.py`), once per process."""
    from . import internals

    internals.wrap(*internals.SERVER_CHAT, _server_chat)
    internals.wrap(*internals.OFFLINE_CHAT, _offline_chat)
