"""The teacher's side of self-distillation: prompts -> dialogues answered by the causal model, cached on disk.

A prompt is ``{"id", "split", "system", "user": [turn, ...]}`` (`datasets/distill_prompts.jsonl`). The teacher
answers round by round, a batch of dialogues at a time (left-padded `generate`, greedy), with every token
causal: what the model was trained for. The answered dialogues are a chat JSONL file that `train` reads;
a small JSON file beside it records what produced them, so a later run reuses them only when nothing changed.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import torch

from ..turns import render_dialogue, tokenize_rendered
from .files import atomic_write_text

__all__ = ["DEFAULT_PROMPTS", "answer_dialogues", "cached_teacher_file", "left_pad", "load_prompts"]

DEFAULT_PROMPTS = pathlib.Path(__file__).with_name("datasets") / "distill_prompts.jsonl"


def load_prompts(path: str | pathlib.Path, split: str | None = "train") -> list[dict[str, Any]]:
    """The prompts of ``split`` ("train", "heldout", or None for all) from a prompts JSONL file."""
    rows = [json.loads(line) for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    for k, row in enumerate(rows):
        if not isinstance(row.get("user"), list) or not row["user"] or not all(isinstance(u, str) for u in row["user"]):
            raise ValueError(f"{path}, line {k + 1}: expected a non-empty list of user turns under 'user'")
    return [r for r in rows if split is None or r.get("split", "train") == split]


def _start(prompt: dict[str, Any]) -> list[dict[str, str]]:
    return [{"role": "system", "content": prompt["system"]}] if prompt.get("system") else []


def _prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The dialogue so far, rendered with the generation prompt, as the renderer tokenises it."""
    rendered = render_dialogue(tokenizer, messages, add_generation_prompt=True)
    return tokenize_rendered(tokenizer, rendered, "causal").input_ids.tolist()


def left_pad(rows: Sequence[torch.Tensor], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D rows stacked right-aligned into ``[B, longest]`` filled with ``value``, and the mask of real entries."""
    width = max(len(r) for r in rows)
    padded = torch.full((len(rows), width), value, dtype=rows[0].dtype)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        padded[b, width - len(r):], mask[b, width - len(r):] = r, 1
    return padded, mask


def _generate_round(model: Any, tokenizer: Any, dialogues: list[list[dict[str, str]]],
                    max_new_tokens: int) -> list[str]:
    """Greedy answers of the causal model to a batch of dialogues (left padding)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = left_pad([torch.tensor(_prompt_ids(tokenizer, d)) for d in dialogues], pad)
    width = ids.shape[1]
    device = model.device
    with torch.inference_mode():
        out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, top_k=None, top_p=None, temperature=None,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out.tolist()]


def answer_dialogues(model: Any, tokenizer: Any, prompts: Sequence[dict[str, Any]], *, max_new_tokens: int,
                     batch_size: int, progress: bool = True) -> list[dict[str, Any]]:
    """Every prompt answered by the model round by round: ``{"id", "split", "messages"}`` per dialogue."""
    from tqdm.auto import tqdm

    out = []
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc="teacher answers", unit="batch", disable=not progress):
        batch = list(prompts[start:start + batch_size])
        messages = [_start(p) for p in batch]
        for r in range(max(len(p["user"]) for p in batch)):
            active = [b for b, p in enumerate(batch) if r < len(p["user"])]
            for b in active:
                messages[b].append({"role": "user", "content": batch[b]["user"][r]})
            answers = _generate_round(model, tokenizer, [messages[b] for b in active], max_new_tokens)
            for b, answer in zip(active, answers, strict=True):
                messages[b].append({"role": "assistant", "content": answer})
        out += [{"id": p.get("id"), "split": p.get("split"), "messages": m}
                for p, m in zip(batch, messages, strict=True)]
    return out


def cached_teacher_file(out_dir: pathlib.Path, prompts_path: pathlib.Path, split: str, model_name: str,
                        max_new_tokens: int, make: Any) -> pathlib.Path:
    """``out_dir/teacher_<split>.jsonl``, made by ``make()`` (a list of dialogues) unless a file made from the
    same prompts, split, model and answer length is already there."""
    key = {"prompts_sha256": hashlib.sha256(prompts_path.read_bytes()).hexdigest(), "split": split,
           "model": model_name, "max_new_tokens": max_new_tokens}
    data, meta = out_dir / f"teacher_{split}.jsonl", out_dir / f"teacher_{split}.json"
    if data.is_file() and meta.is_file() and json.loads(meta.read_text(encoding="utf-8")) == key:
        return data
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = make()
    # The key goes first and comes back last: until both files are whole, no key vouches for the answers.
    meta.unlink(missing_ok=True)
    atomic_write_text(data, "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows))
    atomic_write_text(meta, json.dumps(key, indent=1) + "\n")
    return data
