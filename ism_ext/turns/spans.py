"""Chat messages -> the template's text and where each turn lies in it (character spans, no tokens yet).

Every prefix of the dialogue is rendered with the tokenizer's own chat template (and, before each answer,
with the generation prompt); each rendering must extend the previous one. The turns are then character
spans of the final text (docs/layouts.md):

* an input turn (system, user, tool) also holds the template text before its header (the glue after the
  previous answer) and the generation prompt (assistant header) after it, because at inference both are
  prefilled with it; its *block* is the message itself, from its header through its end-of-turn token
  (what the MAS authors make bidirectional);
* an assistant turn is what the model generates: from the end of the generation prompt through its
  end-of-turn token;
* text the template writes before the first message that is a turn of its own (a default system prompt,
  as SmolLM2's template inserts when the dialogue has none) is a system turn of its own, with no message.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .template import check_messages, check_tokenizer, render_text, special_token_pattern

__all__ = ["RenderedDialogue", "TurnSpan", "render_dialogue"]


@dataclass(frozen=True)
class TurnSpan:
    """Where one turn lies in the rendered text (character positions)."""

    role: str
    start: int
    end: int
    generated: tuple[int, int] | None  # assistant turns: the span the model generates (the labels)
    block: tuple[int, int] | None  # input turns: the message itself, its header through its end-of-turn token
    message: int | None  # index of the message; None for text the template adds (a default system prompt)


@dataclass
class RenderedDialogue:
    """The template text of a dialogue with its turns, before tokenisation.

    ``round_ends`` lists, for truncation, ``(n_messages, character)`` at the end of every round: after the
    last answer of a run of answers, and at the end of the dialogue.
    """

    text: str
    turns: list[TurnSpan]
    round_ends: list[tuple[int, int]]


def _prefix_error(a_what: str, b_what: str) -> ValueError:
    return ValueError(
        f"the chat template is not prefix-consistent: {a_what} is not a prefix of {b_what}; one-pass training "
        f"and KV-cache reuse need a template whose renderings grow by appending (templates that rewrite "
        f"earlier turns, e.g. drop past reasoning, are not supported)"
    )


def _render_prefixes(tokenizer: Any, messages: Sequence[Mapping[str, Any]], roles: list[str],
                     kwargs: dict) -> tuple[list[str], dict[int, int]]:
    """Renders every prefix (and the generation prompt before every answer), checking that each extends
    the previous one; returns the renderings and the end of the generation prompt of every answer."""
    renders: list[str] = []
    gen_end: dict[int, int] = {}
    prev, prev_what = "", "the empty prefix"
    for i, role in enumerate(roles):
        what = f"the rendering of messages[:{i + 1}] (ending with message {i}, role {role!r})"
        text = render_text(tokenizer, messages[: i + 1], False, kwargs)
        if role == "assistant":
            gen = render_text(tokenizer, messages[:i], True, kwargs)
            gen_what = f"the rendering of messages[:{i}] with add_generation_prompt=True"
            if not gen.startswith(prev):
                raise _prefix_error(prev_what, gen_what)
            prev, prev_what = gen, gen_what
            gen_end[i] = len(gen)
        if not text.startswith(prev):
            raise _prefix_error(prev_what, what)
        renders.append(text)
        prev, prev_what = text, what
    return renders, gen_end


def _last_special_end(text: str, start: int, stop: int, special: Any) -> int | None:
    """End of the last special token inside ``text[start:stop]`` (None if there is none)."""
    ends = [m.end() for m in special.finditer(text, start, stop)] if special is not None else []
    return ends[-1] if ends else None


def _first_special_start(text: str, start: int, stop: int, special: Any) -> int:
    """Start of the first special token inside ``text[start:stop]`` (``start`` if there is none)."""
    match = special.search(text, start, stop) if special is not None else None
    return match.start() if match else start


def _end_of_turn_token(tokenizer: Any, kwargs: dict, special: Any) -> str | None:
    """The special token the template closes an answer with (probed on a two-message dialogue)."""
    probe = [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}]
    try:
        prompt = render_text(tokenizer, probe[:1], True, kwargs)
        full = render_text(tokenizer, probe, False, kwargs)
    except Exception:  # a template that refuses the probe: fall back to the eos token
        return getattr(tokenizer, "eos_token", None)
    end = _last_special_end(full, len(prompt), len(full), special) if full.startswith(prompt) else None
    if end is None:
        return getattr(tokenizer, "eos_token", None)
    return next(m.group(0) for m in special.finditer(full, len(prompt), len(full)) if m.end() == end)


def _preamble_end(tokenizer: Any, messages: Sequence[Mapping[str, Any]], kwargs: dict, special: Any) -> int:
    """Characters of the turn the template writes before the first message (0 if it writes none).

    That text is what two renderings of the first message with different contents share, up to the last
    end-of-turn token in it and the whitespace the template writes after that token. It is a turn only if
    it holds more than special tokens and spaces (a BOS alone stays with the first message).
    """
    eot = _end_of_turn_token(tokenizer, kwargs, special)
    if not eot:
        return 0
    first = dict(messages[0])
    probes = [render_text(tokenizer, [{**first, "content": c}], False, kwargs) for c in ("A", "B")]
    common = os.path.commonprefix(probes)
    cut = common.rfind(eot)
    if cut < 0:
        return 0
    end = cut + len(eot)
    # The glue the template writes after the turn (ChatML's newline) stays with it, as it does with an
    # explicit system message (whose rendering ends with it): one layout whichever way the prompt came.
    while end < len(common) and common[end].isspace():
        end += 1
    preamble = common[:end]
    words = special.sub("", preamble) if special is not None else preamble
    return len(preamble) if words.strip() else 0


def _message_block(text: str, start: int, msg_end: int, bos: str | None, special: Any) -> tuple[int, int]:
    """The message itself: from its header (a leading BOS skipped) through its end-of-turn token."""
    if start == 0 and bos and text.startswith(bos):
        start = len(bos)
    begin = _first_special_start(text, start, msg_end, special)
    end = _last_special_end(text, begin, msg_end, special)
    return begin, end if end is not None else msg_end


def _generated_span(text: str, start: int, msg_end: int, special: Any) -> tuple[int, int]:
    """The generated part of an answer: from its generation prompt to its last special token (end of turn)."""
    # The model stops after the end-of-turn token; later template text (a newline) is prefilled with the
    # next turn at inference, so it is neither trained nor part of this causal span.
    stop = _last_special_end(text, start, msg_end, special)
    return start, stop if stop is not None else msg_end


def _turn_spans(text: str, roles: list[str], renders: list[str], gen_end: dict[int, int], prompt_end: int | None,
                preamble_end: int, bos: str | None, special: Any) -> list[TurnSpan]:
    """One span per message, after the template's own turn when there is one (see the module docstring)."""
    spans: list[TurnSpan] = []
    if preamble_end:
        spans.append(TurnSpan("system", 0, preamble_end, None,
                              _message_block(text, 0, preamble_end, bos, special), None))
    n = len(roles)
    for i, role in enumerate(roles):
        start = spans[-1].end if spans else 0
        msg_start, msg_end = (len(renders[i - 1]) if i else preamble_end), len(renders[i])
        if role != "assistant":
            # An input turn also holds the generation prompt of the answer that follows it.
            end = gen_end[i + 1] if i + 1 < n and roles[i + 1] == "assistant" else msg_end
            if i + 1 == n and prompt_end is not None:
                end = prompt_end
            block = _message_block(text, max(msg_start, start), msg_end, bos, special)
            spans.append(TurnSpan(role, start, end, None, block, i))
            continue
        generated = _generated_span(text, gen_end[i], msg_end, special)
        spans.append(TurnSpan(role, start, generated[1] if i + 1 < n else msg_end, generated, None, i))
    return spans


