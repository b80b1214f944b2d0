"""A vLLM attention backend on ``torch.ops.ism.attn_with_kvcache`` over vLLM's paged KV cache (CPU platform).

It takes the place of vLLM's CPU backend (the plugin registers it under ``CPU_ATTN``) and serves each
request's bidirectional ranges (`ranges.py`). An engine started without ``additional_config={"ism": ...}``
runs vLLM's own CPU attention unchanged through the same class, so installing the plugin changes nothing
until it is asked for.

Per step, the metadata builder turns the batch's ranges (handed to it by the model runner, `runner.py`)
into one ``kv_limit`` per query token. Per layer, the op appends each request's new keys and values to its
pages (at ``num_computed_tokens``: pages that the prefix cache shares hold only earlier, complete tokens,
so they are read, never written) and attends: one call for all single-token (decode) requests, one call
per longer (prefill) chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from ...ops.kvcache_attention import attn_with_kvcache
from .config import IsmServingConfig
from .ranges import Ranges, kv_limit_for_chunk

__all__ = ["IsmAttentionBackend", "IsmAttentionImpl", "IsmAttentionMetadata", "IsmMetadataBuilder"]


@dataclass
class _Group:
    """One op call: ``batch`` requests of ``query_len`` tokens each, at ``tokens`` of the step (a slice, or
    indices when vLLM did not put them side by side), with the op's index tensors."""

    tokens: slice | torch.Tensor
    batch: int
    query_len: int
    cache_seqlens: torch.Tensor  # int32 [batch]
    kv_limit: torch.Tensor  # int32 [batch, query_len]
    block_table: torch.Tensor  # int32 [batch, pages]


@dataclass
class IsmAttentionMetadata:
    """A step's attention metadata: the op calls to make, decode group first."""

    num_actual_tokens: int
    groups: list[_Group] = field(default_factory=list)
    stock: Any = None  # vLLM's own metadata when the engine runs without ISM


def _decode_group(rows: list[int], seq_lens: torch.Tensor, starts: list[int], block_table: torch.Tensor) -> _Group:
    """The single-token requests as one call: slices when they sit side by side in the batch (vLLM puts
    decodes first), else index tensors."""
    if rows[-1] - rows[0] == len(rows) - 1:
        index: slice | torch.Tensor = slice(rows[0], rows[-1] + 1)
        tokens: slice | torch.Tensor = slice(starts[rows[0]], starts[rows[0]] + len(rows))
    else:
        index = torch.tensor(rows, dtype=torch.long)
        tokens = torch.tensor([starts[row] for row in rows], dtype=torch.long)
    lens = seq_lens[index].to(torch.int32)
    return _Group(tokens, len(rows), 1, lens - 1, lens.view(-1, 1).clone(), block_table[index])


class IsmMetadataBuilder(CPUAttentionMetadataBuilder):
    """Builds `IsmAttentionMetadata` from vLLM's common metadata and the batch's ranges."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.serving = IsmServingConfig.from_vllm_config(vllm_config)
        self.batch_ranges: list[Ranges] = []

    def set_batch_ranges(self, batch_ranges: list[Ranges]) -> None:
        """The ranges of the step's requests, in batch order (called by the model runner before `build`)."""
        self.batch_ranges = batch_ranges

    def build(self, common_prefix_len: int, common_attn_metadata, fast_build: bool = False) -> IsmAttentionMetadata:
        cm = common_attn_metadata
        if self.serving is None:
            return IsmAttentionMetadata(cm.num_actual_tokens, stock=super().build(common_prefix_len, cm, fast_build))
        starts = cm.query_start_loc_cpu[: cm.num_reqs + 1].tolist()
        seq_lens = cm.seq_lens[: cm.num_reqs].cpu()
        block_table = cm.block_table_tensor[: cm.num_reqs].to(torch.int32)
        decode_rows, groups = [], []
        for row in range(cm.num_reqs):
            query_len = starts[row + 1] - starts[row]
            if query_len == 1:
                decode_rows.append(row)
            elif query_len > 1:
                computed = int(seq_lens[row]) - query_len
                # The runner hook sets the ranges of every request of the batch before each build; rows past
                # them are vLLM's dummy requests (memory profiling, warm-up), which have none.
                ranges = self.batch_ranges[row] if row < len(self.batch_ranges) else ()
                kv_limit = kv_limit_for_chunk(ranges, computed, query_len).view(1, -1)
                groups.append(_Group(slice(starts[row], starts[row + 1]), 1, query_len,
                                     torch.tensor([computed], dtype=torch.int32), kv_limit, block_table[row: row + 1]))
        if decode_rows:
            groups.insert(0, _decode_group(decode_rows, seq_lens, starts, block_table))
        return IsmAttentionMetadata(cm.num_actual_tokens, groups)


