"""The `torch.ops.ism` library: loads the compiled extension and names its namespace, once.

Importing this module loads `ism_ext._C`, whose static registrations define the op schemas and the
CPU/CUDA kernels (csrc/ops.cpp). Every Python file that registers or calls an op goes through
`qualname` / `op` here instead of spelling the namespace itself.
"""

from __future__ import annotations

import torch

from .. import _C
from ..config import _push_to_ops, get_kernel_config

NAMESPACE = "ism"

# A paged KV cache's page size must be a multiple of this (the rule lives in csrc/kvcache_constants.h).
PAGE_SIZE_MULTIPLE: int = _C.PAGE_SIZE_MULTIPLE
# The dtypes and head dims the CUDA kernels are compiled for, every dtype with every head dim (the one list
# is csrc/cuda/static_switch.h; every build exports it).
CUDA_KERNEL_DTYPES: tuple[torch.dtype, ...] = tuple(getattr(torch, name) for name in _C.CUDA_KERNEL_DTYPES)
CUDA_KERNEL_HEAD_DIMS: tuple[int, ...] = tuple(_C.CUDA_KERNEL_HEAD_DIMS)


def qualname(name: str) -> str:
    """The qualified name of an op of the library, e.g. ``"ism::segment_attn_fwd"``."""
    return f"{NAMESPACE}::{name}"


def op(name: str) -> torch._ops.OpOverloadPacket:
    """The callable op ``torch.ops.ism.<name>``."""
    return getattr(getattr(torch.ops, NAMESPACE), name)


# The CUDA ops start with the configuration the environment asked for (ism_ext.config).
_push_to_ops(get_kernel_config())
