"""`python -m ism_ext train`: fine-tune a causal LM on multi-turn chats, one ISM forward pass per dialogue.

Every dialogue of a JSONL file (``{"messages": [{"role": ..., "content": ...}, ...]}`` per line) becomes one
sequence whose user/system turns are bidirectional segments and whose answers are causal
(:class:`ism_ext.data.ChatCollator`), so one forward pass trains all of its answers, each with exactly the view
it has at inference. The model runs with ``attn_implementation="ism"`` (:mod:`ism_ext.hf`).

    python -m ism_ext train --steps 200 --out runs/toy                 # tiny Llama on the shipped toy chats
    python -m ism_ext train --model path/to/hf_dir --data chats.jsonl --lr 2e-5 --epochs 1 --out runs/x
    python -m ism_ext train --out runs/toy --steps 400 --resume        # continue from runs/toy/step-N/
    torchrun --nproc-per-node 2 -m ism_ext train --out runs/ddp        # DDP (gloo on CPU, nccl on GPU)

Outputs under ``--out``: ``loss.jsonl`` (one JSON object per optimizer step) and ``step-N/`` checkpoints. A
checkpoint is a Hugging Face directory (``save_pretrained`` of the model and the tokenizer, so ``--model
DIR/step-N`` or ``from_pretrained`` loads it) plus ``trainer_state.pt`` with the optimizer, the LR schedule,
every rank's RNG state and the data position. ``--resume`` continues from the newest one; on the CPU the loss
curve is then bit-for-bit that of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import math
import os
import pathlib
import random
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .layouts import ROLES, SCHEMES

__all__ = [
    "ChatExample", "TrainConfig", "TrainError", "build_parser", "find_checkpoints", "load_chat_jsonl", "main", "train",
]

DEFAULT_DATA = pathlib.Path(__file__).with_name("datasets") / "toy_chat.jsonl"
TINY = "tiny"
LOSS_FILE = "loss.jsonl"
STATE_FILE = "trainer_state.pt"
DIST_MODES = ("none", "ddp", "fsdp")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CHECKPOINT_RE = re.compile(r"^step-(\d+)$")

# Settings that decide the model, the data order or the optimizer's trajectory: a resumed run must use the same
# ones, otherwise it silently trains something else than the run it claims to continue. The data file is compared
# by content (sha256), not by path. Everything else (--steps/--epochs, logging, saving, --dist between ddp and
# fsdp) may change on resume.
RESUME_FIELDS = (
    "model", "gguf", "gguf_file", "scheme", "pack", "max_length", "batch_size", "lr", "weight_decay",
    "warmup_steps", "max_grad_norm", "lora", "lora_r", "lora_alpha", "lora_dropout", "seed", "dtype",
)


class TrainError(ValueError):
    """A problem with the configuration or the data; the command line reports it without a traceback."""


@dataclass
class TrainConfig:
    """Settings of one training run (the command-line options; see ``python -m ism_ext train --help``).

    ``lr=None`` picks a default by model: 3e-3 for the randomly initialised ``tiny`` model, 2e-4 for LoRA and
    2e-5 for full fine-tuning of a pretrained model. ``steps`` and ``epochs`` are exclusive; with neither, one
    epoch. ``dist=None`` means ``"ddp"`` when launched by torchrun with ``WORLD_SIZE > 1``, else ``"none"``.
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
    out: str | None = None
    resume: bool = False
    seed: int = 0
    log_every: int = 10
    save_every: int | None = None
    dist: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    progress: bool = True
    debug_sync: bool = False


@dataclass
class ChatExample:
    """One dialogue of a JSONL file: its messages and the (1-based) line it came from, for error messages."""

    messages: list[dict[str, Any]]
    line: int


# ------------------------------------------------------------------------------------------------ data


