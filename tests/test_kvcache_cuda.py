"""`attn_with_kvcache` on CUDA (the composite of verified pieces) and `IsmCache` generation on a GPU.

Skipped without a CUDA device or without the CUDA prefill kernel (the composite path runs on it).
Outputs start poisoned (NaN); every result is compared with the float64 reference, the cache bytes with
what the call must write.
"""

from __future__ import annotations

import random

import pytest
import torch
from cuda_utils import DEV, cuda_marks, poison_allocator
from reference import assert_close_scaled, reference_attention

import ism_ext
from ism_ext.masks import kv_limit_causal_append, kv_limit_new_segment

pytestmark = cuda_marks("segment_attn_fwd")
TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3}


def _limits(kind: str, lens: torch.Tensor, lq: int, rng: random.Random) -> torch.Tensor:
    if kind == "segment":
        return kv_limit_new_segment(lens, lq)
    if kind == "causal":
        return kv_limit_causal_append(lens, lq)
    return torch.tensor([[rng.randint(0, int(n) + lq) for _ in range(lq)] for n in lens], dtype=torch.int32)


def _reference(q, keys, values, kv_limit, scale):
    b, lq, hq, d = q.shape
    cu_q = torch.arange(b + 1, dtype=torch.int32) * lq
    cu_k = torch.tensor([0] + torch.tensor([k.shape[0] for k in keys]).cumsum(0).tolist(), dtype=torch.int32)
    out, lse = reference_attention(q.reshape(b * lq, hq, d).double(), torch.cat(keys).double(),
                                   torch.cat(values).double(), kv_limit.reshape(-1), cu_q, cu_k, scale)
    return out.reshape(b, lq, hq, d), lse.reshape(hq, b, lq).permute(1, 0, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("kind", ["segment", "causal", "random"])
@pytest.mark.parametrize("layout", ["rows", "batch_idx", "paged"])
@pytest.mark.parametrize("lq", [1, 70])
def test_composite_against_float64(lq, layout, kind, group, head_dim, dtype):
    rng = random.Random(lq + group + head_dim)
    gen = torch.Generator().manual_seed(rng.randint(0, 1000))
    b, hkv, cap, ps = 3, 2, 512, 16
    hq = hkv * group
    lens = torch.tensor([rng.randint(0, 300) for _ in range(b)], dtype=torch.int32)
    contig = torch.randn(b, cap, hkv, head_dim, generator=gen).to(dtype)
    contig_v = torch.randn(b, cap, hkv, head_dim, generator=gen).to(dtype)
    q, k_new, v_new = (torch.randn(b, lq, h, head_dim, generator=gen).to(dtype) for h in (hq, hkv, hkv))
    lim = _limits(kind, lens, lq, rng)
    keys = [torch.cat([contig[i, : lens[i]], k_new[i]]) for i in range(b)]
    values = [torch.cat([contig_v[i, : lens[i]], v_new[i]]) for i in range(b)]
    ref_out, ref_lse = _reference(q, keys, values, lim, head_dim**-0.5)

    kwargs, k_cache, v_cache = {}, contig.clone(), contig_v.clone()
    if layout == "batch_idx":  # sequence i lives in row perm[i] of a larger cache
        perm = torch.tensor([2, 0, 3], dtype=torch.int32)
        k_cache, v_cache = (torch.zeros(4, cap, hkv, head_dim, dtype=dtype) for _ in range(2))
        k_cache[perm.long()], v_cache[perm.long()] = contig, contig_v
        kwargs["cache_batch_idx"] = perm.to(DEV)
    elif layout == "paged":
        pages = torch.randperm(b * cap // ps, generator=gen).reshape(b, cap // ps).to(torch.int32)
        k_cache, v_cache = (torch.zeros(b * cap // ps, ps, hkv, head_dim, dtype=dtype) for _ in range(2))
        k_cache[pages.long()] = contig.reshape(b, cap // ps, ps, hkv, head_dim)
        v_cache[pages.long()] = contig_v.reshape(b, cap // ps, ps, hkv, head_dim)
        kwargs["block_table"] = pages.to(DEV)
    k_cache, v_cache = k_cache.to(DEV), v_cache.to(DEV)
    poison_allocator(((b, lq, hq, head_dim), dtype), ((b, hq, lq), torch.float32))
    out, lse = ism_ext.attn_with_kvcache(q.to(DEV), k_cache, v_cache, k_new.to(DEV), v_new.to(DEV),
                                         cache_seqlens=lens.to(DEV), kv_limit=lim.to(DEV), return_lse=True, **kwargs)
    assert_close_scaled(out.cpu(), ref_out, TOL[dtype], "out")
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse.cpu()), empty)
    assert_close_scaled(lse.cpu()[~empty], ref_lse[~empty], TOL[dtype], "lse")


def test_composite_writes_exactly_the_new_rows_and_rejects_before_writing():
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(2, 64, 2, 64, generator=gen).to(torch.bfloat16).to(DEV)
    v_cache = torch.randn_like(k_cache)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    q, k_new, v_new = (torch.randn(2, 5, h, 64, generator=gen).to(torch.bfloat16).to(DEV) for h in (4, 2, 2))
    lens = torch.tensor([10, 59], dtype=torch.int32, device=DEV)  # row 1 would overflow: 59 + 5 > 64
    with pytest.raises(ValueError, match="capacity"):
        ism_ext.attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens)
    assert torch.equal(k_cache, before_k) and torch.equal(v_cache, before_v)
    lens = torch.tensor([10, 20], dtype=torch.int32, device=DEV)
    ism_ext.attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens)
    for b, n in enumerate((10, 20)):
        assert torch.equal(k_cache[b, n:n + 5], k_new[b]) and torch.equal(v_cache[b, n:n + 5], v_new[b])
        assert torch.equal(k_cache[b, :n], before_k[b, :n]) and torch.equal(k_cache[b, n + 5:], before_k[b, n + 5:])


def test_ism_cache_generation_on_the_gpu_matches_the_cpu():
    transformers = pytest.importorskip("transformers")
    import ism_ext.integrations.hf  # noqa: F401

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   pad_token_id=0, eos_token_id=1)
    cpu = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="ism").eval()
    gpu = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="ism").eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.to(DEV, torch.float16)
    tokens = torch.randint(2, 96, (2, 40))
    mask = torch.ones_like(tokens)
    mask[1, :7] = 0
    blocks = torch.tensor([[0] * 20 + [-1] * 10 + [1] * 10] * 2)
    args = dict(block_sequence_ids=blocks, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                return_dict_in_generate=True, output_logits=True)
    ref = cpu.generate(tokens, attention_mask=mask, **args)
    out = gpu.generate(tokens.to(DEV), attention_mask=mask.to(DEV), **{**args, "block_sequence_ids": blocks.to(DEV)})
    # fp16 against fp32: the first step's logits within fp16 tolerance, greedy tokens nearly all the same.
    assert_close_scaled(out.logits[0].float().cpu(), ref.logits[0], 2e-2, "first step logits")
    agree = (out.sequences.cpu() == ref.sequences).float().mean().item()
    assert agree > 0.9, f"GPU fp16 and CPU fp32 greedy tokens agree on only {agree:.0%}"
