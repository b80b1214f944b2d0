"""`attn_with_kvcache` on CUDA: the composite of verified pieces, the dedicated kernel (opt-in with
kvcache_kernel=True in ism_ext.config: `ism::_attn_with_kvcache_cuda` through the composite's CUDA entry), and
`IsmCache`
generation and a SmolLM2 chat on a GPU.

Skipped without a CUDA device or without the CUDA prefill kernel (the composite path runs on it).
Outputs start poisoned (NaN); every result is compared with the float64 reference, the cache bytes with
what the call must write.
"""

from __future__ import annotations

import random

import pytest
import torch
from cuda_utils import DEV, assert_nan_where_reference, count_dispatch, cuda_marks, poison_allocator
from reference import assert_close_scaled, reference_attention

import ism_ext
from ism_ext.config import set_kernel_config
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


# ---------------------------------------------------------------------------------------------------------
# The dedicated kernel (ism::_attn_with_kvcache_cuda, opt-in with ism_ext.config kvcache_kernel=True): the calls of
# ism_ext.attn_with_kvcache go to it through the composite's CUDA entry, which counts where each call ran.


@pytest.fixture
def kernel(monkeypatch):
    """Turns the dedicated kernel on; `kernel()` then asserts that every call since ran on it."""
    set_kernel_config(kvcache_kernel=True)
    counts = count_dispatch(monkeypatch.setattr)

    def ran_on_kernel(calls: int | None = None):
        assert counts["composite"] == 0, "a call fell back to the composite"
        assert counts["kernel"] > 0 if calls is None else counts["kernel"] == calls

    return ran_on_kernel


