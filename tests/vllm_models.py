"""Model folders and the reference generation for the vLLM plugin's tests (not a test module).

`tiny_model_dir` writes a random-init Llama or Qwen2 (head dim 32, GQA 4/2) with the tests' tiny ChatML
tokenizer; `Reference` is the project's own verified path: transformers with the ``"ism"`` attention and
``generate(block_sequence_ids=)`` (itself checked against the float64 reference in test_hf_*.py).
"""

from __future__ import annotations

import pathlib

import torch
import transformers
from tiny_tokenizer import make_tokenizer

from ism_ext.integrations import hf  # noqa: F401  (registers the "ism" attention)

__all__ = ["Reference", "block_ids_of", "tiny_model_dir"]

_CONFIGS = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}


def tiny_model_dir(folder: pathlib.Path, family: str, seed: int = 0) -> pathlib.Path:
    """A random-init ``family`` model with the tiny tokenizer, saved as a transformers folder."""
    tokenizer = make_tokenizer()
    config = _CONFIGS[family](
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def block_ids_of(length: int, ranges) -> list[int]:
    """The project's ``block_sequence_ids`` of a prompt with bidirectional ``ranges`` (-1 elsewhere)."""
    ids = [-1] * length
    for n, (start, end) in enumerate(ranges):
        ids[start:end] = [n] * (end - start)
    return ids


class Reference:
    """Greedy tokens and their log-probabilities from ``generate(block_sequence_ids=)`` in float32."""

    def __init__(self, model_dir: pathlib.Path) -> None:
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, attn_implementation="ism", dtype=torch.float32).eval()

    def generate(self, prompt_ids: list[int], ranges, new_tokens: int) -> tuple[list[int], list[float]]:
        ids = torch.tensor([prompt_ids])
        blocks = torch.tensor([block_ids_of(len(prompt_ids), ranges)])
        # No min_new_tokens: it would mask the end-of-turn token, which vLLM (ignore_eos) may still choose.
        out = self.model.generate(ids, block_sequence_ids=blocks, max_new_tokens=new_tokens, eos_token_id=[],
                                  do_sample=False, output_logits=True,
                                  return_dict_in_generate=True, pad_token_id=0, top_k=None, top_p=None,
                                  temperature=None)
        tokens = out.sequences[0, len(prompt_ids):].tolist()
        logprobs = [torch.log_softmax(step[0].double(), -1)[t].item() for step, t in zip(out.logits, tokens,
                                                                                          strict=True)]
        return tokens, logprobs
