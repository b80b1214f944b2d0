"""Multi-turn chat with the KV cache kept across rounds (ISM), and the two baselines of the ISM paper.

`ChatSession(model, tokenizer, scheme="ism")` keeps the dialogue's keys/values in the project's own cache
(`ism_ext.integrations.hf.IsmCache`: preallocated, written in place, attended with `attn_with_kvcache`).
Each round:

1. the new text of the round (the template's glue after the previous answer, the user turn and the
   assistant header) is rendered and tokenised by the same turn renderer as the training data
   (`ism_ext.turns`) and prefilled *once* on top of the cache: under ISM one bidirectional segment per
   input turn (the system turn of the first round is a segment of its own);
2. the answer is decoded causally by `model.generate` on that cache (greedy, or sampling with
   temperature / top-p), streaming each piece of text, until the end-of-turn token;
3. that final token is run through the model too, so its key/value is in the cache before the next round.

No history token is ever recomputed. `scheme="causal"` does the same with causal user turns;
`scheme="prefix_lm"` must recompute the whole history every round (a prefix LM's prompt is one
bidirectional block, so old keys change when the prompt grows): these are the baselines of the paper's
latency claim. `use_cache=False` recomputes the whole dialogue at every step (the reference the tests
compare against). The model must use `attn_implementation="ism"` (`ism_ext.integrations.hf`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.generation.streamers import BaseStreamer

from ..integrations.hf import IsmCache, cache_argument_name, is_ism_model
from ..perf import median_ms
from ..turns import render_dialogue, tokenize_rendered

# The chat's ways of treating the history (not the mask schemes of `ism_ext.masks.SCHEMES`: "prefix_lm" here
# also means recomputing the whole prompt every round).
CHAT_SCHEMES = ("ism", "mas", "causal", "prefix_lm")

# Why a round's answer ended (`RoundStats.finish_reason`).
FINISH_END_OF_TURN = "end_of_turn"  # the model ended its turn
FINISH_MAX_NEW_TOKENS = "max_new_tokens"  # cut at the session's answer length limit
FINISH_CACHE_FULL = "cache_full"  # cut because the cache could hold no more tokens: the answer is partial


@dataclass
class RoundStats:
    """Per-round figures of a chat session."""

    round: int
    prompt_tokens: int  # tokens prefilled this round (the whole dialogue for prefix_lm)
    ttft_s: float  # time to first token: prefill + choosing the first answer token
    answer_tokens: int
    decode_tokens_per_s: float
    cache_tokens: int  # tokens in the cache after the round
    finish_reason: str = FINISH_END_OF_TURN  # one of the FINISH_* constants: "cache_full" marks a partial answer


@dataclass
class _Dialogue:
    """Token ids of the dialogue so far with the layout they were computed under."""

    ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)  # -1 causal, >= 0 one id per bidirectional segment
    text: str = ""  # the template text these ids stand for
    turns: list[tuple[str, int]] = field(default_factory=list)  # (role, n_tokens), as the renderer counts them


class _RoundClock(BaseStreamer):
    """A `generate` streamer that times every new token and streams the answer's text as it grows."""

    def __init__(self, tokenizer, stop_ids: set[int], stream: Callable[[str], None] | None) -> None:
        self.tokenizer, self.stop_ids, self.stream = tokenizer, stop_ids, stream
        self.t0 = time.perf_counter()
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.shown = ""
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        """Called by `generate` with the prompt first, then with each new token."""
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        self.tokens += value.flatten().tolist()
        if self.stream is not None:
            text = self.tokenizer.decode([t for t in self.tokens if t not in self.stop_ids], skip_special_tokens=True)
            if len(text) > len(self.shown):
                self.stream(text[len(self.shown):])
            self.shown = text

    def end(self) -> None:
        """Nothing to flush: pieces are streamed as they come."""


@dataclass
class _RoundPrompt:
    """A round's prompt: the history it extends, the new tokens and block ids, and what the dialogue becomes."""

    history: _Dialogue
    ids: list[int]
    blocks: list[int]
    text: str
    turns: list[tuple[str, int]]
    next_block: int


@dataclass
class _RoundStart:
    """The session as it was before a round: what a failed round restores and what `undo` goes back to."""

    cache_length: int
    dialogue: _Dialogue
    n_messages: int
    next_block: int
    n_stats: int
    n_logits: int


