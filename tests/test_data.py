"""Tests of ism_ext.turns and ism_ext.training: messages -> input_ids, labels, block ids; packing; collation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_tokenizer import CHATML_TEMPLATE, IM_END, build_tokenizer, make_tokenizer, sample_dialogues
from tokenizers import processors

from ism_ext.masks import SCHEMES, kv_limit_from_segment_ids, segment_ids_for_turns
from ism_ext.training import ChatCollator, pack_dialogues, tokenize_triplet, triplet_expansion
from ism_ext.turns import IGNORE_INDEX, TokenizedDialogue, tokenize_dialogue

THREE_ROUNDS = [
    {"role": "system", "content": "You are a small model."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus four?"},
    {"role": "assistant", "content": "Seven, the answer is seven."},
    {"role": "user", "content": "Why?"},
    {"role": "assistant", "content": "Three plus four equals seven!"},
]


def runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of every run of True in a 1-D bool tensor."""
    m = torch.cat([torch.tensor([False]), mask.bool(), torch.tensor([False])]).to(torch.int8)
    d = m[1:] - m[:-1]
    return list(zip(torch.nonzero(d == 1).flatten().tolist(), torch.nonzero(d == -1).flatten().tolist(), strict=True))


def labelled_texts(tok, d: TokenizedDialogue) -> list[str]:
    return [tok.decode(d.labels[s:e].tolist()) for s, e in runs(d.labels != IGNORE_INDEX)]


def turn_texts(tok, d: TokenizedDialogue) -> list[str]:
    out, pos = [], 0
    for _, n in d.turns:
        out.append(tok.decode(d.input_ids[pos : pos + n].tolist()))
        pos += n
    return out


# ------------------------------------------------------------------------------------ tokenize_dialogue


def test_labels_are_exactly_answers_and_end_of_turn():
    tok = make_tokenizer()
    d = tokenize_dialogue(tok, THREE_ROUNDS)
    answers = [m["content"] + IM_END for m in THREE_ROUNDS if m["role"] == "assistant"]
    assert labelled_texts(tok, d) == answers
    lab = d.labels != IGNORE_INDEX
    assert torch.equal(d.labels[lab], d.input_ids[lab])
    # Nothing else: the labelled token count is that of the answers tokenised on their own.
    n_answer_tokens = sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers)
    assert int(lab.sum()) == n_answer_tokens
    assert d.input_ids.dtype == d.labels.dtype == d.block_sequence_ids.dtype == torch.int64
    # The whole text is the template's rendering, tokenised once without extra special tokens.
    full = tok.apply_chat_template(THREE_ROUNDS, tokenize=False)
    assert d.input_ids.tolist() == tok(full, add_special_tokens=False)["input_ids"]


def test_turn_texts_hold_header_and_glue():
    tok = make_tokenizer()
    d = tokenize_dialogue(tok, THREE_ROUNDS)
    assert [r for r, _ in d.turns] == [m["role"] for m in THREE_ROUNDS]
    assert sum(n for _, n in d.turns) == len(d)
    assert turn_texts(tok, d) == [
        "<|im_start|>system\nYou are a small model.<|im_end|>\n",
        "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n",
        "Four.<|im_end|>",
        "\n<|im_start|>user\nAnd three plus four?<|im_end|>\n<|im_start|>assistant\n",
        "Seven, the answer is seven.<|im_end|>",
        "\n<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n",
        "Three plus four equals seven!<|im_end|>\n",
    ]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_segment_ids_follow_layouts(scheme):
    tok = make_tokenizer()
    d = tokenize_dialogue(tok, THREE_ROUNDS, scheme=scheme)
    expected = segment_ids_for_turns(d.turns, scheme).to(torch.int64)
    assert torch.equal(d.block_sequence_ids, expected)
    # The tokens and labels do not depend on the scheme (except prefix_lm's labels, see below); the turns
    # neither, except that mas cuts the template text around each input message into turns of its own.
    ref = tokenize_dialogue(tok, THREE_ROUNDS, scheme="causal")
    assert torch.equal(d.input_ids, ref.input_ids)
    if scheme != "mas":
        assert d.turns == ref.turns
    n_segments = len(set(d.block_sequence_ids.tolist()) - {-1})
    assert n_segments == {"ism": 4, "mas": 4, "mas_merged": 4, "prefix_lm": 1, "causal": 0}[scheme]
    if scheme != "prefix_lm":
        assert torch.equal(d.labels, ref.labels)
    if scheme in ("ism", "mas_merged"):
        # The causal tokens are exactly the answers (the last one's trailing newline too).
        causal = d.block_sequence_ids == -1
        lab = d.labels != IGNORE_INDEX
        assert torch.equal(causal[:-1], lab[:-1]) and bool(causal[-1]) and not bool(lab[-1])


