"""Bad input gives a clear Python exception naming the argument, never a crash or garbage."""

from __future__ import annotations

import pytest
import torch

import ism_ext

T, H, D = 20, 4, 16


def _good(**over):
    gen = torch.Generator().manual_seed(0)
    args = dict(
        q=torch.randn(T, H, D, generator=gen),
        k=torch.randn(T, 2, D, generator=gen),
        v=torch.randn(T, 2, D, generator=gen),
        kv_limit=torch.arange(1, T + 1, dtype=torch.int32),
        cu_seqlens_q=torch.tensor([0, 12, T], dtype=torch.int32),
        cu_seqlens_k=torch.tensor([0, 12, T], dtype=torch.int32),
    )
    args["kv_limit"][12:] -= 12
    args.update(over)
    return args


def _call(args):
    q, k, v, lim = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("kv_limit")
    return ism_ext.segment_attention(q, k, v, lim, **args)


def test_good_arguments_pass():
    assert _call(_good()).shape == (T, H, D)


CASES = [
    # (description, overrides, exception, message fragment)
    ("q rank", dict(q=torch.randn(T, H * D)), ValueError, "q must be"),
    ("k rank", dict(k=torch.randn(T, 2, D, 1)), ValueError, "k must have shape"),
    ("v rank", dict(v=torch.randn(T, 2 * D)), ValueError, "v must have shape"),
    ("head dims differ", dict(k=torch.randn(T, 2, 8), v=torch.randn(T, 2, 8)), ValueError, "head_dim"),
    ("k/v shapes differ", dict(v=torch.randn(T, 1, D)), ValueError, "k and v must have the same shape"),
    ("heads not a multiple", dict(k=torch.randn(T, 3, D), v=torch.randn(T, 3, D)), ValueError, "multiple"),
    ("head_dim too large", dict(q=torch.randn(T, H, 264), k=torch.randn(T, 2, 264), v=torch.randn(T, 2, 264)),
     ValueError, "head_dim must be in"),
    ("dtype mix", dict(k=torch.randn(T, 2, D, dtype=torch.bfloat16)), TypeError, "k has dtype"),
    ("v dtype mix", dict(v=torch.randn(T, 2, D, dtype=torch.float16)), TypeError, "v has dtype"),
    ("float64", dict(q=torch.randn(T, H, D, dtype=torch.float64), k=torch.randn(T, 2, D, dtype=torch.float64),
                     v=torch.randn(T, 2, D, dtype=torch.float64)), TypeError, "q must be float32"),
    ("kv_limit int64", dict(kv_limit=torch.ones(T, dtype=torch.int64)), TypeError, "kv_limit must be int32"),
    ("kv_limit length", dict(kv_limit=torch.ones(T - 1, dtype=torch.int32)), ValueError, "kv_limit must have one"),
    ("kv_limit 2-D", dict(kv_limit=torch.ones(T, 1, dtype=torch.int32)), ValueError, "kv_limit must be 1-D"),
    ("kv_limit above seqlen_k", dict(kv_limit=torch.full((T,), 13, dtype=torch.int32)), ValueError,
     "kv_limit[0] = 13 is outside"),
    ("kv_limit negative", dict(kv_limit=torch.full((T,), -1, dtype=torch.int32)), ValueError,
     "kv_limit[0] = -1 is outside"),
    ("cu_seqlens int64", dict(cu_seqlens_q=torch.tensor([0, 12, T])), TypeError, "cu_seqlens_q must be int32"),
    ("cu_seqlens_k int64", dict(cu_seqlens_k=torch.tensor([0, 12, T])), TypeError, "cu_seqlens_k must be int32"),
    ("cu_seqlens lengths differ", dict(cu_seqlens_k=torch.tensor([0, T], dtype=torch.int32)), ValueError,
     "same length"),
    ("cu_seqlens end", dict(cu_seqlens_q=torch.tensor([0, 12, T - 1], dtype=torch.int32)), ValueError,
     "cu_seqlens_q must end at total_q"),
    ("cu_seqlens_k end", dict(cu_seqlens_k=torch.tensor([0, 12, T + 1], dtype=torch.int32)), ValueError,
     "cu_seqlens_k must end at total_k"),
    ("cu_seqlens start", dict(cu_seqlens_q=torch.tensor([1, 12, T], dtype=torch.int32)), ValueError,
     "cu_seqlens_q must start at 0"),
    ("cu_seqlens decreasing", dict(cu_seqlens_q=torch.tensor([0, 15, 10, T], dtype=torch.int32),
                                   cu_seqlens_k=torch.tensor([0, 5, 10, T], dtype=torch.int32)), ValueError,
     "cu_seqlens_q must be non-decreasing"),
    ("cu_seqlens 2-D", dict(cu_seqlens_q=torch.tensor([[0, 12, T]], dtype=torch.int32)), ValueError,
     "cu_seqlens_q must be 1-D"),
    ("cu_seqlens_k only", dict(cu_seqlens_q=None), ValueError, "cu_seqlens_k was given without cu_seqlens_q"),
    ("max_seqlen_q too small", dict(max_seqlen_q=5), ValueError, "max_seqlen_q = 5 is smaller"),
    ("max_seqlen_k too small", dict(max_seqlen_k=11), ValueError, "max_seqlen_k = 11 is smaller"),
    ("scale NaN", dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be finite"),
    # Finite as a double but inf as the float32 the kernels use.
    ("scale overflows float32", dict(softmax_scale=1e39), ValueError, "softmax_scale must be finite as a float32"),
    ("last dim strided", dict(q=torch.randn(T, H, 2 * D)[..., ::2]), ValueError,
     "q must be contiguous in its last dimension"),
    ("k last dim strided", dict(k=torch.randn(T, 2, D, 2)[..., 0]), ValueError,
     "k must be contiguous in its last dimension"),
    ("k on another device", dict(k=torch.randn(T, 2, D, device="meta")), ValueError, "k is on meta"),
    ("kv_limit on another device", dict(kv_limit=torch.ones(T, dtype=torch.int32, device="meta")), ValueError,
     "kv_limit is on meta"),
    ("cu_seqlens on another device", dict(cu_seqlens_q=torch.tensor([0, 12, T], dtype=torch.int32, device="meta")),
     ValueError, "cu_seqlens_q is on meta"),
    ("k not a tensor", dict(k=[1, 2]), TypeError, "k must be a torch.Tensor"),
]


@pytest.mark.parametrize("over,exc,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_argument(over, exc, fragment):
    with pytest.raises(exc, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        _call(_good(**over))


BATCHED = [
    ("batched kv_limit shape", dict(kv_limit=torch.ones(2, 9, dtype=torch.int32)), "kv_limit must have shape"),
    ("batched with cu_seqlens", dict(cu_seqlens_q=torch.tensor([0, 10, 20], dtype=torch.int32)),
     "for the packed form"),
    ("batched k rank", dict(k=torch.randn(20, 2, D)), "batched q"),
    ("batched batch mismatch", dict(k=torch.randn(3, 10, 2, D)), "batch size"),
]


@pytest.mark.parametrize("over,fragment", [c[1:] for c in BATCHED], ids=[c[0] for c in BATCHED])
def test_bad_batched_argument(over, fragment):
    args = dict(q=torch.randn(2, 10, H, D), k=torch.randn(2, 10, 2, D), v=torch.randn(2, 10, 2, D),
                kv_limit=torch.ones(2, 10, dtype=torch.int32))
    args.update(over)
    with pytest.raises(ValueError, match=fragment):
        _call(args)


def test_bad_backward_arguments():
    a = _good()
    out, lse = torch.ops.ism.segment_attn_fwd(a["q"], a["k"], a["v"], a["kv_limit"], a["cu_seqlens_q"],
                                              a["cu_seqlens_k"], None, None, 0.25)
    rest = (a["kv_limit"], a["cu_seqlens_q"], a["cu_seqlens_k"], None, None, 0.25)
    bwd = torch.ops.ism.segment_attn_bwd
    with pytest.raises(ValueError, match="dout must have the shape of q"):
        bwd(out[:-1], None, a["q"], a["k"], a["v"], out, lse, *rest)
    with pytest.raises(TypeError, match="dout has dtype"):
        bwd(out.double(), None, a["q"], a["k"], a["v"], out, lse, *rest)
    with pytest.raises(TypeError, match="lse must be float32"):
        bwd(out, None, a["q"], a["k"], a["v"], out, lse.double(), *rest)
    with pytest.raises(ValueError, match="lse must have shape"):
        bwd(out, None, a["q"], a["k"], a["v"], out, lse.t(), *rest)
    with pytest.raises(ValueError, match="dlse must have shape"):
        bwd(out, lse[:1], a["q"], a["k"], a["v"], out, lse, *rest)
    with pytest.raises(ValueError, match="softmax_scale must be finite as a float32"):
        bwd(out, None, a["q"], a["k"], a["v"], out, lse, *rest[:-1], 1e39)
