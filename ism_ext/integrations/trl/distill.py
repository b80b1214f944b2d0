"""`IsmDistillTrainer`: the self-distillation objective of ``python -m ism_ext distill`` as a transformers Trainer.

The loss is :func:`ism_ext.training.objectives.distill_loss` (KL from the model without its LoRA adapter under
causal masks to the model with it under the batch's ISM layout, on every answer token), so the adapter can be
made with the Trainer's optimizers, schedules, callbacks and accelerate processes. The teacher's answers come
from :func:`ism_ext.training.teacher.answer_dialogues` (or any dialogues); tokenise them with
:func:`tokenize_conversations` and collate with :class:`IsmDataCollator`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from ...training.objectives import distill_loss
from .collator import FEATURES

__all__ = ["IsmDistillTrainer"]


class IsmDistillTrainer(Trainer):
    """`transformers.Trainer` whose loss is the self-distillation KL; the model must be a peft (LoRA) model.

    The loss of a batch is the mean KL over its answer positions, as in the project's loop: under several
    processes DDP averages the per-process means, and gradient accumulation divides by the number of steps.

    Raises:
        ValueError: the model has no adapter to switch off (the teacher is the model without it).
    """

    def __init__(self, model: Any, *args: Any, **kwargs: Any) -> None:
        if not hasattr(model, "disable_adapter"):
            raise ValueError("IsmDistillTrainer needs a peft model (peft.get_peft_model): the teacher is the same "
                             "model with its adapter switched off")
        super().__init__(model, *args, **kwargs)
        # The loss is a per-batch mean, not a sum over num_items_in_batch: let the Trainer divide it by the
        # accumulation steps (it does not for models that take loss kwargs).
        self.model_accepts_loss_kwargs = False

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = list(FEATURES)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor:
        """KL(teacher || student) of the batch (``return_outputs`` is not supported: there is one loss only)."""
        if return_outputs:
            raise ValueError("IsmDistillTrainer computes a loss only; set prediction_loss_only=True to evaluate")
        return distill_loss(model, self.accelerator.unwrap_model(model), inputs)
