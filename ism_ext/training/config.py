"""Settings of a training run: `TrainConfig`, its checks and defaults, and the error the command reports."""

from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass
from typing import Any

import torch

from ..masks import SCHEMES

__all__ = ["DEFAULT_DATA", "DIST_MODES", "DTYPES", "OBJECTIVES", "RESUME_FIELDS", "TINY", "TrainConfig", "TrainError",
           "check_config", "default_lr", "import_peft"]

DEFAULT_DATA = pathlib.Path(__file__).with_name("datasets") / "toy_chat.jsonl"
TINY = "tiny"
DIST_MODES = ("none", "ddp", "fsdp")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Settings that decide the model, the data order or the optimizer's trajectory: a resumed run must use the same
# ones, otherwise it silently trains something else than the run it claims to continue. The data file is compared
# by content (sha256), not by path. Everything else (--steps/--epochs, logging, saving, --dist between ddp and
# fsdp) may change on resume.
RESUME_FIELDS = (
    "model", "gguf", "gguf_file", "scheme", "pack", "max_length", "batch_size", "lr", "weight_decay",
    "warmup_steps", "max_grad_norm", "lora", "lora_r", "lora_alpha", "lora_dropout", "seed", "dtype", "objective",
)
OBJECTIVES = ("lm", "distill")


class TrainError(ValueError):
    """A problem with the configuration or the data; the command line reports it without a traceback."""



@dataclass
class TrainConfig:
    """Settings of one training run (the command-line options; see ``python -m ism_ext train --help``).

    ``lr=None`` picks a default by model: 3e-3 for the randomly initialised ``tiny`` model, 2e-4 for LoRA and
    2e-5 for full fine-tuning of a pretrained model. ``steps`` and ``epochs`` are exclusive; with neither, one
    epoch. ``objective="lm"`` is the causal-LM loss on the answers; ``"distill"`` is the KL divergence from the
    model without its LoRA adapter under causal masks (the teacher) to the model with it under ``scheme``
    (self-distillation: the adapter learns to give the teacher's distributions under the new masks).
    ``dist=None`` means ``"ddp"`` when launched by torchrun with ``WORLD_SIZE > 1``, else ``"none"``.
    ``resume=True`` continues from the newest intact checkpoint in ``out``; with ``resume_step=N`` from exactly
    ``out/step-N`` (a damaged one is then an error, not skipped).
    """

    model: str = TINY
    gguf: str | None = None
    gguf_file: str | None = None
    data: str | None = None
    scheme: str = "ism"
    pack: bool = False
    max_length: int = 512
    batch_size: int = 8
    lr: float | None = None
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    steps: int | None = None
    epochs: int | None = None
    lora: bool = False
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    objective: str = "lm"
    out: str | None = None
    resume: bool = False
    resume_step: int | None = None
    seed: int = 0
    log_every: int = 10
    save_every: int | None = None
    dist: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    progress: bool = True
    debug_sync: bool = False


def default_lr(config: TrainConfig) -> float:
    """The learning rate when --lr is not given: by model kind (see `TrainConfig`)."""
    if config.model == TINY and config.gguf is None:
        return 3e-3  # random init: a large step size is what makes the toy model learn in a few dozen steps
    return 2e-4 if config.lora else 2e-5


def check_config(config: TrainConfig) -> None:
    """Raises TrainError naming the first setting that cannot work (before anything is loaded)."""
    if config.scheme not in SCHEMES:
        raise TrainError(f"unknown scheme {config.scheme!r}; expected one of {SCHEMES}")
    if config.dtype not in DTYPES:
        raise TrainError(f"unknown dtype {config.dtype!r}; expected one of {tuple(DTYPES)}")
    if config.steps is not None and config.epochs is not None:
        raise TrainError("give --steps or --epochs, not both")
    for name in ("batch_size", "max_length", "log_every", "lora_r"):
        if getattr(config, name) < 1:
            raise TrainError(f"{name} must be >= 1, got {getattr(config, name)}")
    for name in ("steps", "epochs", "save_every", "resume_step"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise TrainError(f"{name} must be >= 1, got {getattr(config, name)}")
    _check_floats(config)
    if config.dtype == "float16":
        # Plain AdamW on float16 weights: updates below float16's resolution vanish and its range overflows
        # (NaN from the second step on the tiny model). A loss scaler with float32 master weights would be needed.
        raise TrainError("--dtype float16 cannot train with plain AdamW (float16 weights lose small updates and "
                         "overflow: the loss turns NaN); use --dtype bfloat16 (same memory, float32's range) or "
                         "float32")
    if config.warmup_steps < 0:
        raise TrainError(f"warmup_steps must be >= 0, got {config.warmup_steps}")
    if config.gguf_file is not None and config.gguf is None:
        raise TrainError("--gguf-file needs --gguf PATH (the directory or repository holding the file)")
    if config.gguf is not None and config.model != TINY:
        raise TrainError("give --model PATH or --gguf PATH --gguf-file NAME, not both")
    if config.resume and config.out is None:
        raise TrainError("--resume needs --out DIR (where the checkpoints are)")
    if config.resume_step is not None and not config.resume:
        raise TrainError("resume_step needs resume=True (--resume-from N sets both)")
    if config.debug_sync and config.out is None:
        raise TrainError("--debug-sync needs --out DIR (where params_rank*.txt are written)")
    if config.objective not in OBJECTIVES:
        raise TrainError(f"unknown objective {config.objective!r}; expected one of {OBJECTIVES}")
    if config.objective == "distill" and not config.lora:
        raise TrainError("the distill objective needs --lora: the teacher is the same model without its adapter")
    if config.lora:
        import_peft()  # before a large model is loaded for nothing


def _check_floats(config: TrainConfig) -> None:
    """Float settings: finite (NaN passes every comparison check), and in range."""
    for name in ("lr", "weight_decay", "max_grad_norm", "lora_alpha", "lora_dropout"):
        value = getattr(config, name)
        if value is not None and not math.isfinite(value):
            raise TrainError(f"{name} must be a finite number, got {value}")
    if config.lr is not None and not config.lr > 0:
        raise TrainError(f"lr must be > 0, got {config.lr}")
    if config.max_grad_norm is not None and not config.max_grad_norm > 0:
        raise TrainError(f"max_grad_norm must be > 0 (or None: no clipping), got {config.max_grad_norm}")
    if config.weight_decay < 0:
        raise TrainError(f"weight_decay must be >= 0, got {config.weight_decay}")
    if not 0 <= config.lora_dropout < 1:
        raise TrainError(f"lora_dropout must be in [0, 1), got {config.lora_dropout}")


def import_peft() -> Any:
    """The `peft` module, or a TrainError that says how to install it."""
    try:
        import peft
    except ImportError:
        raise TrainError("--lora needs the `peft` package, which is not installed (pip install peft)") from None
    return peft
