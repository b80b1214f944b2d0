"""`segment_attention`: the public wrapper of the prefill/training ops, their fake kernels and autograd.

The schemas and the CPU/CUDA kernels are registered from C++ (csrc/ops.cpp). Here, as in
pytorch/extension-cpp, `register_fake` gives the ops shape propagation (so `torch.compile` traces
through them without a graph break) and `register_autograd` makes the forward differentiable.
"""

from __future__ import annotations

import math

import torch

from ._library import op, qualname


@torch.library.register_fake(qualname("segment_attn_fwd"))
def _segment_attn_fwd_fake(q, k, v, kv_limit, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           softmax_scale, deterministic=False):
    torch._check(q.dim() == 3, lambda: f"segment_attn_fwd: q must be 3-D, got {q.dim()}-D")
    out = q.new_empty(q.shape)
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return out, lse


@torch.library.register_fake(qualname("segment_attn_bwd"))
def _segment_attn_bwd_fake(dout, dlse, q, k, v, out, lse, kv_limit, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                           max_seqlen_k, softmax_scale, deterministic=False):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_limit, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, *rest = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_limit, cu_seqlens_q, cu_seqlens_k)
    ctx.max_seqlen_q, ctx.max_seqlen_k, ctx.softmax_scale = max_seqlen_q, max_seqlen_k, softmax_scale
    ctx.deterministic = bool(rest[0]) if rest else False


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, kv_limit, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    if grad_out is None:  # only lse was used downstream
        grad_out = torch.zeros_like(out)
    dq, dk, dv = op("segment_attn_bwd")(
        grad_out, grad_lse, q, k, v, out, lse, kv_limit, cu_seqlens_q, cu_seqlens_k,
        ctx.max_seqlen_q, ctx.max_seqlen_k, ctx.softmax_scale, ctx.deterministic,
    )
    return dq, dk, dv, None, None, None, None, None, None, None


torch.library.register_autograd(qualname("segment_attn_fwd"), _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "segment_attention: double backward is not supported (the gradient of the backward, as "
        "autograd.grad(..., create_graph=True) followed by another backward asks for, is not implemented)"
    )


