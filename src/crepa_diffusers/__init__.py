"""CREPA (Cross-frame Representation Alignment, arXiv 2506.09229) for diffusers video LoRA training."""

from .capture import HiddenStateCapture, transformer_blocks
from .crepa import CrepaConfig, CrepaProjector, add_crepa_args, crepa_loss, crepa_loss_and_stats, frame_similarity
from .features import DinoPatchFeatures, pooling_matrix, token_frame_groups

__version__ = "0.1.0"

__all__ = [
    "CrepaConfig",
    "CrepaProjector",
    "DinoPatchFeatures",
    "HiddenStateCapture",
    "add_crepa_args",
    "crepa_loss",
    "crepa_loss_and_stats",
    "frame_similarity",
    "pooling_matrix",
    "token_frame_groups",
    "transformer_blocks",
]
