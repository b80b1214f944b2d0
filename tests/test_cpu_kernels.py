"""The CPU kernels' instruction-set builds, NaN propagation and half-precision gradient accuracy."""

from __future__ import annotations

import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from reference import assert_close_scaled, make_case, reference_attention

import ism_ext

TESTS = pathlib.Path(__file__).resolve().parent


def _cpuinfo(field: str) -> str:
    """The first value of `field` in /proc/cpuinfo ("" where there is none)."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


FLAGS = set(_cpuinfo("flags").split())
HAS_AVX2 = {"avx2", "fma", "f16c"} <= FLAGS
HAS_AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= FLAGS
# The bfloat16 dot-product build runs where VDPBF16PS outpaces the FMAs: AMD's cores (cpu_dispatch.cpp).
HAS_FAST_AVX512_BF16 = HAS_AVX512 and "avx512_bf16" in FLAGS and _cpuinfo("vendor_id") == "AuthenticAMD"
WIDEST_AVX512 = "avx512_bf16" if HAS_FAST_AVX512_BF16 else "avx512"  # ATen's AVX512 level runs this build


BUILDS = ("generic", "avx2", "avx512", "avx512_bf16")  # narrowest to widest


def _expected_isa(capability: str, cap: str = "") -> str:
    """The build the dispatch must choose at ATen's `capability`, under ISM_CPU_ISA=`cap` ("": unset)."""
    allowed = BUILDS.index(cap) if cap else len(BUILDS) - 1
    if capability == "AVX512" and HAS_AVX512:
        for build in (WIDEST_AVX512, "avx512"):
            if BUILDS.index(build) <= allowed:
                return build
    if capability in ("AVX2", "AVX512") and HAS_AVX2 and allowed >= BUILDS.index("avx2"):
        return "avx2"
    return "generic"


@pytest.mark.skipif(not FLAGS, reason="needs /proc/cpuinfo (Linux)")
def test_dispatch_picks_the_widest_allowed_build():
    chosen = torch.ops.ism.cpu_kernel_isa()
    assert chosen == _expected_isa(torch.backends.cpu.get_cpu_capability(), os.environ.get("ISM_CPU_ISA", ""))
    if HAS_AVX2 and "ATEN_CPU_CAPABILITY" not in os.environ and "ISM_CPU_ISA" not in os.environ:
        wide_enough = ("avx2", "avx512", "avx512_bf16")
        assert chosen in wide_enough, f"an AVX2 machine must run the AVX2 (or wider) kernels, ran {chosen}"


# (ATEN_CPU_CAPABILITY, ISM_CPU_ISA, the build that runs, whether this CPU runs it). ISM_CPU_ISA=avx512 is the
# one way to the plain avx512 build on a CPU that takes avx512_bf16.
LEVELS = [
    ("default", "", "generic", True),
    ("avx2", "", "avx2", HAS_AVX2),
    ("avx512", "", WIDEST_AVX512, HAS_AVX512),
    ("avx512", "avx512", "avx512", HAS_FAST_AVX512_BF16),
]


def _run_kernel_checks(capability: str, cap: str) -> subprocess.CompletedProcess:
    """kernel_checks.main() in a fresh process (the build is chosen once per process) under the two caps."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "ISM_CPU_ISA": cap, "OMP_NUM_THREADS": "2"}
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import kernel_checks; kernel_checks.main()"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("capability,cap,isa,runs_here", LEVELS, ids=[f"{lvl[0]}-{lvl[2]}" for lvl in LEVELS])
def test_every_build_matches_the_reference(capability, cap, isa, runs_here):
    """Each build the machine can run, capped by ATEN_CPU_CAPABILITY (and ISM_CPU_ISA), against float64."""
    if not runs_here:
        pytest.skip(f"this CPU does not run the {isa} build")
    run = _run_kernel_checks(capability, cap)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert run.stdout.split()[-2:] == [isa, "ok"], run.stdout


@pytest.mark.skipif(not FLAGS, reason="needs /proc/cpuinfo (Linux)")
@pytest.mark.parametrize("cap", BUILDS)
def test_ism_cpu_isa_caps_the_build(cap):
    """ISM_CPU_ISA picks the widest build up to it that ATen's capability and the CPU allow."""
    code = "import torch, ism_ext; print(torch.backends.cpu.get_cpu_capability(), torch.ops.ism.cpu_kernel_isa())"
    env = {**os.environ, "ISM_CPU_ISA": cap}
    env.pop("ATEN_CPU_CAPABILITY", None)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    capability, chosen = run.stdout.split()[-2:]
    assert chosen == _expected_isa(capability, cap)


