"""One-pass multi-turn training with the patched model: the loss falls, and one ISM pass gives every
answer exactly the loss it has when its dialogue is cut right after it (the ISM paper's claim that a
single pass sees what inference sees)."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_tokenizer import make_tokenizer, sample_dialogues  # noqa: E402

import ism_ext.integrations.hf  # noqa: E402,F401  (registers attn_implementation="ism")
from ism_ext.training import ChatCollator  # noqa: E402
from ism_ext.turns import IGNORE_INDEX, tokenize_dialogue  # noqa: E402


def tiny_llama(vocab: int, seed: int = 0, attn: str = "ism"):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)


def token_losses(model, input_ids: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every next-token prediction of one unpadded dialogue: loss[j] for predicting token j."""
    logits = model(input_ids[None], block_sequence_ids=block_ids[None]).logits[0]
    return torch.nn.functional.cross_entropy(logits[:-1].double(), input_ids[1:], reduction="none")


@pytest.mark.parametrize("pack", [False, True])
def test_a_few_steps_lower_the_loss(pack):
    tok = make_tokenizer()
    model = tiny_llama(len(tok))
    batch = ChatCollator(tok, scheme="ism", pack=pack, max_length=512 if pack else None)(sample_dialogues(6, 3, 0))
    assert batch["block_sequence_ids"].shape == batch["input_ids"].shape
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize("scheme", ["ism", "mas", "causal"])
def test_one_pass_gives_every_answer_the_loss_of_its_own_prefix(scheme):
    tok = make_tokenizer()
    model = tiny_llama(len(tok), seed=1).eval()
    messages = sample_dialogues(1, 4, seed=3)[0]
    full = tokenize_dialogue(tok, messages, scheme)
    full_losses = token_losses(model, full.input_ids, full.block_sequence_ids)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(answers) == 4
    for k, last in enumerate(answers):
        cut = tokenize_dialogue(tok, messages[: last + 1], scheme)
        n = len(cut)
        assert torch.equal(cut.input_ids, full.input_ids[:n])  # the template is prefix-consistent
        cut_losses = token_losses(model, cut.input_ids, cut.block_sequence_ids)
        labelled = (cut.labels[1:] != IGNORE_INDEX).nonzero().flatten()  # positions predicting answer tokens
        assert labelled.numel() > 0
        # Answer k (and every earlier one) has the same per-token loss in the one pass as in its own prefix.
        torch.testing.assert_close(full_losses[labelled], cut_losses[labelled], atol=1e-9, rtol=1e-5,
                                   msg=f"answer {k}")


def test_prefix_lm_triplet_differs_from_the_one_pass():
    # Control: under a prefix-LM mask the history of a later round sees its own future inside the prefix, so
    # the same answers get different losses; the equality above is a property of ISM, not of the test.
    tok = make_tokenizer()
    model = tiny_llama(len(tok), seed=2).eval()
    messages = sample_dialogues(1, 3, seed=4)[0]
    full = tokenize_dialogue(tok, messages, "ism")
    first_answer_end = [i for i, m in enumerate(messages) if m["role"] == "assistant"][0] + 1
    cut = tokenize_dialogue(tok, messages[:first_answer_end], "ism")
    later = copy.deepcopy(messages)
    prefix = tokenize_dialogue(tok, later, "prefix_lm")
    labelled = (cut.labels[1:] != IGNORE_INDEX).nonzero().flatten()
    ism_losses = token_losses(model, full.input_ids, full.block_sequence_ids)[labelled]
    prefix_losses = token_losses(model, prefix.input_ids, prefix.block_sequence_ids)[labelled]
    assert (ism_losses - prefix_losses).abs().max() > 1e-4
