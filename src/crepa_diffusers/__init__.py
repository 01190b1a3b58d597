"""CREPA (Cross-frame Representation Alignment, arXiv 2506.09229) for diffusers video LoRA training.

The CREPA term (`CrepaConfig`, `build_crepa` -> `CrepaTerm`, `TransformerWithProjector`, `crepa_loss`), and the
small mechanisms the example scripts' loops call explicitly (`checkpoints`, `training_utils`, `ConditionCache`,
`write_model_card`, `comfyui`, `buckets`, `read_sample`, `memory`): everything the scripts import is listed in
`__all__`.
"""

from . import buckets, checkpoints, comfyui, memory, training_utils
from .cache import ConditionCache
from .capture import HiddenStateCapture, transformer_blocks
from .crepa import CrepaConfig, CrepaProjector, add_crepa_args, crepa_loss
from .features import DinoPatchFeatures, token_frame_groups
from .media import dataset_files, read_sample
from .model_card import write_model_card
from .term import CrepaTerm, TransformerWithProjector, build_crepa


__version__ = "0.1.0"
__all__ = [
    "ConditionCache",
    "CrepaConfig",
    "CrepaProjector",
    "CrepaTerm",
    "DinoPatchFeatures",
    "HiddenStateCapture",
    "TransformerWithProjector",
    "add_crepa_args",
    "buckets",
    "build_crepa",
    "checkpoints",
    "comfyui",
    "crepa_loss",
    "dataset_files",
    "memory",
    "read_sample",
    "token_frame_groups",
    "training_utils",
    "transformer_blocks",
    "write_model_card",
]
