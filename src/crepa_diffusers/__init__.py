"""CREPA (Cross-frame Representation Alignment, arXiv 2506.09229) for diffusers video LoRA training: the CREPA term,
and the small mechanisms the example scripts' loops call explicitly. `__all__` lists everything the scripts import."""

from . import buckets, checkpoints, comfyui, memory, training_utils
from .cache import ConditionCache
from .capture import HiddenStateCapture, transformer_blocks
from .crepa import CrepaConfig, CrepaProjector, add_crepa_args, crepa_loss
from .features import DinoPatchFeatures, token_frame_groups
from .media import dataset_files, read_sample
from .model_card import write_model_card
from .term import CrepaTerm, TransformerWithProjector, build_crepa


__version__ = "0.1.0"
# The CREPA term: its settings and flags, the loss, the DINOv2 features, the block hook and the projector.
__all__ = ["CrepaConfig", "add_crepa_args", "build_crepa", "CrepaTerm", "TransformerWithProjector", "crepa_loss"]
__all__ += ["CrepaProjector", "DinoPatchFeatures", "token_frame_groups", "HiddenStateCapture", "transformer_blocks"]
# What the loops call around it: samples, buckets, the condition cache, memory, checkpoints, model card, ComfyUI.
__all__ += ["read_sample", "dataset_files", "buckets", "ConditionCache", "memory", "training_utils", "checkpoints"]
__all__ += ["write_model_card", "comfyui"]
