"""The cache layer: the keys and values of a model kept across calls (`KVCache`), paged by a `PagedAllocator`.

It knows the op (`ism_ext.ops.attn_with_kvcache`) and the rule, not any model library: the transformers
`Cache` adapter (`ism_ext.integrations.hf.IsmCache`) and the chat session build on it.
"""

from .kv_cache import KVCache
from .paged import PageCopy, PagedAllocator

__all__ = ["KVCache", "PageCopy", "PagedAllocator"]
