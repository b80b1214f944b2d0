"""The training loop of `python -m ism_ext train`: one ISM forward pass per dialogue trains all its answers.

Every dialogue of a JSONL file (``{"messages": [{"role": ..., "content": ...}, ...]}`` per line) becomes one
sequence whose user/system turns are bidirectional segments and whose answers are causal
(:class:`ism_ext.training.ChatCollator`), so one forward pass trains all of its answers, each with exactly the
view it has at inference. The model runs with ``attn_implementation="ism"`` (:mod:`ism_ext.integrations.hf`).

Outputs under ``--out``: ``loss.jsonl`` (one JSON object per optimizer step) and ``step-N/`` checkpoints. A
checkpoint is a Hugging Face directory (``save_pretrained`` of the model and the tokenizer, so ``--model
DIR/step-N`` or ``from_pretrained`` loads it) plus ``trainer_state.pt`` with the optimizer, the LR schedule,
every rank's RNG state and the data position, and ``checksums.json`` (sha256 of every file). ``--resume``
continues from the newest intact one (a damaged one is named and skipped; ``--resume-from N`` takes exactly
``step-N`` or stops); on the CPU the loss curve is then bit-for-bit that of an uninterrupted run, and
``loss.jsonl`` keeps every line up to the checkpoint's step. A non-finite loss or gradient norm stops the run
before the optimizer step, and a checkpoint is never written with non-finite weights.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from ..turns import IGNORE_INDEX
from .checkpoint import choose_checkpoint, find_checkpoints, load_weights, params_digest, save_checkpoint, set_rng_state
from .collator import ChatCollator
from .config import DEFAULT_DATA, RESUME_FIELDS, TrainConfig, TrainError, check_config, default_lr
from .data_files import (
    ChatExample,
    batches_for_epoch,
    check_dialogues_fit,
    file_digest,
    load_chat_jsonl,
    make_collate,
    tokenizer_digest,
)
from .distributed import ProcessContext, all_gather_object, barrier, setup_processes, wrap
from .files import atomic_write_text
from .loss_log import LOSS_FILE, append_record, open_loss_log, read_loss_log, sync_loss_log
from .model_setup import apply_lora, load_model, load_tokenizer
from .objectives import step_loss

__all__ = ["train"]


@dataclass
class _Run:
    """Everything the loop reads and advances: the model, its optimizer, the data position, the log."""

    config: TrainConfig
    ctx: ProcessContext
    examples: list[ChatExample]
    data_path: pathlib.Path
    out: pathlib.Path | None
    model: torch.nn.Module  # wrapped (DDP / FSDP) when distributed
    base: torch.nn.Module
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    params: list[torch.nn.Parameter]
    collate: Any
    meta: dict[str, Any]
    total_steps: int = 0
    per_epoch: int = 0
    step: int = 0
    epoch: int = 0
    batch_pos: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    last_ckpt: pathlib.Path | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch``."""
        c = self.config
        return batches_for_epoch(len(self.examples), c.batch_size, epoch, c.seed, self.ctx.rank, self.ctx.world)


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
    check_config(config)
    data_path = pathlib.Path(config.data) if config.data is not None else DEFAULT_DATA
    examples = load_chat_jsonl(data_path)
    config.data = str(data_path.resolve())
    if config.lr is None:
        config.lr = default_lr(config)
    out = pathlib.Path(config.out) if config.out is not None else None

    ctx = setup_processes(config)
    try:
        return _train(config, ctx, examples, data_path, out)
    finally:
        if ctx.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _train(config: TrainConfig, ctx: ProcessContext, examples: list[ChatExample], data_path: pathlib.Path,
           out: pathlib.Path | None) -> dict[str, Any]:
    """Resume point, build, restore, loop, then the optional parameter digest."""
    resume_state, ckpt = _resume_point(config, ctx, out)
    run = _build(config, ctx, examples, data_path, out, resume_state, ckpt)
    if resume_state is not None:
        _restore(run, resume_state, ckpt)
    else:
        # Per-rank streams (dropout, e.g. LoRA's, must differ between ranks); the model was initialised above
        # from `seed` alone, identically on every rank.
        torch.manual_seed(config.seed + ctx.rank)
        random.seed(config.seed + ctx.rank)
    _announce(run, ckpt)
    _loop(run)
    if config.debug_sync:
        _write_params_digest(run)
    return {
        "losses": [r["loss"] for r in run.history],
        "final_step": run.step,
        "total_steps": run.total_steps,
        "checkpoint": str(run.last_ckpt) if run.last_ckpt is not None else None,
        "world_size": ctx.world,
    }


