"""The command line: `python -m ism_ext <command>`. Each command is a module of this package."""

from __future__ import annotations

import importlib
import sys

__all__ = ["COMMANDS", "main"]

COMMANDS = {
    "demo": "a 4-round chat with SmolLM2 and the KV cache kept across rounds; TTFT of ISM vs prefix LM vs causal",
    "ops": "masks of a sample dialogue, their pictures, and the op checked against float64 and timed",
    "bench": "the quick benchmarks that apply to this machine, as one table",
    "train": "fine-tune a model on multi-turn chats in one ISM pass per dialogue",
    "distill": "adapt a causal chat model to ISM masks by self-distillation (no dataset needed)",
    "serve": "vLLM's OpenAI-compatible server with ISM chat (SmolLM2 + the shipped adapter, offline)",
}


def main(argv: list[str] | None = None) -> None:
    """Dispatches to the sub-command named by the first argument (its module's ``main``)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m ism_ext <command> [options]\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:<8} {text}")
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    # Imported on demand: a command's dependencies (transformers, matplotlib) load only when it runs.
    importlib.import_module(f"{__name__}.{argv[0]}").main(argv[1:])
