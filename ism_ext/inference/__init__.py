"""The inference layer: the KV cache kept across rounds, the chat session, and the models that load offline."""

from .chat import ChatSession, RoundStats
from .kv_cache import KVCache
from .paged import PagedAllocator

__all__ = ["ChatSession", "KVCache", "PagedAllocator", "RoundStats"]