def test_user_segment_includes_assistant_header():
    tok = make_tokenizer()
    d = tokenize_dialogue(tok, THREE_ROUNDS, scheme="ism")
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    first_answer = runs(d.labels != IGNORE_INDEX)[0][0]
    # The header's tokens sit right before the first answer token, inside the user's segment.
    assert d.input_ids[first_answer - len(header) : first_answer].tolist() == header
    user_start = d.turns[0][1]
    user_ids = d.block_sequence_ids[user_start:first_answer]
    assert user_ids.unique().tolist() == [1]
    # So every token of the user turn, header included, sees the whole turn and nothing of the answer.
    lim = kv_limit_from_segment_ids(d.block_sequence_ids)
    assert lim[user_start:first_answer].tolist() == [first_answer] * (first_answer - user_start)
    assert int(lim[first_answer]) == first_answer + 1


@pytest.mark.parametrize("scheme", SCHEMES)
def test_no_label_is_visible_to_its_predictor(scheme):
    tok = make_tokenizer()
    for messages in sample_dialogues(6, 3, seed=3):
        d = tokenize_dialogue(tok, messages, scheme=scheme)
        lim = kv_limit_from_segment_ids(d.block_sequence_ids).to(torch.int64)
        j = torch.nonzero(d.labels != IGNORE_INDEX).flatten()
        assert j.numel() > 0 and int(j.min()) > 0
        assert bool((lim[j - 1] <= j).all())


def test_prefix_lm_labels_only_the_last_answer():
    tok = make_tokenizer()
    d = tokenize_dialogue(tok, THREE_ROUNDS, scheme="prefix_lm")
    assert labelled_texts(tok, d) == ["Three plus four equals seven!" + IM_END]


def test_template_with_bos_before_first_message():
    tok = build_tokenizer(chat_template="{{- eos_token }}" + CHATML_TEMPLATE)
    d = tokenize_dialogue(tok, THREE_ROUNDS[1:3])
    assert (
        turn_texts(tok, d)[0] == "<|im_end|><|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert labelled_texts(tok, d) == ["Four." + IM_END]


def test_tool_and_consecutive_messages():
    tok = make_tokenizer()
    messages = [
        {"role": "user", "content": "Read the data."},
        {"role": "tool", "content": "one two three"},
        {"role": "assistant", "content": "Three words."},
        {"role": "assistant", "content": "Done."},
    ]
    d = tokenize_dialogue(tok, messages, scheme="mas_merged")
    assert labelled_texts(tok, d) == ["Three words." + IM_END, "Done." + IM_END]
    texts = turn_texts(tok, d)
    # The second answer has no input turn before it: its header (and the glue) stay in its own causal turn.
    assert texts[3] == "\n<|im_start|>assistant\nDone.<|im_end|>\n"
    assert d.block_sequence_ids.tolist() == segment_ids_for_turns(d.turns, "mas_merged").tolist()
    # mas_merged merges user + tool into one block, ism keeps them apart, the authors' mas makes tools causal.
    assert len(set(d.block_sequence_ids.tolist()) - {-1}) == 1
    d_mas = tokenize_dialogue(tok, messages, scheme="mas")
    assert len(set(d_mas.block_sequence_ids.tolist()) - {-1}) == 1 and labelled_texts(tok, d_mas) == labelled_texts(
        tok, d)
    d_ism = tokenize_dialogue(tok, messages, scheme="ism")
    assert len(set(d_ism.block_sequence_ids.tolist()) - {-1}) == 2


# -------------------------------------------------------------------------------------------- errors


def test_no_chat_template_is_an_error():
    tok = build_tokenizer(chat_template=None)
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_dialogue(tok, THREE_ROUNDS)


def test_slow_tokenizer_is_an_error():
    class Slow:
        chat_template = CHATML_TEMPLATE
        is_fast = False

    with pytest.raises(ValueError, match="fast"):
        tokenize_dialogue(Slow(), THREE_ROUNDS)


def test_not_prefix_consistent_template_is_an_error():
    # Like templates that drop the reasoning of past answers: earlier answers render differently.
    template = (
        "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' }}"
        "{%- if m['role'] == 'assistant' and not loop.last %}{{- 'answer' }}{%- else %}{{- m['content'] }}{%- endif %}"
        "{{- '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    tok = build_tokenizer(chat_template=template)
    tokenize_dialogue(tok, THREE_ROUNDS[:3])  # one answer: still consistent
    with pytest.raises(ValueError, match="not prefix-consistent"):
        tokenize_dialogue(tok, THREE_ROUNDS)


@pytest.mark.parametrize("trim_offsets", [False, True])
def test_boundary_inside_a_token_is_an_error(trim_offsets):
    # No separators at all: the user's "x seg" and the answer's "ment" render as "x segment", and " segment"
    # is one token of the tiny vocabulary.
    tok = build_tokenizer(chat_template="{%- for m in messages %}{{- m['content'] }}{%- endfor %}")
    # GPT-2 style offsets leave a token's leading space out of its span: the boundary between "x " and
    # "segment" is inside " segment" all the same.
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    with pytest.raises(ValueError, match=r"character 2\) falls inside token 1"):
        tokenize_dialogue(tok, [{"role": "user", "content": "x "}, {"role": "assistant", "content": "segment"}])
    assert tok.convert_ids_to_tokens(tok("x segment", add_special_tokens=False)["input_ids"]) == ["x", "Ġsegment"]
    messages = [{"role": "user", "content": "x seg"}, {"role": "assistant", "content": "ment"}]
    with pytest.raises(
        ValueError, match=r"end of turn 0 \(message 0, role 'user'\) \(character 5\) falls inside token 1"
    ):
        tokenize_dialogue(tok, messages)
    # Aligned boundaries in the same template are fine.
    d = tokenize_dialogue(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": " segment"}])
    assert d.turns == [("user", 1), ("assistant", 1)] and d.labels.tolist() == [-100, d.input_ids[1].item()]


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "empty"),
        ([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "hi"}], "must start"),
        ([{"role": "robot", "content": "hi"}], "unknown role"),
        ([{"content": "hi"}], "'role'"),
    ],
)
def test_bad_messages(messages, match):
    with pytest.raises(ValueError, match=match):
        tokenize_dialogue(make_tokenizer(), messages)