def load_chat_jsonl(path: str | os.PathLike) -> list[ChatExample]:
    """Reads and validates a JSONL chat file: one ``{"messages": [{"role", "content"}, ...]}`` object per line.

    Blank lines are skipped. Each dialogue must start with a non-assistant message and contain at least one
    assistant message (otherwise it has nothing to train). Validation happens here, once, so that a bad line is
    reported by its line number before any model is loaded.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        TrainError: invalid JSON, a wrong structure, an unknown role or an empty file; the message names the
            file and the line.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    examples: list[ChatExample] = []
    with path.open(encoding="utf-8") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}, line {line_no}"
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise TrainError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            messages = obj.get("messages") if isinstance(obj, dict) else None
            if not isinstance(messages, list) or not messages:
                raise TrainError(f'{where}: expected an object with a non-empty "messages" list')
            for k, m in enumerate(messages):
                if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                    raise TrainError(f'{where}: message {k} must be an object with a string "content"')
                if m.get("role") not in ROLES:
                    raise TrainError(f"{where}: message {k} has role {m.get('role')!r}; expected one of {ROLES}")
            roles = [m["role"] for m in messages]
            if roles[0] == "assistant":
                raise TrainError(f"{where}: the dialogue starts with an assistant message")
            if "assistant" not in roles:
                raise TrainError(f"{where}: the dialogue has no assistant message (nothing to train on)")
            examples.append(ChatExample(messages, line_no))
    if not examples:
        raise TrainError(f"{path}: no dialogues (the file is empty)")
    return examples


def _batches_for_epoch(n: int, batch_size: int, epoch: int, seed: int, rank: int, world: int) -> list[list[int]]:
    """This rank's batches (dataset indices) of one epoch: a `DistributedSampler` order, chunked.

    The order is a pure function of ``(seed, epoch, rank, world)``, so a resumed run recomputes it and skips to
    the saved batch; every rank gets the same number of batches (the sampler pads), which keeps DDP in step.
    """
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    order = list(sampler)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _make_collate(collator: Any, examples: Sequence[ChatExample], data_path: pathlib.Path) -> Callable:
    """Wraps the collator so that a dialogue it rejects is reported with its line in the data file."""
    from .data import tokenize_dialogue

    def collate(indices: Sequence[int]) -> dict[str, torch.Tensor]:
        try:
            return collator([examples[i].messages for i in indices])
        except ValueError as batch_error:
            # Only on failure: find the culprit by tokenising the batch's dialogues one at a time.
            for i in indices:
                try:
                    tokenize_dialogue(collator.tokenizer, examples[i].messages, collator.scheme, collator.max_length)
                except ValueError as e:
                    raise TrainError(f"{data_path}, line {examples[i].line}: {e}") from e
            raise batch_error

    return collate


def _file_digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tokenizer_digest(tokenizer: Any) -> str:
    """Fingerprint of what decides the token ids (vocabulary, special tokens, chat template)."""
    desc = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": sorted(str(t) for t in tokenizer.all_special_tokens),
        "template": tokenizer.chat_template,
    }
    return hashlib.sha256(json.dumps(desc).encode()).hexdigest()


# ------------------------------------------------------------------------------------------ processes


@dataclass
class _Ctx:
    """Where this process runs: the distributed mode, its rank and the device."""

    mode: str
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mode != "none"


def _setup_processes(config: TrainConfig) -> _Ctx:
    """Resolves --dist and --device and joins the process group (gloo on CPU, nccl on GPU)."""
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    mode = config.dist or ("ddp" if world_env > 1 else "none")
    if mode not in DIST_MODES:
        raise TrainError(f"unknown --dist {mode!r}; expected one of {DIST_MODES}")
    if mode == "none" and world_env > 1:
        raise TrainError(f"launched with WORLD_SIZE={world_env} but --dist none: every rank would train alone")
    if mode != "none" and "RANK" not in os.environ:
        raise TrainError(f"--dist {mode} needs the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR): launch "
                         f"with `torchrun --nproc-per-node N -m ism_ext train ...`")
    if config.device not in ("auto", "cpu", "cuda"):
        raise TrainError(f"unknown --device {config.device!r}; expected auto, cpu or cuda")
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise TrainError("--device cuda but torch sees no CUDA device")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if mode == "none":
        return _Ctx(mode, 0, 1, 0, device)
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return _Ctx(mode, dist.get_rank(), dist.get_world_size(), local_rank, device)


def _all_gather_object(ctx: _Ctx, obj: Any) -> list[Any]:
    if not ctx.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def _barrier(ctx: _Ctx) -> None:
    if ctx.distributed:
        import torch.distributed as dist

        dist.barrier()


# -------------------------------------------------------------------------------------- model loading


def _default_lr(config: TrainConfig) -> float:
    if config.model == TINY and config.gguf is None:
        return 3e-3  # random init: a large step size is what makes the toy model learn in a few dozen steps
    return 2e-4 if config.lora else 2e-5


def _load_model_and_tokenizer(config: TrainConfig, examples: Sequence[ChatExample]) -> tuple[Any, Any]:
    """The model (``attn_implementation="ism"``, float weights of ``--dtype``) and its tokenizer."""
    from . import hf  # registers attn_implementation="ism"

    dtype = DTYPES[config.dtype]
    if config.model == TINY and config.gguf is None:
        from .toy import build_tiny_llama, build_toy_tokenizer, dialogue_texts

        tokenizer = build_toy_tokenizer(dialogue_texts(e.messages for e in examples))
        model = build_tiny_llama(len(tokenizer), seed=config.seed, max_positions=max(2048, config.max_length))
        return model.to(dtype), tokenizer

    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = config.gguf if config.gguf is not None else config.model
    extra: dict[str, Any] = {"gguf_file": config.gguf_file} if config.gguf_file is not None else {}
    if not os.path.exists(source):
        raise FileNotFoundError(f"model not found: {source} (a local transformers directory is expected; nothing "
                                f"is downloaded)")
    tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    model = AutoModelForCausalLM.from_pretrained(source, attn_implementation=hf.ATTN_IMPLEMENTATION, dtype=dtype,
                                                 **extra)
    quantizer = getattr(model, "hf_quantizer", None)
    if config.gguf is not None and quantizer is not None:
        # transformers de-quantises GGUF weights to `dtype` while loading, yet keeps a GGUF quantisation marker
        # that makes save_pretrained refuse the model. The weights are plain floats being trained, so drop the
        # marker (what PreTrainedModel.dequantize ends with; GGUF has no dequantize of its own): the checkpoints
        # are then ordinary float checkpoints that load without the gguf package.
        quantizer.remove_quantization_config(model)
    model_type = getattr(model.config, "model_type", None)
    if model_type not in hf.SUPPORTED_MODEL_TYPES:
        raise TrainError(f"{source}: model_type {model_type!r} is not supported by the ism attention; supported: "
                         f"{hf.SUPPORTED_MODEL_TYPES}")
    return model, tokenizer


def _apply_lora(model: Any, config: TrainConfig) -> Any:
    """Wraps the model with peft LoRA adapters on all linear layers (only the adapters train)."""
    peft = _import_peft()
    lora_config = peft.LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                  target_modules="all-linear", task_type="CAUSAL_LM")
    return peft.get_peft_model(model, lora_config)


def _wrap(model: torch.nn.Module, ctx: _Ctx) -> torch.nn.Module:
    """DDP or FSDP (``fully_shard`` per decoder layer, then the root) around a model already on its device."""
    if ctx.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # The only buffers (rotary frequencies) are constants: skip the buffer broadcast before every forward.
        # torch 2.13 renamed the switch (broadcast_buffers is deprecated there); older releases only know the old one.
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False}
        return DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None, **no_sync
        )
    if ctx.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # transformers names its decoder-layer classes in _no_split_modules: one FSDP unit each, so only one
        # layer's full weights exist at a time.
        layer_names = set(getattr(_unwrap(model), "_no_split_modules", None) or [])
        for module in list(model.modules()):
            if type(module).__name__ in layer_names:
                fully_shard(module)
        fully_shard(model)
    return model


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model under a DDP wrapper (FSDP's fully_shard works in place, so it needs no unwrapping)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, torch.nn.Module) else model


# ---------------------------------------------------------------------------------------- checkpoints


def find_checkpoints(out: str | os.PathLike) -> list[tuple[int, pathlib.Path]]:
    """Complete checkpoints ``out/step-N/`` (with a trainer state file), sorted by step."""
    out = pathlib.Path(out)
    found = []
    if out.is_dir():
        for child in out.iterdir():
            m = _CHECKPOINT_RE.match(child.name)
            if m and (child / STATE_FILE).is_file():
                found.append((int(m.group(1)), child))
    return sorted(found)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(
    out: pathlib.Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    tokenizer: Any,
    ctx: _Ctx,
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
    rngs = _all_gather_object(ctx, _rng_state())  # per rank: each keeps its own stream on resume
    final = out / f"step-{step}"
    if ctx.main:
        tmp = out / f".step-{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        from transformers.utils import logging as hf_logging

        # transformers draws its own "Writing model shards" bar; ours is the one that matters.
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            _unwrap(model).save_pretrained(tmp, state_dict=model_state)
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
    _barrier(ctx)
    return final


def _load_weights(model: torch.nn.Module, base: torch.nn.Module, ckpt: pathlib.Path, state: dict) -> None:
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


def _read_loss_log(path: pathlib.Path, upto: int) -> list[dict[str, Any]]:
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


def _params_digest(model: torch.nn.Module) -> tuple[str, float]:
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


# ------------------------------------------------------------------------------------------ training


def _check_config(config: TrainConfig) -> None:
    if config.scheme not in SCHEMES:
        raise TrainError(f"unknown scheme {config.scheme!r}; expected one of {SCHEMES}")
    if config.dtype not in DTYPES:
        raise TrainError(f"unknown dtype {config.dtype!r}; expected one of {tuple(DTYPES)}")
    if config.steps is not None and config.epochs is not None:
        raise TrainError("give --steps or --epochs, not both")
    for name in ("batch_size", "max_length", "log_every", "lora_r"):
        if getattr(config, name) < 1:
            raise TrainError(f"{name} must be >= 1, got {getattr(config, name)}")
    for name in ("steps", "epochs", "save_every"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise TrainError(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.lr is not None and not config.lr > 0:
        raise TrainError(f"lr must be > 0, got {config.lr}")
    if config.warmup_steps < 0:
        raise TrainError(f"warmup_steps must be >= 0, got {config.warmup_steps}")
    if config.gguf_file is not None and config.gguf is None:
        raise TrainError("--gguf-file needs --gguf PATH (the directory or repository holding the file)")
    if config.gguf is not None and config.model != TINY:
        raise TrainError("give --model PATH or --gguf PATH --gguf-file NAME, not both")
    if config.resume and config.out is None:
        raise TrainError("--resume needs --out DIR (where the checkpoints are)")
    if config.debug_sync and config.out is None:
        raise TrainError("--debug-sync needs --out DIR (where params_rank*.txt are written)")
    if config.lora:
        _import_peft()  # before a large model is loaded for nothing


def _import_peft() -> Any:
    try:
        import peft
    except ImportError:
        raise TrainError("--lora needs the `peft` package, which is not installed (pip install peft)") from None
    return peft


def train(config: TrainConfig) -> dict[str, Any]:
    """Runs one training job (one process of it under torchrun) and returns its loss history.

    Returns:
        ``{"losses": [...], "final_step": N, "total_steps": T, "checkpoint": path or None, "world_size": W}``.
        ``losses[i]`` is the loss of optimizer step ``i + 1`` (averaged over ranks); after ``--resume`` it also
        holds the steps of the earlier run(s), read back from ``loss.jsonl``.

    Raises:
        TrainError: bad settings or data (the message says which, for data the file and line).
        FileNotFoundError: a missing data file or model directory.
    """
    config = dataclasses.replace(config)
    _check_config(config)
    data_path = pathlib.Path(config.data) if config.data is not None else DEFAULT_DATA
    examples = load_chat_jsonl(data_path)
    config.data = str(data_path.resolve())
    if config.lr is None:
        config.lr = _default_lr(config)
    out = pathlib.Path(config.out) if config.out is not None else None

    ctx = _setup_processes(config)
    try:
        return _train(config, ctx, examples, data_path, out)
    finally:
        if ctx.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _train(
    config: TrainConfig, ctx: _Ctx, examples: list[ChatExample], data_path: pathlib.Path, out: pathlib.Path | None
) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from tqdm.auto import tqdm

    from .data import ChatCollator

    # Resume point, chosen before anything is built so that a bad --out fails fast.
    resume_state: dict[str, Any] | None = None
    ckpt: pathlib.Path | None = None
    if out is not None:
        checkpoints = find_checkpoints(out)
        if config.resume:
            if not checkpoints:
                raise TrainError(f"--resume: no checkpoint step-N/ with {STATE_FILE} in {out}")
            ckpt = checkpoints[-1][1]
            resume_state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
            saved = resume_state["config"]
            diff = [f"{k}: {saved.get(k)!r} -> {getattr(config, k)!r}" for k in RESUME_FIELDS
                    if saved.get(k) != getattr(config, k)]
            if resume_state["world_size"] != ctx.world:
                diff.append(f"world size: {resume_state['world_size']} -> {ctx.world}")
            if diff:
                raise TrainError(f"--resume from {ckpt}: settings differ from the run that wrote it "
                                 f"({'; '.join(diff)})")
        elif checkpoints:
            raise TrainError(f"{out} already holds checkpoints (newest {checkpoints[-1][1].name}); pass --resume to "
                             f"continue, or choose another --out")

    data_digest = _file_digest(data_path)
    if resume_state is not None and resume_state["data_sha256"] != data_digest:
        raise TrainError(f"--resume: {data_path} changed since {ckpt} was written (sha256 differs)")

    model, tokenizer = _load_model_and_tokenizer(config, examples)
    tok_digest = _tokenizer_digest(tokenizer)
    if resume_state is not None and resume_state["tokenizer_sha256"] != tok_digest:
        raise TrainError(f"--resume: the tokenizer differs from the one {ckpt} was trained with")
    # Every rank must see the same data and token ids, or DDP averages gradients of different problems.
    if len({(d, t) for d, t in _all_gather_object(ctx, (data_digest, tok_digest))}) != 1:
        raise TrainError("the ranks read different data files or built different tokenizers")
    if config.lora:
        model = _apply_lora(model, config)
    base = model
    model = _wrap(base.to(ctx.device), ctx)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable_names = [n for n, p in base.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = config.warmup_steps
    # Linear warm-up, then constant: a pure function of the step, so the schedule state is just the step count.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)

    collator = ChatCollator(tokenizer, scheme=config.scheme, max_length=config.max_length, pack=config.pack)
    collate = _make_collate(collator, examples, data_path)

    def epoch_batches(epoch: int) -> list[list[int]]:
        return _batches_for_epoch(len(examples), config.batch_size, epoch, config.seed, ctx.rank, ctx.world)

    per_epoch = len(epoch_batches(0))
    total_steps = config.steps if config.steps is not None else per_epoch * (config.epochs or 1)

    step, epoch, batch_pos = 0, 0, 0
    history: list[dict[str, Any]] = []
    if resume_state is not None:
        assert ckpt is not None and out is not None
        _load_weights(model, base, ckpt, resume_state)
        set_optimizer_state_dict(model, optimizer, resume_state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(resume_state["scheduler"])
        _set_rng_state(resume_state["rng"][ctx.rank])
        step = resume_state["step"]
        epoch, batch_pos = resume_state["data_position"]["epoch"], resume_state["data_position"]["batch"]
        history = _read_loss_log(out / LOSS_FILE, step)
        _barrier(ctx)  # every rank has read the old log before rank 0 rewrites it below
    else:
        # Per-rank streams (dropout, e.g. LoRA's, must differ between ranks); the model was initialised above
        # from `seed` alone, identically on every rank.
        torch.manual_seed(config.seed + ctx.rank)
        random.seed(config.seed + ctx.rank)

    log_file = None
    if ctx.main and out is not None:
        out.mkdir(parents=True, exist_ok=True)
        # Rewrite the log up to the resume point: steps logged after the last checkpoint are redone.
        (out / LOSS_FILE).write_text("".join(json.dumps(r) + "\n" for r in history), encoding="utf-8")
        log_file = (out / LOSS_FILE).open("a", encoding="utf-8")
    meta = {
        "config": dataclasses.asdict(config),
        "world_size": ctx.world,
        "data_sha256": data_digest,
        "tokenizer_sha256": tok_digest,
        "trainable_names": trainable_names,
    }

    n_params = sum(p.numel() for p in base.parameters())
    n_train = sum(p.numel() for p in base.parameters() if p.requires_grad)
    if ctx.main:
        source = config.model if config.gguf is None else f"{config.gguf}/{config.gguf_file or ''}"
        print(f"ism_ext train: {source} "
              f"({n_params / 1e6:.2f} M parameters, {n_train / 1e6:.2f} M trained), {len(examples)} dialogues from "
              f"{data_path.name}, scheme {config.scheme}{' packed' if config.pack else ''}, batch {config.batch_size}"
              f" x {ctx.world} rank(s), {per_epoch} steps/epoch, steps {step} -> {total_steps}, lr {config.lr:g}, "
              f"dist {ctx.mode} on {ctx.device}" + (f", resumed from {ckpt}" if ckpt else ""), flush=True)
        if config.scheme == "prefix_lm":
            print("note: prefix_lm trains only the last answer of each dialogue (the earlier ones lie inside the "
                  "bidirectional prefix); ism trains them all in the same pass", flush=True)

    last_ckpt = ckpt
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not (ctx.main and config.progress),
               dynamic_ncols=True)
    model.train()
    order = epoch_batches(epoch) if step < total_steps else []
    try:
        while step < total_steps:
            batch = collate(order[batch_pos])
            batch = {k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()}
            loss = model(**batch).loss
            loss.backward()
            grad_norm = None
            if config.max_grad_norm is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                if hasattr(grad_norm, "full_tensor"):
                    grad_norm = grad_norm.full_tensor()
            lr = optimizer.param_groups[0]["lr"]
            batch_epoch = epoch
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            batch_pos += 1
            if batch_pos == len(order):  # the data position always names the *next* batch to train on
                epoch, batch_pos = epoch + 1, 0
                order = epoch_batches(epoch)

            # One small all-reduce for the log line: the mean loss over ranks (what DDP's averaged gradient
            # descends) and the number of trained (labelled) tokens.
            stats = torch.stack([loss.detach().float(), (batch["labels"] != -100).sum().float()])
            if ctx.distributed:
                import torch.distributed as dist

                dist.all_reduce(stats)
                stats[0] /= ctx.world
            record = {"step": step, "epoch": batch_epoch, "loss": float(stats[0]), "lr": lr,
                      "trained_tokens": int(stats[1])}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            history.append(record)
            if log_file is not None:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if ctx.main and (step % config.log_every == 0 or step == total_steps):
                bar.write(f"step {step}/{total_steps}  loss {record['loss']:.4f}  lr {lr:.3g}  "
                          f"tokens {record['trained_tokens']}")
            if out is not None and ((config.save_every and step % config.save_every == 0) or step == total_steps):
                meta["data_position"] = {"epoch": epoch, "batch": batch_pos}
                last_ckpt = _save_checkpoint(out, step, model, optimizer, scheduler, tokenizer, ctx, meta)
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()

    if config.debug_sync:
        assert out is not None
        digest, total = _params_digest(model)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"params_rank{ctx.rank}.txt").write_text(f"step {step}\nsha256 {digest}\nsum {total!r}\n")
    return {
        "losses": [r["loss"] for r in history],
        "final_step": step,
        "total_steps": total_steps,
        "checkpoint": str(last_ckpt) if last_ckpt is not None else None,
        "world_size": ctx.world,
    }


# ---------------------------------------------------------------------------------------- command line


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
    src = p.add_argument_group("model and data")
    src.add_argument("--model", default=TINY,
                     help="a local transformers directory, or 'tiny': a small random Llama + toy BPE tokenizer")
    src.add_argument("--gguf", metavar="PATH", help="load a GGUF checkpoint from PATH (with --gguf-file)")
    src.add_argument("--gguf-file", metavar="NAME", help="the .gguf file inside --gguf PATH")
    src.add_argument("--data", metavar="JSONL", help=f"chat dialogues (default: the shipped {DEFAULT_DATA.name})")
    src.add_argument("--scheme", default="ism", choices=SCHEMES, help="attention layout of the dialogues")
    src.add_argument("--pack", action="store_true", help="pack several dialogues per row (no padding)")
    src.add_argument("--max-length", type=int, metavar="N", default=512,
                     help="tokens per dialogue (whole trailing rounds dropped beyond it); the row size with --pack")
    src.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="weight dtype")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=int, metavar="N", default=8, help="dialogues per step and rank")
    opt.add_argument("--lr", type=float, metavar="X", default=None,
                     help="AdamW learning rate (default: 3e-3 for tiny, 2e-4 with --lora, else 2e-5)")
    opt.add_argument("--weight-decay", type=float, metavar="X", default=0.0, help="AdamW weight decay")
    opt.add_argument("--warmup-steps", type=int, metavar="N", default=0, help="linear LR warm-up steps, constant after")
    opt.add_argument("--max-grad-norm", type=float, metavar="X", default=1.0, help="gradient clipping (0: none)")
    length = opt.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, metavar="N", help="optimizer steps in all (default: one epoch)")
    length.add_argument("--epochs", type=int, metavar="N", help="passes over the data")
    opt.add_argument("--seed", type=int, metavar="N", default=0, help="model init, data order and RNG seed")
    opt.add_argument("--lora", action="store_true", help="train LoRA adapters (needs peft) instead of all weights")
    opt.add_argument("--lora-r", type=int, metavar="N", default=8, help="LoRA rank")
    opt.add_argument("--lora-alpha", type=float, metavar="X", default=16.0, help="LoRA alpha")
    opt.add_argument("--lora-dropout", type=float, metavar="X", default=0.0, help="LoRA dropout")

    run = p.add_argument_group("outputs and processes")
    run.add_argument("--out", metavar="DIR", help="checkpoints DIR/step-N/ and DIR/loss.jsonl (none if omitted)")
    run.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    run.add_argument("--save-every", type=int, metavar="N", help="checkpoint every N steps (always at the end)")
    run.add_argument("--log-every", type=int, metavar="N", default=10, help="print a loss line every N steps")
    run.add_argument("--dist", choices=DIST_MODES, default=None,
                     help="data parallelism (default: ddp when launched by torchrun with WORLD_SIZE > 1, else none)")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bar")
    run.add_argument("--debug-sync", action="store_true",
                     help="at the end, every rank writes a digest of its parameters to DIR/params_rank{r}.txt")
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m ism_ext train``: parses the options and runs :func:`train`."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    kwargs = vars(args)
    if kwargs["max_grad_norm"] is not None and kwargs["max_grad_norm"] <= 0:
        kwargs["max_grad_norm"] = None
    try:
        result = train(TrainConfig(**kwargs))
    except (TrainError, FileNotFoundError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if result["losses"] and int(os.environ.get("RANK", "0")) == 0:
        print(f"done: step {result['final_step']}, loss {result['losses'][-1]:.4f}"
              + (f", checkpoint {result['checkpoint']}" if result["checkpoint"] else ""))
