"""The torch.ops.ism registrations: schemas, fake kernels, autograd (opcheck) and torch.compile."""

from __future__ import annotations

import pytest
import torch
from reference import make_case, reference_attention

import ism_ext


def _fwd_args(case, requires_grad=False):
    q, k, v = (t.clone().requires_grad_(requires_grad) for t in (case.q, case.k, case.v))
    return (q, k, v, case.kv_limit, case.cu_seqlens_q, case.cu_seqlens_k, None, None, case.softmax_scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_forward(dtype, requires_grad):
    case = make_case([40, 7], heads_q=4, heads_kv=2, head_dim=32, dtype=dtype, limits="ism")
    torch.library.opcheck(torch.ops.ism.segment_attn_fwd.default, _fwd_args(case, requires_grad))


def test_opcheck_forward_with_max_seqlens():
    case = make_case([40, 7], [60, 7], heads_q=2, head_dim=16, limits="causal")
    args = list(_fwd_args(case, True))
    args[6:8] = [40, 60]
    torch.library.opcheck(torch.ops.ism.segment_attn_fwd.default, tuple(args))


@pytest.mark.parametrize("with_dlse", [False, True])
def test_opcheck_backward(with_dlse):
    case = make_case([33, 20], heads_q=4, heads_kv=1, head_dim=16, limits="random")
    out, lse = torch.ops.ism.segment_attn_fwd(*_fwd_args(case))
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse) if with_dlse else None
    torch.library.opcheck(
        torch.ops.ism.segment_attn_bwd.default,
        (dout, dlse, case.q, case.k, case.v, out, lse, case.kv_limit, case.cu_seqlens_q, case.cu_seqlens_k,
         None, None, case.softmax_scale),
    )


def test_torch_compile_fullgraph_forward_and_backward():
    case = make_case([96], heads_q=4, heads_kv=2, head_dim=32, limits="ism")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def layer(q, k, v, kv_limit):
        return ism_ext.segment_attention(q, k, v, kv_limit).square().sum()

    q, k, v = (t.clone().requires_grad_() for t in (case.q, case.k, case.v))
    layer(q, k, v, case.kv_limit).backward()
    qr, kr, vr = (t.double().requires_grad_() for t in (case.q, case.k, case.v))
    ref, _ = reference_attention(qr, kr, vr, case.kv_limit, case.cu_seqlens_q, case.cu_seqlens_k, 32**-0.5)
    ref.square().sum().backward()
    torch.testing.assert_close(q.grad.double(), qr.grad, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(k.grad.double(), kr.grad, atol=5e-5, rtol=1e-4)


def test_torch_compile_inductor_batched_and_packed():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 40, 4, 16, generator=gen)
    k = torch.randn(2, 40, 2, 16, generator=gen)
    v = torch.randn(2, 40, 2, 16, generator=gen)
    lim = torch.randint(0, 41, (2, 40), generator=gen, dtype=torch.int32)
    cu = torch.tensor([0, 40, 80], dtype=torch.int32)

    @torch.compile(fullgraph=True)
    def both(q, k, v, lim):
        batched = ism_ext.segment_attention(q, k, v, lim)
        packed = ism_ext.segment_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), lim.flatten(),
                                           cu_seqlens_q=cu)
        return batched * 2, packed + 1

    batched, packed = both(q, k, v, lim)
    eager = ism_ext.segment_attention(q, k, v, lim)
    torch.testing.assert_close(batched, eager * 2)
    torch.testing.assert_close(packed, eager.flatten(0, 1) + 1)


def _kvcache_args(paged: bool, append: bool, batch_idx: bool):
    gen = torch.Generator().manual_seed(1)
    b, lq, hq, hkv, d = 2, 3, 4, 2, 16
    rows, cap = (8, 16) if paged else (3, 40)  # paged: 8 pages of 16 tokens
    k_cache = torch.randn(rows, cap, hkv, d, generator=gen)
    v_cache = torch.randn(rows, cap, hkv, d, generator=gen)
    q = torch.randn(b, lq, hq, d, generator=gen)
    k_new, v_new = (torch.randn(b, lq, hkv, d, generator=gen) for _ in range(2)) if append else (None, None)
    seqlens = torch.tensor([5, 20], dtype=torch.int32)
    limit = ism_ext.kv_limit_causal_append(seqlens, lq) if append else seqlens[:, None].expand(b, lq).contiguous()
    idx = torch.tensor([2, 0], dtype=torch.int32) if batch_idx else None
    table = torch.tensor([[3, 1], [6, 4]], dtype=torch.int32) if paged else None
    return (q, k_cache, v_cache, k_new, v_new, seqlens, limit, idx, table, d**-0.5)


@pytest.mark.parametrize("paged, append, batch_idx", [(False, True, False), (False, True, True),
                                                       (True, True, False), (False, False, False)])
def test_opcheck_attn_with_kvcache(paged, append, batch_idx):
    # Also checks the schema's mutation marks: the op writes k_cache / v_cache (a!) (b!) and nothing else.
    torch.library.opcheck(torch.ops.ism.attn_with_kvcache.default, _kvcache_args(paged, append, batch_idx))


def test_attn_with_kvcache_schema_marks_the_caches_mutable():
    schema = torch.ops.ism.attn_with_kvcache.default._schema
    mutable = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert mutable == ["k_cache", "v_cache"]