def test_bad_scheme():
    with pytest.raises(ValueError, match="unknown scheme"):
        tokenize_dialogue(make_tokenizer(), THREE_ROUNDS, scheme="bidirectional")


# ---------------------------------------------------------------------------------------- truncation


def test_max_length_drops_whole_trailing_rounds():
    tok = make_tokenizer()
    full = tokenize_dialogue(tok, THREE_ROUNDS)
    two = tokenize_dialogue(tok, THREE_ROUNDS[:5])
    one = tokenize_dialogue(tok, THREE_ROUNDS[:3])
    assert len(one) < len(two) < len(full)
    assert tokenize_dialogue(tok, THREE_ROUNDS, max_length=len(full)).turns == full.turns
    for max_length, expected in ((len(full) - 1, two), (len(two), two), (len(two) - 1, one), (len(one), one)):
        got = tokenize_dialogue(tok, THREE_ROUNDS, max_length=max_length)
        assert len(got) <= max_length
        assert got.turns == expected.turns
        assert torch.equal(got.input_ids, expected.input_ids)
        assert torch.equal(got.labels, expected.labels)
        assert torch.equal(got.block_sequence_ids, expected.block_sequence_ids)
        # A kept round is the start of the full dialogue.
        assert torch.equal(got.input_ids, full.input_ids[: len(got)])
    with pytest.raises(ValueError, match="first round"):
        tokenize_dialogue(tok, THREE_ROUNDS, max_length=len(one) - 1)


# ------------------------------------------------------------------------------------------- packing


