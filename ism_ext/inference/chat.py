"""Multi-turn chat with the KV cache kept across rounds (ISM), and the two baselines of the ISM paper.

`ChatSession(model, tokenizer, scheme="ism")` keeps the dialogue's keys/values in a transformers
`DynamicCache`. Each round:

1. the new text of the round (the template's glue after the previous answer, the user turn and the
   assistant header) is rendered and tokenised by the same turn renderer as the training data
   (`ism_ext.turns`) and prefilled *once* on top of the cache: under ISM one bidirectional segment per
   input turn (the system turn of the first round is a segment of its own);
2. the answer is decoded causally (greedy, or sampling with temperature / top-p), streaming each piece of
   text, until the end-of-turn token;
3. that final token is run through the model too, so its key/value is in the cache before the next round.

No history token is ever recomputed. `scheme="causal"` does the same with a causal user turn;
`scheme="prefix_lm"` must recompute the whole history every round (a prefix LM's prompt is one
bidirectional block, so old keys change when the prompt grows): these are the baselines of the paper's
latency claim. `use_cache=False` recomputes the whole dialogue at every step (the reference the tests
compare against). The model must use `attn_implementation="ism"` (`ism_ext.integrations.hf`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..turns import render_dialogue, tokenize_rendered

SCHEMES = ("ism", "mas", "causal", "prefix_lm")


@dataclass
class RoundStats:
    """Per-round figures of a chat session."""

    round: int
    prompt_tokens: int  # tokens prefilled this round (the whole dialogue for prefix_lm)
    ttft_s: float  # time to first token: prefill + choosing the first answer token
    answer_tokens: int
    decode_tokens_per_s: float
    cache_tokens: int  # tokens in the cache after the round


@dataclass
class _Dialogue:
    """Token ids of the dialogue so far with the layout they were computed under."""

    ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)  # -1 causal, >= 0 one id per bidirectional segment
    text: str = ""  # the template text these ids stand for
    turns: list[tuple[str, int]] = field(default_factory=list)  # (role, n_tokens), as the renderer counts them


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
        """
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
        if getattr(model.config, "_attn_implementation", None) != "ism":
            raise ValueError("ChatSession needs a model with attn_implementation='ism' (see ism_ext.hf.apply_ism)")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("ChatSession needs a tokenizer with a chat template")
        self.model, self.tokenizer, self.scheme = model, tokenizer, scheme
        self.max_new_tokens, self.use_cache, self.record_logits = max_new_tokens, use_cache, record_logits
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        self.stats: list[RoundStats] = []
        self.logits: list[torch.Tensor] = []  # per step: logits of the last position, float32 [vocab]
        self.logit_positions: list[int] = []  # per step: that position's index in the dialogue
        self.dialogue = _Dialogue()
        self._cache = None
        self._next_block = 0
        eos = tokenizer.eos_token_id
        self.stop_ids = {eos} if isinstance(eos, int) else set(eos or [])
        if not self.stop_ids:
            raise ValueError("the tokenizer has no eos_token_id: ChatSession cannot tell when an answer ends")

    # -- model calls -------------------------------------------------------------------------------------------

    @property
    def cache_tokens(self) -> int:
        """Tokens whose keys/values are in the cache."""
        return 0 if self._cache is None else self._cache.get_seq_length()

    def _forward(self, ids: list[int], block_ids: list[int]) -> torch.Tensor:
        """Runs `ids` on top of the cache (or the whole dialogue without one); returns the last logits."""
        device = self.model.device
        if not self.use_cache:  # reference mode: everything so far, every time
            all_ids, all_blocks = self.dialogue.ids + ids, self.dialogue.block_ids + block_ids
            out = self.model(torch.tensor([all_ids], device=device),
                             block_sequence_ids=torch.tensor([all_blocks], device=device))
        else:
            if self._cache is None:
                from transformers import DynamicCache

                self._cache = DynamicCache(config=self.model.config)
            out = self.model(torch.tensor([ids], device=device), past_key_values=self._cache, use_cache=True,
                             block_sequence_ids=torch.tensor([block_ids], device=device))
        self.dialogue.ids += ids
        self.dialogue.block_ids += block_ids
        logits = out.logits[0, -1].float()
        if self.record_logits:
            self.logits.append(logits.detach().clone())
            self.logit_positions.append(len(self.dialogue.ids) - 1)
        return logits

    @staticmethod
    def _choose(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
        if temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:  # nucleus: keep the smallest set of tokens whose probability reaches top_p
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))

    # -- a round -----------------------------------------------------------------------------------------------

    def _prompt_for_round(self) -> tuple[list[int], list[int]]:
        """Token ids (and block ids) to prefill this round: what the renderer gives after the cached text."""
        rendered = render_dialogue(self.tokenizer, self.messages, add_generation_prompt=True)
        if self.scheme == "prefix_lm":  # the whole prompt is one bidirectional block: recompute all of it
            self._cache, self.dialogue, self._next_block = None, _Dialogue(), 0
        if not rendered.text.startswith(self.dialogue.text):
            raise ValueError("the chat template does not render the new round as an extension of the previous one, "
                             "so the cached history cannot be reused")
        new = tokenize_rendered(self.tokenizer, rendered, self.scheme, start=len(self.dialogue.text))
        segment = new.block_sequence_ids
        blocks = torch.where(segment >= 0, segment + self._next_block, segment)
        if new.block_sequence_ids.numel() and int(segment.max()) >= 0:
            self._next_block += int(segment.max()) + 1
        self.dialogue.text = rendered.text
        self.dialogue.turns += new.turns
        return new.input_ids.tolist(), blocks.tolist()

    def send(
        self,
        user_text: str,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stream: Callable[[str], None] | None = None,
    ) -> str:
        """Adds a user turn, generates the answer (greedy when temperature is 0), returns its text.

        `stream`, if given, is called with each new piece of the answer's text as soon as it is decoded.
        """
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.messages.append({"role": "user", "content": user_text})
        with torch.inference_mode():
            t0 = time.perf_counter()
            prompt_ids, prompt_blocks = self._prompt_for_round()
            logits = self._forward(prompt_ids, prompt_blocks)
            token = self._choose(logits, temperature, top_p, generator)
            ttft = time.perf_counter() - t0
            answer: list[int] = [token]
            shown = ""
            t1 = time.perf_counter()
            while token not in self.stop_ids and len(answer) < self.max_new_tokens:
                if stream is not None:
                    shown = self._stream(answer, shown, stream)
                logits = self._forward([token], [-1])
                token = self._choose(logits, temperature, top_p, generator)
                answer.append(token)
            decode_s = time.perf_counter() - t1
            # The answer's last token (the end-of-turn token) goes into the cache now, before the next round.
            self._forward([token], [-1])
        if stream is not None:
            self._stream(answer, shown, stream)
        text = self.tokenizer.decode(answer, skip_special_tokens=True)
        self.dialogue.text += self.tokenizer.decode(answer, skip_special_tokens=False)
        self.dialogue.turns.append(("assistant", len(answer)))
        self.messages.append({"role": "assistant", "content": text})
        self.stats.append(RoundStats(round=len(self.stats) + 1, prompt_tokens=len(prompt_ids), ttft_s=ttft,
                                     answer_tokens=len(answer),
                                     decode_tokens_per_s=(len(answer) - 1) / decode_s if decode_s > 0 else 0.0,
                                     cache_tokens=self.cache_tokens))
        return text

    def _stream(self, answer: list[int], shown: str, stream: Callable[[str], None]) -> str:
        text = self.tokenizer.decode([t for t in answer if t not in self.stop_ids], skip_special_tokens=True)
        if len(text) > len(shown):
            stream(text[len(shown):])
        return text
