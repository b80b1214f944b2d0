"""The ``"ism"`` entries of transformers' `AttentionInterface` and `AttentionMaskInterface`.

The mask function runs once per forward and returns a small `IsmMask` (no `N x N` tensor). That object is
what transformers hands every layer, so it carries what one forward shares: the first attention layer
turns block ids, padding and packing into one `VarlenPacking` (or, on the project's cache, plans the
append) and keeps it there, and every layer then makes one op call.

Nothing else is shared: the block ids and positions come in the attention's ``**kwargs``, and the
project's cache reaches the attention through the cache itself, as the key its `update` returns
(`IsmCache.update` hands back `NewRows`, the cache with the layer's new rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ...ops import segment_attention
from .packing import VarlenPacking, varlen_packing_op

if TYPE_CHECKING:
    from .cache import IsmCache, _Step

ATTN_IMPLEMENTATION = "ism"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass
class NewRows:
    """What `IsmCache.update` returns as the key: the cache and the layer's new keys ``[B, Hkv, q_len, D]``.

    Only the ``"ism"`` attention takes it apart; any other attention implementation touching it as a tensor gets
    the error below instead of attending over the new rows alone.
    """

    cache: IsmCache
    key: torch.Tensor

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(
            "IsmCache works only with attn_implementation='ism' (its attention appends the keys/values in place); "
            "this model uses another attention implementation: use transformers' DynamicCache with it"
        )


@dataclass
class IsmMask:
    """What the `"ism"` mask function hands every layer of one forward instead of an attention mask tensor."""

    batch_size: int
    q_length: int
    kv_length: int
    padding_mask: torch.Tensor | None  # 2-D [batch, kv_length], nonzero = token
    device: torch.device
    _packing: VarlenPacking | None = None  # built by the first layer of the forward that asks
    _step: _Step | None = None  # the cache append of this forward, planned by its first layer

    def packing(self, block_sequence_ids: torch.Tensor | None, position_ids: torch.Tensor | None) -> VarlenPacking:
        """The varlen packing of this forward, computed by the first layer that asks and kept for the others.

        Every layer of one forward receives the very same block ids and positions, so one slot is enough.
        """
        if self._packing is None:
            self._packing = varlen_packing_op(
                self.batch_size, self.q_length, self.kv_length, attention_mask=self.padding_mask,
                position_ids=position_ids, block_sequence_ids=block_sequence_ids, device=self.device,
            )
        return self._packing

    def cache_step(self, cache: IsmCache, block_sequence_ids: torch.Tensor | None, num_layers: int) -> _Step:
        """What this forward appends to ``cache``, planned (and checked) by the first layer that asks."""
        if self._step is None:
            self._step = cache.plan(self.padding_mask, block_sequence_ids, self.q_length, self.kv_length, num_layers)
        return self._step


def ism_mask_function(
    batch_size: int,
    q_length: int | None = None,
    kv_length: int | None = None,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    cache_position: torch.Tensor | None = None,
    **kwargs: Any,
) -> IsmMask:
    """The `AttentionMaskInterface` entry of `"ism"`: records the padding mask and the sizes, builds nothing.

    transformers 5.19 (the pinned release, `check_transformers_version`) and 5.23 pass `q_length` and `device`;
    older 5.x releases passed `cache_position` instead, which is still read when `q_length` is missing.
    """
    if isinstance(kv_offset, torch.Tensor) or kv_offset != 0:
        raise ValueError(
            "the ism attention needs a full KV cache (kv_offset = 0); sliding-window caches are not supported"
        )
    if q_length is None:
        q_length = cache_position.shape[0]
        device = cache_position.device if device is None else device
    return IsmMask(batch_size, q_length, kv_length, attention_mask, torch.device(device or "cpu"))


def _check_module(module: torch.nn.Module, dropout: float, kwargs: dict[str, Any], kv_len: int) -> None:
    """Refuses what the ism attention cannot honour (another family, dropout, a window, softcapping)."""
    config = getattr(module, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"the ism attention supports the model families {SUPPORTED_MODEL_TYPES}, got {model_type!r}"
        )
    if dropout:
        raise NotImplementedError("the ism attention has no attention dropout: set config.attention_dropout = 0")
    window = kwargs.get("sliding_window")
    if window is not None and kv_len > window:
        raise NotImplementedError(
            f"sliding-window attention is not supported by the ism attention ({kv_len} keys > window {window})"
        )
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("attention logit softcapping is not supported by the ism attention")


def _forward_mask(attention_mask: IsmMask | torch.Tensor | None, query: torch.Tensor, key: torch.Tensor,
                  on_cache: bool) -> IsmMask:
    """The forward's `IsmMask`, checked against the attention inputs (sizes derived from them when absent)."""
    q_len, kv_in = query.shape[2], key.shape[2]
    if attention_mask is None and on_cache:
        # The forward's one IsmMask is where the cache append is planned once for every layer.
        raise ValueError("the ism attention on an IsmCache needs the mask object of the \"ism\" mask interface "
                         "(attention_mask=None reached it: call the model, not the attention function directly)")
    if attention_mask is None:  # a caller that skipped mask creation
        return IsmMask(query.shape[0], q_len, kv_in, None, query.device)
    if not isinstance(attention_mask, IsmMask):
        raise ValueError(
            "the ism attention does not take a dense attention mask: pass a 2-D padding attention_mask and the "
            f"segments as block_sequence_ids (got a tensor of shape {tuple(attention_mask.shape)})"
        )
    # With the project's cache the keys are the new rows; with any other, every key of the forward.
    expect_kv = q_len if on_cache else attention_mask.kv_length
    if (attention_mask.q_length, expect_kv) != (q_len, kv_in):
        raise ValueError(
            f"mask sizes (q {attention_mask.q_length}, kv {attention_mask.kv_length}) do not match the attention "
            f"inputs (q {q_len}, kv {kv_in})"
        )
    return attention_mask


