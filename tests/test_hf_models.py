"""The patched transformers models against the stock ones (eager attention with the dense 4-D mask)."""

from __future__ import annotations

import copy
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ism_ext  # noqa: E402
import ism_ext.integrations.hf as ism_hf  # noqa: E402
from ism_ext.masks import segment_ids_for_turns  # noqa: E402
from ism_ext.turns import IGNORE_INDEX  # noqa: E402

VOCAB = 128


def tiny_config(family: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, attention_dropout=0.0)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, use_sliding_window=False)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=16, use_sliding_window=False)
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    raise ValueError(family)


FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]


def model_pair(family: str, dtype=torch.float32, seed: int = 0):
    """(patched model built with attn_implementation="ism", stock eager model with the same weights)."""
    torch.manual_seed(seed)
    cfg = tiny_config(family)
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="ism").to(dtype)
    stock = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager").to(dtype)
    stock.load_state_dict(ours.state_dict())
    return ours.eval(), stock.eval()


def random_turns(rng: random.Random, total: int) -> list[tuple[str, int]]:
    turns, left = [("system", rng.randint(1, 6))], total
    left -= turns[0][1]
    roles = ["user", "assistant"]
    i = 0
    while left > 0:
        n = min(left, rng.randint(1, 9))
        role = roles[i % 2] if rng.random() > 0.15 else "user"  # sometimes two user turns in a row
        turns.append((role, n))
        left -= n
        i += 1
    return turns


def additive_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """The dense 4-D float mask of a [B, S] id grid (independent of the package: built from the definition)."""
    b, s = segment_ids.shape
    q, k = torch.arange(s)[:, None], torch.arange(s)[None, :]
    same_block = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] >= 0)
    allowed = (k <= q) | same_block
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float, what: str) -> None:
    scale = max(b.abs().max().item(), 1e-6)
    err = (a - b).abs().max().item()
    assert err <= rtol * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", ["ism", "mas", "prefix_lm", "causal"])
def test_logits_and_parameter_grads_match_stock_eager_with_dense_mask(family, scheme):
    rng = random.Random(FAMILIES.index(family) * 10 + len(scheme))
    turns = random_turns(rng, 70)
    ids = segment_ids_for_turns(turns, scheme)[None].long()
    tokens = torch.randint(0, VOCAB, ids.shape, generator=torch.Generator().manual_seed(1))
    ours, stock = model_pair(family)
    out = ours(tokens, block_sequence_ids=ids).logits
    ref = stock(tokens, attention_mask=additive_mask(ids)).logits
    _assert_close(out, ref, 1e-5, "logits")
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * w).sum().backward()
    (ref * w).sum().backward()
    g_ours, g_ref = _grads(ours), _grads(stock)
    assert g_ours.keys() == g_ref.keys() and len(g_ours) > 10
    for name in g_ref:
        _assert_close(g_ours[name], g_ref[name], 1e-4, f"grad of {name}")


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_layout_equals_stock_model_without_mask(family):
    ours, stock = model_pair(family)
    tokens = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(3))
    _assert_close(ours(tokens).logits, stock(tokens).logits, 1e-5, "no ids")
    causal = torch.full_like(tokens, -1)
    _assert_close(ours(tokens, block_sequence_ids=causal).logits, stock(tokens).logits, 1e-5, "all -1")


