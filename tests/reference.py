"""Independent float64 reference for segment-masked attention, and test-case builders.

The reference is the textbook formula with a dense boolean mask built per sequence, written without
any code of the package: softmax(q k^T * scale + mask) v in float64, GQA by repeating k/v heads.
It is differentiable, so gradients come from autograd in float64.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_limit: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed-form attention in float64: returns (out [Tq, Hq, D], lse [Hq, Tq])."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    for b in range(cu_seqlens_q.numel() - 1):
        q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        k0, k1 = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        qb = q[q0:q1].transpose(0, 1)  # [H, Lq, D]
        kb = k[k0:k1].repeat_interleave(group, dim=1).transpose(0, 1)
        vb = v[k0:k1].repeat_interleave(group, dim=1).transpose(0, 1)
        allowed = torch.arange(k1 - k0)[None, :] < kv_limit[q0:q1].long()[:, None]  # [Lq, Lk]
        scores = (qb @ kb.transpose(1, 2)) * softmax_scale
        scores = scores.masked_fill(~allowed, -math.inf)
        lse = torch.logsumexp(scores, dim=-1)  # -inf for empty rows
        probs = torch.exp(scores - lse.unsqueeze(-1).masked_fill(~allowed.any(-1, keepdim=True), 0.0))
        probs = probs.masked_fill(~allowed, 0.0)
        outs.append((probs @ vb).transpose(0, 1))
        lses.append(lse)
    return torch.cat(outs, 0), torch.cat(lses, 1)


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    """Every element of ``actual`` is finite and within ``atol * max(1, max |expected|)`` of ``expected``.

    The tolerance scales with the reference's magnitude, so one atol per dtype serves outputs, lse and
    gradients alike.
    """
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (an unwritten element or a NaN)"
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= atol * scale, f"{what}: max abs error {err:.3g} > {atol * scale:.3g}"


@dataclass
class Case:
    """A packed test case: inputs of `segment_attention` plus its shape description."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kv_limit: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    softmax_scale: float

    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        return reference_attention(
            self.q, self.k, self.v, self.kv_limit, self.cu_seqlens_q, self.cu_seqlens_k, self.softmax_scale
        )


def _cu(lengths: list[int]) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


def random_limits(rng: random.Random, seqlen_q: int, seqlen_k: int, kind: str) -> list[int]:
    """kv_limit for the last `seqlen_q` positions of a sequence of `seqlen_k` keys.

    kinds: "random" (any value in [0, seqlen_k], so decreasing runs and empty rows), "empty" (all
    0), "full" (all seqlen_k), "causal", and the chat schemes of ism_ext.masks over random turns.
    """
    offset = seqlen_k - seqlen_q
    if kind == "random":
        return [rng.choice([0, seqlen_k, rng.randint(0, seqlen_k)]) for _ in range(seqlen_q)]
    if kind == "empty":
        return [0] * seqlen_q
    if kind == "full":
        return [seqlen_k] * seqlen_q
    if kind == "causal":
        return [offset + i + 1 for i in range(seqlen_q)]
    # A chat layout over all seqlen_k positions; the queries are its last seqlen_q tokens.
    from ism_ext.masks import kv_limit_for_turns

    turns, left, i = [], seqlen_k, 0
    roles = ["system", "user", "assistant", "user", "assistant"]
    while left > 0:
        n = min(left, rng.randint(1, max(1, seqlen_k // 3)))
        role = roles[i] if i < len(roles) else rng.choice(["user", "assistant", "user", "tool"])
        turns.append((role, n))
        left -= n
        i += 1
    full = kv_limit_for_turns(turns, kind).tolist()
    return full[offset:]


def make_case(
    seqlens_q: list[int],
    seqlens_k: list[int] | None = None,
    *,
    heads_q: int = 4,
    heads_kv: int | None = None,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    limits: str = "random",
    seed: int = 0,
    scale: float | None = None,
) -> Case:
    """Random inputs for a packed batch; seqlens_k defaults to seqlens_q (self-attention)."""
    seqlens_k = list(seqlens_q) if seqlens_k is None else seqlens_k
    heads_kv = heads_q if heads_kv is None else heads_kv
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    tq, tk = sum(seqlens_q), sum(seqlens_k)
    q = torch.randn(tq, heads_q, head_dim, generator=gen).to(dtype)
    k = torch.randn(tk, heads_kv, head_dim, generator=gen).to(dtype)
    v = torch.randn(tk, heads_kv, head_dim, generator=gen).to(dtype)
    lim: list[int] = []
    for lq, lk in zip(seqlens_q, seqlens_k, strict=True):
        lim += random_limits(rng, lq, lk, limits)
    return Case(
        q, k, v, torch.tensor(lim, dtype=torch.int32), _cu(seqlens_q), _cu(seqlens_k),
        head_dim**-0.5 if scale is None else scale,
    )