def render_dialogue(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    chat_template_kwargs: dict | None = None,
) -> RenderedDialogue:
    """The template text of ``messages`` and where each turn lies in it.

    With ``add_generation_prompt=True`` (a prompt waiting for its answer; the last message must then be an
    input message) the text ends with the assistant header, which belongs to the last input turn.

    Raises:
        ValueError: no chat template, slow tokenizer, unknown role, empty dialogue or one starting with an
            answer, a template that is not prefix-consistent.
    """
    check_tokenizer(tokenizer)
    roles = check_messages(messages)
    kwargs = dict(chat_template_kwargs or {})
    special = special_token_pattern(tokenizer)
    renders, gen_end = _render_prefixes(tokenizer, messages, roles, kwargs)
    text, prompt_end = renders[-1], None
    if add_generation_prompt:
        if roles[-1] == "assistant":
            raise ValueError("add_generation_prompt needs a dialogue that ends with an input message, not an answer")
        text = render_text(tokenizer, messages, True, kwargs)
        if not text.startswith(renders[-1]):
            raise _prefix_error(f"the rendering of messages[:{len(roles)}]", "its rendering with the generation prompt")
        prompt_end = len(text)
    preamble_end = _preamble_end(tokenizer, messages, kwargs, special)
    bos = getattr(tokenizer, "bos_token", None)
    spans = _turn_spans(text, roles, renders, gen_end, prompt_end, preamble_end, bos, special)
    n = len(roles)
    round_msgs = [i + 1 for i in range(n) if roles[i] == "assistant" and (i + 1 == n or roles[i + 1] != "assistant")]
    if not round_msgs or round_msgs[-1] != n:
        round_msgs.append(n)
    round_ends = [(m, len(renders[m - 1]) if m < n else len(text)) for m in round_msgs]
    return RenderedDialogue(text, spans, round_ends)
