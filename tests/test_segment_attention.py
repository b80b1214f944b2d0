"""segment_attention forward and backward against the float64 dense-mask reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import Case, assert_close_scaled, make_case, reference_attention

import ism_ext

# (forward atol, gradient atol) relative to the reference's magnitude; inputs are N(0, 1).
TOL = {torch.float32: (2e-5, 5e-5), torch.bfloat16: (2e-2, 4e-2), torch.float16: (3e-3, 6e-3)}
DTYPES = list(TOL)


def _run(case: Case, *, grad: bool, dtype_tol: torch.dtype | None = None, check_lse: bool = True) -> None:
    fwd_tol, grad_tol = TOL[dtype_tol or case.q.dtype]
    q, k, v = (t.clone().requires_grad_(grad) for t in (case.q, case.k, case.v))
    out, lse = ism_ext.segment_attention(
        q, k, v, case.kv_limit, cu_seqlens_q=case.cu_seqlens_q, cu_seqlens_k=case.cu_seqlens_k,
        softmax_scale=case.softmax_scale, return_lse=True,
    )
    qr, kr, vr = (t.double().requires_grad_(grad) for t in (case.q, case.k, case.v))
    ref_out, ref_lse = reference_attention(qr, kr, vr, case.kv_limit, case.cu_seqlens_q, case.cu_seqlens_k,
                                           case.softmax_scale)
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    assert lse.shape == (case.q.shape[1], case.q.shape[0]) and lse.dtype == torch.float32
    assert_close_scaled(out, ref_out, fwd_tol, "out")
    if check_lse:
        empty = torch.isinf(ref_lse)
        assert torch.equal(torch.isneginf(lse), empty), "lse must be -inf exactly on the empty rows"
        assert_close_scaled(lse[~empty], ref_lse[~empty], fwd_tol, "lse")
    if grad:
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
        out.backward(g)
        ref_out.backward(g.double())
        for name, mine, ref in (("dq", q.grad, qr.grad), ("dk", k.grad, kr.grad), ("dv", v.grad, vr.grad)):
            assert mine.dtype == case.q.dtype
            assert_close_scaled(mine, ref, grad_tol, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [32, 64, 80, 128, 256])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_dtypes_head_dims_gqa(dtype, head_dim, group):
    case = make_case([70, 1, 130], heads_q=8, heads_kv=8 // group, head_dim=head_dim, dtype=dtype,
                     limits="random", seed=head_dim * 10 + group)
    _run(case, grad=True)


@pytest.mark.parametrize("scheme", ["ism", "mas", "prefix_lm", "causal", "random", "full", "empty"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layouts(scheme, dtype):
    case = make_case([200, 65, 129, 3], heads_q=4, heads_kv=2, dtype=dtype, limits=scheme, seed=len(scheme))
    _run(case, grad=True)


@pytest.mark.parametrize("scheme", ["ism", "causal", "random"])
def test_queries_shorter_than_keys(scheme):
    # Prefill on top of cached keys: each sequence's queries are its last Lq positions.
    case = make_case([1, 64, 37, 0], [300, 64, 190, 5], heads_q=6, heads_kv=3, limits=scheme, seed=3)
    _run(case, grad=True)


@pytest.mark.parametrize("length", [1, 2, 15, 16, 17, 63, 64, 65, 127, 128, 129, 191, 257])
def test_tile_edge_lengths(length):
    case = make_case([length, length + 1], heads_q=2, limits="ism", seed=length)
    _run(case, grad=True)


def test_empty_rows_give_zero_output_and_gradients():
    case = make_case([90, 40], heads_q=2, limits="random", seed=11)
    case.kv_limit[::3] = 0
    case.kv_limit[90:] = 0  # a whole sequence with nothing visible
    q, k, v = (t.clone().requires_grad_() for t in (case.q, case.k, case.v))
    out, lse = ism_ext.segment_attention(q, k, v, case.kv_limit, cu_seqlens_q=case.cu_seqlens_q,
                                         softmax_scale=case.softmax_scale, return_lse=True)
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    empty = case.kv_limit == 0
    assert torch.all(out[empty] == 0)
    assert torch.all(torch.isneginf(lse[:, empty]))
    assert torch.all(q.grad[empty] == 0)
    # Keys of the second sequence are seen by no query: zero gradients, not NaN.
    assert torch.all(k.grad[90:] == 0) and torch.all(v.grad[90:] == 0)
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()
    _run(case, grad=True)


def test_degenerate_sizes():
    # Zero-length sequences, a sequence with no keys at all, and an empty batch.
    case = make_case([0, 5, 0], [0, 0, 7], heads_q=2, limits="random", seed=1)
    assert torch.all(case.kv_limit[:5] == 0)
    _run(case, grad=True)
    empty = make_case([0], [0], heads_q=2)
    out = ism_ext.segment_attention(empty.q, empty.k, empty.v, empty.kv_limit, cu_seqlens_q=empty.cu_seqlens_q,
                                    cu_seqlens_k=empty.cu_seqlens_k)
    assert out.shape == (0, 2, 64)


def test_gradient_through_lse():
    case = make_case([100, 30], heads_q=4, heads_kv=1, limits="ism", seed=5)
    q, k, v = (t.clone().requires_grad_() for t in (case.q, case.k, case.v))
    out, lse = ism_ext.segment_attention(q, k, v, case.kv_limit, cu_seqlens_q=case.cu_seqlens_q,
                                         softmax_scale=case.softmax_scale, return_lse=True)
    w = torch.randn(lse.shape, generator=torch.Generator().manual_seed(1))
    (out.pow(2).sum() + (lse * w).sum()).backward()
    qr, kr, vr = (t.double().requires_grad_() for t in (case.q, case.k, case.v))
    ro, rl = reference_attention(qr, kr, vr, case.kv_limit, case.cu_seqlens_q, case.cu_seqlens_k,
                                 case.softmax_scale)
    (ro.pow(2).sum() + (rl * w.double()).sum()).backward()
    for mine, ref in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        assert_close_scaled(mine, ref, 5e-5, "grad")
    # lse alone (out unused): grad_out arrives as None.
    q.grad = None
    _, lse = ism_ext.segment_attention(q, k, v, case.kv_limit, cu_seqlens_q=case.cu_seqlens_q, return_lse=True)
    lse.sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def test_batched_form_matches_packed():
    gen = torch.Generator().manual_seed(0)
    b, sq, sk, hq, hkv, d = 3, 50, 80, 4, 2, 32
    q = torch.randn(b, sq, hq, d, generator=gen, requires_grad=True)
    k = torch.randn(b, sk, hkv, d, generator=gen, requires_grad=True)
    v = torch.randn(b, sk, hkv, d, generator=gen, requires_grad=True)
    lim = torch.randint(0, sk + 1, (b, sq), generator=gen, dtype=torch.int32)
    out, lse = ism_ext.segment_attention(q, k, v, lim, return_lse=True)
    assert out.shape == q.shape and lse.shape == (b, hq, sq)
    cu_q = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32)
    cu_k = torch.arange(0, (b + 1) * sk, sk, dtype=torch.int32)
    ref_out, ref_lse = reference_attention(q.reshape(-1, hq, d), k.reshape(-1, hkv, d), v.reshape(-1, hkv, d),
                                           lim.reshape(-1), cu_q, cu_k, d**-0.5)
    assert_close_scaled(out.reshape(-1, hq, d), ref_out, 2e-5, "out")
    finite = torch.isfinite(ref_lse)
    assert_close_scaled(lse.transpose(0, 1).reshape(hq, -1)[finite], ref_lse[finite], 2e-5, "lse")
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


def test_strided_inputs():
    # q/k/v as views of [H, T, D] and of a fused qkv projection: only the last dim is contiguous.
    gen = torch.Generator().manual_seed(2)
    t, h, d = 150, 4, 64
    qkv = torch.randn(t, 3, h, d, generator=gen)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    q2 = torch.randn(h, t, d, generator=gen).transpose(0, 1)
    lim = torch.randint(0, t + 1, (t,), generator=gen, dtype=torch.int32)
    cu = torch.tensor([0, t], dtype=torch.int32)
    for qq in (q, q2):
        out = ism_ext.segment_attention(qq, k, v, lim)
        ref, _ = reference_attention(qq, k, v, lim, cu, cu, d**-0.5)
        assert_close_scaled(out, ref, 2e-5, "out")


def test_backward_is_deterministic_and_thread_count_independent():
    case = make_case([300, 200], heads_q=4, heads_kv=2, limits="ism", seed=9)
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (threads, threads, 1):
            torch.set_num_threads(n)
            q, k, v = (t.clone().requires_grad_() for t in (case.q, case.k, case.v))
            out = ism_ext.segment_attention(q, k, v, case.kv_limit, cu_seqlens_q=case.cu_seqlens_q)
            out.backward(torch.ones_like(out))
            grads.append((out.detach(), q.grad, k.grad, v.grad))
    finally:
        torch.set_num_threads(threads)
    for other in grads[1:]:
        for a, b in zip(grads[0], other, strict=True):
            assert torch.equal(a, b)


def test_default_scale_and_custom_scale():
    case = make_case([40], heads_q=2, head_dim=16, seed=4)
    out = ism_ext.segment_attention(case.q, case.k, case.v, case.kv_limit)
    ref, _ = reference_attention(case.q, case.k, case.v, case.kv_limit, case.cu_seqlens_q, case.cu_seqlens_k,
                                 16**-0.5)
    assert_close_scaled(out, ref, 2e-5, "default scale")
    out = ism_ext.segment_attention(case.q, case.k, case.v, case.kv_limit, softmax_scale=0.3)
    ref, _ = reference_attention(case.q, case.k, case.v, case.kv_limit, case.cu_seqlens_q, case.cu_seqlens_k, 0.3)
    assert_close_scaled(out, ref, 2e-5, "custom scale")


def test_large_scores_do_not_overflow():
    # Scores of several hundred: the online softmax must subtract the running max.
    case = make_case([130], heads_q=2, limits="causal", seed=6, scale=3.0)
    _run(case, grad=True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seqlens=st.lists(st.tuples(st.integers(0, 150), st.integers(0, 60)), min_size=1, max_size=4),
    group=st.sampled_from([1, 2, 4]),
    heads_kv=st.integers(1, 2),
    head_dim=st.sampled_from([8, 24, 64, 96]),
    limits=st.sampled_from(["random", "ism", "mas", "prefix_lm", "causal"]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_fuzz(seqlens, group, heads_kv, head_dim, limits, dtype, seed):
    seqlens_k = [lk for lk, _ in seqlens]
    seqlens_q = [min(lk, lq) for lk, lq in seqlens]
    if limits != "random":
        seqlens_q = [lk if i % 2 else lq for i, (lk, lq) in enumerate(zip(seqlens_k, seqlens_q, strict=True))]
    case = make_case(seqlens_q, seqlens_k, heads_q=heads_kv * group, heads_kv=heads_kv, head_dim=head_dim,
                     dtype=dtype, limits=limits, seed=seed)
    _run(case, grad=True)


@pytest.mark.parametrize("batch, seqlen_q, seqlen_k", [(2, 0, 0), (0, 4, 4), (2, 0, 5), (2, 3, 0)])
def test_batched_form_with_empty_dimensions(batch, seqlen_q, seqlen_k):
    # Empty batches and empty sequences give empty results (and rows that see no key give 0 / -inf), never an
    # error from building the offsets.
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, seqlen_q, 4, 16, generator=gen).requires_grad_()
    k = torch.randn(batch, seqlen_k, 2, 16, generator=gen).requires_grad_()
    v = torch.randn(batch, seqlen_k, 2, 16, generator=gen).requires_grad_()
    lim = torch.zeros(batch, seqlen_q, dtype=torch.int32)
    out, lse = ism_ext.segment_attention(q, k, v, lim, return_lse=True)
    assert out.shape == q.shape and lse.shape == (batch, 4, seqlen_q)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and torch.all(t.grad == 0)


def test_more_queries_than_keys_follow_kv_limit():
    # Nothing assumes where a query sits: a sequence with more queries than keys (here 5 and 3, and an empty
    # sequence before it) attends by kv_limit alone, like the reference.
    case = make_case([0, 5, 3], [2, 3, 1], heads_q=4, heads_kv=2, head_dim=16, limits="random", seed=5)
    assert case.kv_limit.max() <= 3
    _run(case, grad=True)


def test_double_backward_raises_a_clear_error():
    # Before: the second backward returned zeros with only PyTorch's generic "autograd not registered" warning.
    case = make_case([3, 4], heads_q=2, heads_kv=1, head_dim=8, seed=3)
    q, k, v = (t.clone().requires_grad_() for t in (case.q, case.k, case.v))
    out = ism_ext.segment_attention(q, k, v, case.kv_limit, cu_seqlens_q=case.cu_seqlens_q,
                                    cu_seqlens_k=case.cu_seqlens_k)
    dq, = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        dq.sum().backward()