def test_an_unknown_ism_cpu_isa_is_refused_by_name():
    """A misspelt cap is an error that names the variable and the builds, raised before any kernel runs."""
    code = (
        "import torch, ism_ext\n"
        "q = torch.randn(1, 8, 2, 64)\n"
        "try:\n"
        "    ism_ext.segment_attention(q, q, q, torch.arange(1, 9, dtype=torch.int32)[None])\n"
        "except RuntimeError as e:\n"
        "    print('refused:', e)\n"
    )
    env = {**os.environ, "ISM_CPU_ISA": "avx3"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "refused:" in run.stdout and "ISM_CPU_ISA='avx3'" in run.stdout, run.stdout
    assert "avx512_bf16" in run.stdout, run.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_nan_in_a_query_row_gives_nan_out(dtype):
    case = make_case([40, 70], heads_q=2, heads_kv=1, head_dim=64, dtype=dtype, limits="causal", seed=3)
    q = case.q.clone()
    q[50, 1, 7] = float("nan")  # sequence 1, position 10, head 1: sees 11 keys
    q, k, v = (t.clone().requires_grad_(True) for t in (q, case.k, case.v))
    out, lse = ism_ext.segment_attention(q, k, v, case.kv_limit, cu_seqlens_q=case.cu_seqlens_q,
                                         cu_seqlens_k=case.cu_seqlens_k, return_lse=True)
    assert torch.isnan(out[50, 1]).all() and torch.isnan(lse[1, 50])
    others = torch.ones(out.shape[:2], dtype=torch.bool)
    others[50, 1] = False
    assert torch.isfinite(out[others]).all(), "NaN must stay in its row"
    out.backward(torch.ones_like(out))
    assert torch.isnan(q.grad[50, 1]).all()
    assert torch.isnan(k.grad[40:51, 0]).any() and torch.isnan(v.grad[40:51, 0]).any()
    assert torch.isfinite(q.grad[:40]).all() and torch.isfinite(k.grad[:40]).all(), "other sequences stay finite"


def test_nan_in_the_cache_op():
    q = torch.randn(2, 1, 4, 32)
    q[1, 0, 2, 5] = float("nan")
    k_cache, v_cache = torch.randn(2, 64, 2, 32), torch.randn(2, 64, 2, 32)
    lens = torch.tensor([10, 20], dtype=torch.int32)
    out, lse = ism_ext.attn_with_kvcache(q, k_cache, v_cache, torch.randn(2, 1, 2, 32), torch.randn(2, 1, 2, 32),
                                         cache_seqlens=lens, return_lse=True)
    assert torch.isnan(out[1, 0, 2]).all() and torch.isnan(lse[1, 2, 0])
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1, 0, [0, 1, 3]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("group", [1, 2, 8])
def test_nan_key_reaches_only_the_rows_that_see_it(group, dtype):
    """A NaN in a new key of K/V head 0 at position len + 1: the second new row of that head's queries sees it and
    is NaN; the first row (kv_limit len + 1) and the other head's rows stay finite, in the decode paths."""
    hkv, d, lens = 2, 32, torch.tensor([130], dtype=torch.int32)
    q = torch.randn(1, 2, group * hkv, d, dtype=dtype)
    k_cache, v_cache = torch.randn(1, 200, hkv, d, dtype=dtype), torch.randn(1, 200, hkv, d, dtype=dtype)
    k_new, v_new = torch.randn(1, 2, hkv, d, dtype=dtype), torch.randn(1, 2, hkv, d, dtype=dtype)
    k_new[0, 1, 0, 3] = float("nan")
    limit = lens[:, None] + torch.tensor([[1, 2]], dtype=torch.int32)
    out, lse = ism_ext.attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, kv_limit=limit,
                                         return_lse=True)
    assert torch.isnan(out[0, 1, :group]).all() and torch.isnan(lse[0, :group, 1]).all()
    assert torch.isfinite(out[0, 0]).all() and torch.isfinite(lse[0, :, 0]).all()
    assert torch.isfinite(out[0, 1, group:]).all() and torch.isfinite(lse[0, group:, 1]).all()