def test_pack_dialogues():
    tok = make_tokenizer()
    dialogues = [tokenize_dialogue(tok, m) for m in sample_dialogues(20, 2, seed=7)]
    max_tokens = 2 * max(len(d) for d in dialogues)
    rows = pack_dialogues(dialogues, max_tokens, tok.pad_token_id)
    assert len(rows) < len(dialogues)
    seen = []
    for row in rows:
        ids, lab, seg, pos, cu = (
            row[k] for k in ("input_ids", "labels", "block_sequence_ids", "position_ids", "cu_seqlens")
        )
        members = row["dialogue_indices"].tolist()
        seen += members
        assert ids.shape == lab.shape == seg.shape == pos.shape == (1, ids.shape[1])
        assert ids.shape[1] <= max_tokens
        assert cu.dtype == torch.int32 and cu.tolist()[0] == 0 and cu.tolist()[-1] == ids.shape[1]
        used: set[int] = set()
        for k, (s, e) in zip(members, zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True), strict=True):
            d = dialogues[k]
            assert e - s == len(d)
            assert torch.equal(ids[0, s:e], d.input_ids)
            assert int(lab[0, s]) == -100 and torch.equal(lab[0, s + 1 : e], d.labels[1:])
            assert pos[0, s:e].tolist() == list(range(len(d)))
            own = seg[0, s:e]
            assert torch.equal(own == -1, d.block_sequence_ids == -1)
            shift = own[own >= 0] - d.block_sequence_ids[own >= 0]
            assert shift.unique().numel() == 1  # same layout, renumbered by one offset
            ids_here = set(own[own >= 0].tolist())
            assert not ids_here & used
            used |= ids_here
        # The packed kv_limit is the dialogues' own kv_limits side by side.
        expected = torch.cat([kv_limit_from_segment_ids(dialogues[k].block_sequence_ids) for k in members])
        assert torch.equal(kv_limit_from_segment_ids(seg[0], cu), expected)
    assert sorted(seen) == list(range(len(dialogues)))


def test_pack_dialogues_first_fit_and_padding():
    def fake(n: int, first_id: int) -> TokenizedDialogue:
        ids = torch.tensor([first_id] * (n - 1) + [-1])
        return TokenizedDialogue(torch.arange(n) + 10, torch.arange(n) + 10, ids, [("user", n - 1), ("assistant", 1)])

    dialogues = [fake(6, 0), fake(5, 0), fake(3, 0), fake(4, 0)]
    rows = pack_dialogues(dialogues, max_tokens=10, pad_token_id=0)
    assert [r["dialogue_indices"].tolist() for r in rows] == [[0, 2], [1, 3]]
    assert rows[0]["block_sequence_ids"].tolist() == [[0] * 5 + [-1] + [1, 1, -1]]
    # Every token of these fakes is labelled: only each dialogue's first token loses its label, so that the
    # shifted loss never asks the previous dialogue's last token to predict it.
    assert rows[0]["labels"].tolist() == [[-100, 11, 12, 13, 14, 15, -100, 11, 12]]
    padded = pack_dialogues(dialogues, max_tokens=10, pad_token_id=0, pad_to=12)
    r = padded[0]
    assert r["input_ids"].shape == (1, 12)
    assert r["input_ids"][0, 9:].tolist() == [0, 0, 0]
    assert r["labels"][0, 9:].tolist() == [-100] * 3
    assert r["block_sequence_ids"][0, 9:].tolist() == [-1] * 3
    assert r["position_ids"][0].tolist() == list(range(6)) + list(range(3)) + list(range(3))
    assert r["cu_seqlens"].tolist() == [0, 6, 9, 12]
    with pytest.raises(ValueError, match="max_tokens"):
        pack_dialogues(dialogues, max_tokens=5, pad_token_id=0)


# ------------------------------------------------------------------------------------------ collator


def test_collator_padded():
    tok = make_tokenizer()
    chats = sample_dialogues(5, 3, seed=11)
    batch = ChatCollator(tok, scheme="ism")(chats)
    singles = [tokenize_dialogue(tok, c, "ism") for c in chats]
    length = max(len(d) for d in singles)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "block_sequence_ids"}
    for key in batch:
        assert batch[key].shape == (5, length) and batch[key].dtype == torch.int64
    for b, d in enumerate(singles):
        n = len(d)
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (length - n)
        assert torch.equal(batch["input_ids"][b, :n], d.input_ids)
        assert torch.equal(batch["labels"][b, :n], d.labels)
        assert torch.equal(batch["block_sequence_ids"][b, :n], d.block_sequence_ids)
        assert set(batch["input_ids"][b, n:].tolist()) <= {tok.pad_token_id}
        assert set(batch["labels"][b, n:].tolist()) <= {-100}
        assert set(batch["block_sequence_ids"][b, n:].tolist()) <= {-1}
    # Dataset rows with a "messages" key, and padding to a multiple.
    rows = ChatCollator(tok, pad_to_multiple_of=64)([{"messages": c} for c in chats])
    assert rows["input_ids"].shape[1] % 64 == 0 and torch.equal(rows["input_ids"][:, :length], batch["input_ids"])


def test_collator_pads_with_eos_without_pad_token():
    tok = build_tokenizer()
    tok.pad_token = None
    batch = ChatCollator(tok)([THREE_ROUNDS, THREE_ROUNDS[:3]])
    n = len(tokenize_dialogue(tok, THREE_ROUNDS[:3]))
    assert set(batch["input_ids"][1, n:].tolist()) == {tok.eos_token_id}