def ism_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | NewRows,
    value: torch.Tensor,
    attention_mask: IsmMask | torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The `AttentionInterface` entry of `"ism"`: `[B, H, S, D]` in, `[B, S, Hq, D]` out, as transformers expects.

    On an `IsmCache` the key/value are the new rows only, appended and attended in one op call; otherwise they
    are every key of the forward (transformers' own caches concatenate), attended by one `segment_attention`.
    """
    batch, heads_q, q_len, head_dim = query.shape
    cache = key.cache if isinstance(key, NewRows) else None
    key = key.key if cache is not None else key
    mask = _forward_mask(attention_mask, query, key, cache is not None)
    kv_len = mask.kv_length
    _check_module(module, dropout, kwargs, kv_len)
    if cache is not None:  # the project's cache: append and attend in one op call
        step = mask.cache_step(cache, kwargs.get("block_sequence_ids"), module.config.num_hidden_layers)
        return cache.attend(module.layer_idx, step, query, key, value, scaling), None
    packing = mask.packing(kwargs.get("block_sequence_ids"), kwargs.get("position_ids"))

    # [B, H, S, D] -> packed [B * S, H, D]; the copies are O(N), like the transposes of other backends.
    q = query.transpose(1, 2).reshape(batch * q_len, heads_q, head_dim)
    k = key.transpose(1, 2).reshape(batch * kv_len, key.shape[1], head_dim)
    v = value.transpose(1, 2).reshape(batch * kv_len, value.shape[1], head_dim)
    out = segment_attention(
        q, k, v, packing.kv_limit,
        cu_seqlens_q=packing.cu_seqlens_q, cu_seqlens_k=packing.cu_seqlens_k,
        max_seqlen_q=packing.max_seqlen_q, max_seqlen_k=packing.max_seqlen_k, softmax_scale=scaling,
    )
    return out.view(batch, q_len, heads_q, head_dim), None


def register() -> None:
    """Registers `"ism"` with transformers' attention and mask interfaces (done on import; idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, ism_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ism_mask_function)
