"""The inference layer: the chat session (on the project's own KV cache), and models that load offline."""

from .chat import ChatSession, RoundStats

__all__ = ["ChatSession", "RoundStats"]