def _resume_point(config: TrainConfig, ctx: ProcessContext,
                  out: pathlib.Path | None) -> tuple[dict[str, Any] | None, pathlib.Path | None]:
    """The checkpoint to resume from (and its state), chosen before anything is built so a bad --out fails fast."""
    if out is None:
        return None, None
    if not config.resume:
        checkpoints = find_checkpoints(out)
        if checkpoints:
            raise TrainError(f"{out} already holds checkpoints (newest {checkpoints[-1][1].name}); pass --resume to "
                             f"continue, or choose another --out")
        return None, None
    state, ckpt = choose_checkpoint(out, config.resume_step, ctx.main)
    saved = state["config"]
    defaults = TrainConfig()  # a setting older checkpoints do not record has its default there
    diff = [f"{k}: {saved.get(k, getattr(defaults, k))!r} -> {getattr(config, k)!r}" for k in RESUME_FIELDS
            if saved.get(k, getattr(defaults, k)) != getattr(config, k)]
    if state["world_size"] != ctx.world:
        diff.append(f"world size: {state['world_size']} -> {ctx.world}")
    if diff:
        raise TrainError(f"--resume from {ckpt}: settings differ from the run that wrote it ({'; '.join(diff)})")
    return state, ckpt


def _check_tokenizer_digest(ctx: ProcessContext, resume_state: dict[str, Any] | None, ckpt: pathlib.Path | None,
                            data_digest: str, tok_digest: str) -> None:
    """A resumed run uses the token ids of the run it continues, and all ranks read the same data and ids."""
    if resume_state is not None and resume_state["tokenizer_sha256"] != tok_digest:
        raise TrainError(f"--resume: the tokenizer differs from the one {ckpt} was trained with")
    # Every rank must see the same data and token ids, or DDP averages gradients of different problems.
    if len(set(all_gather_object(ctx, (data_digest, tok_digest)))) != 1:
        raise TrainError("the ranks read different data files or built different tokenizers")


def _build(config: TrainConfig, ctx: ProcessContext, examples: list[ChatExample], data_path: pathlib.Path,
           out: pathlib.Path | None, resume_state: dict[str, Any] | None, ckpt: pathlib.Path | None) -> _Run:
    """The model (with LoRA, wrapped), the optimizer with its schedule, the collation and the step count."""
    data_digest = file_digest(data_path)
    if resume_state is not None and resume_state["data_sha256"] != data_digest:  # before a model is loaded
        raise TrainError(f"--resume: {data_path} changed since {ckpt} was written (sha256 differs)")
    tokenizer = load_tokenizer(config, examples)
    collator = ChatCollator(tokenizer, scheme=config.scheme, max_length=config.max_length, pack=config.pack)
    check_dialogues_fit(collator, examples, data_path)  # every dialogue, before the model loads
    tok_digest = tokenizer_digest(tokenizer)
    _check_tokenizer_digest(ctx, resume_state, ckpt, data_digest, tok_digest)
    model = load_model(config, tokenizer)
    base = apply_lora(model, config) if config.lora else model
    wrapped = wrap(base.to(ctx.device), ctx)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = config.warmup_steps
    # Linear warm-up, then constant: a pure function of the step, so the schedule state is just the step count.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    meta = {
        "config": dataclasses.asdict(config),
        "world_size": ctx.world,
        "data_sha256": data_digest,
        "tokenizer_sha256": tok_digest,
        "trainable_names": [n for n, p in base.named_parameters() if p.requires_grad],
    }
    run = _Run(config, ctx, examples, data_path, out, wrapped, base, tokenizer, optimizer, scheduler, params,
               make_collate(collator, examples, data_path), meta, last_ckpt=ckpt)
    run.per_epoch = len(run.epoch_batches(0))
    run.total_steps = config.steps if config.steps is not None else run.per_epoch * (config.epochs or 1)
    return run


def _restore(run: _Run, state: dict[str, Any], ckpt: pathlib.Path) -> None:
    """Weights, optimizer, schedule, random streams, data position and loss log of the checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    assert run.out is not None
    load_weights(run.model, run.base, ckpt, state)
    set_optimizer_state_dict(run.model, run.optimizer, state["optimizer"],
                             options=StateDictOptions(full_state_dict=True))
    run.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"][run.ctx.rank])
    run.step = state["step"]
    run.epoch, run.batch_pos = state["data_position"]["epoch"], state["data_position"]["batch"]
    run.history = read_loss_log(run.out / LOSS_FILE, run.step)
    barrier(run.ctx)  # every rank has read the old log before rank 0 rewrites it


def _announce(run: _Run, ckpt: pathlib.Path | None) -> None:
    """Rank 0's one-line summary of the run."""
    config, ctx = run.config, run.ctx
    if not ctx.main:
        return
    n_params = sum(p.numel() for p in run.base.parameters())
    n_train = sum(p.numel() for p in run.base.parameters() if p.requires_grad)
    source = config.model if config.gguf is None else f"{config.gguf}/{config.gguf_file or ''}"
    print(f"ism_ext train: {source} "
          f"({n_params / 1e6:.2f} M parameters, {n_train / 1e6:.2f} M trained), {len(run.examples)} dialogues from "
          f"{run.data_path.name}, scheme {config.scheme}{' packed' if config.pack else ''}, batch {config.batch_size}"
          f" x {ctx.world} rank(s), {run.per_epoch} steps/epoch, steps {run.step} -> {run.total_steps}, "
          f"lr {config.lr:g}, dist {ctx.mode} on {ctx.device}" + (f", resumed from {ckpt}" if ckpt else ""),
          flush=True)
    if config.scheme == "prefix_lm":
        print("note: prefix_lm trains only the last answer of each dialogue (the earlier ones lie inside the "
              "bidirectional prefix); ism trains them all in the same pass", flush=True)


