"""The chat runtime: cache reuse across rounds equals recomputing the dialogue, for every scheme."""

from __future__ import annotations

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_tokenizer import make_tokenizer  # noqa: E402

import ism_ext.inference.chat  # noqa: E402
import ism_ext.integrations.hf  # noqa: E402,F401
from ism_ext.inference import ChatSession  # noqa: E402

PROMPTS = ["What is two plus two?", "And the sun and the moon?", "Tell me about the river.", "Thanks!"]


def tiny_llama(vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="ism").eval()


def run(scheme: str, use_cache: bool, model_seed: int = 0, **send):
    """A 4-round session; `send` goes to every `ChatSession.send` call (temperature, top_p, seed)."""
    tok = make_tokenizer()
    session = ChatSession(tiny_llama(len(tok), model_seed), tok, scheme, system="Be brief.", max_new_tokens=6,
                          use_cache=use_cache, record_logits=True)
    answers = [session.send(p, **send) for p in PROMPTS]
    return session, answers


@pytest.mark.parametrize("scheme", ["ism", "mas", "causal", "prefix_lm"])
def test_cached_session_equals_recomputing_at_every_step(scheme):
    cached, answers = run(scheme, use_cache=True)
    fresh, reference_answers = run(scheme, use_cache=False)
    assert answers == reference_answers  # greedy answers identical with and without the cache
    assert len(cached.logits) == len(fresh.logits) > 4 * len(PROMPTS)
    for step, (a, b) in enumerate(zip(cached.logits, fresh.logits, strict=True)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5, msg=f"step {step}")


@pytest.mark.parametrize("scheme", ["ism", "causal"])
def test_every_step_equals_one_full_forward_over_the_dialogue(scheme):
    # Under ISM (and causal) no token sees a later segment, so one forward over the final dialogue with its
    # layout reproduces the logits of every step of the session.
    session, _ = run(scheme, use_cache=True, model_seed=1)
    ids = torch.tensor([session.dialogue.ids])
    blocks = torch.tensor([session.dialogue.block_ids])
    assert session.cache_tokens == ids.shape[1]  # the last answer's final token is in the cache too
    with torch.inference_mode():
        full = session.model(ids, block_sequence_ids=blocks).logits[0].float()
    for pos, logits in zip(session.logit_positions, session.logits, strict=True):
        torch.testing.assert_close(logits, full[pos], atol=2e-5, rtol=1e-5, msg=f"position {pos}")
    if scheme == "ism":
        # one bidirectional segment for the system turn and one per user turn
        assert max(session.dialogue.block_ids) == len(PROMPTS)


def test_no_history_token_is_recomputed_with_ism_but_all_are_with_prefix_lm():
    ism, _ = run("ism", use_cache=True)
    prefix, _ = run("prefix_lm", use_cache=True)
    for k in range(1, len(PROMPTS)):
        assert ism.stats[k].prompt_tokens < ism.stats[k].cache_tokens - ism.stats[k - 1].cache_tokens + 1
        assert prefix.stats[k].prompt_tokens > prefix.stats[k - 1].cache_tokens
    assert [s.round for s in ism.stats] == [1, 2, 3, 4]
    assert all(s.ttft_s > 0 and s.answer_tokens >= 1 for s in ism.stats)


def test_sampling_is_reproducible_and_streaming_adds_up():
    pieces: list[str] = []
    _, answers_a = run("ism", use_cache=True, temperature=0.8, top_p=0.9, seed=3)
    _, answers_b = run("ism", use_cache=True, temperature=0.8, top_p=0.9, seed=3)
    _, answers_c = run("ism", use_cache=True, temperature=0.8, top_p=0.9, seed=4)
    _, greedy = run("ism", use_cache=True)
    assert answers_a == answers_b  # the same send(seed=) draws the same tokens
    assert answers_c != answers_a  # ... and another seed other tokens: the seed reaches the sampler
    assert answers_a != greedy
    tok = make_tokenizer()
    session = ChatSession(tiny_llama(len(tok)), tok, "ism", max_new_tokens=6)
    answer = session.send(PROMPTS[0], stream=pieces.append)
    assert "".join(pieces) == answer


def test_bad_arguments():
    tok = make_tokenizer()
    with pytest.raises(ValueError, match="scheme"):
        ChatSession(tiny_llama(len(tok)), tok, "bidirectional")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    eager = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with pytest.raises(ValueError, match="attn_implementation='ism'"):
        ChatSession(eager, tok)


