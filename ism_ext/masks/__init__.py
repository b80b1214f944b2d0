"""The masks layer: segment ids and chat-turn schemes -> the per-token `kv_limit` (pure PyTorch).

Nothing here needs the compiled extension, so layouts can be built and tested before the ops exist.
"""

from .dense import dense_mask
from .new_tokens import kv_limit_causal_append, kv_limit_new_segment
from .schemes import (
    ROLES,
    SCHEMES,
    TURN_ROLES,
    check_scheme,
    check_turns,
    kv_limit_for_turns,
    segment_ids_for_turns,
    turn_boundaries,
)
from .segments import kv_limit_from_segment_ids
from .synthetic import rounds_dialogue

__all__ = [
    "ROLES",
    "SCHEMES",
    "TURN_ROLES",
    "check_scheme",
    "check_turns",
    "dense_mask",
    "kv_limit_causal_append",
    "kv_limit_for_turns",
    "kv_limit_from_segment_ids",
    "kv_limit_new_segment",
    "rounds_dialogue",
    "segment_ids_for_turns",
    "turn_boundaries",
]
