"""`torch.ops.ism` attention inside Hugging Face transformers causal LMs.

Importing this package registers the attention implementation ``"ism"`` in transformers'
`AttentionInterface`, together with a mask function of the same name in `AttentionMaskInterface`
(without one, transformers would hand the attention no mask information at all). Then::

    model = AutoModelForCausalLM.from_config(config, attn_implementation="ism")   # or from_pretrained
    apply_ism(model)                                     # or: patch a model that is already loaded
    out = model(input_ids, block_sequence_ids=ids, labels=labels)

`block_sequence_ids` follows transformers' convention (-1 = causal token, a contiguous run of one
id >= 0 = one bidirectional block). It travels with the forward's keyword arguments to every attention
layer (`attention.py`), which turns it, the padding and the packing into one varlen packing per forward
(`packing.py`). On the project's cache (`IsmCache`, `cache.py`) each layer appends and attends in one op call;
`model.generate(..., block_sequence_ids=...)` works and uses that cache by default (`generation.py`, which
wraps two private `GenerationMixin` methods for ``"ism"`` models only, and says why). No module-level state
carries anything from one call to the next: see `attention.py`.

Supported families: Llama, Qwen2, Qwen3, Mistral (full attention; sliding windows, logit softcapping
and attention dropout are rejected with a clear error, never silently ignored).
"""

from .attention import (
    ATTN_IMPLEMENTATION,
    SUPPORTED_MODEL_TYPES,
    IsmMask,
    NewRows,
    ism_attention_forward,
    ism_mask_function,
    register,
)
from .cache import IsmCache
from .generation import (
    CHECKED_TRANSFORMERS,
    SUPPORTED_TRANSFORMERS,
    cache_argument_name,
    check_transformers_version,
    install,
    is_ism_model,
)
from .packing import VarlenPacking, query_block_ids, varlen_packing, varlen_packing_op
from .patch import (
    APPLY_FUNCTIONS,
    apply_ism,
    apply_ism_to_llama,
    apply_ism_to_mistral,
    apply_ism_to_qwen2,
    apply_ism_to_qwen3,
)

__all__ = [
    "APPLY_FUNCTIONS",
    "ATTN_IMPLEMENTATION",
    "CHECKED_TRANSFORMERS",
    "SUPPORTED_MODEL_TYPES",
    "SUPPORTED_TRANSFORMERS",
    "IsmCache",
    "IsmMask",
    "NewRows",
    "VarlenPacking",
    "apply_ism",
    "cache_argument_name",
    "check_transformers_version",
    "install",
    "is_ism_model",
    "apply_ism_to_llama",
    "apply_ism_to_mistral",
    "apply_ism_to_qwen2",
    "apply_ism_to_qwen3",
    "ism_attention_forward",
    "ism_mask_function",
    "varlen_packing_op",
    "varlen_packing",
    "query_block_ids",
    "register",
]

register()
install()
