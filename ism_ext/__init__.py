"""ism_ext: segment-masked attention (ISM, MAS) as `torch.ops.ism` ops with autograd.

Importing the package loads the native extension, which registers the ops in `torch.ops.ism`. The package
is layered, one folder a layer; a layer imports only the layers above it (docs/design.md):

    config.py      which opt-in CUDA kernels run (KernelConfig, set_kernel_config, kernel_config)
    masks/         segment ids and chat-turn schemes -> kv_limit
    ops/           segment_attention, attn_with_kvcache: wrappers, fake kernels, autograd
    turns/         the turn renderer: chat template -> token ids, segment ids, labels
    cache/         KVCache and its PagedAllocator (the storage of keys and values)
    integrations/  hf/: the "ism" attention inside transformers models, IsmCache, model loaders
    training/      one-pass multi-turn training data and the train loop
    inference/     the chat session
    cli/, viz/, perf/   the commands, pictures, the timer
"""

import torch  # noqa: F401  (the extension links against torch: load it first)

from . import (
    _C,  # noqa: F401  (registers torch.ops.ism.*)
    config,
)
from .cache import KVCache
from .masks import (
    SCHEMES,
    dense_mask,
    kv_limit_causal_append,
    kv_limit_for_turns,
    kv_limit_from_segment_ids,
    kv_limit_new_segment,
    segment_ids_for_turns,
)
from .ops import attn_with_kvcache, segment_attention

__all__ = [
    "KVCache",
    "SCHEMES",
    "attn_with_kvcache",
    "config",
    "dense_mask",
    "kv_limit_causal_append",
    "kv_limit_for_turns",
    "kv_limit_from_segment_ids",
    "kv_limit_new_segment",
    "segment_attention",
    "segment_ids_for_turns",
]
__version__ = "0.1.0"