def test_nan_in_a_row_that_sees_nothing_stays_empty():
    """kv_limit = 0 decides first: nothing is read, so the row is 0 with lse -inf whatever its query holds."""
    q, k, v = torch.randn(4, 1, 16), torch.randn(4, 1, 16), torch.randn(4, 1, 16)
    q[0] = float("nan")
    lim = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    out, lse = ism_ext.segment_attention(q, k, v, lim, cu_seqlens_q=cu, cu_seqlens_k=cu, return_lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0, 0])


FLOOR = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}  # gradients
FWD_FLOOR = {torch.float32: 2e-7, torch.float16: 1e-4, torch.bfloat16: 1e-3}  # about half the errors seen


def _sdpa_math(case, q, k, v):
    """PyTorch's math path on the case's packed layout (one dense mask over all sequences, each row seeing keys of
    its own sequence below its kv_limit), in the tensors' dtype: [total_q, heads, D]."""
    group = q.shape[1] // k.shape[1]
    seq_of_q = torch.repeat_interleave(torch.arange(case.cu_seqlens_q.numel() - 1), case.cu_seqlens_q.diff().long())
    seq_of_k = torch.repeat_interleave(torch.arange(case.cu_seqlens_k.numel() - 1), case.cu_seqlens_k.diff().long())
    key_in_seq = torch.arange(k.shape[0]) - case.cu_seqlens_k.long()[seq_of_k]
    mask = (seq_of_q[:, None] == seq_of_k[None, :]) & (key_in_seq[None, :] < case.kv_limit.long()[:, None])
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.repeat_interleave(group, 1).transpose(0, 1),
                                             v.repeat_interleave(group, 1).transpose(0, 1), attn_mask=mask,
                                             scale=case.softmax_scale)
    return out.transpose(0, 1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [2, 40, 64, 128, 256])
@pytest.mark.parametrize("limits", ["causal", "ism", "mas"])
def test_forward_as_accurate_as_pytorch_in_the_same_dtype(dtype, head_dim, limits):
    """Forward error against float64 at most twice PyTorch's math path's in the same dtype, plus a floor: the
    bfloat16 forward on the AVX512_BF16 dot product rounds P to bfloat16 (pair_path.h), the others do not."""
    case = make_case([300, 1, 131], heads_q=4, heads_kv=2, head_dim=head_dim, dtype=dtype, limits=limits,
                     seed=head_dim + len(limits))
    ref, _ = reference_attention(case.q.double(), case.k.double(), case.v.double(), case.kv_limit,
                                 case.cu_seqlens_q, case.cu_seqlens_k, case.softmax_scale)
    out = ism_ext.segment_attention(case.q, case.k, case.v, case.kv_limit, cu_seqlens_q=case.cu_seqlens_q,
                                    cu_seqlens_k=case.cu_seqlens_k, softmax_scale=case.softmax_scale)
    mine, theirs = _rel(out, ref), _rel(_sdpa_math(case, case.q, case.k, case.v), ref)
    assert mine <= 2 * theirs + FWD_FLOOR[dtype], f"out: {mine:.3g} vs PyTorch math {theirs:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_keys_at_an_odd_row_stride(dtype):
    """K and V rows 65 elements apart: bfloat16 pairs cannot be read in place at an odd stride and are copied."""
    case = make_case([200, 57], heads_q=2, heads_kv=1, head_dim=64, dtype=dtype, limits="ism", seed=5)
    wide = [torch.cat([t, torch.zeros(t.shape[0], 1, 1, dtype=dtype)], dim=2) for t in (case.k, case.v)]
    k, v = (t[..., :64] for t in wide)
    assert k.stride(0) == 65
    ref, _ = reference_attention(case.q.double(), case.k.double(), case.v.double(), case.kv_limit,
                                 case.cu_seqlens_q, case.cu_seqlens_k, case.softmax_scale)
    out = ism_ext.segment_attention(case.q, k, v, case.kv_limit, cu_seqlens_q=case.cu_seqlens_q,
                                    cu_seqlens_k=case.cu_seqlens_k, softmax_scale=case.softmax_scale)
    assert_close_scaled(out, ref, 2e-5 if dtype == torch.float32 else 2e-2, f"out ({dtype}, rows 65 apart)")


