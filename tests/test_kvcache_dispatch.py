"""The CPU-testable parts of the dedicated CUDA kernel of `attn_with_kvcache`.

- Dispatch: which calls the CUDA entry (`kvcache_dispatch.attn_with_kvcache_cuda`) hands to the kernel op and
  which to the composite, and that the fallback gives the op's results.
- The combine of split keys, in its torch form (`combine_partials`), against attention over whole rows.
- The launch plan (csrc/cuda/kvcache_plan.h, plain C++): compiled here with the system C++ compiler into a
  small driver, so the split choice, the key chunks, the append shares and the grids the kernel runs with are
  tested on the CPU. The shared-memory sizes of the kernel traits come out of the same driver.
"""

from __future__ import annotations

import math
import pathlib
import shutil
import subprocess

import pytest
import torch
from cuda_utils import count_dispatch
from reference import assert_close_scaled, reference_attention

from ism_ext import config
from ism_ext.masks import kv_limit_causal_append
from ism_ext.ops import kvcache_dispatch as kc

ROOT = pathlib.Path(__file__).resolve().parent.parent


# ---- dispatch ---------------------------------------------------------------------------------------------

def _tensors(dtype=torch.bfloat16, d=64, b=2, lq=3, cap=64, hq=4, hkv=2):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, lq, hq, d, generator=gen).to(dtype)
    k_cache, v_cache = (torch.randn(b, cap, hkv, d, generator=gen).to(dtype) for _ in range(2))
    k_new, v_new = (torch.randn(b, lq, hkv, d, generator=gen).to(dtype) for _ in range(2))
    lens = torch.tensor([5, 17], dtype=torch.int32)[:b]
    return q, k_cache, v_cache, k_new, v_new, lens, kv_limit_causal_append(lens, lq)


@pytest.mark.parametrize("requested", [False, True])
def test_kernel_is_requested_by_the_kernel_config(requested):
    with config.kernel_config(kvcache_kernel=requested):
        assert kc.kernel_requested() is requested
        if not requested:
            assert "kvcache_kernel=False" in kc.kernel_fallback_reason(*_tensors()[:3])


def test_kernel_op_exists_exactly_in_cuda_builds():
    cuda_build = torch._C._dispatch_has_kernel_for_dispatch_key("ism::segment_attn_fwd", "CUDA")
    assert kc.kernel_registered() is cuda_build
    assert hasattr(torch.ops.ism, "_attn_with_kvcache_cuda") is cuda_build
    # Never registered for the op itself: the composite stays the CUDA implementation of attn_with_kvcache.
    if cuda_build:
        assert torch._C._dispatch_has_kernel_for_dispatch_key("ism::attn_with_kvcache", "CUDA")


def test_tensor_gaps_name_what_the_kernel_does_not_cover():
    q, k_cache, v_cache = _tensors()[:3]
    assert kc.kernel_tensor_gap(q, k_cache, v_cache) is None
    assert kc.kernel_tensor_gap(*_tensors(d=128)[:3]) is None
    assert kc.kernel_tensor_gap(*_tensors(torch.float16)[:3]) is None
    assert "dtype torch.float32" in kc.kernel_tensor_gap(*_tensors(torch.float32)[:3])
    assert "head_dim 96" in kc.kernel_tensor_gap(*_tensors(d=96)[:3])
    assert "malformed" in kc.kernel_tensor_gap(q[0], k_cache, v_cache)
    assert "malformed" in kc.kernel_tensor_gap(q, None, v_cache)
    # A cache 2 bytes off a 16-byte boundary, and one whose head stride is not a multiple of 8 elements.
    storage = torch.zeros(k_cache.numel() + 1, dtype=k_cache.dtype)
    shifted = storage[1:].view(k_cache.shape)
    assert "16-byte" in kc.kernel_tensor_gap(q, shifted, v_cache)
    padded = torch.zeros(*k_cache.shape[:3], 68, dtype=k_cache.dtype)[..., :64]
    assert "16-byte" in kc.kernel_tensor_gap(q, k_cache, padded)
    # q is copied by the kernel op when it is not aligned: not a gap.
    assert kc.kernel_tensor_gap(torch.zeros(2, 3, 4, 72, dtype=q.dtype)[..., :64], k_cache, v_cache) is None