@pytest.mark.parametrize("scheme", ["ism", "mas", "causal"])
def test_session_segments_the_dialogue_like_the_training_data(scheme, monkeypatch):
    # One turn renderer: with scripted answers, the tokens and segment ids the session prefilled and decoded
    # are those that tokenize_dialogue gives the same messages for training.
    from ism_ext.turns import tokenize_dialogue

    tok = make_tokenizer()
    answers = ["Four.", "The sun is big.", "It is long."]
    script = [t for a in answers for t in tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]

    def scripted(input_ids, scores):  # a logits processor that makes the next scripted token the argmax
        forced = torch.full_like(scores, -1e9)
        forced[:, script.pop(0)] = 0.0
        return forced

    model = tiny_llama(len(tok))
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: generate(*a, logits_processor=[scripted], **k))
    session = ChatSession(model, tok, scheme, system="Be brief.", max_new_tokens=32)
    assert [session.send(p) for p in PROMPTS[:3]] == answers
    train = tokenize_dialogue(tok, session.messages, scheme)
    n = len(session.dialogue.ids)
    # The training rendering also holds the newline after the last end-of-turn token.
    assert train.input_ids[:n].tolist() == session.dialogue.ids and len(train) == n + 1
    assert train.block_sequence_ids[:n].tolist() == session.dialogue.block_ids
    assert session.dialogue.turns[:-1] == train.turns[:-1]


@pytest.mark.parametrize("scheme", ["ism", "prefix_lm"])
def test_ttft_repeats_leave_the_session_as_one_run_would(scheme):
    plain, answers = run(scheme, use_cache=True)
    tok = make_tokenizer()
    timed = ChatSession(tiny_llama(len(tok)), tok, scheme, system="Be brief.", max_new_tokens=6, record_logits=True)
    assert [timed.send(p, ttft_repeats=3) for p in PROMPTS] == answers
    assert timed.dialogue.ids == plain.dialogue.ids and timed.cache_tokens == plain.cache_tokens
    assert all(s.ttft_s > 0 for s in timed.stats)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_undo_truncates_to_the_round_start_and_the_next_round_equals_a_fresh_session(paged):
    tok = make_tokenizer()
    page_size = 16 if paged else None
    session = ChatSession(tiny_llama(len(tok)), tok, "ism", system="Be brief.", max_new_tokens=6, page_size=page_size)
    session.send(PROMPTS[0])
    after_one = (list(session.dialogue.ids), session.cache_tokens, list(session.messages))
    session.send(PROMPTS[1])
    session.undo()
    assert (session.dialogue.ids, session.cache_tokens, session.messages) == after_one
    answer = session.send(PROMPTS[2])
    fresh = ChatSession(tiny_llama(len(tok)), tok, "ism", system="Be brief.", max_new_tokens=6)
    fresh.send(PROMPTS[0])
    assert fresh.send(PROMPTS[2]) == answer and fresh.dialogue.ids == session.dialogue.ids
    with pytest.raises(ValueError, match="no round"):
        ChatSession(tiny_llama(len(tok)), tok).undo()


def _state(session):
    """Everything a failed round must leave as it was."""
    return (list(session.messages), list(session.dialogue.ids), list(session.dialogue.block_ids),
            session.dialogue.text, session.cache_tokens, [dataclasses.astuple(s) for s in session.stats],
            len(session.logits), session._next_block)


