"""The inference layer: the chat session, on the project's own KV cache.

The cache itself is `ism_ext.cache` (`KVCache`) and `ism_ext.integrations.hf` (`IsmCache`); the models that
load offline are in `ism_ext.integrations.hf.models`.
"""

from .chat import ChatSession, RoundStats

__all__ = ["ChatSession", "RoundStats"]