def _grad_errors(case, dtype, g):
    """Norm-relative errors against float64 of (dq, dk, dv) for the op and for SDPA's math path in `dtype`."""
    qr, kr, vr = (t.double().requires_grad_(True) for t in (case.q, case.k, case.v))
    ref, _ = reference_attention(qr, kr, vr, case.kv_limit, case.cu_seqlens_q, case.cu_seqlens_k, case.softmax_scale)
    ref.backward(g.double())
    q, k, v = (t.clone().requires_grad_(True) for t in (case.q, case.k, case.v))
    ism_ext.segment_attention(q, k, v, case.kv_limit, cu_seqlens_q=case.cu_seqlens_q, cu_seqlens_k=case.cu_seqlens_k,
                              softmax_scale=case.softmax_scale).backward(g)
    qs, ks, vs = (t.clone().requires_grad_(True) for t in (case.q, case.k, case.v))
    _sdpa_math(case, qs, ks, vs).backward(g)
    triples = ((q.grad, qs.grad, qr.grad), (k.grad, ks.grad, kr.grad), (v.grad, vs.grad, vr.grad))
    return [(_rel(mine, r), _rel(theirs, r)) for mine, theirs, r in triples]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [16, 64, 128, 256])
@pytest.mark.parametrize("limits,scale", [("causal", 0.3), ("ism", None), ("mas", 0.2)])
def test_gradients_as_accurate_as_pytorch_in_the_same_dtype(dtype, head_dim, limits, scale):
    """FlashAttention's criterion: error against float64 at most twice PyTorch's math path's, plus a floor.

    Peaked softmaxes (scale 0.3 on head dim 256: one key takes nearly all the weight) are where a delta taken
    from the rounded output would cancel against dP."""
    case = make_case([4, 37], heads_q=2, heads_kv=1, head_dim=head_dim, dtype=dtype, limits=limits,
                     seed=head_dim + len(limits), scale=scale)
    g = torch.randn(case.q.shape, generator=torch.Generator().manual_seed(head_dim)).to(dtype)
    for name, (mine, theirs) in zip(("dq", "dk", "dv"), _grad_errors(case, dtype, g), strict=True):
        assert mine <= 2 * theirs + FLOOR[dtype], f"{name}: {mine:.3g} vs PyTorch math {theirs:.3g}"
        assert math.isfinite(mine)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [2, 40, 128, 256])
@pytest.mark.parametrize("limits", ["causal", "ism", "mas"])
def test_gradients_of_ordinary_inputs_within_twice_pytorch(dtype, head_dim, limits):
    """The same criterion with the forward's small floor, on a packed batch with ordinary softmaxes: the bfloat16
    backward on the AVX512_BF16 dot product rounds P and dS to bfloat16 (pair_path.h); the half-precision
    floors of the test above would hide an error several times PyTorch's."""
    case = make_case([300, 1, 131], heads_q=4, heads_kv=2, head_dim=head_dim, dtype=dtype, limits=limits,
                     seed=head_dim + len(limits))
    g = torch.randn(case.q.shape, generator=torch.Generator().manual_seed(head_dim)).to(dtype)
    for name, (mine, theirs) in zip(("dq", "dk", "dv"), _grad_errors(case, dtype, g), strict=True):
        assert mine <= 2 * theirs + FWD_FLOOR[dtype], f"{name}: {mine:.3g} vs PyTorch math {theirs:.3g}"


@pytest.mark.parametrize("seed", [219, 226, 255])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_peaked_softmax_gradients(seed, dtype):
    """The fuzz's worst cases (4 causal tokens, head dim 256, 2 query heads on 1 K/V head, scale 0.3): with delta
    taken from the rounded output, dq and dk were 50-76x less accurate than PyTorch's math path in float16."""
    case = make_case([4], heads_q=2, heads_kv=1, head_dim=256, dtype=dtype, limits="causal", seed=seed, scale=0.3)
    g = torch.randn(case.q.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    for name, (mine, theirs) in zip(("dq", "dk", "dv"), _grad_errors(case, dtype, g), strict=True):
        assert mine <= 2 * theirs + FLOOR[dtype], f"{name}: {mine:.3g} vs PyTorch math {theirs:.3g}"
