"""Checkpoints of a training run: ``step-N/`` folders, random states, file digests, and the choice of one to resume.

A checkpoint is written under a temporary name and renamed when complete, with ``checksums.json`` (the sha256 of
every file in it) written last; a resume verifies those digests before it trusts a checkpoint, so truncated
or flipped bytes are found and named instead of loading silently or failing with a raw traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import random
import re
import shutil
import sys
from typing import Any

import torch

from .config import TrainError
from .distributed import ProcessContext, all_gather_object, barrier, unwrap
from .files import atomic_write_text, sha256_file
from .loss_log import LOSS_FILE

__all__ = ["LOSS_FILE", "MANIFEST_FILE", "STATE_FILE", "DamagedCheckpoint", "choose_checkpoint", "find_checkpoints",
           "load_weights", "params_digest", "rng_state", "save_checkpoint", "set_rng_state", "verify_checkpoint"]

STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "checksums.json"
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
    _refuse_non_finite(ctx, step, model_state)
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
        _write_manifest(tmp)
        # Written under a temporary name and renamed: an interrupted save never looks like a checkpoint.
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    barrier(ctx)
    return final


def _refuse_non_finite(ctx: ProcessContext, step: int, model_state: dict[str, torch.Tensor]) -> None:
    """Raises TrainError on every rank, before anything is written, when a weight holds NaN or inf."""
    bad = [name for name, t in model_state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    bad = sorted({name for names in all_gather_object(ctx, bad) for name in names})  # rank 0 holds the full state
    if bad:
        raise TrainError(f"step {step}: the weights hold NaN or inf ({', '.join(bad[:3])}"
                         f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}); no checkpoint was written")


def _write_manifest(folder: pathlib.Path) -> None:
    """``checksums.json``: the sha256 of every other file of the checkpoint (written last)."""
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.name != MANIFEST_FILE)
    digests = {f.relative_to(folder).as_posix(): sha256_file(f) for f in files}
    atomic_write_text(folder / MANIFEST_FILE, json.dumps({"sha256": digests}, indent=1) + "\n")


class DamagedCheckpoint(TrainError):
    """A checkpoint whose files do not match its digests, or cannot be read."""


def verify_checkpoint(folder: pathlib.Path) -> None:
    """Raises DamagedCheckpoint naming the first file that is missing or differs from ``checksums.json``.

    A checkpoint written before digests were recorded (no ``checksums.json``) passes; its files are then only
    checked by reading them.
    """
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        return
    try:
        digests = json.loads(manifest.read_text(encoding="utf-8"))["sha256"]
    except (ValueError, KeyError, TypeError) as e:
        raise DamagedCheckpoint(f"{folder}: {MANIFEST_FILE} is unreadable ({e})") from None
    for name, expected in digests.items():
        file = folder / name
        if not file.is_file():
            raise DamagedCheckpoint(f"{folder}: {name} is missing")
        if sha256_file(file) != expected:
            raise DamagedCheckpoint(f"{folder}: {name} does not match its sha256 in {MANIFEST_FILE} "
                                    f"(truncated or altered)")


def _load_state(folder: pathlib.Path) -> dict[str, Any]:
    """The verified checkpoint's trainer state (DamagedCheckpoint when it is damaged or unreadable)."""
    verify_checkpoint(folder)
    try:
        return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # a legacy checkpoint without digests: its damage shows only here
        raise DamagedCheckpoint(f"{folder}: {STATE_FILE} cannot be read ({type(e).__name__}: {e})") from None


def choose_checkpoint(out: pathlib.Path, step: int | None, main: bool) -> tuple[dict[str, Any], pathlib.Path]:
    """The checkpoint a resume starts from, with its trainer state.

    With ``step`` None: the newest intact one; each damaged newer one is named on stderr (by rank 0) and
    skipped. With a ``step``: exactly ``out/step-N``, or a TrainError saying why not (missing or damaged).
    """
    checkpoints = find_checkpoints(out)
    if step is not None:
        folder = out / f"step-{step}"
        if (step, folder) not in checkpoints:
            raise TrainError(f"--resume-from {step}: {folder} is not a complete checkpoint (found "
                             f"{[s for s, _ in checkpoints]})")
        try:
            return _load_state(folder), folder
        except DamagedCheckpoint as e:
            raise TrainError(f"--resume-from {step}: the checkpoint is damaged: {e}") from None
    if not checkpoints:
        raise TrainError(f"--resume: no checkpoint step-N/ with {STATE_FILE} in {out}")
    damaged = []
    for _, folder in reversed(checkpoints):
        try:
            state = _load_state(folder)
        except DamagedCheckpoint as e:
            damaged.append(str(e))
            if main:
                print(f"ism_ext train: warning: checkpoint damaged, skipped: {e}", file=sys.stderr, flush=True)
            continue
        return state, folder
    raise TrainError(f"--resume: every checkpoint in {out} is damaged: {'; '.join(damaged)}")


def load_weights(model: torch.nn.Module, base: torch.nn.Module, ckpt: pathlib.Path, state: dict) -> None:
    """Loads a checkpoint's weights into the (possibly wrapped) model, tolerating only tied duplicates."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if state["trainable"] is not None:
        weights = state["trainable"]
    else:
        from safetensors.torch import load_file

        weights = {}
        for file in sorted(ckpt.glob("*.safetensors")):
            try:
                weights.update(load_file(file))
            except Exception as e:  # verified checkpoints read fine; this names a damaged legacy one
                raise DamagedCheckpoint(f"{file} cannot be read ({type(e).__name__}: {e})") from None
    result = set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    if result.unexpected_keys:
        raise TrainError(f"{ckpt}: unexpected weights {sorted(result.unexpected_keys)[:5]} (another model?)")
    # save_pretrained drops one name of each tied pair; anything else missing must be frozen (LoRA's base).
    loaded = {id(p) for name, p in base.named_parameters(remove_duplicate=False) if name in weights}
    named = dict(base.named_parameters(remove_duplicate=False))
    missing = [k for k in result.missing_keys if k in named and named[k].requires_grad and id(named[k]) not in loaded]
    if missing:
        raise TrainError(f"{ckpt}: trainable weights missing from the checkpoint: {missing[:5]}")


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
