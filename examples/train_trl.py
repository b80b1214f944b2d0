"""Fine-tune a chat model with TRL's SFTTrainer under ISM masks: every answer of a dialogue in one pass.

    python examples/train_trl.py                                  # tiny built-in model, toy chats, a few seconds
    python examples/train_trl.py --pack --scheme mas --lora       # packed rows, MAS masks, LoRA adapters
    accelerate launch --multi_gpu --num_processes 2 examples/train_trl.py --batch-size 2   # two processes
    python examples/train_trl.py --model path/to/hf_model --data chats.jsonl --lora --lr 2e-4 --max-steps 200

The data is a JSONL file of ``{"messages": [{"role": ..., "content": ...}, ...]}`` rows (the shipped toy chats by
default). ``--model tiny`` builds a randomly initialised 0.1 M-parameter Llama and a toy tokenizer trained on the
data, so nothing is downloaded; any local Llama / Qwen2 / Qwen3 / Mistral folder works too. ``--out`` receives the
trained model (or adapter) with its tokenizer, ``losses.json`` (the loss of every step) and, with ``--model tiny``,
the untrained base model in ``base_model/`` (what an adapter is loaded onto:
``load_chat_model("OUT/base_model", adapter="OUT")``).

Several processes: ``accelerate launch --multi_gpu --num_processes N`` starts N torch.distributed processes (on a
machine without GPUs they train on the CPU over gloo; ``--cpu`` would start only one). Each takes ``--batch-size``
dialogues per step, and the loss is averaged over the answer tokens of all processes, so two processes with
batch 2 train exactly as one with batch 4.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ism_ext.integrations.trl import IsmSFTConfig, IsmSFTTrainer
from ism_ext.training import DEFAULT_DATA, load_chat_jsonl
from ism_ext.training.toy import build_tiny_llama, build_toy_tokenizer, dialogue_texts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny' or a local transformers folder")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="JSONL chats (default: the shipped toy chats)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N dialogues")
    p.add_argument("--out", default="train_trl_out")
    p.add_argument("--scheme", default="ism", choices=["ism", "mas", "mas_merged", "causal"])
    p.add_argument("--pack", action="store_true", help="pack whole dialogues per row (padding-free)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of every weight")
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8, help="dialogues per process and step")
    p.add_argument("--max-length", type=int, default=512, help="per dialogue; whole trailing rounds are dropped")
    p.add_argument("--lr", type=float, default=3e-3, help="3e-3 suits the tiny model; ~2e-5 (full) or 2e-4 (LoRA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sequential", action="store_true", help="take the dialogues in file order (no shuffling)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is there")
    return p.parse_args(argv)


def load_model(args: argparse.Namespace, dialogues: list[list[dict]], out: pathlib.Path):
    """The model (on the ism attention) and its tokenizer."""
    if args.model == "tiny":
        tokenizer = build_toy_tokenizer(dialogue_texts(dialogues))
        model = build_tiny_llama(len(tokenizer), seed=args.seed)
        if args.lora:  # the base the adapter is loaded onto later
            model.save_pretrained(out / "base_model")
            tokenizer.save_pretrained(out / "base_model")
        return model, tokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="ism", dtype=torch.float32)
    return model, tokenizer


def main(argv: list[str] | None = None) -> list[float]:
    """Trains and saves; returns the loss of every step."""
    args = parse_args(argv)
    out = pathlib.Path(args.out)
    dialogues = [e.messages for e in load_chat_jsonl(args.data)][: args.limit]
    model, tokenizer = load_model(args, dialogues, out)
    peft_config = None
    if args.lora:
        import peft

        peft_config = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    config = IsmSFTConfig(
        output_dir=str(out), ism_scheme=args.scheme, ism_packing=args.pack, max_length=args.max_length,
        per_device_train_batch_size=args.batch_size, max_steps=args.max_steps, learning_rate=args.lr,
        lr_scheduler_type="constant", weight_decay=0.0, seed=args.seed, logging_steps=1, save_strategy="no",
        report_to=[], gradient_checkpointing=False, ddp_find_unused_parameters=False,
        use_cpu=args.cpu or not torch.cuda.is_available(),
        train_sampling_strategy="sequential" if args.sequential else "random",
    )
    trainer = IsmSFTTrainer(model, args=config, train_dataset=datasets.Dataset.from_list(
        [{"messages": d} for d in dialogues]), processing_class=tokenizer, peft_config=peft_config)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    trainer.save_model(str(out))  # the adapter only with --lora
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(out)
        (out / "losses.json").write_text(json.dumps(losses) + "\n")
        state = trainer.accelerator.state
        print(f"{len(losses)} steps on {state.num_processes} process(es) ({state.distributed_type}), loss "
              f"{losses[0]:.4f} -> {losses[-1]:.4f}; saved to {out}")
    return losses


if __name__ == "__main__":
    main()
    # Under `accelerate launch` the process group is still open here; closing it before the interpreter exits
    # avoids a teardown race in gloo's threads ("terminate called without an active exception").
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
