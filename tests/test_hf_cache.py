"""`IsmCache` and `model.generate` on an "ism" model, against recomputing every step in float64.

The reference is the stock eager model in float64 with the dense 4-D mask of the rule, run on each row's
real tokens alone (no padding, no cache) for every step: what the cached, padded, batched runs must equal.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ism_ext.integrations.hf as ism_hf  # noqa: E402
from ism_ext.integrations.hf import IsmCache, cache_argument_name, query_block_ids  # noqa: E402
from ism_ext.masks import segment_ids_for_turns  # noqa: E402

VOCAB = 96


def tiny_models(seed: int = 0, layers: int = 2):
    """(fp32 model with the ism attention, float64 stock eager model with the same weights)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   pad_token_id=0, eos_token_id=1, bos_token_id=None)
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="ism").eval()
    stock = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager")
    stock.load_state_dict(ours.state_dict())
    return ours, stock.double().eval()


def dense_additive(ids: torch.Tensor) -> torch.Tensor:
    """[1, 1, L, L] float64 mask of one row's block ids, built from the definition of the rule."""
    n = ids.numel()
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    same_block = (ids[:, None] == ids[None, :]) & (ids[:, None] >= 0)
    return torch.where((k <= q) | same_block, 0.0, -torch.inf).double()[None, None]


def reference_logits(stock, tokens: list[int], ids: list[int]) -> torch.Tensor:
    """float64 logits [L, V] of one unpadded row."""
    with torch.no_grad():
        t = torch.tensor([tokens])
        return stock(t, attention_mask=dense_additive(torch.tensor(ids))).logits[0]