# Without an autograd formula, autograd would treat the backward op's outputs as constants and a second
# backward would return zeros with only a generic warning; this makes it an error instead.
torch.library.register_autograd(qualname("segment_attn_bwd"), _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


def _fail(exc: type[Exception], msg: str):
    raise exc(f"segment_attention: {msg}")


def _check_tensor(name: str, t, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        _fail(ValueError, f"{name} is on {t.device} but q is on {device}")


def _cu_seqlens_for_batch(batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
    """Offsets of `batch` sequences of `seqlen` rows each (also right for an empty batch or empty rows)."""
    return torch.arange(batch + 1, dtype=torch.int32, device=device) * seqlen


def _batched(q, k, v, kv_limit, softmax_scale: float, return_lse: bool, deterministic: bool):
    """The batched form `[B, S, H, D]`: flattened into the packed form with equal-length sequences."""
    if k.dim() != 4 or v.dim() != 4:
        _fail(ValueError, f"batched q [B, Sq, Hq, D] needs k and v [B, Sk, Hkv, D], got k {tuple(k.shape)} "
              f"and v {tuple(v.shape)}")
    batch, seqlen_q = q.shape[0], q.shape[1]
    seqlen_k = k.shape[1]
    if k.shape[0] != batch or v.shape[0] != batch:
        _fail(ValueError, f"k and v must have batch size {batch} like q, got {k.shape[0]} and {v.shape[0]}")
    if tuple(kv_limit.shape) != (batch, seqlen_q):
        _fail(ValueError, f"kv_limit must have shape [B, Sq] = [{batch}, {seqlen_q}], got {tuple(kv_limit.shape)}")
    cu_q = _cu_seqlens_for_batch(batch, seqlen_q, q.device)
    cu_k = _cu_seqlens_for_batch(batch, seqlen_k, q.device)
    out, lse = op("segment_attn_fwd")(
        q.reshape(batch * seqlen_q, *q.shape[2:]),
        k.reshape(batch * seqlen_k, *k.shape[2:]),
        v.reshape(batch * seqlen_k, *v.shape[2:]),
        kv_limit.reshape(-1), cu_q, cu_k, seqlen_q, seqlen_k, softmax_scale, deterministic,
    )
    out = out.view(q.shape)
    if not return_lse:
        return out
    return out, lse.view(q.shape[2], batch, seqlen_q).transpose(0, 1)


def _packed(q, k, v, kv_limit, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale: float,
            return_lse: bool, deterministic: bool):
    """The packed (varlen) form; missing offsets mean one sequence, or key offsets equal to the queries'."""
    if cu_seqlens_q is None:
        if cu_seqlens_k is not None:
            _fail(ValueError, "cu_seqlens_k was given without cu_seqlens_q")
        cu_seqlens_q = torch.tensor([0, q.shape[0]], dtype=torch.int32, device=q.device)
        cu_seqlens_k = torch.tensor([0, k.shape[0]], dtype=torch.int32, device=q.device)
        max_seqlen_q = q.shape[0] if max_seqlen_q is None else max_seqlen_q
        max_seqlen_k = k.shape[0] if max_seqlen_k is None else max_seqlen_k
    elif cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q
        max_seqlen_k = max_seqlen_q if max_seqlen_k is None else max_seqlen_k
    _check_tensor("cu_seqlens_q", cu_seqlens_q, q.device)
    _check_tensor("cu_seqlens_k", cu_seqlens_k, q.device)
    out, lse = op("segment_attn_fwd")(
        q, k, v, kv_limit, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, deterministic
    )
    return (out, lse) if return_lse else out


def segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_limit: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    deterministic: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Segment-masked attention: query row ``i`` attends to keys ``j < kv_limit[i]`` of its sequence.

    Two forms:

    * **packed** (FlashAttention's varlen layout): ``q`` ``[Tq, Hq, D]``, ``k``/``v`` ``[Tk, Hkv, D]``,
      ``kv_limit`` int32 ``[Tq]``, ``cu_seqlens_q``/``cu_seqlens_k`` int32 ``[B + 1]`` (sequence ``b`` owns
      rows ``cu[b]:cu[b+1]``; empty sequences are allowed). Without ``cu_seqlens_q`` the rows are one
      sequence; without ``cu_seqlens_k`` the key boundaries are those of the queries. ``kv_limit`` always
      counts from the sequence's first key, so a sequence may have more keys than queries (prefill on top
      of cached keys: its queries are then usually its last positions). Nothing assumes where a query
      sits, so a sequence may also have more queries than keys: each row still sees keys ``j <
      kv_limit``. ``lse`` is ``[Hq, Tq]``.
    * **batched**: ``q`` ``[B, Sq, Hq, D]``, ``k``/``v`` ``[B, Sk, Hkv, D]``, ``kv_limit`` ``[B, Sq]``, no
      ``cu_seqlens``. ``B``, ``Sq`` or ``Sk`` may be 0 (an empty result). ``lse`` is ``[B, Hq, Sq]``.

    ``Hq`` must be a multiple of ``Hkv`` (GQA/MQA). ``softmax_scale`` defaults to ``D ** -0.5``.
    ``max_seqlen_q``/``max_seqlen_k`` are optional hints (the longest sequence); when given they must not
    be smaller than the truth. A row with ``kv_limit = 0`` sees nothing: its output is 0 and its
    log-sum-exp ``-inf``. Differentiable in ``q``, ``k`` and ``v`` (and through ``lse``).

    What each device supports:

    * **CPU**: float32, float16 and bfloat16 (accumulation in float32), head dims 1 to 256. ``kv_limit``
      and ``cu_seqlens`` values are checked: a value out of range raises ValueError.
    * **CUDA**: float16 and bfloat16, head dims 64 and 128, compute capability 8.0 or newer. The index
      values live on the device and are *not* checked (that would cost a device sync per call): the
      kernels clamp ``kv_limit`` into ``[0, seqlen_k]`` and ``cu_seqlens`` into ``[0, T]``, so a bad value
      gives wrong numbers for its rows, never an out-of-bounds access. The batched form builds its
      offsets itself, so only ``kv_limit`` is the caller's there.

    ``deterministic=True`` makes the CUDA backward bit-reproducible: dQ comes from its own kernel
    instead of float32 atomic adds (about 1.4 times the backward's tile products).
    ``torch.use_deterministic_algorithms(True)`` has the same effect; the CPU kernels always are.

    Returns the output (the shape of ``q``), or ``(output, lse)`` with ``return_lse=True``; ``lse`` is
    the float32 natural-log log-sum-exp of the scaled scores of each row.

    Raises ValueError/TypeError naming the argument for bad shapes, dtypes, devices, strides,
    ``cu_seqlens`` or (CPU) out-of-range ``kv_limit``.
    """
    if not isinstance(q, torch.Tensor):
        _fail(TypeError, f"q must be a torch.Tensor, got {type(q).__name__}")
    for name, t in (("k", k), ("v", v), ("kv_limit", kv_limit)):
        _check_tensor(name, t, q.device)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1]) if q.dim() > 0 and q.shape[-1] > 0 else 1.0
    softmax_scale = float(softmax_scale)

    if q.dim() == 4:
        if cu_seqlens_q is not None or cu_seqlens_k is not None:
            _fail(ValueError, "cu_seqlens_q/cu_seqlens_k are for the packed form; batched q is [B, Sq, Hq, D]")
        return _batched(q, k, v, kv_limit, softmax_scale, return_lse, deterministic)
    if q.dim() != 3:
        _fail(ValueError, f"q must be [Tq, Hq, D] (packed) or [B, Sq, Hq, D] (batched), got shape {tuple(q.shape)}")
    return _packed(q, k, v, kv_limit, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                   return_lse, deterministic)
