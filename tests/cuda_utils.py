"""Shared pieces of the CUDA tests: skip markers, the NaN-poisoned allocator, random packed batches,
the lse comparison, and the switch and launch counters of the backward's small dK/dV tiles."""

from __future__ import annotations

import math
import random

import pytest
import torch
from reference import Case, assert_close_scaled, make_case

DEV = "cuda"



def has_cuda_kernel(op: str) -> bool:
    """True when a CUDA device is present and `ism::<op>` has a CUDA kernel registered."""
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(f"ism::{op}", "CUDA")


def cuda_marks(op: str) -> list:
    """pytestmark of a module that tests the CUDA kernel of `ism::<op>`: skipped without one."""
    return [
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        pytest.mark.skipif(torch.cuda.is_available() and not has_cuda_kernel(op),
                           reason="ism_ext was built without its CUDA kernels (ISM_EXT_FORCE_CPU or no nvcc)"),
    ]


def poison_allocator(*like: tuple[tuple[int, ...], torch.dtype]) -> None:
    """Fills freshly freed blocks of the sizes an op is about to allocate with NaN.

    The caching allocator hands a freed block of the right size to the next allocation on the
    stream, so the op's at::empty outputs start as NaN and any element the kernel does not write
    is caught by the finiteness checks.
    """
    blocks = [torch.full(shape, math.nan, dtype=dtype, device=DEV) for shape, dtype in like]
    del blocks


def assert_lse_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str = "lse") -> None:
    """lse against the float64 reference's: -inf exactly on the rows that see nothing (kv_limit 0),
    no NaN or +inf, and the finite rows within atol relative to max(1, |reference|)."""
    actual = actual.detach().cpu().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    empty = torch.isneginf(expected)
    assert torch.equal(torch.isneginf(actual), empty), f"{what} must be -inf exactly on the rows that see nothing"
    assert not torch.isnan(actual).any() and not torch.isposinf(actual).any(), f"{what}: NaN or +inf"
    if (~empty).any():
        err = (actual[~empty] - expected[~empty]).abs().max().item()
        scale = max(1.0, expected[~empty].abs().max().item())
        assert err <= atol * scale, f"{what}: max abs error {err:.3g} > {atol * scale:.3g}"


def assert_nan_where_reference(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    """NaN in, NaN out: `actual` is NaN exactly where the float64 reference is (which must hold some), -inf
    exactly where it is, and every other element within atol relative to max(1, |reference|)."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    nan, neg_inf = torch.isnan(expected), torch.isneginf(expected)
    assert nan.any(), f"{what}: the case must give the reference a NaN"
    assert torch.equal(torch.isnan(actual), nan), f"{what}: NaN must be exactly where the reference has it"
    assert torch.equal(torch.isneginf(actual), neg_inf), f"{what}: -inf must be exactly where the reference has it"
    rest = ~nan & ~neg_inf
    assert_close_scaled(actual[rest], expected[rest], atol, what)


def bwd_tile_launches() -> dict[str, int]:
    """How many dK/dV kernels of each kind of tiles ("big", "small") this process has launched."""
    return {tiles: torch.ops.ism._cuda_bwd_tiles_launches(tiles) for tiles in ("big", "small")}


TILE_EDGES = [1, 63, 64, 65, 127, 128, 129, 255, 256, 257]


def random_varlen_case(rng: random.Random, dtypes: list[torch.dtype], schemes: list[str], seed: int) -> Case:
    """A random packed batch for the kernels: 1-5 sequences of 0..700 query rows (some on a tile edge),
    sometimes more keys than queries, 8 query heads in GQA groups of 1/2/4/8, head dim 64 or 128, and
    a dtype and a kv_limit scheme drawn from `dtypes` and `schemes`."""
    batch = rng.randint(1, 5)
    seqlens_q = [rng.choice([rng.randint(0, 700), rng.choice(TILE_EDGES)]) for _ in range(batch)]
    seqlens_k = [lq + (rng.randint(0, 300) if rng.random() < 0.4 else 0) for lq in seqlens_q]
    group = rng.choice([1, 2, 4, 8])
    return make_case(seqlens_q, seqlens_k, heads_q=8, heads_kv=8 // group, head_dim=rng.choice([64, 128]),
                     dtype=rng.choice(dtypes), limits=rng.choice(schemes), seed=seed)


def count_dispatch(set_attr) -> dict[str, int]:
    """Counts, from now on, where `kvcache_dispatch.attn_with_kvcache_cuda` sends each call ("kernel" or
    "composite"), by wrapping its two targets with ``set_attr(module, name, value)`` (`monkeypatch.setattr` in a
    test, so the wrappers go away after it). Returns the live counts."""
    from ism_ext.ops import kvcache_dispatch as kc

    counts = {"kernel": 0, "composite": 0}
    composite, op = kc.attn_with_kvcache_composite, kc.op

    def counted_composite(*args):
        counts["composite"] += 1
        return composite(*args)

    def counted_op(name):
        target = op(name)
        if name != kc.KERNEL_OP:
            return target

        def kernel(*args):
            counts["kernel"] += 1
            return target(*args)

        return kernel

    set_attr(kc, "attn_with_kvcache_composite", counted_composite)
    set_attr(kc, "op", counted_op)
    return counts