class IsmAttentionImpl(CPUAttentionBackendImpl):
    """Appends and attends with ``ism::attn_with_kvcache``; vLLM's own CPU kernel when the engine has no ISM."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                 logits_soft_cap=None, attn_type="decoder", kv_sharing_target_layer_name=None, sinks=None) -> None:
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        self.serving = IsmServingConfig.from_vllm_config(get_current_vllm_config())
        if self.serving is not None:
            self._check_supported()

    def _check_supported(self) -> None:
        """ISM serving covers plain decoder self-attention; anything else is refused when the engine starts."""
        unsupported = {
            "attention type": self.attn_type != "decoder",
            "ALiBi slopes": self.alibi_slopes is not None,
            "a sliding window": self.sliding_window != -1,
            "logit soft-capping": bool(self.logits_soft_cap),
            "attention sinks": self.sinks is not None,
            f"KV cache dtype {self.kv_cache_dtype!r}": self.kv_cache_dtype != "auto",
            "KV sharing between layers": self.kv_sharing_target_layer_name is not None,
        }
        found = [name for name, present in unsupported.items() if present]
        if found:
            raise NotImplementedError(f"ism_ext's vLLM backend does not serve models with {', '.join(found)}; "
                                      f"start the engine without additional_config['ism'] for vLLM's own backend")

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if attn_metadata is None:  # vLLM's warm-up and memory profiling
            return output
        if attn_metadata.stock is not None:
            super().do_kv_cache_update(layer, key, value, kv_cache, attn_metadata.stock.slot_mapping)
            return super().forward(layer, query, key, value, kv_cache, attn_metadata.stock, output, output_scale,
                                   output_block_scale)
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("ism_ext's vLLM backend has no fused output quantization")
        k_pages, v_pages = _page_views(kv_cache)
        heads, dim, kv_heads = self.num_heads, self.head_size, self.num_kv_heads
        out = output.view(-1, heads, dim)
        for group in attn_metadata.groups:
            rows = (group.batch, group.query_len)
            result = attn_with_kvcache(
                query[group.tokens].view(*rows, heads, dim), k_pages, v_pages,
                key[group.tokens].view(*rows, kv_heads, dim), value[group.tokens].view(*rows, kv_heads, dim),
                cache_seqlens=group.cache_seqlens, kv_limit=group.kv_limit, block_table=group.block_table,
                softmax_scale=self.scale)
            out[group.tokens] = result.view(-1, heads, dim)
        return output


def _page_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's CPU cache ``[blocks, kv_heads, block_size, 2 * head_dim]`` (a block's keys, then its values, each
    ``[block_size, head_dim]`` per head) as the op's paged ``[pages, page_size, kv_heads, head_dim]`` views."""
    blocks, kv_heads, block_size, _ = kv_cache.shape
    halves = kv_cache.view(blocks, kv_heads, 2 * block_size, -1)
    return halves[:, :, :block_size].transpose(1, 2), halves[:, :, block_size:].transpose(1, 2)


class IsmAttentionBackend(CPUAttentionBackend):
    """vLLM's CPU attention backend with ``ism::attn_with_kvcache`` as its kernel (registered as ``CPU_ATTN``)."""

    # The op writes the new keys and values itself (vLLM's separate cache update is skipped).
    forward_includes_kv_cache_update: bool = True

    @staticmethod
    def get_impl_cls() -> type[IsmAttentionImpl]:
        return IsmAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[IsmMetadataBuilder]:
        return IsmMetadataBuilder