def prompt_batch(scheme: str, lengths: list[int], seed: int):
    """Left-padded prompts (ending with an input turn) with their block ids, one row per length."""
    rng = random.Random(seed)
    width = max(lengths)
    tokens = torch.zeros(len(lengths), width, dtype=torch.long)
    blocks = torch.full((len(lengths), width), -1, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        turns, left = [], n
        while left > 0:
            size = min(left, rng.randint(2, 7))
            turns.append(("user" if len(turns) % 2 == 0 else "assistant", size))
            left -= size
        if turns[-1][0] == "assistant":
            turns[-1] = ("user", turns[-1][1])
        ids = segment_ids_for_turns(turns, scheme)
        tokens[b, width - n:] = torch.tensor([rng.randrange(2, VOCAB) for _ in range(n)])
        blocks[b, width - n:] = torch.where(ids >= 0, ids + 10 * b, ids)
        mask[b, width - n:] = 1
    return tokens, mask, blocks


def check_generation(out, stock, tokens, mask, blocks, atol=2e-4):
    """Every step's logits of every row equal the float64 recompute; greedy picks the argmax."""
    width = tokens.shape[1]
    for b in range(tokens.shape[0]):
        real = mask[b].bool()
        prompt, prompt_ids = tokens[b, real].tolist(), blocks[b, real].tolist()
        new = out.sequences[b, width:].tolist()
        for step, logits in enumerate(out.logits):
            ref = reference_logits(stock, prompt + new[:step], prompt_ids + [-1] * step)[-1]
            err = (logits[b].double() - ref).abs().max().item()
            assert err <= atol * max(1.0, ref.abs().max().item()), f"row {b} step {step}: {err:.3g}"


@pytest.mark.parametrize("scheme", ["ism", "mas", "causal"])
@pytest.mark.parametrize("cache", ["default", "contiguous", "paged"])
def test_generate_greedy_batched_and_padded_equals_float64_recompute(scheme, cache):
    ours, stock = tiny_models()
    tokens, mask, blocks = prompt_batch(scheme, [23, 15, 30], seed=1)
    kwargs = {}
    if cache != "default":
        kwargs[cache_argument_name(ours)] = IsmCache.for_model(ours, 3, 64, page_size=16 if cache == "paged" else None)
    out = ours.generate(tokens, attention_mask=mask, block_sequence_ids=blocks, max_new_tokens=6, min_new_tokens=6,
                        do_sample=False, return_dict_in_generate=True, output_logits=True, **kwargs)
    used = getattr(out, "cache", None) or out.past_key_values
    assert isinstance(used, IsmCache)
    assert used.kv.lengths(0) == [23 + 5, 15 + 5, 30 + 5]  # each row holds its real tokens only
    check_generation(out, stock, tokens, mask, blocks)


def test_generate_sampling_is_seeded_and_equals_the_dynamic_cache_path():
    ours, _ = tiny_models(seed=2)
    tokens, mask, blocks = prompt_batch("ism", [12, 20], seed=2)
    runs = []
    for implementation in (None, None, "dynamic"):
        torch.manual_seed(7)
        runs.append(ours.generate(tokens, attention_mask=mask, block_sequence_ids=blocks, max_new_tokens=8,
                                  min_new_tokens=8, do_sample=True, temperature=0.9, top_p=0.95, top_k=0,
                                  cache_implementation=implementation).tolist())
    assert runs[0] == runs[1] == runs[2]
    torch.manual_seed(8)
    other = ours.generate(tokens, attention_mask=mask, block_sequence_ids=blocks, max_new_tokens=8, min_new_tokens=8,
                          do_sample=True, temperature=0.9, top_p=0.95, top_k=0).tolist()
    assert other != runs[0]


def test_generate_refuses_block_ids_on_models_without_the_ism_attention():
    _, stock = tiny_models()
    tokens = torch.randint(2, VOCAB, (1, 6))
    with pytest.raises(ValueError, match="block_sequence_ids"):
        stock.float().generate(tokens, block_sequence_ids=torch.zeros_like(tokens), max_new_tokens=2)


def forward(model, cache, tokens, ids):
    with torch.no_grad():
        return model(torch.tensor([tokens]), block_sequence_ids=torch.tensor([ids]), use_cache=True,
                     **{cache_argument_name(model): cache}).logits[0]


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_rounds_with_truncation_equal_float64_recompute(paged):
    ours, stock = tiny_models(seed=3)
    cache = IsmCache.for_model(ours, 1, 96, page_size=16 if paged else None)
    rng = random.Random(3)
    history, history_ids, block = [], [], 0

    def round_(n_user: int, n_answer: int, check: bool = True):
        nonlocal block
        user = [rng.randrange(2, VOCAB) for _ in range(n_user)]
        got = [forward(ours, cache, user, [block] * n_user)[-1]]  # the user turn: one bidirectional segment
        history.extend(user)
        history_ids.extend([block] * n_user)
        block += 1
        for _ in range(n_answer):  # the answer, token by token
            token = int(got[-1].argmax())
            got.append(forward(ours, cache, [token], [-1])[-1])
            history.append(token)
            history_ids.append(-1)
        if check:
            ref = reference_logits(stock, history, history_ids)
            positions = [len(history) - n_answer - 1 + i for i in range(n_answer + 1)]
            for pos, logits in zip(positions, got, strict=True):
                assert (logits.double() - ref[pos]).abs().max() < 2e-4
        return got

    round_(9, 4)
    end_of_round_1 = cache.get_seq_length()
    kept = (list(history), list(history_ids), block)
    round_(7, 3)
    cache.truncate(end_of_round_1)
    history[:], history_ids[:], block = list(kept[0]), list(kept[1]), kept[2]
    assert cache.get_seq_length() == end_of_round_1 == len(history)
    round_(11, 5)  # the new round 2 sees exactly round 1
    with pytest.raises(ValueError, match="not the end of a forward call"):
        cache.truncate(3)


def _state(cache: IsmCache):
    layers = range(cache.kv.num_layers)
    return ([cache.kv.key_cache(i).clone() for i in layers], [cache.kv.value_cache(i).clone() for i in layers],
            [cache.kv.lengths(i) for i in layers], cache.get_seq_length())


def _assert_unchanged(cache: IsmCache, before) -> None:
    after = _state(cache)
    assert all(torch.equal(a, b) for a, b in zip(before[0] + before[1], after[0] + after[1], strict=True))
    assert before[2:] == after[2:]


def test_errors_are_raised_before_anything_is_written():
    ours, _ = tiny_models(seed=4)
    cache = IsmCache.for_model(ours, 1, 24)
    forward(ours, cache, [5, 6, 7, 8], [0, 0, 0, 0])
    before = _state(cache)
    cases = [
        (ValueError, "capacity", lambda: forward(ours, cache, list(range(2, 30)), [-1] * 28)),
        (ValueError, "prefilled whole", lambda: forward(ours, cache, [9, 10], [0, 0])),  # continues block 0
        (ValueError, "layers", lambda: forward(tiny_models(layers=3)[0], cache, [9], [-1])),
        (TypeError, "dtype", lambda: forward(copy.deepcopy(ours).to(torch.bfloat16), cache, [9], [-1])),
    ]
    for exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call()
        _assert_unchanged(cache, before)
    forward(ours, cache, [9, 10], [1, 1])  # a new block id is fine


def test_the_cache_refuses_other_attention_implementations():
    _, stock = tiny_models()
    cache = IsmCache.for_model(stock.float(), 1, 16)
    with pytest.raises(RuntimeError, match="attn_implementation='ism'"):
        stock.float()(torch.tensor([[3, 4]]), use_cache=True, **{cache_argument_name(stock): cache})


def test_query_block_ids_of_the_prompt_make_later_positions_causal():
    ids = torch.tensor([[0, 0, 1, 1]])
    assert query_block_ids(ids, 1, 4, 4, "cpu").tolist() == [[0, 0, 1, 1]]  # the queries' own ids
    assert query_block_ids(ids, 1, 1, 6, "cpu").tolist() == [[-1]]  # a generated position
    assert query_block_ids(torch.tensor([[0, 0, 1, 1, 2, 2]]), 1, 2, 6, "cpu").tolist() == [[2, 2]]  # all keys
    with pytest.raises(ValueError, match="block_sequence_ids"):
        query_block_ids(torch.zeros(1, 7, dtype=torch.long), 1, 1, 6, "cpu")


def test_apply_ism_models_also_generate_with_blocks():
    _, stock = tiny_models(seed=5)
    model = ism_hf.apply_ism(stock.float())
    out = model.generate(torch.tensor([[4, 5, 6]]), block_sequence_ids=torch.tensor([[0, 0, 0]]), max_new_tokens=3,
                         min_new_tokens=3, return_dict_in_generate=True)
    assert isinstance(getattr(out, "cache", None) or out.past_key_values, IsmCache)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_an_exception_mid_forward_rolls_the_cache_back(paged, monkeypatch):
    # Before: layer 0 kept its appended rows, layers 1 and 2 did not (lengths 10 and 6), and the next call failed
    # with a misleading kv_limit message.
    ours, stock = tiny_models(seed=6, layers=3)
    cache = IsmCache.for_model(ours, 1, 48, page_size=16 if paged else None)
    history, history_ids = [5, 6, 7, 8, 9, 10], [0] * 6
    forward(ours, cache, history, history_ids)
    before = _state(cache)

    def broken(*args, **kwargs):
        raise RuntimeError("layer 1 broke")

    with monkeypatch.context() as patch:
        patch.setattr(ours.model.layers[1].mlp, "forward", broken)
        with pytest.raises(RuntimeError, match="layer 1 broke"):
            forward(ours, cache, [11, 12, 13, 14], [1, 1, 1, 1])
    assert cache.get_seq_length() == 6
    assert [cache.kv.lengths(i) for i in range(cache.kv.num_layers)] == before[2]
    # The same call again now works and equals the float64 recompute of the whole history.
    got = forward(ours, cache, [11, 12, 13, 14], [1, 1, 1, 1])
    ref = reference_logits(stock, history + [11, 12, 13, 14], history_ids + [1] * 4)
    assert (got.double() - ref[6:]).abs().max() < 2e-4


def test_generate_refuses_block_ids_shorter_than_the_prompt():
    ours, _ = tiny_models()
    tokens = torch.randint(2, VOCAB, (1, 6))
    with pytest.raises(ValueError, match=r"block_sequence_ids has 4 positions per row but the prompt .* has 6 tokens"):
        ours.generate(tokens, block_sequence_ids=torch.zeros(1, 4, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"block_sequence_ids has 4 positions per row but the input has 6 tokens"):
        ours(tokens, block_sequence_ids=torch.zeros(1, 4, dtype=torch.long))


def test_the_attention_on_the_cache_needs_the_forwards_mask_object():
    # Without the one mask object of the forward, every layer would plan the append again.
    ours, _ = tiny_models()
    cache = IsmCache.for_model(ours, 1, 16)
    attention = ours.model.layers[0].self_attn
    q = torch.randn(1, 4, 3, 16)
    k, v = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)
    key, value = cache.update(k, v, 0)
    with pytest.raises(ValueError, match="needs the mask object"):
        ism_hf.ism_attention_forward(attention, q, key, value, None)
    assert cache.get_seq_length() == 0 and cache.kv.lengths(0) == [0]