@pytest.mark.parametrize("max_length", [None, 200])
def test_collator_packed(max_length):
    tok = make_tokenizer()
    chats = sample_dialogues(9, 2, seed=5)
    batch = ChatCollator(tok, scheme="mas", max_length=max_length, pack=True)(chats)
    singles = [tokenize_dialogue(tok, c, "mas", max_length) for c in chats]
    assert set(batch) == {"input_ids", "labels", "block_sequence_ids", "position_ids"}
    rows, length = batch["input_ids"].shape
    capacity = max_length or max(len(d) for d in singles)
    assert length <= capacity and rows <= len(chats)
    if max_length is not None:
        assert rows < len(chats)  # room for two dialogues per row
    expected_rows = pack_dialogues(singles, capacity, tok.pad_token_id)
    assert rows == len(expected_rows)
    for r, row in enumerate(expected_rows):
        n = row["input_ids"].shape[1]
        for key in ("input_ids", "labels", "block_sequence_ids", "position_ids"):
            assert torch.equal(batch[key][r, :n], row[key][0])
        assert batch["position_ids"][r, n:].tolist() == list(range(length - n))
        assert set(batch["labels"][r, n:].tolist()) <= {-100}
    # Dialogues are recoverable from the position restarts alone, as a model sees them.
    pos = batch["position_ids"].reshape(-1)
    starts = torch.nonzero(pos == 0).flatten()
    assert int((pos[starts[1:] - 1] + 1 != 0).sum()) == starts.numel() - 1


# ------------------------------------------------------------------------------------------ triplets


def test_triplet_expansion_and_tokens():
    tok = make_tokenizer()
    n = len(THREE_ROUNDS) // 2
    samples = triplet_expansion(THREE_ROUNDS)
    assert len(samples) == n
    full = tokenize_dialogue(tok, THREE_ROUNDS)
    answers = [m for m in THREE_ROUNDS if m["role"] == "assistant"]
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    # The prefix of the full dialogue that ends with answer k ends where user k+1's <|im_start|> begins.
    starts = torch.nonzero(full.input_ids == im_start).flatten().tolist()
    prefix_lengths = [starts[1 + 2 * k + 2] for k in range(n - 1)] + [len(full)]
    total = 0
    for k, sample in enumerate(samples):
        assert sample == THREE_ROUNDS[: 2 * k + 3] and sample[-1] is answers[k]
        t = tokenize_triplet(tok, sample)
        assert labelled_texts(tok, t) == [answers[k]["content"] + IM_END]
        answer = t.block_sequence_ids == -1
        # One bidirectional prefix (header included), then the causal answer (and its trailing newline).
        assert t.block_sequence_ids[~answer].unique().tolist() == [0]
        first = runs(t.labels != -100)[0][0]
        assert answer.tolist() == [False] * first + [True] * (len(t) - first)
        assert len(t) == prefix_lengths[k]
        assert torch.equal(t.input_ids, full.input_ids[: len(t)])
        total += len(t)
    assert total == sum(prefix_lengths)
    assert len(full) < total < n * len(full)


def test_triplets_cost_n_plus_one_over_two():
    tok = make_tokenizer()
    n = 6
    same = [{"role": "user", "content": "What is one plus one?"}, {"role": "assistant", "content": "Two."}] * n
    full = tokenize_dialogue(tok, same)
    total = sum(len(tokenize_triplet(tok, s)) for s in triplet_expansion(same))
    assert total * 2 == (n + 1) * len(full)


def test_triplet_errors():
    tok = make_tokenizer()
    with pytest.raises(ValueError, match="end with the assistant"):
        tokenize_triplet(tok, THREE_ROUNDS[:2])
    with pytest.raises(ValueError, match="does not fit"):
        tokenize_triplet(tok, THREE_ROUNDS, max_length=20)


# ------------------------------------------------------------------------------------------ property


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), rounds=st.integers(1, 5), scheme=st.sampled_from(SCHEMES))
def test_random_dialogues(seed, rounds, scheme):
    tok = make_tokenizer()
    messages = sample_dialogues(1, rounds, seed)[0]
    d = tokenize_dialogue(tok, messages, scheme=scheme)
    assert sum(n for _, n in d.turns) == len(d)
    assert torch.equal(d.block_sequence_ids, segment_ids_for_turns(d.turns, scheme).to(torch.int64))
    answers = [m["content"] + IM_END for m in messages if m["role"] == "assistant"]
    assert labelled_texts(tok, d) == (answers[-1:] if scheme == "prefix_lm" else answers)
