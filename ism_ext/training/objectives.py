"""What a training step minimises: the causal-LM loss on the answers, or self-distillation from the model
without its adapter.

Self-distillation (``objective="distill"``) adapts a causal chat model to a new attention layout without a
dataset of answers: the teacher is the model itself with its LoRA adapter switched off and causal masks (how
it was trained), the student the same model with the adapter under the ISM (or MAS) layout of the batch. The
loss is KL(teacher || student) over the vocabulary at every answer token, all answers of a dialogue in the
one forward pass of ISM training.
"""

from __future__ import annotations

from typing import Any

import torch

from ..turns import IGNORE_INDEX

__all__ = ["distill_loss", "step_loss"]


def distill_loss(model: torch.nn.Module, base: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean KL(teacher || student) over the positions that predict an answer token.

    ``model`` is the (possibly wrapped) student; ``base`` the peft model under it, whose ``disable_adapter()``
    gives the teacher. The teacher sees no ``block_sequence_ids``: every token causal.
    """
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad(), base.disable_adapter():
        teacher = base(**inputs).logits[:, :-1]
    student = model(**inputs, block_sequence_ids=batch["block_sequence_ids"]).logits[:, :-1]
    answer = batch["labels"][:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
    log_t = teacher[answer].float().log_softmax(-1)
    log_s = student[answer].float().log_softmax(-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean()


def step_loss(objective: str, model: torch.nn.Module, base: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss of one batch under ``objective`` ("lm" or "distill")."""
    if objective == "distill":
        return distill_loss(model, base, batch)
    return model(**batch).loss
