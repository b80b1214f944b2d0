"""The CUDA forward kernel of ism.segment_attn_fwd against the float64 dense-mask reference.

Runs the CPU test matrix on the GPU: every layout scheme and random kv_limit (empty rows included),
bfloat16 and float16, head dims 64 and 128, GQA groups 1/2/4/8, packed variable-length batches,
lengths 1..4097 around the tile edges (64/128 query rows, 64 keys), and sequences with more keys than
queries. Each call's outputs land in memory that was just filled with NaN (through the caching
allocator), so a row the kernel forgets to write shows up as NaN. Skipped without a CUDA device.

Every test runs twice: with the default (FA2-class, sm_80) kernel, and with the Hopper kernel forced
(ism_ext.config hopper_fwd=True, csrc/cuda/hopper_fwd_kernel.cuh), whose variant is skipped unless this build has
it and the device is compute capability 9.0 (`-k hopper` selects that variant alone). In the Hopper
variant every call with rows and keys must have launched the Hopper kernel, so no test passes on the
other one by a silent fallback.
"""

from __future__ import annotations

import random

import pytest
import torch
from cuda_utils import (
    DEV,
    assert_lse_close,
    assert_nan_where_reference,
    cuda_marks,
    has_cuda_kernel,
    poison_allocator,
    random_varlen_case,
)
from reference import Case, assert_close_scaled, make_case, reference_attention

import ism_ext  # noqa: F401  (registers torch.ops.ism)
from ism_ext.config import get_kernel_config, set_kernel_config

pytestmark = cuda_marks("segment_attn_fwd")

# Forward atol relative to max(1, |reference|): the CPU test's tolerances. P is rounded to the input
# dtype before the PV product (as in FlashAttention), which stays well inside them.
TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3}
DTYPES = list(TOL)
SCHEMES = ["ism", "mas", "prefix_lm", "causal", "random", "full", "empty"]




def hopper_fwd_available() -> tuple[bool, str]:
    """(whether the Hopper forward kernel can run here, why not)."""
    if not has_cuda_kernel("segment_attn_fwd"):
        return False, "no CUDA device or no CUDA kernels"
    if not torch.ops.ism._cuda_hopper_fwd_built():
        return False, "ism_ext was built without the Hopper kernel (no CUTLASS headers or no 9.0a arch)"
    if torch.cuda.get_device_capability() != (9, 0):
        return False, f"the Hopper kernel needs compute capability 9.0, not {torch.cuda.get_device_capability()}"
    return True, ""


@pytest.fixture(autouse=True, params=["default", "hopper"])
def fwd_kernel(request, monkeypatch):
    """The forward kernel under test: the default one, or the Hopper one forced by its switch."""
    if request.param == "hopper":
        available, why = hopper_fwd_available()
        if not available:
            pytest.skip(why)
    # The conftest fixture restores the process's kernel configuration after the test.
    set_kernel_config(hopper_fwd=request.param == "hopper")
    return request.param


def _cuda_args(case: Case):
    return [t.to(DEV) for t in (case.q, case.k, case.v, case.kv_limit, case.cu_seqlens_q, case.cu_seqlens_k)]


def _fwd(case: Case, max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, stream=None):
    q, k, v, lim, cu_q, cu_k = _cuda_args(case)
    poison_allocator((tuple(q.shape), q.dtype), ((q.shape[1], q.shape[0]), torch.float32))
    hopper = get_kernel_config().hopper_fwd
    launches = torch.ops.ism._cuda_hopper_fwd_launches() if hopper else 0
    with torch.cuda.stream(stream or torch.cuda.current_stream()):
        out, lse = torch.ops.ism.segment_attn_fwd(q, k, v, lim, cu_q, cu_k, max_seqlen_q, max_seqlen_k,
                                                  case.softmax_scale)
    torch.cuda.synchronize()
    if hopper:
        # The Hopper kernel runs every call with rows and keys (no keys at all: the sm_80 kernel).
        expected = 1 if q.shape[0] > 0 and k.shape[0] > 0 else 0
        assert torch.ops.ism._cuda_hopper_fwd_launches() - launches == expected, "the Hopper kernel did not run"
    return out, lse