@pytest.mark.parametrize("scheme", ["ism", "causal", "prefix_lm"])
def test_a_round_that_fails_mid_answer_leaves_the_session_as_before(scheme):
    plain, answers = run(scheme, use_cache=True)
    tok = make_tokenizer()
    session = ChatSession(tiny_llama(len(tok)), tok, scheme, system="Be brief.", max_new_tokens=6, record_logits=True)
    session.send(PROMPTS[0])
    before = _state(session)

    seen = []

    def fail_on_second_piece(piece):
        seen.append(piece)
        if len(seen) == 2:
            raise KeyboardInterrupt  # what a user's Ctrl-C in the middle of the answer raises

    with pytest.raises(KeyboardInterrupt):
        session.send(PROMPTS[1], stream=fail_on_second_piece)
    assert len(seen) == 2 and _state(session) == before
    # The session goes on exactly as one that never saw the failed round.
    assert [session.send(p) for p in PROMPTS[1:]] == answers[1:]
    assert session.dialogue.ids == plain.dialogue.ids and session.cache_tokens == plain.cache_tokens
    for a, b in zip(session.logits, plain.logits, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_a_prompt_that_does_not_fit_the_cache_changes_nothing_and_undo_still_works():
    tok = make_tokenizer()
    session = ChatSession(tiny_llama(len(tok)), tok, "ism", system="Be brief.", max_new_tokens=6)
    session.send(PROMPTS[0])
    session.max_cache_tokens = session.cache_tokens + 3  # the next prompt alone does not fit
    before = _state(session)
    with pytest.raises(ValueError, match="max_cache_tokens"):
        session.send(PROMPTS[1])
    assert _state(session) == before
    session.undo()  # undoes round 1 (the failed round left nothing to undo)
    assert session.messages == [{"role": "system", "content": "Be brief."}] and session.cache_tokens == 0
    assert session.stats == [] and session.dialogue.ids == []
    with pytest.raises(ValueError, match="no round"):
        session.undo()
    first_failed = ChatSession(tiny_llama(len(tok)), tok, "ism", max_new_tokens=6, max_cache_tokens=4)
    with pytest.raises(ValueError, match="max_cache_tokens"):
        first_failed.send(PROMPTS[0])
    assert first_failed.messages == [] and first_failed.cache_tokens == 0
    with pytest.raises(ValueError, match="no round"):
        first_failed.undo()


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_a_cache_that_fills_mid_answer_returns_the_partial_answer_marked(paged):
    tok = make_tokenizer()
    full = ChatSession(tiny_llama(len(tok)), tok, "ism", system="Be brief.", max_new_tokens=12)
    full.send(PROMPTS[0])
    complete = full.stats[0]
    assert complete.answer_tokens > 3  # the unconstrained answer is longer than what will fit below
    prompt_tokens = complete.prompt_tokens
    session = ChatSession(tiny_llama(len(tok)), tok, "ism", system="Be brief.", max_new_tokens=12,
                          max_cache_tokens=prompt_tokens + 3, page_size=16 if paged else None)
    text = session.send(PROMPTS[0])
    stats = session.stats[0]
    assert (stats.answer_tokens, stats.finish_reason, stats.cache_tokens) == (3, "cache_full", prompt_tokens + 3)
    assert session.dialogue.ids == full.dialogue.ids[: prompt_tokens + 3]  # the first 3 tokens of the full answer
    assert session.messages[-1] == {"role": "assistant", "content": text}
    assert full.stats[0].finish_reason in ("end_of_turn", "max_new_tokens")
    before = _state(session)
    with pytest.raises(ValueError, match="max_cache_tokens"):
        session.send(PROMPTS[1])
    assert _state(session) == before


def test_ttft_repeats_do_not_touch_max_new_tokens(monkeypatch):
    tok = make_tokenizer()
    session = ChatSession(tiny_llama(len(tok)), tok, "ism", max_new_tokens=6)
    seen = []
    monkeypatch.setattr(ism_ext.inference.chat, "median_ms",
                        lambda fn, repeats, **kw: seen.append((repeats, session.max_new_tokens)) or 2.0)
    session.send(PROMPTS[0], ttft_repeats=3)
    assert seen == [(3, 6)] and session.stats[0].ttft_s == 2e-3  # the project's one timer, in seconds


@pytest.mark.parametrize("kwargs, exc, message", [
    (dict(max_cache_tokens=0), ValueError, "max_cache_tokens must be >= 1, got 0"),  # was silently the default
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be >= 1"),
    (dict(max_new_tokens=2.5), TypeError, "max_new_tokens must be an int"),
    (dict(page_size=-16), ValueError, "page_size must be >= 1"),
])
def test_bad_session_arguments_are_named(kwargs, exc, message):
    tok = make_tokenizer()
    with pytest.raises(exc, match=message):
        ChatSession(tiny_llama(len(tok)), tok, "ism", **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=float("nan")), "temperature must be a finite number"),  # was silently greedy
    (dict(temperature=-1.0), "temperature must be"),
    (dict(top_p=0.0), "top_p must be in"),
    (dict(top_p=float("nan")), "top_p must be in"),
    (dict(ttft_repeats=-1), "ttft_repeats must be >= 0"),
])
def test_bad_send_arguments_change_nothing(kwargs, message):
    tok = make_tokenizer()
    session = ChatSession(tiny_llama(len(tok)), tok, "ism", max_new_tokens=6)
    with pytest.raises(ValueError, match=message):
        session.send(PROMPTS[0], **kwargs)
    assert session.messages == [] and session.cache_tokens == 0
