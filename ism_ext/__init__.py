"""ism_ext: segment-masked attention (ISM, MAS) as `torch.ops.ism` ops with autograd.

Importing the package loads the native extension, which registers the ops in `torch.ops.ism`.
"""

import torch  # noqa: F401  (the extension links against torch: load it first)

from . import _C  # noqa: F401  (registers torch.ops.ism.*)
from ._kvcache_ops import attn_with_kvcache, kv_limit_causal_append, kv_limit_new_segment
from ._ops import segment_attention
from .kv_cache import KVCache
from .layouts import SCHEMES, dense_mask, kv_limit_for_turns, segment_ids_for_turns
from .segments import kv_limit_from_segment_ids

__all__ = [
    "KVCache",
    "SCHEMES",
    "attn_with_kvcache",
    "dense_mask",
    "kv_limit_causal_append",
    "kv_limit_for_turns",
    "kv_limit_from_segment_ids",
    "kv_limit_new_segment",
    "segment_attention",
    "segment_ids_for_turns",
]
__version__ = "0.1.0"