def _check(case: Case, out: torch.Tensor, lse: torch.Tensor, kv_limit: torch.Tensor | None = None) -> None:
    """out/lse (on the GPU) against the float64 reference of `case` (or of `kv_limit` instead)."""
    lim = case.kv_limit if kv_limit is None else kv_limit
    ref_out, ref_lse = reference_attention(case.q, case.k, case.v, lim, case.cu_seqlens_q, case.cu_seqlens_k,
                                           case.softmax_scale)
    assert out.shape == case.q.shape and out.dtype == case.q.dtype and out.device.type == "cuda"
    assert lse.shape == (case.q.shape[1], case.q.shape[0]) and lse.dtype == torch.float32
    out, lse = out.cpu().double(), lse.cpu().double()
    atol = TOL[case.q.dtype]
    assert_close_scaled(out, ref_out, atol, "out")
    assert_lse_close(lse, ref_lse, atol)
    empty_rows = (lim == 0).nonzero().flatten()
    assert torch.all(out[empty_rows] == 0), "rows with kv_limit = 0 must be exactly 0"


def _run(case: Case, **kwargs) -> None:
    out, lse = _fwd(case, **kwargs)
    _check(case, out, lse)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_layouts(scheme, dtype, head_dim):
    case = make_case([200, 65, 129, 3], heads_q=4, heads_kv=2, head_dim=head_dim, dtype=dtype, limits=scheme,
                     seed=len(scheme) + head_dim)
    _run(case)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_gqa(group, dtype, head_dim):
    case = make_case([70, 1, 130, 300], heads_q=8, heads_kv=8 // group, head_dim=head_dim, dtype=dtype,
                     limits="random", seed=head_dim * 10 + group)
    _run(case)


EDGE_LENGTHS = [1, 2, 15, 16, 17, 63, 64, 65, 127, 128, 129, 191, 192, 193, 255, 256, 257, 1023, 1024, 1025,
                2047, 2049, 4095, 4096, 4097]


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("length", EDGE_LENGTHS)
def test_tile_edge_lengths(length, head_dim):
    # Two sequences whose lengths straddle the query-tile (64 / 128 rows) and key-tile (64) edges.
    # One head for the long ones keeps the float64 reference's [L, L] matrices small.
    heads = 2 if length < 1000 else 1
    case = make_case([length, length + 1], heads_q=heads, head_dim=head_dim, dtype=torch.bfloat16, limits="ism",
                     seed=length + head_dim)
    _run(case)


@pytest.mark.parametrize("length", [127, 128, 129, 4097])
def test_tile_edge_lengths_causal_fp16(length):
    case = make_case([length], heads_q=1, head_dim=128, dtype=torch.float16, limits="causal", seed=length)
    _run(case)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("scheme", ["ism", "causal", "random", "full"])
def test_queries_shorter_than_keys(scheme, head_dim):
    # Prefill on top of cached keys: each sequence's queries are its last Lq positions.
    case = make_case([1, 64, 37, 0, 130], [300, 64, 190, 5, 1000], heads_q=6, heads_kv=3, head_dim=head_dim,
                     dtype=torch.bfloat16, limits=scheme, seed=3)
    _run(case)


@pytest.mark.parametrize("seed", range(24))
def test_random_varlen_layouts(seed):
    # Random packed batches: every scheme, both dtypes and head dims, GQA, lengths 0..700 (some on a
    # tile edge), and sometimes more keys than queries.
    case = random_varlen_case(random.Random(1000 + seed), DTYPES, SCHEMES, seed)
    _run(case)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_empty_rows_and_sequences(head_dim):
    case = make_case([90, 40, 300], heads_q=2, head_dim=head_dim, dtype=torch.bfloat16, limits="random", seed=11)
    case.kv_limit[::3] = 0
    case.kv_limit[90:130] = 0  # a whole sequence that sees nothing
    case.kv_limit[130:258] = 0  # whole query tiles that see nothing
    out, lse = _fwd(case)
    _check(case, out, lse)
    empty = (case.kv_limit == 0).to(DEV)
    assert torch.all(out[empty] == 0) and torch.all(torch.isneginf(lse[:, empty]))


def test_degenerate_sizes():
    # Zero-length sequences, a sequence with no keys at all, and an empty batch.
    case = make_case([0, 5, 0], [0, 0, 7], heads_q=2, dtype=torch.bfloat16, limits="random", seed=1)
    _run(case)
    empty = make_case([0], [0], heads_q=2, dtype=torch.bfloat16)
    out, lse = _fwd(empty)
    assert out.shape == (0, 2, 64) and lse.shape == (2, 0)


