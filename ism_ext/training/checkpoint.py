"""Checkpoints of a training run: ``step-N/`` folders, the loss log, random states, weight digests."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import random
import re
import shutil
from typing import Any

import torch

from .config import TrainError
from .distributed import ProcessContext, all_gather_object, barrier, unwrap

__all__ = ["LOSS_FILE", "STATE_FILE", "find_checkpoints", "load_weights", "params_digest", "read_loss_log",
           "rng_state", "save_checkpoint", "set_rng_state"]

LOSS_FILE = "loss.jsonl"
STATE_FILE = "trainer_state.pt"
CHECKPOINT_RE = re.compile(r"^step-(\d+)$")


def find_checkpoints(out: str | os.PathLike) -> list[tuple[int, pathlib.Path]]:
    """Complete checkpoints ``out/step-N/`` (with a trainer state file), sorted by step."""
    out = pathlib.Path(out)
    found = []
    if out.is_dir():
        for child in out.iterdir():
            m = CHECKPOINT_RE.match(child.name)
            if m and (child / STATE_FILE).is_file():
                found.append((int(m.group(1)), child))
    return sorted(found)


def rng_state() -> dict[str, Any]:
    """This process's Python, torch (and CUDA) random states."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what `rng_state` saved."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out: pathlib.Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    tokenizer: Any,
    ctx: ProcessContext,
    meta: dict[str, Any],
) -> pathlib.Path:
    """Writes ``out/step-N/`` (every rank takes part in gathering the state; rank 0 writes)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    # Full (unsharded) state dicts, gathered to rank 0's CPU: the same files whatever --dist and world size.
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    rngs = all_gather_object(ctx, rng_state())  # per rank: each keeps its own stream on resume
    final = out / f"step-{step}"
    if ctx.main:
        tmp = out / f".step-{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        from transformers.utils import logging as hf_logging

        # transformers draws its own "Writing model shards" bar; ours is the one that matters.
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            unwrap(model).save_pretrained(tmp, state_dict=model_state)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        tokenizer.save_pretrained(tmp)
        state = {
            **meta,
            "step": step,
            "optimizer": optim_state,
            "scheduler": scheduler.state_dict(),
            "rng": rngs,
            # With LoRA, save_pretrained writes the adapter in peft's own format; resuming reads these instead.
            "trainable": {k: v for k, v in model_state.items() if k in meta["trainable_names"]}
            if meta["config"]["lora"] else None,
        }
        torch.save(state, tmp / STATE_FILE)
        # Written under a temporary name and renamed: an interrupted save never looks like a checkpoint.
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    barrier(ctx)
    return final


def load_weights(model: torch.nn.Module, base: torch.nn.Module, ckpt: pathlib.Path, state: dict) -> None:
    """Loads a checkpoint's weights into the (possibly wrapped) model, tolerating only tied duplicates."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if state["trainable"] is not None:
        weights = state["trainable"]
    else:
        from safetensors.torch import load_file

        weights = {}
        for file in sorted(ckpt.glob("*.safetensors")):
            weights.update(load_file(file))
    result = set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    if result.unexpected_keys:
        raise TrainError(f"{ckpt}: unexpected weights {sorted(result.unexpected_keys)[:5]} (another model?)")
    # save_pretrained drops one name of each tied pair; anything else missing must be frozen (LoRA's base).
    loaded = {id(p) for name, p in base.named_parameters(remove_duplicate=False) if name in weights}
    named = dict(base.named_parameters(remove_duplicate=False))
    missing = [k for k in result.missing_keys if k in named and named[k].requires_grad and id(named[k]) not in loaded]
    if missing:
        raise TrainError(f"{ckpt}: trainable weights missing from the checkpoint: {missing[:5]}")


def read_loss_log(path: pathlib.Path, upto: int) -> list[dict[str, Any]]:
    """The records of ``loss.jsonl`` up to step ``upto`` (later ones belong to steps a resume redoes)."""
    records = []
    if path.is_file():
        for raw in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                break  # a line cut short by an interruption: nothing after it is trustworthy
            if rec.get("step", math.inf) <= upto:
                records.append(rec)
    return records


def params_digest(model: torch.nn.Module) -> tuple[str, float]:
    """sha256 of every parameter's bytes (full tensors, in name order) and their sum, for --debug-sync."""
    h = hashlib.sha256()
    total = 0.0
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        t = p.detach()
        if hasattr(t, "full_tensor"):  # FSDP's DTensor shards: gather (a collective: all ranks, same order)
            t = t.full_tensor()
        t = t.float().cpu().contiguous()
        h.update(name.encode())
        h.update(t.numpy().tobytes())
        total += float(t.double().sum())
    return h.hexdigest(), total