@pytest.mark.parametrize("dtype,rtol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)], ids=["bf16", "fp16"])
def test_half_precision_logits(dtype, rtol):
    rng = random.Random(7)
    ids = segment_ids_for_turns(random_turns(rng, 60), "ism")[None].long()
    tokens = torch.randint(0, VOCAB, ids.shape, generator=torch.Generator().manual_seed(4))
    ours, stock = model_pair("llama", dtype)
    out = ours(tokens, block_sequence_ids=ids).logits.float()
    ref = stock(tokens, attention_mask=additive_mask(ids).to(dtype)).logits.float()
    _assert_close(out, ref, rtol, "logits")


def _dialogues(n: int, seed: int):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = segment_ids_for_turns(random_turns(rng, rng.randint(20, 45)), "ism").long()
        out.append((torch.randint(0, VOCAB, ids.shape, generator=gen), ids))
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_single_dialogues(family, side):
    ours, _ = model_pair(family)
    dialogues = _dialogues(3, seed=5)
    length = max(t.numel() for t, _ in dialogues)
    tokens = torch.zeros(3, length, dtype=torch.long)
    block = torch.full((3, length), -1, dtype=torch.long)
    mask = torch.zeros(3, length, dtype=torch.long)
    spans = []
    for i, (t, ids) in enumerate(dialogues):
        s = slice(0, t.numel()) if side == "right" else slice(length - t.numel(), length)
        tokens[i, s], block[i, s], mask[i, s] = t, ids, 1
        spans.append(s)
    # Left padding needs positions that start at the first real token, as in transformers' generate().
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    batched = ours(tokens, attention_mask=mask, position_ids=position_ids, block_sequence_ids=block).logits
    for i, (t, ids) in enumerate(dialogues):
        single = ours(t[None], block_sequence_ids=ids[None]).logits[0]
        _assert_close(batched[i, spans[i]], single, 1e-5, f"dialogue {i}")


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_row_equals_single_dialogues(family):
    ours, stock = model_pair(family)
    dialogues = _dialogues(3, seed=6)
    tokens = torch.cat([t for t, _ in dialogues])[None]
    # Renumber the ids per dialogue so no id is shared across dialogues of the row.
    offset, blocks = 0, []
    for _, ids in dialogues:
        blocks.append(torch.where(ids >= 0, ids + offset, ids))
        offset += int(ids.max()) + 1
    block = torch.cat(blocks)[None]
    position_ids = torch.cat([torch.arange(t.numel()) for t, _ in dialogues])[None]
    packed = ours(tokens, position_ids=position_ids, block_sequence_ids=block).logits[0]
    start = 0
    for i, (t, ids) in enumerate(dialogues):
        single = ours(t[None], block_sequence_ids=ids[None]).logits[0]
        _assert_close(packed[start:start + t.numel()], single, 1e-5, f"dialogue {i}")
        start += t.numel()


def test_apply_to_a_loaded_model():
    torch.manual_seed(0)
    cfg = tiny_config("qwen2")
    model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    stock = copy.deepcopy(model)
    ids = segment_ids_for_turns(random_turns(random.Random(3), 40), "ism")[None].long()
    tokens = torch.randint(0, VOCAB, ids.shape)
    assert ism_hf.apply_ism(model) is model and model.config._attn_implementation == "ism"
    _assert_close(model(tokens, block_sequence_ids=ids).logits, stock(tokens, attention_mask=additive_mask(ids)).logits,
                  1e-5, "logits")


def test_packing_is_built_once_per_forward(monkeypatch):
    calls = []
    from ism_ext.integrations.hf import packing

    real = packing.varlen_packing

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(packing, "varlen_packing", counting)
    cfg = tiny_config("llama")
    cfg.num_hidden_layers = 4
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="ism")
    ids = torch.tensor([[0, 0, 0, -1, -1, 1, 1, -1]])
    model(torch.randint(0, VOCAB, ids.shape), block_sequence_ids=ids)
    assert len(calls) == 1
    model(torch.randint(0, VOCAB, ids.shape), block_sequence_ids=ids)
    assert len(calls) == 2


def test_new_segment_on_top_of_the_cache_equals_full_recompute():
    ours, _ = model_pair("llama")
    turns = [("system", 5), ("user", 7), ("assistant", 6), ("user", 9)]
    ids = segment_ids_for_turns(turns, "ism")[None].long()
    tokens = torch.randint(0, VOCAB, ids.shape, generator=torch.Generator().manual_seed(8))
    full = ours(tokens, block_sequence_ids=ids).logits
    history = 18  # system + user + assistant; the last user turn (9 tokens) is prefilled on the cache
    first = ours(tokens[:, :history], block_sequence_ids=ids[:, :history], use_cache=True)
    new_ids = torch.zeros(1, 9, dtype=torch.long)  # one bidirectional segment
    second = ours(tokens[:, history:], block_sequence_ids=new_ids, past_key_values=first.past_key_values)
    _assert_close(second.logits, full[:, history:], 1e-5, "new turn on the cache")


