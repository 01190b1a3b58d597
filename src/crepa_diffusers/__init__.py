"""CREPA (Cross-frame Representation Alignment, arXiv 2506.09229) for diffusers video LoRA training."""

from .capture import HiddenStateCapture, transformer_blocks
from .crepa import CrepaConfig, CrepaProjector, add_crepa_args, crepa_loss, crepa_loss_and_stats
from .features import DinoPatchFeatures, token_frame_groups
from .term import CrepaTerm, TransformerWithProjector, build_crepa, check_crepa_args


__version__ = "0.1.0"
__all__ = [
    "CrepaConfig",
    "CrepaProjector",
    "CrepaTerm",
    "DinoPatchFeatures",
    "HiddenStateCapture",
    "TransformerWithProjector",
    "add_crepa_args",
    "build_crepa",
    "check_crepa_args",
    "crepa_loss",
    "crepa_loss_and_stats",
    "token_frame_groups",
    "transformer_blocks",
]