class ChatSession:
    """A chat over a model and its tokenizer with the KV cache reused across rounds (see module doc)."""

    def __init__(
        self,
        model,
        tokenizer,
        scheme: str = "ism",
        *,
        system: str | None = None,
        max_new_tokens: int = 256,
        use_cache: bool = True,
        record_logits: bool = False,
        max_cache_tokens: int | None = None,
        page_size: int | None = None,
    ) -> None:
        """Args:
        model: a causal LM built or patched with `attn_implementation="ism"`.
        tokenizer: its tokenizer, with a chat template whose renderings of growing dialogues extend each other.
        scheme: "ism" or "mas" (reuse, bidirectional input turns), "causal" (reuse, causal user turns) or
            "prefix_lm" (recompute the whole prompt every round).
        system: optional system message.
        max_new_tokens: answer length limit per round.
        use_cache: False recomputes the whole dialogue at every decode step (reference mode).
        record_logits: keep the logits of every step in `self.logits` (for tests).
        max_cache_tokens: capacity of the cache (default: the model's context, at most 4096 tokens).
        page_size: a paged cache with pages of this many tokens (a multiple of 16); None for a contiguous one.
        """
        if scheme not in CHAT_SCHEMES:
            raise ValueError(f"scheme must be one of {CHAT_SCHEMES}, got {scheme!r}")
        _check_count("max_new_tokens", max_new_tokens, minimum=1)
        if max_cache_tokens is not None:  # checked, not `or`-ed: 0 must not silently mean "the default"
            _check_count("max_cache_tokens", max_cache_tokens, minimum=1)
        if page_size is not None:
            _check_count("page_size", page_size, minimum=1)
        if not is_ism_model(model):
            raise ValueError("ChatSession needs a model with attn_implementation='ism' (see ism_ext.integrations.hf)")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("ChatSession needs a tokenizer with a chat template")
        self.model, self.tokenizer, self.scheme = model, tokenizer, scheme
        self.max_new_tokens, self.use_cache, self.record_logits = max_new_tokens, use_cache, record_logits
        context = getattr(model.config, "max_position_embeddings", None) or 4096
        self.max_cache_tokens = max_cache_tokens if max_cache_tokens is not None else min(context, 4096)
        self.page_size = page_size
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.stats: list[RoundStats] = []
        self.logits: list[torch.Tensor] = []  # per step: logits of the last position, float32 [vocab]
        self.logit_positions: list[int] = []  # per step: that position's index in the dialogue
        self.dialogue = _Dialogue()
        self.cache: IsmCache | None = None
        # prefix_lm recomputes every round into this second cache and swaps it in when the round succeeds, so a
        # failed round leaves `cache` as it was.
        self._spare_cache: IsmCache | None = None
        self._next_block = 0
        self._round_starts: list[_RoundStart] = []
        eos = tokenizer.eos_token_id
        self.stop_ids = {eos} if isinstance(eos, int) else set(eos or [])
        if not self.stop_ids:
            raise ValueError("the tokenizer has no eos_token_id: ChatSession cannot tell when an answer ends")

    @property
    def cache_tokens(self) -> int:
        """Tokens whose keys/values are in the cache."""
        return 0 if self.cache is None else self.cache.get_seq_length()

    # -- a round -----------------------------------------------------------------------------------------------

    def _round_prompt(self) -> _RoundPrompt:
        """What this round prefills: the renderer's tokens after the cached text (the whole prompt for prefix_lm)."""
        rendered = render_dialogue(self.tokenizer, self.messages, add_generation_prompt=True)
        history = _Dialogue() if self.scheme == "prefix_lm" else self.dialogue
        next_block = 0 if self.scheme == "prefix_lm" else self._next_block
        if not rendered.text.startswith(history.text):
            raise ValueError("the chat template does not render the new round as an extension of the previous one, "
                             "so the cached history cannot be reused")
        new = tokenize_rendered(self.tokenizer, rendered, self.scheme, start=len(history.text))
        segment = new.block_sequence_ids
        blocks = torch.where(segment >= 0, segment + next_block, segment)
        if segment.numel() and int(segment.max()) >= 0:
            next_block += int(segment.max()) + 1
        return _RoundPrompt(history, new.input_ids.tolist(), blocks.tolist(), rendered.text, new.turns, next_block)

    def _start_round(self, prompt: _RoundPrompt) -> None:
        """The dialogue now holds the round's prompt."""
        self.dialogue = _copy(prompt.history)
        self.dialogue.text = prompt.text
        self.dialogue.turns += prompt.turns
        self._next_block = prompt.next_block

    def _round_cache(self) -> IsmCache | None:
        """The cache this round generates into: the session's, or for prefix_lm the emptied spare one."""
        if not self.use_cache:
            return None
        if self.scheme != "prefix_lm":
            if self.cache is None:
                self.cache = self._new_cache()
            return self.cache
        if self._spare_cache is None:
            self._spare_cache = self._new_cache()
        self._spare_cache.reset()
        return self._spare_cache

    def _new_cache(self) -> IsmCache:
        return IsmCache.for_model(self.model, 1, self.max_cache_tokens, page_size=self.page_size)

    def _answer_budget(self, prompt_tokens: int) -> int:
        """Answer tokens this round may generate: ``max_new_tokens``, or fewer when the cache would fill first.

        Every answer token ends up in the cache (the last one through `_cache_last_token`), so the prompt and
        the answer together must fit. Raises ValueError when not even one answer token fits.
        """
        if not self.use_cache:
            return self.max_new_tokens
        room = self.max_cache_tokens - prompt_tokens
        if room < 1:
            raise ValueError(f"ChatSession: this round's prompt needs {prompt_tokens} cache tokens and its answer at "
                             f"least one more, but the cache holds {self.max_cache_tokens} (max_cache_tokens); the "
                             f"session is unchanged (undo earlier rounds or start a session with a larger cache)")
        return min(self.max_new_tokens, room)

    def _generation_config(self, max_new_tokens: int, temperature: float, top_p: float):
        from transformers import GenerationConfig

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.stop_ids)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}
        # top_k=0: only temperature and top-p shape the distribution (transformers defaults to top_k=50).
        # Every generation option lives here: transformers deprecates passing some beside a config.
        return GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=sorted(self.stop_ids),
                                pad_token_id=pad, top_k=0, use_cache=self.use_cache, return_dict_in_generate=True,
                                output_logits=self.record_logits, **sampling)

    def _generate(self, cache: IsmCache | None, ids: list[int], blocks: list[int], max_new_tokens: int,
                  temperature: float, top_p: float, seed: int | None, clock: _RoundClock):
        """`model.generate` over the whole dialogue on ``cache`` (it prefills only the tokens not cached yet)."""
        device = self.model.device
        kwargs = {} if cache is None else {cache_argument_name(self.model): cache}
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            return self.model.generate(
                torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                                                                               device=device),
                block_sequence_ids=torch.tensor([blocks], device=device), streamer=clock,
                generation_config=self._generation_config(max_new_tokens, temperature, top_p), **kwargs)

    def _cache_last_token(self, cache: IsmCache | None, token: int) -> None:
        """Runs the answer's last token through the model: into the cache now, where the next round expects it."""
        if cache is None:
            return
        device = self.model.device
        self.model(torch.tensor([[token]], device=device), use_cache=True,
                   block_sequence_ids=torch.tensor([[-1]], device=device),
                   **{cache_argument_name(self.model): cache})

    def send(
        self,
        user_text: str,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stream: Callable[[str], None] | None = None,
        ttft_repeats: int = 0,
    ) -> str:
        """Adds a user turn, generates the answer (greedy when temperature is 0), returns its text.

        `stream`, if given, is called with each new piece of the answer's text as soon as it is decoded.
        `seed` makes sampling reproducible (the global random state is left as it was). With `ttft_repeats`
        > 0 the round's time to first token is the median of that many runs of its prefill and first token
        (`ism_ext.perf.median_ms`, after one warm-up run; each run is undone), not the single sample of the round.

        Atomic: if anything raises (a prompt that does not fit the cache, the model, `stream`, an interrupt),
        the session is exactly as before the call (messages, dialogue, cache length, statistics, logits) and
        the exception propagates. When the cache fills during the answer, the answer generated so far is
        returned and kept, marked by ``stats[-1].finish_reason == "cache_full"``.
        """
        _check_send_args(user_text, temperature, top_p, ttft_repeats)
        before = _RoundStart(self.cache_tokens, _copy(self.dialogue), len(self.messages), self._next_block,
                             len(self.stats), len(self.logits))
        self.messages.append({"role": "user", "content": user_text})
        try:
            text = self._run_round(temperature, top_p, seed, stream, ttft_repeats)
        except BaseException:
            self._restore(before)
            raise
        self._round_starts.append(before)
        return text

    def _run_round(self, temperature: float, top_p: float, seed: int | None, stream: Callable[[str], None] | None,
                   ttft_repeats: int) -> str:
        """One round on the session's state (`send` undoes it if this raises)."""
        with torch.inference_mode():
            prompt = self._round_prompt()
            ids, blocks = prompt.history.ids + prompt.ids, prompt.history.block_ids + prompt.blocks
            budget = self._answer_budget(len(ids))
            cache = self._round_cache()
            ttft = self._median_ttft(cache, ids, blocks, ttft_repeats) if ttft_repeats > 0 else None
            clock = _RoundClock(self.tokenizer, self.stop_ids, stream)
            self._start_round(prompt)
            out = self._generate(cache, ids, blocks, budget, temperature, top_p, seed, clock)
            answer = out.sequences[0, len(ids):].tolist()
            self._cache_last_token(cache, answer[-1])
        if self.scheme == "prefix_lm" and cache is not None:
            self.cache, self._spare_cache = cache, self.cache
        if answer[-1] in self.stop_ids:
            finish = FINISH_END_OF_TURN
        else:
            finish = FINISH_CACHE_FULL if budget < self.max_new_tokens else FINISH_MAX_NEW_TOKENS
        self._record(out, ids, prompt, answer, clock, ttft, finish)
        text = self.tokenizer.decode(answer, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": text})
        return text

    def _restore(self, start: _RoundStart) -> None:
        """Puts the session back to ``start`` (after a failed round, or for `undo`)."""
        if self.cache is not None and self.scheme != "prefix_lm":
            # Also when the length looks unchanged: a forward that failed may have advanced some layers only.
            self.cache.truncate(start.cache_length)
        self.dialogue, self._next_block = _copy(start.dialogue), start.next_block
        del self.messages[start.n_messages:]
        del self.stats[start.n_stats:]
        del self.logits[start.n_logits:]
        del self.logit_positions[start.n_logits:]

    def _median_ttft(self, cache: IsmCache | None, ids: list[int], blocks: list[int], repeats: int) -> float:
        """Median seconds of the round's prefill and first token over ``repeats`` runs after a warm-up run.

        Each run generates one token into ``cache`` and is then undone (truncated back, or emptied for prefix_lm,
        whose cache is the spare one, empty at the start of the round).
        """
        start = 0 if cache is None else cache.get_seq_length()

        def prefill_and_first_token() -> None:
            self._generate(cache, ids, blocks, 1, 0.0, 1.0, None, _RoundClock(self.tokenizer, self.stop_ids, None))
            if cache is not None:
                cache.truncate(start)

        return median_ms(prefill_and_first_token, repeats, warmup=1, device=self.model.device) / 1e3

    def _record(self, out, ids: list[int], prompt: _RoundPrompt, answer: list[int], clock: _RoundClock,
                ttft: float | None, finish_reason: str) -> None:
        """The dialogue grows by the round's tokens; the round's figures and (optionally) its logits are kept."""
        self.dialogue.ids = ids + answer
        self.dialogue.block_ids += prompt.blocks + [-1] * len(answer)
        self.dialogue.text += self.tokenizer.decode(answer, skip_special_tokens=False)
        self.dialogue.turns.append(("assistant", len(answer)))
        if self.record_logits:
            for step, logits in enumerate(out.logits):
                self.logits.append(logits[0].float())
                self.logit_positions.append(len(ids) - 1 + step)
        decode_s = clock.times[-1] - clock.times[0] if len(clock.times) > 1 else 0.0
        self.stats.append(RoundStats(round=len(self.stats) + 1, prompt_tokens=len(prompt.ids),
                                     ttft_s=clock.times[0] - clock.t0 if ttft is None else ttft,
                                     answer_tokens=len(answer),
                                     decode_tokens_per_s=(len(answer) - 1) / decode_s if decode_s > 0 else 0.0,
                                     cache_tokens=self.cache_tokens, finish_reason=finish_reason))

    def undo(self) -> None:
        """Forgets the last round: its messages, tokens, statistics and logits, and truncates the cache to where it
        began.

        The cut is at a segment boundary (the end of the previous round), which is where KV reuse is sound. A
        failed `send` left nothing to undo, so this always forgets the last round that succeeded.
        """
        if not self._round_starts:
            raise ValueError("ChatSession.undo: there is no round to undo")
        self._restore(self._round_starts[-1])
        self._round_starts.pop()  # only once restored: an undo that raised can be retried


def _check_count(name: str, value: object, minimum: int) -> None:
    """An int (not a bool) >= ``minimum``, or a TypeError/ValueError naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"ChatSession: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"ChatSession: {name} must be >= {minimum}, got {value}")


def _check_send_args(user_text: object, temperature: float, top_p: float, ttft_repeats: int) -> None:
    """`send`'s arguments, before the session changes (NaN fails every comparison, so it is named explicitly)."""
    if not isinstance(user_text, str):
        raise TypeError(f"ChatSession.send: user_text must be a str, got {type(user_text).__name__}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"ChatSession.send: temperature must be a finite number >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"ChatSession.send: top_p must be in (0, 1], got {top_p}")
    _check_count("ttft_repeats", ttft_repeats, minimum=0)


def _copy(dialogue: _Dialogue) -> _Dialogue:
    return _Dialogue(list(dialogue.ids), list(dialogue.block_ids), dialogue.text, list(dialogue.turns))