def test_fallback_reasons_in_order(monkeypatch):
    q, k_cache, v_cache = _tensors()[:3]
    config.set_kernel_config(kvcache_kernel=True)
    if not kc.kernel_registered():
        assert kc.kernel_fallback_reason(q, k_cache, v_cache) == "this build has no CUDA KV-cache kernel"
    monkeypatch.setattr(kc, "kernel_registered", lambda: True)
    assert kc.kernel_fallback_reason(q, k_cache, v_cache) == "q is on cpu"
    assert "dtype" in kc.kernel_fallback_reason(*_tensors(torch.float32)[:3])  # tensor gaps come first


def test_cuda_entry_falls_back_to_the_composite_with_the_ops_results(monkeypatch):
    config.set_kernel_config(kvcache_kernel=True)
    args = _tensors()
    q, k_cache, v_cache, k_new, v_new, lens, lim = args
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    counts = count_dispatch(monkeypatch.setattr)
    out, lse = kc.attn_with_kvcache_cuda(q, k_cache, v_cache, k_new, v_new, lens, lim, None, None, 0.125)
    assert counts == {"kernel": 0, "composite": 1}
    ref_out, ref_lse = torch.ops.ism.attn_with_kvcache(q, k_ref, v_ref, k_new, v_new, lens, lim, None, None, 0.125)
    torch.testing.assert_close(out, ref_out, atol=2e-2, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=0)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_cuda_entry_hands_covered_calls_to_the_kernel_op(monkeypatch):
    calls = []
    monkeypatch.setattr(kc, "kernel_fallback_reason", lambda *a: None)
    monkeypatch.setattr(kc, "op", lambda name: (lambda *a: calls.append((name, a)) or ("out", "lse")))
    args = _tensors()
    counts = count_dispatch(monkeypatch.setattr)
    assert kc.attn_with_kvcache_cuda(*args, None, None, 0.5) == ("out", "lse")
    assert [name for name, _ in calls] == [kc.KERNEL_OP] and calls[0][1] == (*args, None, None, 0.5)
    assert counts == {"kernel": 1, "composite": 0}


# ---- the combine of split keys ------------------------------------------------------------------------------


