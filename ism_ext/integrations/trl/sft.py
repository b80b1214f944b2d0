"""`IsmSFTTrainer`: TRL's `SFTTrainer` on conversational data with ISM / MAS masks, one pass per dialogue.

TRL's own preparation of a conversational dataset would render and tokenise the dialogues itself, truncate
them at ``max_length`` (cutting a turn) and, with ``packing``, concatenate and cut them; its padding-free
collator drops ``block_sequence_ids``. So the trainer tokenises with the project's renderer first
(:func:`tokenize_conversations`), tells TRL to skip its preparation, and collates with :class:`IsmDataCollator`.
Everything else (optimizer, schedule, logging, checkpoints, PEFT, accelerate processes, TRL's chunked loss
on the LM head) is TRL's and transformers' own.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from trl import SFTConfig, SFTTrainer

from ...masks import SCHEMES
from ..hf import ATTN_IMPLEMENTATION
from .collator import FEATURES, IsmDataCollator
from .data import tokenize_conversations
from .model_checks import ensure_ism_model

__all__ = ["IsmSFTConfig", "IsmSFTTrainer", "check_sft_config"]


@dataclass
class IsmSFTConfig(SFTConfig):
    """`trl.SFTConfig` with the two choices of ISM training.

    ``ism_scheme``: the layout ("ism", "mas", "mas_merged", "prefix_lm", "causal"; see
    :mod:`ism_ext.masks.schemes`). ``ism_packing``: pack whole dialogues into rows of at most ``max_length``
    tokens with ``position_ids`` restarting per dialogue (padding-free); False pads one dialogue per row.
    ``max_length`` is the per-dialogue limit: longer dialogues lose whole trailing rounds. TRL's ``packing``,
    ``padding_free``, ``assistant_only_loss``, ``completion_only_loss`` and mixed precision (``bf16``, ``fp16``,
    here off by default) must stay off (see :func:`check_sft_config`).
    """

    # TRL turns bf16 autocast on by default; under autocast the ism attention gets query/key in float32 (RoPE
    # upcasts them) and value in bfloat16, which it refuses. Load the model in bfloat16 instead (check_sft_config).
    bf16: bool | None = field(default=False, metadata={"help": "mixed precision: not supported with ISM"})
    ism_scheme: str = field(default="ism", metadata={"help": f"attention layout, one of {SCHEMES}"})
    ism_packing: bool = field(default=False, metadata={"help": "pack whole dialogues per row (padding-free)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ism_scheme not in SCHEMES:
            raise ValueError(f"ism_scheme must be one of {SCHEMES}, got {self.ism_scheme!r}")


def check_sft_config(args: SFTConfig) -> None:
    """Raises ValueError naming the first SFTConfig setting that cannot work with ISM segments."""
    if args.packing or args.eval_packing:
        raise ValueError(
            f"packing=True (TRL's packing, strategy {args.packing_strategy!r}) concatenates dialogues into fixed "
            f"rows, cuts them ('wrapped', 'bfd_split') and collates without block_sequence_ids, so ISM segments "
            f"would be lost: set packing=False and eval_packing=False, and ism_packing=True to pack whole dialogues"
        )
    if args.padding_free:
        raise ValueError("padding_free=True uses TRL's collator, which drops block_sequence_ids: set "
                         "padding_free=False and ism_packing=True (padding-free rows of whole dialogues)")
    if args.assistant_only_loss or args.completion_only_loss:
        raise ValueError("assistant_only_loss / completion_only_loss must be left off: the ISM renderer already "
                         "puts labels on the assistants' tokens only")
    if args.bf16 or args.fp16:
        raise ValueError("bf16=True / fp16=True run the model under autocast, where the ism attention receives query "
                         "and key in float32 (RoPE upcasts them) but value in half precision, which it refuses: "
                         "load the model in that dtype (from_pretrained(..., dtype=torch.bfloat16)) and set "
                         "bf16=False, fp16=False")
    if args.truncation_mode != "keep_start":
        raise ValueError(f"truncation_mode={args.truncation_mode!r} would cut the start of a dialogue; ISM "
                         f"training drops whole trailing rounds past max_length (keep_start)")
    if args.chat_template_path is not None:
        raise ValueError("chat_template_path is applied after the dataset is tokenised here: set "
                         "tokenizer.chat_template before building the trainer")


def _model_init_kwargs(args: SFTConfig) -> dict[str, Any]:
    """``model_init_kwargs`` with the ism attention (a model given by name is loaded by TRL)."""
    kwargs = dict(args.model_init_kwargs or {})
    if kwargs.setdefault("attn_implementation", ATTN_IMPLEMENTATION) != ATTN_IMPLEMENTATION:
        raise ValueError(f"model_init_kwargs['attn_implementation'] is {kwargs['attn_implementation']!r}; ISM "
                         f"training needs {ATTN_IMPLEMENTATION!r}")
    return kwargs


def _tokenize(dataset: Any, tokenizer: Any, args: IsmSFTConfig) -> Any:
    """A dataset, a dict of them, None or a dataset's name (left as it is), tokenised as ``args`` says."""
    if dataset is None or isinstance(dataset, str):
        return dataset
    if isinstance(dataset, dict):
        return {name: _tokenize(d, tokenizer, args) for name, d in dataset.items()}
    return tokenize_conversations(dataset, tokenizer, args.ism_scheme, args.max_length, args.dataset_num_proc)


