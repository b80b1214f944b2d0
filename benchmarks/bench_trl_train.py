"""TRL SFTTrainer step time: one ISM pass per dialogue versus triplet expansion (one sample per answer).

    python benchmarks/bench_trl_train.py            # 2, 4, 8 rounds -> results/trl_train.{json,png}
    python benchmarks/bench_trl_train.py --quick    # 2 rounds, 2 dialogues, 2 repeats (a smoke run)

What `bench_train.py` measures for the project's own loop, measured inside TRL: both impls are
`ism_ext.integrations.trl.IsmSFTTrainer` steps (forward, backward, clipping, AdamW, TRL's chunked LM-head loss
and metrics, collation) on the same answers of the same dialogues with the same model and attention kernel.
`ism` trains each n-round dialogue once with its ISM layout (one batch of all dialogues per step); `triplet`
feeds TRL the dialogues expanded into n prefix-LM samples each (history + query + answer k, loss on answer k:
`ism_ext.training.tokenize_triplet`), all of them in one batch per step. A step is timed from the end of the
previous one (a callback), so the data loading and collation are in it; step_ms is the median over `--repeats`
steps after `--warmup` steps. Records: bench=trl_train, impl (ism | triplet), rounds, step_ms, dialogues, samples,
tokens (non-padding tokens per step), answer_tokens, tokens_per_s, repeats, warmup, dtype, trl, transformers,
plus device, cpu_threads, torch, cuda, commit. The model is a small random-init Llama (4 layers, hidden 256, as in
`bench_train.py`) on the tokenizer of tests/tiny_tokenizer.py (no download); `--device cuda` runs it on a GPU.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
from common import environment, write_records

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
import datasets  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from tiny_tokenizer import make_tokenizer, sample_dialogues  # noqa: E402

from ism_ext.integrations.trl import IsmSFTConfig, IsmSFTTrainer, tokenize_conversations  # noqa: E402
from ism_ext.training import tokenize_triplet, triplet_expansion  # noqa: E402
from ism_ext.turns import IGNORE_INDEX  # noqa: E402


def make_model(vocab: int, dtype: torch.dtype):
    """The model of bench_train.py: a random-init 4-layer Llama on the ism attention."""
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="ism").to(dtype)


def triplet_rows(tok, dialogues) -> datasets.Dataset:
    """Every dialogue's prefix-LM samples (one per answer), tokenised: the columns IsmSFTTrainer takes as they are."""
    samples = [tokenize_triplet(tok, t) for d in dialogues for t in triplet_expansion(d)]
    return datasets.Dataset.from_list([{"input_ids": s.input_ids.tolist(), "labels": s.labels.tolist(),
                                        "block_sequence_ids": s.block_sequence_ids.tolist()} for s in samples])


