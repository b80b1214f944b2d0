"""The ``"ism"`` entries of transformers' `AttentionInterface` and `AttentionMaskInterface`.

The mask function runs once per forward and returns a small `IsmMask` (no `N x N` tensor). The first
attention layer turns block ids, padding and packing into one `PackedLayout` and caches it on that
object, so the conversion happens once per forward, not once per layer. Every layer then makes one
`segment_attention` call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ...ops import segment_attention
from .layout import PackedLayout, packed_layout

if TYPE_CHECKING:
    from .cache import IsmCache

ATTN_IMPLEMENTATION = "ism"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
# transformers versions this layer is tested with (tests/test_hf_models.py); requirements.txt pins the newest.
SUPPORTED_TRANSFORMERS = ">=5.0,<6"


@dataclass
class IsmMask:
    """What the `"ism"` mask function hands every layer instead of an attention mask tensor."""

    batch_size: int
    q_length: int
    kv_length: int
    padding_mask: torch.Tensor | None  # 2-D [batch, kv_length], nonzero = token
    device: torch.device
    cache: IsmCache | None = None  # the project's cache, when the forward runs on one
    _layouts: dict[tuple, PackedLayout] = field(default_factory=dict)
    _steps: dict[int, Any] = field(default_factory=dict)

    def layout(self, block_sequence_ids: torch.Tensor | None, position_ids: torch.Tensor | None) -> PackedLayout:
        """The packed layout for this forward, computed by the first layer that asks and cached here."""
        # Every layer of one forward receives the very same tensors, so their identities key the cache.
        key = (id(block_sequence_ids), id(position_ids))
        if key not in self._layouts:
            self._layouts[key] = packed_layout(
                self.batch_size, self.q_length, self.kv_length, attention_mask=self.padding_mask,
                position_ids=position_ids, block_sequence_ids=block_sequence_ids, device=self.device,
            )
        return self._layouts[key]

    def cache_step(self, block_sequence_ids: torch.Tensor | None, num_layers: int):
        """What this forward appends to the cache, planned (and checked) by the first layer that asks."""
        key = id(block_sequence_ids)
        if key not in self._steps:
            self._steps[key] = self.cache.plan(self.padding_mask, block_sequence_ids, self.q_length, self.kv_length,
                                               num_layers)
        return self._steps[key]


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

    Recent 5.x releases (5.10 and 5.23 here) pass `q_length` and `device`; 5.0 passes `cache_position` instead.
    """
    if isinstance(kv_offset, torch.Tensor) or kv_offset != 0:
        raise ValueError(
            "the ism attention needs a full KV cache (kv_offset = 0); sliding-window caches are not supported"
        )
    if q_length is None:
        q_length = cache_position.shape[0]
        device = cache_position.device if device is None else device
    from .cache import cache_being_masked

    cache = cache_being_masked()
    if cache is not None:
        cache.take()
    return IsmMask(batch_size, q_length, kv_length, attention_mask, torch.device(device or "cpu"), cache)


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


def _forward_mask(attention_mask: IsmMask | torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> IsmMask:
    """The forward's `IsmMask`, checked against the attention inputs (sizes derived from them when absent)."""
    q_len, kv_in = query.shape[2], key.shape[2]
    if attention_mask is None:  # a caller that skipped mask creation
        return IsmMask(query.shape[0], q_len, kv_in, None, query.device)
    if not isinstance(attention_mask, IsmMask):
        raise ValueError(
            "the ism attention does not take a dense attention mask: pass a 2-D padding attention_mask and the "
            f"segments as block_sequence_ids (got a tensor of shape {tuple(attention_mask.shape)})"
        )
    # With the project's cache the keys are the new rows; with any other, every key of the forward.
    expect_kv = q_len if attention_mask.cache is not None else attention_mask.kv_length
    if (attention_mask.q_length, expect_kv) != (q_len, kv_in):
        raise ValueError(
            f"mask sizes (q {attention_mask.q_length}, kv {attention_mask.kv_length}) do not match the attention "
            f"inputs (q {q_len}, kv {kv_in})"
        )
    return attention_mask


def ism_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
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
    mask = _forward_mask(attention_mask, query, key)
    kv_len = mask.kv_length
    _check_module(module, dropout, kwargs, kv_len)
    if mask.cache is not None:  # the project's cache: append and attend in one op call
        step = mask.cache_step(kwargs.get("block_sequence_ids"), module.config.num_hidden_layers)
        return mask.cache.attend(module.layer_idx, step, query, key, value, scaling), None
    layout = mask.layout(kwargs.get("block_sequence_ids"), kwargs.get("position_ids"))

    # [B, H, S, D] -> packed [B * S, H, D]; the copies are O(N), like the transposes of other backends.
    q = query.transpose(1, 2).reshape(batch * q_len, heads_q, head_dim)
    k = key.transpose(1, 2).reshape(batch * kv_len, key.shape[1], head_dim)
    v = value.transpose(1, 2).reshape(batch * kv_len, value.shape[1], head_dim)
    out = segment_attention(
        q, k, v, layout.kv_limit,
        cu_seqlens_q=layout.cu_seqlens_q, cu_seqlens_k=layout.cu_seqlens_k,
        max_seqlen_q=layout.max_seqlen_q, max_seqlen_k=layout.max_seqlen_k, softmax_scale=scaling,
    )
    return out.view(batch, q_len, heads_q, head_dim), None


def register() -> None:
    """Registers `"ism"` with transformers' attention and mask interfaces (done on import; idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, ism_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ism_mask_function)
