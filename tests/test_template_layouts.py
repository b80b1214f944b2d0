"""Layouts that follow the chat template: a default system prompt is its own segment, and MAS as its
authors build it (each message from its header through its end-of-turn token), written out by hand for a
ChatML and a Llama-3 style template."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from tiny_tokenizer import CHATML_DEFAULT_SYSTEM_TEMPLATE, build_tokenizer, make_llama3_tokenizer, make_tokenizer  # noqa: E402

from ism_ext.turns import render_dialogue, tokenize_dialogue, tokenize_rendered  # noqa: E402

S, U, A = "Be brief.", "What is the sun?", "A star."
DIALOGUE = [
    {"role": "system", "content": S},
    {"role": "user", "content": U},
    {"role": "assistant", "content": A},
    {"role": "user", "content": "Tell me more."},
    {"role": "user", "content": "Please."},
    {"role": "assistant", "content": "It is big."},
    {"role": "tool", "content": "one two"},
    {"role": "assistant", "content": "Two words."},
]


def layout(tok, messages, scheme, **kwargs):
    """(role, text, block id) of every turn the renderer makes."""
    d = tokenize_dialogue(tok, messages, scheme, **kwargs)
    out, pos = [], 0
    for role, n in d.turns:
        ids = d.block_sequence_ids[pos : pos + n].unique().tolist()
        assert len(ids) == 1, f"a turn has one block id, got {ids}"
        out.append((role, tok.decode(d.input_ids[pos : pos + n].tolist()), ids[0]))
        pos += n
    return out


def test_mas_as_its_authors_build_it_chatml():
    assert layout(make_tokenizer(), DIALOGUE, "mas") == [
        ("system", f"<|im_start|>system\n{S}<|im_end|>", 0),
        ("template", "\n", -1),
        ("user", f"<|im_start|>user\n{U}<|im_end|>", 1),
        ("template", "\n<|im_start|>assistant\n", -1),
        ("assistant", f"{A}<|im_end|>", -1),
        ("template", "\n", -1),
        ("user", "<|im_start|>user\nTell me more.<|im_end|>", 2),
        ("template", "\n", -1),
        ("user", "<|im_start|>user\nPlease.<|im_end|>", 3),  # two user messages in a row: two blocks
        ("template", "\n<|im_start|>assistant\n", -1),
        ("assistant", "It is big.<|im_end|>", -1),
        ("template", "\n", -1),
        ("tool", "<|im_start|>tool\none two<|im_end|>", -1),  # tool turns are causal
        ("template", "\n<|im_start|>assistant\n", -1),
        ("assistant", "Two words.<|im_end|>\n", -1),
    ]


def test_mas_as_its_authors_build_it_llama3():
    tok = make_llama3_tokenizer()
    assert layout(tok, DIALOGUE[:5], "mas", max_length=None)[:6] == [
        ("template", "<|begin_of_text|>", -1),  # BOS is causal
        ("system", f"<|start_header_id|>system<|end_header_id|>\n\n{S}<|eot_id|>", 0),
        ("user", f"<|start_header_id|>user<|end_header_id|>\n\n{U}<|eot_id|>", 1),
        ("template", "<|start_header_id|>assistant<|end_header_id|>\n\n", -1),
        ("assistant", f"{A}<|eot_id|>", -1),
        ("user", "<|start_header_id|>user<|end_header_id|>\n\nTell me more.<|eot_id|>", 2),
    ]


def test_mas_merged_is_the_header_prefilled_convention():
    assert layout(make_tokenizer(), DIALOGUE[:6], "mas_merged") == [
        ("system", f"<|im_start|>system\n{S}<|im_end|>\n", 0),
        ("user", f"<|im_start|>user\n{U}<|im_end|>\n<|im_start|>assistant\n", 1),
        ("assistant", f"{A}<|im_end|>", -1),
        ("user", "\n<|im_start|>user\nTell me more.<|im_end|>\n", 2),
        ("user", "<|im_start|>user\nPlease.<|im_end|>\n<|im_start|>assistant\n", 2),  # merged with the one before
        ("assistant", "It is big.<|im_end|>\n", -1),
    ]


@pytest.mark.parametrize("scheme", ["ism", "mas", "mas_merged"])
def test_a_default_system_prompt_is_its_own_segment_chatml(scheme):
    tok = build_tokenizer(chat_template=CHATML_DEFAULT_SYSTEM_TEMPLATE)
    turns = layout(tok, DIALOGUE[1:3], scheme)
    system = [t for t in turns if t[0] == "system"]
    user = [t for t in turns if t[0] == "user"]
    assert len(system) == 1 and system[0][1].startswith("<|im_start|>system\nYou are a small helpful model.")
    assert system[0][2] >= 0 and user[0][2] >= 0 and system[0][2] != user[0][2]  # two segments: no peeking
    assert "system" not in user[0][1]


def test_a_default_system_prompt_is_its_own_segment_llama3():
    tok = make_llama3_tokenizer()
    assert layout(tok, DIALOGUE[1:3], "ism") == [
        ("system", "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a small helpful "
                   "model.<|eot_id|>", 0),
        ("user", f"<|start_header_id|>user<|end_header_id|>\n\n{U}<|eot_id|><|start_header_id|>assistant"
                 "<|end_header_id|>\n\n", 1),
        ("assistant", f"{A}<|eot_id|>", -1),
    ]
    mas = layout(tok, DIALOGUE[1:3], "mas")
    assert mas[0] == ("template", "<|begin_of_text|>", -1) and mas[1][0] == "system" and mas[1][2] == 0


def test_the_chat_prompt_of_a_new_round_uses_the_same_pieces():
    # A round's prompt (rendered with the generation prompt, tokenised after the cached text) has the pieces
    # the training rendering of the same messages has.
    tok = make_llama3_tokenizer()
    first = render_dialogue(tok, DIALOGUE[:2], add_generation_prompt=True)
    second = render_dialogue(tok, DIALOGUE[:4], add_generation_prompt=True)
    start = len(first.text) + len(A) + len("<|eot_id|>")
    new = tokenize_rendered(tok, second, "mas", start=start)
    assert [(role, tok.decode(new.input_ids[sum(n for _, n in new.turns[:k]):][:n].tolist()))
            for k, (role, n) in enumerate(new.turns)] == [
        ("user", "<|start_header_id|>user<|end_header_id|>\n\nTell me more.<|eot_id|>"),
        ("template", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    ]


@pytest.mark.parametrize("scheme", ["ism", "mas", "mas_merged", "prefix_lm"])
@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_implicit_default_and_explicit_system_prompt_give_one_layout(scheme, template):
    # Before: the newline after the template's own system turn joined the user segment, while the same text
    # given as a system message kept it: two layouts for one token sequence.
    tok = (build_tokenizer(chat_template=CHATML_DEFAULT_SYSTEM_TEMPLATE) if template == "chatml"
           else make_llama3_tokenizer())
    explicit = [{"role": "system", "content": "You are a small helpful model."}, *DIALOGUE[1:3]]
    implicit_layout, explicit_layout = layout(tok, DIALOGUE[1:3], scheme), layout(tok, explicit, scheme)
    assert "".join(t[1] for t in implicit_layout) == "".join(t[1] for t in explicit_layout)  # the same tokens
    assert implicit_layout == explicit_layout