class KvCase:
    """A random call: caches of `layout` with random lengths per sequence, the new rows, kv_limit of `kind`, and
    the expected caches after the append (contiguous view) and the float64 reference."""

    def __init__(self, *, b, lq, hkv, group, head_dim, dtype, cap, layout, kind, seed, lens=None, page_size=16):
        rng = random.Random(seed)
        gen = torch.Generator().manual_seed(seed)
        self.lq, self.dtype, self.layout = lq, dtype, layout
        self.lens = torch.tensor(lens or [rng.randint(0, cap - lq) for _ in range(b)], dtype=torch.int32)
        contig_k, contig_v = (torch.randn(b, cap, hkv, head_dim, generator=gen).to(dtype) for _ in range(2))
        self.q = torch.randn(b, lq, hkv * group, head_dim, generator=gen).to(dtype)
        self.k_new, self.v_new = (torch.randn(b, lq, hkv, head_dim, generator=gen).to(dtype) for _ in range(2))
        self.lim = _limits(kind, self.lens, lq, rng)
        self.exp_k, self.exp_v = contig_k.clone(), contig_v.clone()
        for i, n in enumerate(self.lens.tolist()):
            self.exp_k[i, n:n + lq], self.exp_v[i, n:n + lq] = self.k_new[i], self.v_new[i]
        keys = [self.exp_k[i, :n + lq] for i, n in enumerate(self.lens.tolist())]
        values = [self.exp_v[i, :n + lq] for i, n in enumerate(self.lens.tolist())]
        self.keys, self.values = keys, values
        self.ref_out, self.ref_lse = _reference(self.q, keys, values, self.lim, head_dim**-0.5)
        self.kwargs, self.k_cache, self.v_cache = {}, contig_k, contig_v
        if layout == "batch_idx":  # sequence i in row perm[i] of a larger cache, the other rows untouched
            self.perm = torch.randperm(b + 2, generator=gen)[:b].to(torch.int32)
            self.k_cache, self.v_cache = (torch.randn(b + 2, cap, hkv, head_dim, generator=gen).to(dtype)
                                          for _ in range(2))
            self.k_cache[self.perm.long()], self.v_cache[self.perm.long()] = contig_k, contig_v
            self.kwargs["cache_batch_idx"] = self.perm
        elif layout == "paged":  # pages at a random permutation, plus spare pages that must stay untouched
            pages_per_seq = cap // page_size
            self.table = torch.randperm(b * pages_per_seq + 3, generator=gen)[:b * pages_per_seq]
            self.table = self.table.reshape(b, pages_per_seq).to(torch.int32)
            self.k_cache, self.v_cache = (torch.randn(b * pages_per_seq + 3, page_size, hkv, head_dim,
                                                      generator=gen).to(dtype) for _ in range(2))
            self.k_cache[self.table.long()] = contig_k.reshape(b, pages_per_seq, page_size, hkv, head_dim)
            self.v_cache[self.table.long()] = contig_v.reshape(b, pages_per_seq, page_size, hkv, head_dim)
            self.kwargs["block_table"] = self.table
        self.before_k, self.before_v = self.k_cache.clone(), self.v_cache.clone()

    def run(self, **overrides):
        """The call on the GPU (outputs poisoned first); returns out, lse and the caches, on the CPU."""
        k_cache, v_cache = self.k_cache.to(DEV), self.v_cache.to(DEV)
        kwargs = {name: t.to(DEV) for name, t in self.kwargs.items()}
        args = dict(cache_seqlens=self.lens.to(DEV), kv_limit=self.lim.to(DEV), return_lse=True, **kwargs)
        args.update(overrides)
        b, lq, hq, d = self.q.shape
        poison_allocator(((b, lq, hq, d), self.dtype), ((b, hq, lq), torch.float32))
        out, lse = ism_ext.attn_with_kvcache(self.q.to(DEV), k_cache, v_cache, self.k_new.to(DEV),
                                             self.v_new.to(DEV), **args)
        return out.cpu(), lse.cpu(), k_cache.cpu(), v_cache.cpu()

    def expected_caches(self):
        """The caches as the call must leave them: the new rows written, every other byte as before."""
        k, v = self.before_k.clone(), self.before_v.clone()
        lq = self.lq
        for i, n in enumerate(self.lens.tolist()):
            if self.layout == "paged":
                ps = k.shape[1]
                for t in range(n, n + lq):
                    page = int(self.table[i, t // ps])
                    k[page, t % ps], v[page, t % ps] = self.k_new[i, t - n], self.v_new[i, t - n]
            else:
                row = int(self.perm[i]) if self.layout == "batch_idx" else i
                k[row, n:n + lq], v[row, n:n + lq] = self.k_new[i], self.v_new[i]
        return k, v

    def check(self, out, lse, k_cache, v_cache):
        assert_close_scaled(out, self.ref_out, TOL[self.dtype], "out")
        empty = torch.isneginf(self.ref_lse)
        assert torch.equal(torch.isneginf(lse), empty), "lse must be -inf exactly on the rows that see nothing"
        assert_close_scaled(lse[~empty], self.ref_lse[~empty], TOL[self.dtype], "lse")
        assert torch.all(out[empty.permute(0, 2, 1)] == 0), "rows that see nothing must output 0"
        exp_k, exp_v = self.expected_caches()
        assert torch.equal(k_cache, exp_k) and torch.equal(v_cache, exp_v), "the append wrote the wrong bytes"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("kind", ["segment", "causal", "random"])
@pytest.mark.parametrize("layout", ["rows", "batch_idx", "paged"])
@pytest.mark.parametrize("lq", [1, 3, 16, 70])
def test_kernel_against_float64(lq, layout, kind, group, head_dim, dtype, kernel):
    # lq 1 and group * lq <= 16: the group tile (decode); more packed rows: the rows tile, several per head.
    case = KvCase(b=3, lq=lq, hkv=2, group=group, head_dim=head_dim, dtype=dtype, cap=512, layout=layout, kind=kind,
                  seed=lq * 1000 + group * 10 + head_dim)
    case.check(*case.run())
    kernel(1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["rows", "paged"])
@pytest.mark.parametrize(("lq", "group", "kind"), [(1, 4, "causal"), (1, 8, "random"), (4, 4, "segment"),
                                                   (256, 4, "segment"), (40, 1, "random")])
def test_kernel_splits_the_keys_of_long_caches(lq, group, kind, layout, dtype, kernel):
    # One or two sequences cannot fill the GPU: the keys are split over thread blocks and combined.
    case = KvCase(b=2, lq=lq, hkv=2, group=group, head_dim=128, dtype=dtype, cap=8192, layout=layout, kind=kind,
                  seed=lq + group, lens=[8192 - lq - 5, 3000])
    case.check(*case.run())
    kernel(1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("lq", "group", "cap", "lens"), [(1, 4, 512, None), (70, 1, 512, None),
                                                         (1, 8, 8192, [8192 - 6, 3000])])
def test_kernel_nan_in_a_query_row_gives_a_nan_row(lq, group, cap, lens, dtype, kernel):
    # NaN in, NaN out (issue 27, item 5) on each path of the kernel: the group tile of a decode step (lq 1,
    # warps merged), the rows tile (lq 70), and keys split over blocks and combined (a long cache). One NaN
    # element of the last query row of head 1 in sequence 0 makes that row's output and lse NaN, as in the
    # float64 reference; the other rows match it.
    case = KvCase(b=2, lq=lq, hkv=2, group=group, head_dim=128, dtype=dtype, cap=cap, layout="rows", kind="causal",
                  seed=31 + lq, lens=lens)
    case.q[0, lq - 1, 1, 7] = float("nan")
    ref_out, ref_lse = _reference(case.q, case.keys, case.values, case.lim, 128**-0.5)
    out, lse, *_ = case.run()
    assert_nan_where_reference(out, ref_out, TOL[dtype], "out")
    assert_nan_where_reference(lse, ref_lse, TOL[dtype], "lse")
    kernel(1)


@pytest.mark.parametrize("page_size", [16, 48, 64])
@pytest.mark.parametrize("lq", [1, 5, 100])
def test_kernel_paged_equals_contiguous(lq, page_size, kernel):
    contiguous = KvCase(b=3, lq=lq, hkv=2, group=4, head_dim=128, dtype=torch.bfloat16, cap=960, layout="rows",
                        kind="random", seed=7 + lq)
    paged = KvCase(b=3, lq=lq, hkv=2, group=4, head_dim=128, dtype=torch.bfloat16, cap=960, layout="paged",
                   kind="random", seed=7 + lq, page_size=page_size)
    out_c, lse_c, *_ = contiguous.run()
    out_p, lse_p, k_p, v_p = paged.run()
    assert torch.equal(out_p, out_c) and torch.equal(lse_p, lse_c), "paged must give the contiguous result exactly"
    paged.check(out_p, lse_p, k_p, v_p)
    kernel(2)


def test_kernel_empty_rows_empty_caches_and_attend_only(kernel):
    case = KvCase(b=3, lq=2, hkv=2, group=4, head_dim=64, dtype=torch.float16, cap=256, layout="rows",
                  kind="random", seed=11, lens=[0, 0, 100])
    case.lim[0] = 0  # a sequence none of whose rows sees anything, and an empty cache that sees only itself
    case.lim[1] = torch.tensor([1, 2], dtype=torch.int32)
    keys = [case.exp_k[i, :n + 2] for i, n in enumerate(case.lens.tolist())]
    values = [case.exp_v[i, :n + 2] for i, n in enumerate(case.lens.tolist())]
    case.ref_out, case.ref_lse = _reference(case.q, keys, values, case.lim, 64**-0.5)
    case.check(*case.run())
    # Without new rows: the cache is only read.
    k_cache, v_cache = case.exp_k.to(DEV), case.exp_v.to(DEV)
    lens = case.lens + 2
    out, lse = ism_ext.attn_with_kvcache(case.q.to(DEV), k_cache, v_cache, cache_seqlens=lens.to(DEV),
                                         kv_limit=case.lim.to(DEV), return_lse=True)
    assert_close_scaled(out.cpu(), case.ref_out, TOL[torch.float16], "attend-only out")
    assert torch.equal(k_cache.cpu(), case.exp_k) and torch.equal(v_cache.cpu(), case.exp_v)
    # No sequence at all.
    q0 = torch.zeros(0, 1, 8, 64, dtype=torch.float16, device=DEV)
    out0, lse0 = ism_ext.attn_with_kvcache(q0, k_cache, v_cache, cache_seqlens=torch.zeros(0, dtype=torch.int32,
                                                                                           device=DEV),
                                           return_lse=True)
    assert out0.shape == (0, 1, 8, 64) and lse0.shape == (0, 8, 1)
    kernel(3)


@pytest.mark.parametrize("scale", [-0.3, 0.0, 2.5])
def test_kernel_softmax_scales(scale, kernel):
    case = KvCase(b=2, lq=1, hkv=2, group=4, head_dim=128, dtype=torch.bfloat16, cap=640, layout="rows",
                  kind="causal", seed=13)
    keys = [case.exp_k[i, :n + 1] for i, n in enumerate(case.lens.tolist())]
    values = [case.exp_v[i, :n + 1] for i, n in enumerate(case.lens.tolist())]
    case.ref_out, case.ref_lse = _reference(case.q, keys, values, case.lim, scale)
    case.check(*case.run(softmax_scale=scale))
    kernel(1)


def _bad_calls(case):
    """Calls the op must reject before writing: (overrides of the call, exception, message)."""
    cap = case.k_cache.shape[1]
    too_long = case.lens.clone()
    too_long[1] = cap - case.lq + 1
    lim_high = case.lim.clone()
    lim_high[0, 0] = int(case.lens[0]) + case.lq + 1
    return [(dict(cache_seqlens=too_long.to(DEV)), ValueError, "capacity"),
            (dict(kv_limit=lim_high.to(DEV)), ValueError, "kv_limit"),
            (dict(cache_batch_idx=torch.tensor([1, 1, 0], dtype=torch.int32, device=DEV)), ValueError, "twice|two"),
            (dict(cache_batch_idx=torch.tensor([0, 1, 9], dtype=torch.int32, device=DEV)), ValueError, "cache row")]


@pytest.mark.parametrize("which", range(4))
def test_kernel_rejects_before_writing(which, kernel):
    case = KvCase(b=3, lq=4, hkv=2, group=4, head_dim=64, dtype=torch.bfloat16, cap=64, layout="rows",
                  kind="segment", seed=17, lens=[3, 10, 20])
    overrides, exc, match = _bad_calls(case)[which]
    k_cache, v_cache = case.k_cache.to(DEV), case.v_cache.to(DEV)
    args = {"cache_seqlens": case.lens.to(DEV), "kv_limit": case.lim.to(DEV), **overrides}
    with pytest.raises(exc, match=match):
        ism_ext.attn_with_kvcache(case.q.to(DEV), k_cache, v_cache, case.k_new.to(DEV), case.v_new.to(DEV), **args)
    assert torch.equal(k_cache.cpu(), case.before_k) and torch.equal(v_cache.cpu(), case.before_v)
    kernel(1)


def test_kernel_rejects_shared_written_pages_before_writing(kernel):
    case = KvCase(b=2, lq=3, hkv=2, group=4, head_dim=128, dtype=torch.bfloat16, cap=64, layout="paged",
                  kind="segment", seed=19, lens=[10, 40])
    table = case.table.clone()
    table[1, 2] = table[0, 0]  # sequence 1 writes position 40.. into the page sequence 0 reads
    k_cache, v_cache = case.k_cache.to(DEV), case.v_cache.to(DEV)
    with pytest.raises(ValueError, match="page"):
        ism_ext.attn_with_kvcache(case.q.to(DEV), k_cache, v_cache, case.k_new.to(DEV), case.v_new.to(DEV),
                                  cache_seqlens=case.lens.to(DEV), kv_limit=case.lim.to(DEV),
                                  block_table=table.to(DEV))
    assert torch.equal(k_cache.cpu(), case.before_k) and torch.equal(v_cache.cpu(), case.before_v)
    kernel(1)


def test_kernel_op_rejects_what_it_does_not_cover_and_the_entry_falls_back(monkeypatch):
    set_kernel_config(kvcache_kernel=True)
    case = KvCase(b=2, lq=1, hkv=2, group=4, head_dim=64, dtype=torch.bfloat16, cap=128, layout="rows",
                  kind="causal", seed=23)
    # A cache 2 bytes off a 16-byte boundary: the kernel op refuses it by name, the op's CUDA entry runs the
    # composite instead and gives the right answer.
    storage = torch.zeros(case.k_cache.numel() + 1, dtype=case.dtype, device=DEV)
    k_cache = storage[1:].view(case.k_cache.shape)
    k_cache.copy_(case.k_cache.to(DEV))
    v_cache = case.v_cache.to(DEV)
    with pytest.raises(ValueError, match="16-byte"):
        torch.ops.ism._attn_with_kvcache_cuda(case.q.to(DEV), k_cache, v_cache, case.k_new.to(DEV),
                                              case.v_new.to(DEV), case.lens.to(DEV), case.lim.to(DEV), None, None,
                                              0.125)
    counts = count_dispatch(monkeypatch.setattr)
    out, lse = ism_ext.attn_with_kvcache(case.q.to(DEV), k_cache, v_cache, case.k_new.to(DEV), case.v_new.to(DEV),
                                         cache_seqlens=case.lens.to(DEV), kv_limit=case.lim.to(DEV), return_lse=True)
    assert counts == {"kernel": 0, "composite": 1}
    case.check(out.cpu(), lse.cpu(), k_cache.cpu(), v_cache.cpu())


def test_kernel_matches_the_composite_and_is_not_used_without_the_switch(monkeypatch):
    case = KvCase(b=4, lq=1, hkv=2, group=4, head_dim=128, dtype=torch.bfloat16, cap=2048, layout="paged",
                  kind="causal", seed=29)
    set_kernel_config(kvcache_kernel=False)
    counts = count_dispatch(monkeypatch.setattr)
    composite = case.run()
    assert counts["kernel"] == 0
    set_kernel_config(kvcache_kernel=True)
    dedicated = case.run()
    assert counts["kernel"] == 1
    assert_close_scaled(dedicated[0], composite[0], TOL[torch.bfloat16], "kernel vs composite")
    assert torch.equal(dedicated[2], composite[2]) and torch.equal(dedicated[3], composite[3])


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged16"])
def test_kernel_multi_round_dialogue_equals_recomputation(paged, kernel):
    # Rounds of one bidirectional user segment per sequence, then its answer decoded token by token, on a
    # KVCache on the GPU; every step against the float64 reference over the whole history so far.
    from ism_ext.cache import KVCache

    rng, gen = random.Random(31), torch.Generator().manual_seed(31)
    hkv, hq, d, dtype = 2, 8, 128, torch.bfloat16
    cache = KVCache(1, 2, hkv, d, capacity=1024, dtype=dtype, device=DEV, page_size=16 if paged else None)
    hist_k, hist_v = [torch.zeros(0, hkv, d) for _ in range(2)], [torch.zeros(0, hkv, d) for _ in range(2)]
    ids: list[list[int]] = [[], []]

    def step(seqs, lq, segment, seg_id):
        q = torch.randn(len(seqs), lq, hq, d, generator=gen).to(dtype)
        k, v = (torch.randn(len(seqs), lq, hkv, d, generator=gen).to(dtype) for _ in range(2))
        out = cache.append_and_attend(0, q.to(DEV), k.to(DEV), v.to(DEV), segment=segment, seq_ids=seqs).cpu()
        for i, s in enumerate(seqs):
            hist_k[s], hist_v[s] = torch.cat([hist_k[s], k[i].float()]), torch.cat([hist_v[s], v[i].float()])
            ids[s] += [seg_id if segment else -1] * lq
        lens = [len(ids[s]) for s in seqs]
        cu_k = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(len(seqs))], dtype=torch.int32)
        lim_all = ism_ext.kv_limit_from_segment_ids(torch.tensor([t for s in seqs for t in ids[s]]), cu_k)
        lim = torch.cat([lim_all[int(cu_k[i + 1]) - lq:int(cu_k[i + 1])] for i in range(len(seqs))])
        ref, _ = reference_attention(q.reshape(-1, hq, d).double(), torch.cat([hist_k[s] for s in seqs]).double(),
                                     torch.cat([hist_v[s] for s in seqs]).double(), lim,
                                     torch.arange(len(seqs) + 1, dtype=torch.int32) * lq, cu_k, d**-0.5)
        assert_close_scaled(out, ref.reshape(len(seqs), lq, hq, d), TOL[dtype], f"step {sum(lens)}")

    for r in range(3):
        for s in (0, 1):
            step([s], rng.randint(20, 90), True, r)
        answer = {0: rng.randint(4, 9), 1: rng.randint(4, 9)}
        for t in range(max(answer.values())):
            step([s for s in (0, 1) if t < answer[s]], 1, False, -1)
    kernel()