def test_unsupported_family_is_refused():
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=VOCAB)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="supports the model families"):
        ism_hf.apply_ism(model)
    with pytest.raises(ValueError, match="expects a llama model"):
        ism_hf.apply_ism_to_llama(model)


def test_misuse_gives_clear_errors():
    ours, _ = model_pair("llama")
    tokens = torch.randint(0, VOCAB, (1, 8))
    with pytest.raises(ValueError, match="does not take a dense attention mask"):
        ours(tokens, attention_mask=torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="reused after a gap"):
        ours(tokens, block_sequence_ids=torch.tensor([[0, 0, -1, 0, -1, -1, -1, -1]]))
    with pytest.raises(ValueError, match="block_sequence_ids must have shape"):
        ours(tokens, block_sequence_ids=torch.zeros(1, 9, dtype=torch.long))  # longer than the row
    # Ids shorter than the input would leave its last tokens causal without a word: refused, both lengths named.
    with pytest.raises(ValueError, match=r"block_sequence_ids has 3 positions per row but the input has 8 tokens"):
        ours(tokens, block_sequence_ids=torch.tensor([[0, 0, -1]]))
    cfg = tiny_config("llama")
    cfg.attention_dropout = 0.1
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with pytest.raises(NotImplementedError, match="dropout"):
        ism_hf.apply_ism(model)


def test_training_loss_through_labels():
    ours, stock = model_pair("qwen2")
    ids = segment_ids_for_turns(random_turns(random.Random(9), 50), "ism")[None].long()
    tokens = torch.randint(0, VOCAB, ids.shape)
    labels = torch.where(ids < 0, tokens, torch.full_like(tokens, IGNORE_INDEX))
    loss = ours(tokens, block_sequence_ids=ids, labels=labels).loss
    ref = stock(tokens, attention_mask=additive_mask(ids), labels=labels).loss
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) < 1e-5


def test_kv_limit_of_the_packing_matches_package_helper():
    # The packing of a plain unpadded batch is kv_limit_from_segment_ids row by row.
    from ism_ext.integrations.hf import varlen_packing

    ids = torch.tensor([[0, 0, -1, 1, 1, -1], [-1, 2, 2, 2, -1, -1]])
    packing = varlen_packing(2, 6, 6, block_sequence_ids=ids)
    assert packing.cu_seqlens_q.tolist() == [0, 6, 12] and packing.cu_seqlens_k.tolist() == [0, 6, 12]
    assert packing.kv_limit.tolist() == ism_ext.kv_limit_from_segment_ids(ids).reshape(-1).tolist()


def test_compiled_fullgraph_equals_eager_logits_and_grads():
    # Before: graph breaks on the ContextVar of the mask function and on .item() in the packing's checks.
    torch._dynamo.reset()
    ours, _ = model_pair("llama")
    ids = segment_ids_for_turns([("system", 3), ("user", 5), ("assistant", 4), ("user", 3)], "ism")[None].long()
    tokens = torch.randint(0, VOCAB, ids.shape, generator=torch.Generator().manual_seed(5))
    eager = ours(tokens, block_sequence_ids=ids, labels=tokens)
    eager.loss.backward()
    eager_grads = _grads(ours)
    ours.zero_grad()
    compiled = torch.compile(ours, fullgraph=True)(tokens, block_sequence_ids=ids, labels=tokens)
    compiled.loss.backward()
    _assert_close(compiled.logits, eager.logits, 1e-5, "compiled logits")
    for name, grad in _grads(ours).items():
        _assert_close(grad, eager_grads[name], 1e-4, f"compiled grad of {name}")


def test_transformers_version_is_checked():
    import warnings

    with pytest.raises(ImportError, match="needs transformers >=5.0,<6, found 4.46.0"):
        ism_hf.check_transformers_version("4.46.0")
    with pytest.warns(UserWarning, match="checked with transformers >=5.19,<5.20, found 5.22.0"):
        ism_hf.check_transformers_version("5.22.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ism_hf.check_transformers_version("5.19.0")
        ism_hf.check_transformers_version()  # the installed (pinned) release
