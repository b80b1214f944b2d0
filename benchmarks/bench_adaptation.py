"""ISM on a real model, with and without the shipped adapter, measured against the causal teacher.

    python benchmarks/bench_adaptation.py                  # SmolLM2-135M on the CPU -> results/adaptation.{json,png}

On the held-out prompts of `distill_prompts.jsonl` the teacher (SmolLM2 with causal masks, greedy, as in
`python -m ism_ext distill`) answers every round. Then, for each impl (model x layout):

* agreement: teacher-forced top-1 agreement with the teacher on its answer tokens (every round of every
  held-out dialogue in one forward, under the impl's layout);
* answer_match: the fraction of prompts (a round, with the teacher's history before it) whose greedy answer
  equals the teacher's for its first 16 tokens (or to the end of the teacher's turn when shorter);
* accuracy: on `benchmarks/data/short_answer_qa.jsonl` (questions with known one-word answers, written for
  this benchmark; system prompt "Answer with one word."), the fraction of greedy answers whose first line
  contains an accepted answer as a word.

impls: causal_base, ism_base (no adaptation), ism_adapted (the shipped adapter), causal_adapted. Records:
bench="adaptation", impl, agreement, answer_match, accuracy, n_prompts, n_answer_tokens, n_questions, plus
model, adapter, device, torch, commit. A PNG beside the JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
from typing import Any

import torch
from common import environment, write_records
from tqdm import tqdm

from ism_ext.integrations.hf.models import DEFAULT_ADAPTER, load_chat_model
from ism_ext.training import tokenize_triplet
from ism_ext.training.teacher import DEFAULT_PROMPTS, answer_dialogues, left_pad, load_prompts
from ism_ext.turns import IGNORE_INDEX, render_dialogue, tokenize_dialogue, tokenize_rendered

QA = pathlib.Path(__file__).resolve().parent / "data" / "short_answer_qa.jsonl"
MATCH_TOKENS = 16
IMPLS = ("causal_base", "ism_base", "ism_adapted", "causal_adapted")


def agreement(model, tok, dialogues: list[dict], scheme: str) -> tuple[float, int]:
    """Teacher-forced top-1 agreement on the teacher's answer tokens, and how many tokens that is."""
    hits = total = 0
    for d in dialogues:
        t = tokenize_dialogue(tok, d["messages"], scheme)
        with torch.inference_mode():
            logits = model(t.input_ids[None], block_sequence_ids=t.block_sequence_ids[None]).logits[0]
        answer = t.labels[1:] != IGNORE_INDEX  # position j predicts token j + 1
        hits += int((logits[:-1].argmax(-1)[answer] == t.labels[1:][answer]).sum())
        total += int(answer.sum())
    return hits / total, total