def test_kernel_opcheck():
    case = KvCase(b=2, lq=3, hkv=2, group=4, head_dim=64, dtype=torch.bfloat16, cap=128, layout="paged",
                  kind="random", seed=37)
    args = (case.q.to(DEV), case.k_cache.to(DEV), case.v_cache.to(DEV), case.k_new.to(DEV), case.v_new.to(DEV),
            case.lens.to(DEV), case.lim.to(DEV), None, case.table.to(DEV), 0.125)
    torch.library.opcheck(torch.ops.ism._attn_with_kvcache_cuda.default, args)


def test_kernel_under_torch_compile(kernel):
    case = KvCase(b=2, lq=1, hkv=2, group=4, head_dim=128, dtype=torch.bfloat16, cap=512, layout="rows",
                  kind="causal", seed=41)

    def decode(q, k_cache, v_cache, k_new, v_new, lens, lim):
        out = ism_ext.attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, kv_limit=lim)
        return out.float() * 2

    tensors = [t.to(DEV) for t in (case.q, case.k_cache, case.v_cache, case.k_new, case.v_new, case.lens, case.lim)]
    eager = decode(*[t.clone() for t in tensors])
    compiled = torch.compile(decode, fullgraph=True)(*tensors)
    torch.testing.assert_close(compiled, eager)
    exp_k, exp_v = case.expected_caches()
    assert torch.equal(tensors[1].cpu(), exp_k) and torch.equal(tensors[2].cpu(), exp_v)
    kernel()


def test_ism_cache_generation_through_the_kernel(kernel):
    test_ism_cache_generation_on_the_gpu_matches_the_cpu()
    kernel()


def test_smollm2_chat_through_the_kernel_gives_the_cpu_tokens(kernel):
    # The real model, patched for ISM, chatting with the cache reused across rounds: greedy tokens on the GPU
    # (bfloat16, through the kernel) are those of the CPU (float32), for answers the model is sure of.
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    import ism_ext.integrations.hf as ism_hf
    from ism_ext.inference import ChatSession
    from ism_ext.integrations.hf.models import load_smollm2

    try:
        stock, tok = load_smollm2("eager")
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        pytest.skip(str(exc))
    answers = {}
    for device, dtype in (("cpu", torch.float32), (DEV, torch.bfloat16)):
        model = ism_hf.apply_ism(__import__("copy").deepcopy(stock)).to(device, dtype)
        session = ChatSession(model, tok, "causal", max_new_tokens=12)
        answers[device] = [session.send(q) for q in ("What is the capital of France? Answer in one word.",
                                                      "And the capital of Italy?")]
    assert answers[DEV] == answers["cpu"]
    assert "paris" in answers[DEV][0].lower()
    kernel()
