"""Processes of a training run: torchrun ranks, their devices, and DDP / FSDP around the model."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch

from .config import DIST_MODES, TrainConfig, TrainError

__all__ = ["ProcessContext", "all_gather_object", "barrier", "setup_processes", "unwrap", "wrap"]


@dataclass
class ProcessContext:
    """Where this process runs: the distributed mode, its rank and the device."""

    mode: str
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        """True on rank 0, the rank that logs and writes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True under DDP or FSDP."""
        return self.mode != "none"


def setup_processes(config: TrainConfig) -> ProcessContext:
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
        return ProcessContext(mode, 0, 1, 0, device)
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return ProcessContext(mode, dist.get_rank(), dist.get_world_size(), local_rank, device)


def all_gather_object(ctx: ProcessContext, obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (just ``[obj]`` without a process group)."""
    if not ctx.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: ProcessContext) -> None:
    """Waits for every rank (a no-op without a process group)."""
    if ctx.distributed:
        import torch.distributed as dist

        dist.barrier()


def wrap(model: torch.nn.Module, ctx: ProcessContext) -> torch.nn.Module:
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
        layer_names = set(getattr(unwrap(model), "_no_split_modules", None) or [])
        for module in list(model.modules()):
            if type(module).__name__ in layer_names:
                fully_shard(module)
        fully_shard(model)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model under a DDP wrapper (FSDP's fully_shard works in place, so it needs no unwrapping)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, torch.nn.Module) else model