@pytest.mark.parametrize("scale", [3.0, -0.2, 0.0])
def test_large_negative_and_zero_scale(scale):
    # Scores of several hundred (the running max must be subtracted), a negative scale (the max is
    # taken after scaling), and scale 0 (uniform attention over the visible keys).
    case = make_case([130, 70], [130, 90], heads_q=2, head_dim=64, dtype=torch.float16, limits="random", seed=6,
                     scale=scale)
    _run(case)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_in_a_query_row_gives_a_nan_row(dtype, head_dim):
    # NaN in, NaN out (issue 27, item 5): one NaN element of a query row that sees keys makes that row's
    # output and lse NaN in that head, as in the float64 reference, where the kernels' empty-row logic
    # used to give output 0 and lse -inf. Rows with kv_limit 0 stay exactly 0 and -inf; every other row
    # matches the reference.
    case = make_case([150, 40], heads_q=4, heads_kv=2, head_dim=head_dim, dtype=dtype, limits="random", seed=11)
    seen = (case.kv_limit > 0).nonzero().flatten()
    case.q[int(seen[len(seen) // 2]), 1, 5] = float("nan")
    out, lse = _fwd(case)
    ref_out, ref_lse = case.reference()
    assert_nan_where_reference(out, ref_out, TOL[dtype], "out")
    assert_nan_where_reference(lse, ref_lse, TOL[dtype], "lse")
    empty = case.kv_limit == 0
    assert empty.any() and torch.all(out.cpu()[empty] == 0) and torch.all(torch.isneginf(lse.cpu()[:, empty]))


def test_max_seqlen_hints_give_identical_results():
    case = make_case([300, 17, 129], [310, 17, 400], heads_q=4, heads_kv=2, head_dim=64, dtype=torch.bfloat16,
                     limits="ism", seed=2)
    no_hint = _fwd(case)  # several sequences, no hint: read from cu_seqlens_q (one device sync)
    exact = _fwd(case, max_seqlen_q=300, max_seqlen_k=400)
    larger = _fwd(case, max_seqlen_q=1000)  # extra query tiles exit at once
    _check(case, *no_hint)
    for other in (exact, larger):
        assert torch.equal(no_hint[0], other[0]) and torch.equal(no_hint[1], other[1])


def test_deterministic():
    case = make_case([500, 200], heads_q=4, heads_kv=1, head_dim=128, dtype=torch.bfloat16, limits="mas", seed=9)
    a, b = _fwd(case), _fwd(case)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("head_dim", [64, 128])
def test_strided_and_misaligned_inputs(head_dim):
    gen = torch.Generator().manual_seed(2)
    t, h = 150, 4
    lim = torch.randint(0, t + 1, (t,), generator=gen, dtype=torch.int32)
    cu = torch.tensor([0, t], dtype=torch.int32)
    # Views of a fused qkv projection and of [H, T, D]: only the last dim is contiguous.
    qkv = torch.randn(t, 3, h, head_dim, generator=gen).to(torch.bfloat16)
    q2 = torch.randn(h, t, head_dim, generator=gen).to(torch.bfloat16).transpose(0, 1)
    # A view 2 bytes past an aligned base: the op must copy it before 16-byte vector loads.
    flat = torch.randn(t * h * head_dim + 1, generator=gen).to(torch.bfloat16)
    q3 = flat[1:].view(t, h, head_dim)
    k, v = qkv[:, 1], qkv[:, 2]
    kd, vd = _device_view_like(k), _device_view_like(v)
    for q in (qkv[:, 0], q2, q3):
        ref, _ = reference_attention(q, k, v, lim, cu, cu, head_dim**-0.5)
        qd = _device_view_like(q)
        assert qd.stride() == q.stride() and qd.storage_offset() == q.storage_offset()
        out, _ = torch.ops.ism.segment_attn_fwd(qd, kd, vd, lim.to(DEV), cu.to(DEV), cu.to(DEV), t, t,
                                                head_dim**-0.5)
        err = (out.cpu().double() - ref).abs().max().item()
        assert err <= TOL[torch.bfloat16] * max(1.0, ref.abs().max().item())


def _device_view_like(x: torch.Tensor) -> torch.Tensor:
    """The same strided view (storage offset and strides) of a copy of x's storage on the GPU."""
    storage = torch.empty(0, dtype=x.dtype).set_(x.untyped_storage()).to(DEV)
    return storage.as_strided(x.shape, x.stride(), x.storage_offset())


def test_misaligned_view_really_is_misaligned_on_device():
    flat = torch.zeros(64 * 64 + 1, dtype=torch.bfloat16, device=DEV)
    assert flat[1:].data_ptr() % 16 != 0  # so test_strided_and_misaligned_inputs covers the copy path


def test_out_of_range_kv_limit_is_clamped_not_a_crash():
    # On CUDA the values of kv_limit are the caller's contract (checking them would sync). The kernel
    # clamps them into [0, seqlen_k]: no out-of-bounds read, no NaN, and the clamped result.
    case = make_case([100, 30], [120, 30], heads_q=2, head_dim=64, dtype=torch.bfloat16, limits="random", seed=4)
    bad = case.kv_limit.clone()
    bad[::4] = -7
    bad[1::4] = 10_000
    clamped = bad.clone()
    clamped[:100] = clamped[:100].clamp(0, 120)
    clamped[100:] = clamped[100:].clamp(0, 30)
    case.kv_limit = bad
    out, lse = _fwd(case)
    _check(case, out, lse, kv_limit=clamped)


def test_non_default_stream():
    case = make_case([257, 64], heads_q=4, heads_kv=2, head_dim=128, dtype=torch.float16, limits="ism", seed=8)
    side = torch.cuda.Stream()
    out, lse = _fwd(case, max_seqlen_q=257, stream=side)
    _check(case, out, lse)


def test_cuda_graph_capture_with_hints():
    # With max_seqlen_q given the op never syncs, so it can be captured in a CUDA graph.
    case = make_case([200, 65], heads_q=4, heads_kv=2, head_dim=64, dtype=torch.bfloat16, limits="ism", seed=12)
    q, k, v, lim, cu_q, cu_k = _cuda_args(case)
    op = torch.ops.ism.segment_attn_fwd
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        op(q, k, v, lim, cu_q, cu_k, 200, 200, case.softmax_scale)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = op(q, k, v, lim, cu_q, cu_k, 200, 200, case.softmax_scale)
    graph.replay()
    torch.cuda.synchronize()
    _check(case, out, lse)


def test_public_wrapper_batched_and_packed():
    gen = torch.Generator().manual_seed(0)
    b, sq, sk, hq, hkv, d = 3, 150, 180, 4, 2, 64
    q = torch.randn(b, sq, hq, d, generator=gen).to(torch.bfloat16)
    k = torch.randn(b, sk, hkv, d, generator=gen).to(torch.bfloat16)
    v = torch.randn(b, sk, hkv, d, generator=gen).to(torch.bfloat16)
    lim = torch.randint(0, sk + 1, (b, sq), generator=gen, dtype=torch.int32)
    out, lse = ism_ext.segment_attention(q.to(DEV), k.to(DEV), v.to(DEV), lim.to(DEV), return_lse=True)
    assert out.shape == q.shape and lse.shape == (b, hq, sq)
    cu_q = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32)
    cu_k = torch.arange(0, (b + 1) * sk, sk, dtype=torch.int32)
    ref, _ = reference_attention(q.reshape(-1, hq, d), k.reshape(-1, hkv, d), v.reshape(-1, hkv, d),
                                 lim.reshape(-1), cu_q, cu_k, d**-0.5)
    err = (out.reshape(-1, hq, d).cpu().double() - ref).abs().max().item()
    assert err <= TOL[torch.bfloat16] * max(1.0, ref.abs().max().item())
    # Packed form with cu_seqlens and no max_seqlen hint.
    packed = ism_ext.segment_attention(q.reshape(-1, hq, d).to(DEV), k.reshape(-1, hkv, d).to(DEV),
                                       v.reshape(-1, hkv, d).to(DEV), lim.reshape(-1).to(DEV),
                                       cu_seqlens_q=cu_q.to(DEV), cu_seqlens_k=cu_k.to(DEV))
    assert torch.equal(packed, out.reshape(-1, hq, d))


def test_opcheck_schema_and_fake():
    case = make_case([40, 7], heads_q=4, heads_kv=2, head_dim=64, dtype=torch.bfloat16, limits="ism")
    q, k, v, lim, cu_q, cu_k = _cuda_args(case)
    torch.library.opcheck(torch.ops.ism.segment_attn_fwd.default,
                          (q, k, v, lim, cu_q, cu_k, 40, 40, case.softmax_scale),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("head_dim", [32, 80, 96, 256])
def test_unsupported_head_dim_raises(head_dim):
    case = make_case([16], heads_q=2, head_dim=head_dim, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head_dim"):
        _fwd(case)


def test_float32_raises_type_error():
    case = make_case([16], heads_q=2, head_dim=64, dtype=torch.float32)
    with pytest.raises(TypeError, match="float16 and bfloat16"):
        _fwd(case)


def test_shape_errors_are_the_cpu_ones():
    # check_attn_args is shared with the CPU op: same exception types and messages.
    case = make_case([16], heads_q=3, heads_kv=2, head_dim=64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of the number of k/v heads"):
        _fwd(case)
