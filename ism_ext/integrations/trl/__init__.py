"""Training with ISM / MAS masks where people train: TRL's `SFTTrainer`, the transformers `Trainer`, accelerate.

TRL::

    from ism_ext.integrations.trl import IsmSFTConfig, IsmSFTTrainer

    args = IsmSFTConfig(output_dir="out", ism_scheme="ism", ism_packing=True, max_length=1024)
    trainer = IsmSFTTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer,
                            peft_config=None)          # or a peft.LoraConfig
    trainer.train()

``dataset`` is conversational (``{"messages": [...]}`` rows). The project's turn renderer tokenises it
(:func:`tokenize_conversations`: ``input_ids``, labels on the assistants' tokens only, ``block_sequence_ids``),
TRL's own preparation is skipped, and :class:`IsmDataCollator` pads or packs whole dialogues. A plain
`transformers.Trainer` takes the same tokenised dataset and collator (with ``remove_unused_columns=False``);
:class:`IsmDistillTrainer` is the self-distillation objective as a Trainer. ``accelerate launch`` runs any of
them on several processes. README section "Training with TRL" and ``examples/train_trl.py`` show it whole.
"""

from .collator import IsmDataCollator
from .data import tokenize_conversations
from .distill import IsmDistillTrainer
from .model_checks import ensure_ism_model, sliding_window

try:
    from .sft import IsmSFTConfig, IsmSFTTrainer, check_sft_config
except ImportError as e:  # trl missing: the Trainer path above still works
    _TRL_ERROR = e

    def __getattr__(name: str):
        if name in ("IsmSFTConfig", "IsmSFTTrainer", "check_sft_config"):
            raise ImportError(f"{name} needs TRL (pip install trl==1.16.0): {_TRL_ERROR}")
        raise AttributeError(name)

__all__ = [
    "IsmDataCollator",
    "IsmDistillTrainer",
    "IsmSFTConfig",
    "IsmSFTTrainer",
    "check_sft_config",
    "ensure_ism_model",
    "sliding_window",
    "tokenize_conversations",
]