def _open_log(run: _Run):
    """Rank 0 opens ``loss.jsonl`` for appending, keeping every line up to the resume point (see `loss_log`)."""
    if not (run.ctx.main and run.out is not None):
        return None
    run.out.mkdir(parents=True, exist_ok=True)
    return open_loss_log(run.out / LOSS_FILE, run.step)


def _optimizer_step(run: _Run, batch_indices: list[int]) -> dict[str, Any]:
    """Forward, backward, clip and step on one batch; returns the step's log record."""
    config, ctx = run.config, run.ctx
    batch = {k: v.to(ctx.device, non_blocking=True) for k, v in run.collate(batch_indices).items()}
    loss = step_loss(config.objective, run.model, run.base, batch)
    loss.backward()
    # One small all-reduce for the log line: the mean loss over ranks (what DDP's averaged gradient
    # descends) and the number of trained (labelled) tokens. Before the step, so that every rank sees the
    # same (possibly non-finite) loss and all stop together.
    stats = torch.stack([loss.detach().float(), (batch["labels"] != IGNORE_INDEX).sum().float()])
    if ctx.distributed:
        import torch.distributed as dist

        dist.all_reduce(stats)
        stats[0] /= ctx.world
    _stop_if_not_finite(run, "loss", float(stats[0]))
    grad_norm = None
    if config.max_grad_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(run.params, config.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        _stop_if_not_finite(run, "gradient norm", float(grad_norm))  # the same on every rank (global norm)
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    record = {"step": run.step + 1, "epoch": run.epoch, "loss": float(stats[0]), "lr": lr,
              "trained_tokens": int(stats[1])}
    if grad_norm is not None:
        record["grad_norm"] = float(grad_norm)
    return record


def _stop_if_not_finite(run: _Run, what: str, value: float) -> None:
    """TrainError before the optimizer step when ``value`` is NaN or inf: the weights stay as they were."""
    if math.isfinite(value):
        return
    last = f"the newest checkpoint is {run.last_ckpt}" if run.last_ckpt is not None else "no checkpoint was written"
    raise TrainError(f"step {run.step + 1}: the {what} is {value}; stopped before the optimizer step ({last}). "
                     f"Try a lower --lr, gradient clipping (--max-grad-norm) or --dtype float32")


def _advance(run: _Run, order: list[list[int]]) -> list[list[int]]:
    """Moves the data position to the next batch (the position always names the *next* batch to train on)."""
    run.step += 1
    run.batch_pos += 1
    if run.batch_pos == len(order):
        run.epoch, run.batch_pos = run.epoch + 1, 0
        return run.epoch_batches(run.epoch)
    return order


def _after_step(run: _Run, record: dict[str, Any], log_file, bar) -> None:
    """Logs the step (file, progress bar, every --log-every a line) and checkpoints when it is time."""
    config, step, total = run.config, run.step, run.total_steps
    run.history.append(record)
    if log_file is not None:
        append_record(log_file, record)
    bar.update(1)
    bar.set_postfix(loss=f"{record['loss']:.4f}")
    if run.ctx.main and (step % config.log_every == 0 or step == total):
        bar.write(f"step {step}/{total}  loss {record['loss']:.4f}  lr {record['lr']:.3g}  "
                  f"tokens {record['trained_tokens']}")
    if run.out is not None and ((config.save_every and step % config.save_every == 0) or step == total):
        run.meta["data_position"] = {"epoch": run.epoch, "batch": run.batch_pos}
        if log_file is not None:
            sync_loss_log(log_file)  # the checkpoint's steps are in the log on disk before it exists
        run.last_ckpt = save_checkpoint(run.out, step, run.model, run.optimizer, run.scheduler, run.tokenizer,
                                        run.ctx, run.meta)


def _loop(run: _Run) -> None:
    """Trains from the current step to ``total_steps`` with a progress bar."""
    from tqdm.auto import tqdm

    log_file = _open_log(run)
    bar = tqdm(total=run.total_steps, initial=run.step, desc="train", unit="step",
               disable=not (run.ctx.main and run.config.progress), dynamic_ncols=True)
    run.model.train()
    order = run.epoch_batches(run.epoch) if run.step < run.total_steps else []
    try:
        while run.step < run.total_steps:
            record = _optimizer_step(run, order[run.batch_pos])
            order = _advance(run, order)
            _after_step(run, record, log_file, bar)
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()


def _write_params_digest(run: _Run) -> None:
    """--debug-sync: every rank writes the digest of its parameters (a collective under FSDP)."""
    assert run.out is not None
    digest, total = params_digest(run.model)
    run.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.out / f"params_rank{run.ctx.rank}.txt", f"step {run.step}\nsha256 {digest}\nsum {total!r}\n")