def combine_partials(out_parts: torch.Tensor, lse_parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's combine of split keys (csrc/cuda/kvcache_combine_kernel.cuh) in torch, in float32.

    ``out_parts [splits, rows, d]``: each chunk's normalised output; ``lse_parts [splits, rows]``: its natural-log
    log-sum-exp (-inf where the chunk saw no key of the row). Returns ``(out [rows, d], lse [rows])`` with
    ``lse = log sum_c exp(lse_c)`` and ``out = sum_c exp(lse_c - lse) out_c``, in the kernel's one pass with a
    running maximum; a row no chunk saw gets 0 and -inf.
    """
    rows, dim = out_parts.shape[1:]
    top = torch.full((rows,), -torch.inf)
    total = torch.zeros(rows)
    acc = torch.zeros(rows, dim)
    for out_c, lse_c in zip(out_parts.float(), lse_parts.float(), strict=True):
        seen = lse_c != -torch.inf
        nxt = torch.where(seen, torch.maximum(top, lse_c), top)
        keep = torch.where(seen, torch.exp(top - nxt), 1.0)
        weight = torch.where(seen, torch.exp(lse_c - nxt), 0.0)
        acc = acc * keep[:, None] + weight[:, None] * torch.where(seen[:, None], out_c, 0.0)
        total = total * keep + weight
        top = nxt
    inv = torch.where(total > 0, 1.0 / total, 0.0)
    return acc * inv[:, None], torch.where(total > 0, top + torch.log(total), -torch.inf)


def test_combine_of_chunks_equals_attention_over_whole_rows():
    gen = torch.Generator().manual_seed(3)
    rows, keys, d = 12, 300, 32
    q = torch.randn(rows, 1, d, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(keys, 1, d, generator=gen, dtype=torch.float64) for _ in range(2))
    lim = torch.randint(0, keys + 1, (rows,), generator=gen, dtype=torch.int32)
    lim[:3] = torch.tensor([0, 1, keys], dtype=torch.int32)  # an empty row, one key, every key
    cu_q, cu_k = torch.tensor([0, rows], dtype=torch.int32), torch.tensor([0, keys], dtype=torch.int32)
    ref_out, ref_lse = reference_attention(q, k, v, lim, cu_q, cu_k, 0.2)
    bounds = [0, 64, 128, 250, 256, 300]  # chunks of unequal length; [250, 256) is seen by few rows
    parts = []
    for c0, c1 in zip(bounds, bounds[1:], strict=False):
        # keys [c0, c1) alone: the chunk's rows see keys below min(limit, c1), counted from c0
        lim_c = (lim.clamp(c0, c1) - c0).to(torch.int32)
        cu_c = torch.tensor([0, c1 - c0], dtype=torch.int32)
        parts.append(reference_attention(q, k[c0:c1], v[c0:c1], lim_c, cu_q, cu_c, 0.2))
    out_parts = torch.stack([o[:, 0] for o, _ in parts])
    lse_parts = torch.stack([lse[0] for _, lse in parts])
    out, lse = combine_partials(out_parts.float(), lse_parts.float())
    assert_close_scaled(out, ref_out[:, 0], 1e-5, "out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse[0]))
    assert torch.all(out[0] == 0) and lse[0] == -math.inf
    finite = ~torch.isneginf(ref_lse[0])
    assert_close_scaled(lse[finite], ref_lse[0][finite], 1e-5, "lse")


def test_combine_of_one_chunk_is_that_chunk():
    out = torch.randn(1, 5, 8)
    lse = torch.tensor([[0.5, -math.inf, 3.0, -2.0, 10.0]])
    got_out, got_lse = combine_partials(out, lse)
    torch.testing.assert_close(got_lse, lse[0])
    torch.testing.assert_close(got_out[[0, 2, 3, 4]], out[0, [0, 2, 3, 4]])
    assert torch.all(got_out[1] == 0)


# ---- the launch plan (csrc/cuda/kvcache_plan.h) ----------------------------------------------------------------

DRIVER = r"""
#include <cstdio>
#include <cstring>
#include "cuda/kvcache_plan.h"
using namespace ism::cuda;
template <int d> void grid(long long b, long long hq, long long hkv, long long lq, int splits) {
  const KVCacheGrid g = kvcache_grid<d>(b, hq, hkv, lq, splits);
  std::printf("%d %lld %d %lld %lld\n", static_cast<int>(g.tiles), static_cast<long long>(g.row_tiles), g.splits,
              static_cast<long long>(g.attn_blocks), static_cast<long long>(g.combine_blocks));
}
template <int d, KVCacheTiles t> void smem() {
  using S = KVCacheTileShape<d, t>;
  std::printf("%d %d %d %d\n", S::kSmemBytes, S::kBlockM, S::kStages, S::kMergeBytes);
}
int main() {
  char what[16];
  while (std::scanf("%15s", what) == 1) {
    long long a, b, c, e, f;
    if (!std::strcmp(what, "splits") && std::scanf("%lld %lld %lld %lld", &a, &b, &c, &e) == 4) {
      std::printf("%d\n", choose_key_splits(a, b, static_cast<int>(c), static_cast<int>(e)));
    } else if (!std::strcmp(what, "chunk") && std::scanf("%lld %lld %lld %lld", &a, &b, &c, &e) == 4) {
      const KeyChunk k = key_chunk(static_cast<int>(a), static_cast<int>(b), static_cast<int>(c), static_cast<int>(e));
      std::printf("%d %d\n", k.begin, k.end);
    } else if (!std::strcmp(what, "append") && std::scanf("%lld %lld %lld", &a, &b, &c) == 3) {
      const KeyChunk k = append_rows(static_cast<int>(a), static_cast<int>(b), static_cast<int>(c));
      std::printf("%d %d\n", k.begin, k.end);
    } else if (!std::strcmp(what, "grid64") && std::scanf("%lld %lld %lld %lld %lld", &a, &b, &c, &e, &f) == 5) {
      grid<64>(a, b, c, e, static_cast<int>(f));
    } else if (!std::strcmp(what, "grid128") && std::scanf("%lld %lld %lld %lld %lld", &a, &b, &c, &e, &f) == 5) {
      grid<128>(a, b, c, e, static_cast<int>(f));
    } else if (!std::strcmp(what, "smem")) {
      smem<64, KVCacheTiles::kGroup>(); smem<128, KVCacheTiles::kGroup>();
      smem<64, KVCacheTiles::kRows>(); smem<128, KVCacheTiles::kRows>();
    } else {
      return 1;
    }
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    """Runs queries through the C++ plan: plan(["splits 8 512 132 3", ...]) -> output lines."""
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the plan driver")
    work = tmp_path_factory.mktemp("kvcache_plan")
    (work / "driver.cpp").write_text(DRIVER)
    exe = work / "driver"
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{ROOT / 'csrc'}", str(work / "driver.cpp"),
                    "-o", str(exe)], check=True, capture_output=True, text=True)

    def run(queries: list[str]) -> list[str]:
        res = subprocess.run([str(exe)], input="\n".join(queries) + "\n", capture_output=True, text=True, check=True)
        return res.stdout.splitlines()

    return run


def _splits(plan, cases):
    return [int(x) for x in plan([f"splits {w} {t} {s} {b}" for w, t, s, b in cases])]


def test_split_choice_fills_one_wave_of_the_gpu(plan):
    # H100/H200-like: 132 SMs, 3 decode blocks per SM (396 slots); key tiles of 64 keys.
    cases = [(8, 512, 132, 3), (64, 128, 132, 3), (8, 16, 132, 3), (128, 128, 132, 3), (200, 128, 132, 3),
             (396, 512, 132, 3), (512, 512, 132, 3), (8, 1, 132, 3), (8, 3, 132, 3), (1, 100000, 132, 3),
             (0, 100, 132, 3), (8, 0, 132, 3), (8, 100, 0, 3), (8, 100, 132, 0)]
    got = dict(zip(cases, _splits(plan, cases), strict=True))
    assert got[(64, 128, 132, 3)] == 6      # batch 8 x 8 K/V heads, 8k keys: 384 blocks in 396 slots
    assert got[(8, 16, 132, 3)] == 8        # 1k keys: 2 tiles per chunk at least
    assert got[(8, 512, 132, 3)] == 47      # 49 would fit, 47 chunks of 11 tiles take as long
    assert got[(128, 128, 132, 3)] == 3     # batch 16: 384 blocks
    assert got[(200, 128, 132, 3)] == 1     # 2 chunks would start a second wave
    assert got[(396, 512, 132, 3)] == 1 and got[(512, 512, 132, 3)] == 1  # the units fill the slots
    assert got[(8, 1, 132, 3)] == 1 and got[(8, 3, 132, 3)] == 1          # too few tiles to split
    assert got[(1, 100000, 132, 3)] == 128  # at most kMaxKeySplits
    assert got[(0, 100, 132, 3)] == got[(8, 0, 132, 3)] == got[(8, 100, 0, 3)] == 1
    assert got[(8, 100, 132, 0)] == _splits(plan, [(8, 100, 132, 1)])[0]  # no occupancy: one block per SM


def test_split_choice_rule(plan):
    cases = [(w, t, 132, b) for w in (1, 4, 8, 24, 64, 100, 131, 200, 395) for t in (1, 2, 17, 64, 257, 4096)
             for b in (1, 3)]
    for (w, t, sms, per_sm), s in zip(cases, _splits(plan, cases), strict=True):
        most = min(sms * per_sm // w, t // 2, 128)
        if most <= 1:
            assert s == 1
            continue
        assert w * s <= sms * per_sm and t // s >= 2 and s <= 128  # one wave, 2 tiles a chunk at least
        per_chunk = -(-t // most)
        assert -(-t // s) == per_chunk and (s == 1 or -(-t // (s - 1)) > per_chunk)  # fewest chunks for that


def test_key_chunks_partition_the_keys_in_whole_tiles(plan):
    cases = [(keys, splits) for keys in (0, 1, 63, 64, 65, 128, 1000, 4097, 32768) for splits in (1, 2, 3, 7, 47, 128)]
    queries = [f"chunk {keys} {splits} {i} 64" for keys, splits in cases for i in range(splits)]
    out = iter(plan(queries))
    for keys, splits in cases:
        chunks = [tuple(int(x) for x in next(out).split()) for _ in range(splits)]
        assert chunks[0][0] == 0 and chunks[-1][1] == keys
        for (_, e0), (b1, _) in zip(chunks, chunks[1:], strict=False):
            assert e0 == b1  # consecutive, no gap, no overlap
        tiles = math.ceil(keys / 64)
        per = math.ceil(tiles / splits) * 64  # whole tiles per chunk
        for b, e in chunks:
            assert 0 <= b <= e <= keys and e - b <= per
            assert (b % 64 == 0 and (e % 64 == 0 or e == keys)) or b == e == keys  # empty chunks at the end


def test_append_shares_write_every_new_row_once(plan):
    cases = [(n, units) for n in (0, 1, 5, 16, 300) for units in (1, 2, 3, 16, 47)]
    out = iter(plan([f"append {n} {units} {u}" for n, units in cases for u in range(units)]))
    for n, units in cases:
        rows = []
        for _ in range(units):
            b, e = (int(x) for x in next(out).split())
            rows += range(b, e)
        assert rows == list(range(n))


def test_grids_pick_the_tiling_by_the_packed_rows(plan):
    # (d, batch, hq, hkv, lq, splits) -> (tiling 0 group / 1 rows, row tiles, splits, blocks, combine blocks)
    cases = {(128, 8, 32, 8, 1, 6): (0, 1, 6, 384, 64),     # decode, GQA 4: 256 rows, 4 per combine block
             (128, 2, 32, 8, 4, 1): (0, 1, 1, 16, 0),       # 16 packed rows still one group tile
             (128, 2, 32, 8, 5, 1): (1, 1, 1, 16, 0),       # 20 rows: the rows tiling, 64 rows a tile
             (128, 1, 32, 8, 256, 3): (1, 16, 3, 384, 2048),
             (64, 3, 9, 3, 1, 2): (0, 1, 2, 18, 4),         # SmolLM2: group 3; 27 rows, 8 per combine block
             (64, 1, 8, 1, 70, 1): (1, 5, 1, 5, 0)}         # 560 rows / 128
    lines = plan([f"grid{d} {b} {hq} {hkv} {lq} {s}" for d, b, hq, hkv, lq, s in cases])
    assert [tuple(int(x) for x in line.split()) for line in lines] == list(cases.values())


def test_kernel_shared_memory_fits_every_sm80_gpu(plan):
    rows = [tuple(int(x) for x in line.split()) for line in plan(["smem"])]
    # (bytes, rows per tile, stages, merge bytes): group d 64 / 128, rows d 64 / 128
    assert rows[0][:3] == (51552, 16, 3) and rows[1][:3] == (69984, 16, 2)
    assert rows[2][:3] == (49952, 128, 2) and rows[3][:3] == (82464, 64, 2)
    assert all(r[0] <= 99 * 1024 for r in rows)  # sm_86 / sm_89 / sm_120 allow 99 KiB per block