def _pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad token, else its eos token (as ChatCollator pads)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with")
    return int(pad)


class IsmSFTTrainer(SFTTrainer):
    """TRL's `SFTTrainer` training every answer of a dialogue in one ISM (or MAS) pass.

    Takes what `SFTTrainer` takes, with these differences: ``args`` is an :class:`IsmSFTConfig`;
    ``processing_class`` (the tokenizer, with its chat template) is required; the datasets are conversational
    (``{"messages": [...]}``) or already tokenised by :func:`tokenize_conversations`; the collator is always
    :class:`IsmDataCollator` (``data_collator`` and ``formatting_func`` are refused). A model object is switched
    to the ism attention in place (supported families only; a sliding window shorter than ``max_length`` is
    refused); a model name is loaded with it. ``peft_config`` trains LoRA adapters as in TRL.

    Raises:
        TypeError: ``args`` is not an :class:`IsmSFTConfig`.
        ValueError: a setting that cannot work with ISM segments (:func:`check_sft_config`), a model that cannot
            (see :func:`ensure_ism_model`), or a dataset row the renderer rejects (named by its index).
    """

    def __init__(self, model: Any, args: IsmSFTConfig, train_dataset: Any, eval_dataset: Any = None,
                 processing_class: Any = None, data_collator: Any = None, formatting_func: Any = None,
                 **kwargs: Any) -> None:
        if not isinstance(args, IsmSFTConfig):
            raise TypeError(f"args must be an IsmSFTConfig (trl.SFTConfig plus ism_scheme and ism_packing), got "
                            f"{type(args).__name__}")
        check_sft_config(args)
        if data_collator is not None or formatting_func is not None:
            raise ValueError("IsmSFTTrainer builds its inputs with the ISM renderer and IsmDataCollator: pass no "
                             "data_collator or formatting_func")
        if processing_class is None:
            raise ValueError("processing_class (the tokenizer, with its chat template) is required: the dialogues "
                             "are tokenised before TRL sees them")
        args = copy.copy(args)  # the settings below are this trainer's: the caller's object stays as it was
        if isinstance(model, str):
            args.model_init_kwargs = _model_init_kwargs(args)
        else:
            ensure_ism_model(model, args.max_length)
        train_dataset = _tokenize(train_dataset, processing_class, args)
        eval_dataset = _tokenize(eval_dataset, processing_class, args)
        # TRL's preparation would re-tokenise, truncate and pack: the rows are final already.
        args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
        collator = IsmDataCollator(_pad_token_id(processing_class), pack=args.ism_packing,
                                   max_length=args.max_length, pad_to_multiple_of=args.pad_to_multiple_of)
        super().__init__(model, args=args, data_collator=collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        if isinstance(model, str):
            ensure_ism_model(self.model, args.max_length)

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """`SFTTrainer.evaluate`, with a dataset passed here tokenised by the ISM renderer first (a name selects
        one of the eval datasets given at construction, which are tokenised already)."""
        eval_dataset = _tokenize(eval_dataset, self.processing_class, self.args)
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def _set_signature_columns_if_needed(self) -> None:
        # Trainer drops the dataset columns that are not in this list before collation: keep the segments.
        if self._signature_columns is None:
            self._signature_columns = list(FEATURES)
