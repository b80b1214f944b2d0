"""The training layer: chat data for one-pass multi-turn training, and the `train` loop behind the command.

`ChatCollator` turns dialogues into model inputs (padded or packed); `triplet_expansion` builds the prefix-LM
baseline; `train(TrainConfig(...))` runs the loop of ``python -m ism_ext train`` (config, data files,
distributed processes, checkpoints, the loss log, atomic file writes and the loop each have their module).
"""

from .collator import ChatCollator, collate_tokenized
from .config import DEFAULT_DATA, TrainConfig, TrainError
from .data_files import ChatExample, load_chat_jsonl
from .loop import train
from .packing import pack_dialogues
from .triplet import tokenize_triplet, triplet_expansion

__all__ = [
    "DEFAULT_DATA",
    "ChatCollator",
    "collate_tokenized",
    "ChatExample",
    "TrainConfig",
    "TrainError",
    "load_chat_jsonl",
    "pack_dialogues",
    "tokenize_triplet",
    "train",
    "triplet_expansion",
]