class StepClock(transformers.TrainerCallback):
    """Wall time of every optimizer step, from the end of the previous one (or the start of training)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.last = 0.0
        self.ms: list[float] = []

    def _now(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        now = self._now()
        self.ms.append((now - self.last) * 1e3)
        self.last = now


def time_impl(rows: datasets.Dataset, per_step: int, tok, args: argparse.Namespace, dtype: torch.dtype,
              out: str) -> float:
    """Median step time of IsmSFTTrainer over the same batch (all of ``rows``) repeated, after the warm-up."""
    steps = args.warmup + args.repeats
    repeated = datasets.concatenate_datasets([rows] * steps)  # sequential sampler: step k sees the same batch
    config = IsmSFTConfig(
        output_dir=out, per_device_train_batch_size=per_step, max_steps=steps, learning_rate=1e-4, max_length=None,
        lr_scheduler_type="constant", optim="adamw_torch", logging_steps=10**6, save_strategy="no", report_to=[],
        disable_tqdm=True, gradient_checkpointing=False, train_sampling_strategy="sequential",
        use_cpu=args.device == "cpu", dataloader_pin_memory=False)
    clock = StepClock(args.device)
    trainer = IsmSFTTrainer(make_model(len(tok), dtype), args=config, train_dataset=repeated, processing_class=tok,
                            callbacks=[clock])
    trainer.remove_callback(transformers.PrinterCallback)  # no log lines between the timed steps
    trainer.train()
    return statistics.median(clock.ms[args.warmup:])


def run(rounds: int, args: argparse.Namespace, env: dict[str, Any]) -> list[dict[str, Any]]:
    """The two records (ism, triplet) of one number of rounds."""
    tok = make_tokenizer()
    dtype = getattr(torch, args.dtype)
    dialogues = sample_dialogues(args.dialogues, rounds, seed=rounds)
    impls = {"ism": tokenize_conversations([{"messages": d} for d in dialogues], tok, "ism"),
             "triplet": triplet_rows(tok, dialogues)}
    records = []
    for impl, rows in impls.items():
        with tempfile.TemporaryDirectory() as out:
            ms = time_impl(rows, len(rows), tok, args, dtype, out)
        tokens = sum(len(r) for r in rows["input_ids"])
        answers = sum(sum(label != IGNORE_INDEX for label in r[1:]) for r in rows["labels"])
        records.append(dict(bench="trl_train", impl=impl, rounds=rounds, step_ms=ms, dialogues=args.dialogues,
                            samples=len(rows), tokens=tokens, tokens_per_s=tokens / (ms * 1e-3), answer_tokens=answers,
                            repeats=args.repeats, warmup=args.warmup, dtype=args.dtype, trl=trl.__version__,
                            transformers=transformers.__version__, **env))
    return records


def plot(records: list[dict[str, Any]], path: pathlib.Path) -> None:
    """Step time per number of rounds, ism next to triplet, with the ratio over each pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = sorted({r["rounds"] for r in records})
    by = {(r["impl"], r["rounds"]): r for r in records}
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for i, impl in enumerate(["ism", "triplet"]):
        xs = [j + (i - 0.5) * width for j in range(len(rounds))]
        ax.bar(xs, [by[impl, n]["step_ms"] for n in rounds], width, label=impl)
    for j, n in enumerate(rounds):
        ratio = by["triplet", n]["step_ms"] / by["ism", n]["step_ms"]
        ax.annotate(f"{ratio:.1f}x", (j + 0.5 * width, by["triplet", n]["step_ms"]), ha="center", va="bottom")
    ax.set_xticks(range(len(rounds)), [f"{n} rounds" for n in rounds])
    ax.set_ylabel("SFTTrainer step (ms, median)")
    ax.legend()
    env = records[0]
    ax.set_title(f"TRL {env['trl']}: one ISM pass vs triplet expansion, {env['dialogues']} dialogues/step\n"
                 f"{env['device']}, {env['cpu_threads']} threads, torch {env['torch']}, commit {env['commit']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Runs the sweep, writes JSON and PNG, prints a table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--dialogues", type=int, default=8, help="dialogues per step")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--name", default="trl_train", help="results/<name>.json and .png")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 2 dialogues, 1 warm-up, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.dialogues, args.warmup, args.repeats = [2], 2, 1, 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    env = environment()
    records = []
    for rounds in args.rounds:
        records += run(rounds, args, env)
    path = write_records(args.name, records)
    plot(records, path.with_suffix(".png"))
    print(f"\n{'rounds':>6} {'impl':>8} {'samples':>8} {'tokens':>7} {'step ms':>9} {'vs ism':>7}")
    for r in records:
        ism = next(x for x in records if x["rounds"] == r["rounds"] and x["impl"] == "ism")
        print(f"{r['rounds']:>6} {r['impl']:>8} {r['samples']:>8} {r['tokens']:>7} {r['step_ms']:>9.1f} "
              f"{r['step_ms'] / ism['step_ms']:>6.2f}x")
    print(f"\nwrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
