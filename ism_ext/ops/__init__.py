"""The ops layer: `torch.ops.ism` wrappers with fake kernels and autograd (no model knowledge here)."""

from ._library import NAMESPACE, PAGE_SIZE_MULTIPLE
from .kvcache_attention import attn_with_kvcache
from .segment_attention import segment_attention

__all__ = ["NAMESPACE", "PAGE_SIZE_MULTIPLE", "attn_with_kvcache", "segment_attention"]
