"""Training throughput: one ISM pass per dialogue versus prefix-LM triplet expansion (ISM paper, sec. 3).

    python benchmarks/bench_train.py            # 2, 4, 8 rounds -> results/train_ism_vs_triplet.{json,png}
    python benchmarks/bench_train.py --quick

Both train on the same answers of the same dialogues with the same model and the same attention kernel
(`attn_implementation="ism"`): `ism` runs each n-round dialogue once with its ISM layout; `triplet` expands
it into n prefix-LM samples (history + query + answer k, loss on answer k). One step = forward, backward
and an AdamW update over the whole set. Records: bench=train_ism_vs_triplet, impl (ism | triplet), rounds,
step_ms (median), tokens (non-padding tokens per step), tokens_per_s, answer_tokens (supervised tokens per
step), answer_tokens_per_s, plus device, torch, commit. The model is a small random-init Llama on the
tokenizer of tests/tiny_tokenizer.py (no download); the same script runs on a GPU with --device cuda.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any

import torch
from common import environment, median_ms, write_records
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
import transformers  # noqa: E402
from tiny_tokenizer import make_tokenizer, sample_dialogues  # noqa: E402

import ism_ext.integrations.hf  # noqa: E402,F401
from ism_ext.training import ChatCollator, tokenize_triplet, triplet_expansion  # noqa: E402
from ism_ext.turns import IGNORE_INDEX  # noqa: E402


def make_model(vocab: int, device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="ism").to(device, dtype)


def triplet_batch(tok, dialogues) -> dict[str, torch.Tensor]:
    """All triplets of all dialogues, right-padded into one batch (labels only on each sample's answer)."""
    samples = [tokenize_triplet(tok, t) for d in dialogues for t in triplet_expansion(d)]
    length = max(len(s) for s in samples)
    n = len(samples)
    batch = {
        "input_ids": torch.full((n, length), tok.pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros(n, length, dtype=torch.long),
        "labels": torch.full((n, length), IGNORE_INDEX, dtype=torch.long),
        "block_sequence_ids": torch.full((n, length), -1, dtype=torch.long),
    }
    for i, s in enumerate(samples):
        batch["input_ids"][i, : len(s)] = s.input_ids
        batch["attention_mask"][i, : len(s)] = 1
        batch["labels"][i, : len(s)] = s.labels
        batch["block_sequence_ids"][i, : len(s)] = s.block_sequence_ids
    return batch


def run(rounds: int, n_dialogues: int, repeats: int, device: str, dtype: torch.dtype, env) -> list[dict[str, Any]]:
    tok = make_tokenizer()
    dialogues = sample_dialogues(n_dialogues, rounds, seed=rounds)
    batches = {"ism": ChatCollator(tok, scheme="ism")(dialogues), "triplet": triplet_batch(tok, dialogues)}
    records = []
    for impl, batch in batches.items():
        model = make_model(len(tok), device, dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batch = {k: v.to(device) for k, v in batch.items()}

        def step(model=model, opt=opt, batch=batch):
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        ms = median_ms(step, repeats, warmup=2, device=device)
        tokens = int(batch["attention_mask"].sum())
        answers = int((batch["labels"] != IGNORE_INDEX).sum())
        records.append(dict(bench="train_ism_vs_triplet", impl=impl, rounds=rounds, dialogues=n_dialogues,
                            samples=int(batch["input_ids"].shape[0]), step_ms=ms, tokens=tokens,
                            tokens_per_s=tokens / (ms * 1e-3), answer_tokens=answers,
                            answer_tokens_per_s=answers / (ms * 1e-3), dtype=str(dtype).split(".")[-1],
                            repeats=repeats, **env))
    return records


def plot(records, path) -> None:
    """Step time and tokens processed per step, per number of rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = sorted({r["rounds"] for r in records})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.38
    for i, impl in enumerate(["ism", "triplet"]):
        rows = {r["rounds"]: r for r in records if r["impl"] == impl}
        xs = [j + (i - 0.5) * width for j in range(len(rounds))]
        axes[0].bar(xs, [rows[n]["step_ms"] for n in rounds], width, label=impl)
        axes[1].bar(xs, [rows[n]["tokens"] for n in rounds], width, label=impl)
    for ax, title in zip(axes, ["step time (ms, same answers trained)", "tokens processed per step"], strict=True):
        ax.set_xticks(range(len(rounds)), [f"{n} rounds" for n in rounds])
        ax.set_title(title)
        ax.legend()
    env = records[0]
    fig.suptitle(f"one ISM pass vs triplet expansion: {env['device']}, torch {env['torch']}, commit {env['commit']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Runs the sweep, writes JSON and PNG, prints a table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--dialogues", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--name", default="train_ism_vs_triplet")
    parser.add_argument("--quick", action="store_true", help="2 and 4 rounds, 4 dialogues, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.dialogues, args.repeats = [2, 4], 4, 2
    env = environment()
    records = []
    for rounds in tqdm(args.rounds, desc="train benchmark", unit="config"):
        records += run(rounds, args.dialogues, args.repeats, args.device, getattr(torch, args.dtype), env)
    path = write_records(args.name, records)
    plot(records, path.with_suffix(".png"))
    header = ("rounds", 6), ("impl", 8), ("samples", 8), ("tokens", 7), ("step ms", 9), ("answer tok/s", 13)
    print("\n" + " ".join(f"{h:>{w}}" for h, w in header) + f" {'speedup':>8}")
    for r in records:
        ism = next(x for x in records if x["rounds"] == r["rounds"] and x["impl"] == "ism")
        print(f"{r['rounds']:>6} {r['impl']:>8} {r['samples']:>8} {r['tokens']:>7} {r['step_ms']:>9.1f} "
              f"{r['answer_tokens_per_s']:>13.0f} {r['step_ms'] / ism['step_ms']:>7.2f}x")
    print(f"\nwrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
