"""The switch and the dispatch of the Hopper forward kernel (ism_ext.config hopper_fwd), on a GPU.

The kernel's numbers are tested by the whole forward matrix of test_segment_attention_cuda.py, which
runs every test a second time with the kernel forced; here: the switch is read at every call and the
default stays the sm_80 kernel, a forced kernel that cannot run raises instead of falling back, calls
with no keys go to the sm_80 kernel, views the tensor maps cannot describe as they are (a broadcast
K/V head, fused-QKV strides) give the right numbers, and the two kernels agree with each other.
Skipped without a CUDA device; the tests that run the kernel also need it built and a 9.0 device.
"""

from __future__ import annotations

import pytest
import torch
from cuda_utils import DEV, cuda_marks
from reference import make_case, reference_attention
from test_segment_attention_cuda import TOL, hopper_fwd_available

import ism_ext  # noqa: F401  (registers torch.ops.ism)
from ism_ext.config import set_kernel_config

pytestmark = cuda_marks("segment_attn_fwd")


def _needs_hopper():
    available, why = hopper_fwd_available()
    if not available:
        pytest.skip(why)


def _call(case, **kwargs):
    args = [t.to(DEV) for t in (case.q, case.k, case.v, case.kv_limit, case.cu_seqlens_q, case.cu_seqlens_k)]
    return torch.ops.ism.segment_attn_fwd(*args, None, None, case.softmax_scale, **kwargs)


def test_switch_is_read_at_every_call_and_off_by_default():
    _needs_hopper()
    case = make_case([300, 70], heads_q=4, heads_kv=2, head_dim=128, dtype=torch.bfloat16, limits="ism", seed=1)
    launches = torch.ops.ism._cuda_hopper_fwd_launches
    set_kernel_config(hopper_fwd=False)
    before = launches()
    default = _call(case)
    assert launches() == before
    set_kernel_config(hopper_fwd=True)
    hopper = _call(case)
    torch.cuda.synchronize()
    assert launches() == before + 1
    # Both kernels round P to bf16 before P V and accumulate in float32: close, not bit-equal.
    scale = max(1.0, default[0].abs().max().item())
    assert (hopper[0].float() - default[0].float()).abs().max().item() <= TOL[torch.bfloat16] * scale
    finite = torch.isfinite(default[1])
    assert torch.equal(finite, torch.isfinite(hopper[1]))
    assert (hopper[1][finite] - default[1][finite]).abs().max().item() <= 1e-3


def test_forced_kernel_that_cannot_run_raises(monkeypatch):
    available, _ = hopper_fwd_available()
    if available:
        pytest.skip("this build and device run the Hopper kernel")
    set_kernel_config(hopper_fwd=True)
    case = make_case([40], heads_q=2, head_dim=64, dtype=torch.bfloat16, limits="causal")
    with pytest.raises(RuntimeError, match="hopper_fwd=True"):
        _call(case)


def test_no_keys_at_all_runs_the_default_kernel(monkeypatch):
    _needs_hopper()
    set_kernel_config(hopper_fwd=True)
    case = make_case([5, 9], [0, 0], heads_q=2, head_dim=64, dtype=torch.bfloat16, limits="random", seed=2)
    before = torch.ops.ism._cuda_hopper_fwd_launches()
    out, lse = _call(case)
    torch.cuda.synchronize()
    assert torch.ops.ism._cuda_hopper_fwd_launches() == before
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_views_the_tensor_maps_need_copied_or_described(monkeypatch, head_dim):
    # A K/V head broadcast over the query heads (stride 0: copied), and the strided Q/K/V of a fused
    # QKV projection (described by the tensor maps as they are).
    _needs_hopper()
    set_kernel_config(hopper_fwd=True)
    gen = torch.Generator().manual_seed(3)
    t, h = 333, 4
    lim = torch.randint(0, t + 1, (t,), generator=gen, dtype=torch.int32)
    cu = torch.tensor([0, t], dtype=torch.int32)
    qkv = torch.randn(t, 3, h, head_dim, generator=gen).to(torch.bfloat16)
    one = torch.randn(t, 1, head_dim, generator=gen).to(torch.bfloat16)
    cases = [(qkv[:, 0], qkv[:, 1], qkv[:, 2]), (qkv[:, 0], one.expand(t, h, head_dim), one.expand(t, h, head_dim))]
    for q, k, v in cases:
        ref, _ = reference_attention(q, k, v, lim, cu, cu, head_dim**-0.5)
        qd, kd, vd = q.to(DEV), k.to(DEV), v.to(DEV)
        if k.stride(1) == 0:
            kd, vd = one.to(DEV).expand(t, h, head_dim), one.to(DEV).expand(t, h, head_dim)
        else:
            fused = qkv.to(DEV)
            qd, kd, vd = fused[:, 0], fused[:, 1], fused[:, 2]
        out, _ = torch.ops.ism.segment_attn_fwd(qd, kd, vd, lim.to(DEV), cu.to(DEV), cu.to(DEV), t, t,
                                                head_dim**-0.5)
        err = (out.cpu().double() - ref).abs().max().item()
        assert err <= TOL[torch.bfloat16] * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_long_sequences_agree_with_the_default_kernel(monkeypatch, dtype, head_dim):
    # Many key tiles per query tile (the pipelines wrap around their stages many times), ISM and causal
    # layouts of 4k tokens, against the sm_80 kernel (a float64 reference of this size is slow).
    _needs_hopper()
    for scheme in ("ism", "causal"):
        case = make_case([4096, 1500], [4096, 2100], heads_q=4, heads_kv=1, head_dim=head_dim, dtype=dtype,
                         limits=scheme, seed=head_dim)
        set_kernel_config(hopper_fwd=False)
        default = _call(case)
        set_kernel_config(hopper_fwd=True)
        hopper = _call(case)
        scale = max(1.0, default[0].abs().max().item())
        assert (hopper[0].float() - default[0].float()).abs().max().item() <= TOL[dtype] * scale
        assert (hopper[1] - default[1]).abs().max().item() <= 1e-3