def greedy(model, tok, prompts: list[list[dict]], scheme: str, max_new_tokens: int, batch: int = 16) -> list[list[int]]:
    """Greedy answers (token ids up to the end of turn) to prompts under ``scheme``, left-padded in batches."""
    answers = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for start in range(0, len(prompts), batch):
        rows = [tokenize_rendered(tok, render_dialogue(tok, p, add_generation_prompt=True), scheme)
                for p in prompts[start:start + batch]]
        ids, mask = left_pad([r.input_ids for r in rows], pad)
        blocks, _ = left_pad([r.block_sequence_ids for r in rows], -1)
        width = ids.shape[1]
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, block_sequence_ids=blocks, max_new_tokens=max_new_tokens,
                                 do_sample=False, top_k=None, top_p=None, temperature=None,
                                 eos_token_id=tok.eos_token_id, pad_token_id=pad)
        for row in out[:, width:].tolist():
            answers.append(row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
    return answers


def round_prompts(tok, dialogues: list[dict]) -> tuple[list[list[dict]], list[list[int]]]:
    """Every round of every dialogue: the prompt (teacher history + the user turn) and the teacher's answer ids."""
    prompts, targets = [], []
    for d in dialogues:
        msgs = d["messages"]
        for k, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            labels = tokenize_triplet(tok, msgs[: k + 1]).labels  # this answer's tokens only
            prompts.append(msgs[:k])
            targets.append(labels[labels != IGNORE_INDEX].tolist())
    return prompts, targets


def answer_match(model, tok, prompts, targets, scheme: str) -> float:
    """The fraction of prompts whose greedy answer under ``scheme`` starts with the teacher's MATCH_TOKENS."""
    got = greedy(model, tok, prompts, scheme, MATCH_TOKENS)
    same = [g[: min(MATCH_TOKENS, len(t))] == t[:MATCH_TOKENS] for g, t in zip(got, targets, strict=True)]
    return sum(same) / len(same)


def accuracy(model, tok, scheme: str) -> tuple[float, int]:
    """The fraction of QA questions answered with an accepted word under ``scheme``, and how many there are."""
    rows = [json.loads(line) for line in QA.read_text().splitlines() if line.strip()]
    prompts = [[{"role": "system", "content": "Answer with one word."}, {"role": "user", "content": r["question"]}]
               for r in rows]
    got = [tok.decode(a, skip_special_tokens=True).strip().lower().split("\n")[0]
           for a in greedy(model, tok, prompts, scheme, 12)]
    ok = [any(re.search(rf"\b{re.escape(ans)}\b", text) for ans in r["answers"])
          for r, text in zip(rows, got, strict=True)]
    return sum(ok) / len(ok), len(ok)


def plot(records: list[dict[str, Any]], path: pathlib.Path) -> None:
    from matplotlib.figure import Figure

    from ism_ext.viz import save_figure

    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.add_subplot()
    metrics = ("agreement", "answer_match", "accuracy")
    width = 0.2
    for i, r in enumerate(records):
        ax.bar([m + (i - 1.5) * width for m in range(len(metrics))], [r[k] for k in metrics], width, label=r["impl"])
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set(ylim=(0, 1.05), ylabel="fraction", title="SmolLM2-135M under ISM: unadapted vs self-distilled adapter")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default=str(DEFAULT_ADAPTER))
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    parser.add_argument("--max-new-tokens", type=int, default=64, help="teacher answer length (as in distill)")
    parser.add_argument("--name", default="adaptation")
    args = parser.parse_args()
    env = environment()  # at the start: the commit the run measures, before anything else can change the tree
    base, tok = load_chat_model()
    adapted, _ = load_chat_model(adapter=args.adapter)
    models = {"base": base, "adapted": adapted}
    held = load_prompts(args.prompts, "heldout")
    dialogues = answer_dialogues(base, tok, held, max_new_tokens=args.max_new_tokens, batch_size=16)
    prompts, targets = round_prompts(tok, dialogues)
    records = []
    for impl in tqdm(IMPLS, desc="adaptation", unit="impl"):
        scheme, which = impl.split("_")
        model = models[which]
        agree, n_tokens = agreement(model, tok, dialogues, scheme)
        acc, n_questions = accuracy(model, tok, scheme)
        records.append(dict(bench="adaptation", impl=impl, agreement=agree,
                            answer_match=answer_match(model, tok, prompts, targets, scheme), accuracy=acc,
                            n_prompts=len(prompts), n_answer_tokens=n_tokens, n_questions=n_questions,
                            model="SmolLM2-135M-Instruct", adapter=args.adapter, **env))
    path = write_records(args.name, records)
    plot(records, path.with_suffix(".png"))
    print(f"\n{'impl':<15} {'agreement':>9} {'answer_match':>12} {'accuracy':>8}")
    for r in records:
        print(f"{r['impl']:<15} {r['agreement']:>9.3f} {r['answer_match']:>12.3f} {r['accuracy']:>8.3f}")
    print(f"\n{len(prompts)} prompts, {records[0]['n_answer_tokens']} teacher answer tokens, "
          f"{records[0]['n_questions']} questions; wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
