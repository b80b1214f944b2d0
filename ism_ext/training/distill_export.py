"""The library side of `python -m ism_ext distill`: the teacher's answers, cached, and the adapter export.

`cli/distill.py` parses the command line and calls these; anything that wants the same run from Python
(a notebook, another command) calls them too.
"""

from __future__ import annotations

import json
import pathlib
import shutil

__all__ = ["adapter_readme", "distill_teacher_file", "export_adapter"]

# What each scheme makes bidirectional, for the exported README (ism_ext.masks, docs/layouts.md).
_SCHEME_WORDS = {
    "ism": "user and system turns bidirectional, answers causal",
    "mas": "system and user messages bidirectional from header to end-of-turn, the rest causal",
    "mas_merged": "runs of same-role turns bidirectional as one block, answers causal",
    "prefix_lm": "everything before the last answer one bidirectional block, the last answer causal",
}


def distill_teacher_file(model: str, prompts: pathlib.Path, out: pathlib.Path, *, max_new_tokens: int,
                         batch_size: int, progress: bool) -> pathlib.Path:
    """The teacher's (``model`` with causal masks, greedy) answers to the train split of ``prompts``, made once
    into ``out`` and reused by later runs with the same inputs; returns the JSONL file."""
    from ..integrations.hf.models import load_chat_model
    from .teacher import answer_dialogues, cached_teacher_file, load_prompts

    def make():
        chat_model, tokenizer = load_chat_model(model)
        print(f"teacher: {model} answers the train prompts of {prompts} (causal, greedy)", flush=True)
        return answer_dialogues(chat_model, tokenizer, load_prompts(prompts, "train"),
                                max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)

    return cached_teacher_file(out, prompts, "train", model, max_new_tokens, make)


def adapter_readme(base_model: str, scheme: str, command: str, losses: list[float]) -> str:
    """The README of an exported adapter: which model, which scheme, the command, the KL at both ends."""
    words = _SCHEME_WORDS.get(scheme, f"the {scheme!r} layout")
    return (
        f"# {base_model} adapted to the {scheme} layout\n\n"
        "A LoRA adapter (float16) made by self-distillation: the model with causal masks is the teacher, the\n"
        f"same model with this adapter under the {scheme} layout ({words}) the student; it learns the\n"
        "teacher's token distributions (KL) on the teacher's answers to the prompt set. With it, the model can\n"
        f"be prompted with {scheme} layouts and keep its KV cache across rounds.\n\n"
        f"Made by:\n\n    {command}\n\n"
        f"{len(losses)} steps; KL at the first step {losses[0]:.4f}, at the last {losses[-1]:.4f} (loss.jsonl).\n"
    )


def export_adapter(checkpoint: pathlib.Path, out: pathlib.Path, target: pathlib.Path, *, command: str,
                   base_model: str, scheme: str) -> None:
    """The adapter of ``checkpoint`` in float16 (for ``base_model``), the loss log of ``out`` and a README, into
    ``target``."""
    import torch
    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True, exist_ok=True)
    weights = load_file(checkpoint / "adapter_model.safetensors")
    save_file({k: v.to(torch.float16) for k, v in weights.items()}, target / "adapter_model.safetensors")
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    # peft records the base model's local folder (a venv path here); the adapter is loaded onto a model
    # the caller builds, so it names the model as `--model` did, which holds on any machine.
    config["base_model_name_or_path"] = base_model
    (target / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copy(out / "loss.jsonl", target / "loss.jsonl")
    losses = [json.loads(line)["loss"] for line in (out / "loss.jsonl").read_text().splitlines()]
    (target / "README.md").write_text(adapter_readme(base_model, scheme, command, losses), encoding="utf-8")
