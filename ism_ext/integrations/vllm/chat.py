"""Chat messages -> prompt tokens and bidirectional ranges, with the project's one turn renderer.

vLLM's OpenAI chat endpoint and offline ``LLM.chat`` go through `render_chat` when the engine serves ISM
(``additional_config["ism"]``): the same renderer and schemes that training (`ism_ext.training`) and the
project's own chat loop use, so a served chat is segmented exactly as it was trained. The request's scheme
is its ``ism_scheme`` extra argument, else the engine's default (`IsmServingConfig.scheme`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ...turns import render_dialogue, tokenize_rendered
from .config import SCHEME_KEY, IsmServingConfig, check_scheme
from .ranges import RANGES_KEY, Ranges, flatten, ranges_from_block_ids

__all__ = ["chat_extra_args", "render_chat", "text_messages"]


def _text(content: Any, index: int) -> str:
    """A message's content as text: a string, or OpenAI content parts that are all text."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            part = dict(part) if isinstance(part, Mapping) else {}
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"messages[{index}].content: ISM serving renders text only, got a "
                                 f"{part.get('type', type(part).__name__)!r} part")
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError(f"messages[{index}].content must be a string or text parts, got {type(content).__name__}")


def text_messages(messages: Sequence[Any]) -> list[dict[str, str]]:
    """OpenAI-style messages (dicts or pydantic models) as ``[{"role", "content"}]`` with text content."""
    plain = []
    for index, message in enumerate(messages):
        message = message.model_dump() if hasattr(message, "model_dump") else dict(message)
        if message.get("tool_calls"):
            raise ValueError(f"messages[{index}]: tool calls are not rendered by ISM serving")
        plain.append({"role": message.get("role"), "content": _text(message.get("content") or "", index)})
    return plain


def render_chat(tokenizer: Any, messages: Sequence[Any], scheme: str,
                chat_template_kwargs: dict | None = None) -> tuple[list[int], Ranges]:
    """The prompt of ``messages`` waiting for its answer (generation prompt added), and its ranges under ``scheme``.

    Raises ValueError for what the renderer cannot segment (no chat template, unknown role, a dialogue ending
    with an answer, non-text content), naming the message.
    """
    check_scheme(scheme, SCHEME_KEY)
    rendered = render_dialogue(tokenizer, text_messages(messages), add_generation_prompt=True,
                               chat_template_kwargs=chat_template_kwargs)
    dialogue = tokenize_rendered(tokenizer, rendered, scheme)
    return dialogue.input_ids.tolist(), ranges_from_block_ids(dialogue.block_sequence_ids.tolist())


def chat_extra_args(tokenizer: Any, messages: Sequence[Any], extra_args: Mapping[str, Any] | None,
                    serving: IsmServingConfig, chat_template_kwargs: dict | None = None) -> tuple[list[int], dict]:
    """Prompt tokens of a chat request and its ``extra_args`` with the derived ``ism_ranges`` added.

    The scheme is ``extra_args["ism_scheme"]`` or the engine's default; a chat request that also carries
    ``ism_ranges`` is refused (ranges go with token prompts, whose tokens the client knows).
    """
    extra = dict(extra_args or {})
    if RANGES_KEY in extra:
        raise ValueError(f"{RANGES_KEY} goes with a token prompt (completions / LLM.generate); a chat request's "
                         f"ranges come from its messages (choose them with {SCHEME_KEY})")
    scheme = extra.pop(SCHEME_KEY, serving.scheme)
    token_ids, ranges = render_chat(tokenizer, messages, scheme, chat_template_kwargs)
    extra[RANGES_KEY] = flatten(ranges)
    return token_ids, extra
