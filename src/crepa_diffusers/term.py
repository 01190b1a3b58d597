"""The CREPA term of a training step, bundled: frozen DINOv2 + block hook + projector. In a diffusers loop (README,
"Add CREPA to your own diffusers training script"): `build_crepa`, train `TransformerWithProjector` with the
projector's parameters beside the LoRA's, `prepare(encode(frames, ...))` (or precomputed features) before the
forward where `lambda_at(step, ...)` > 0, and add `loss(projected, step, max_train_steps)` to the diffusion loss.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .capture import HiddenStateCapture, transformer_blocks
from .checkpoints import PROJECTOR_FILE
from .crepa import CrepaConfig, CrepaProjector, crepa_loss
from .features import DinoPatchFeatures, select_frames


def build_crepa(
    config: CrepaConfig, transformer: nn.Module, device: torch.device, cache_dir: str | None = None
) -> "CrepaTerm | None":
    """The CREPA term of a crepa/repa run (None for mode none or lambda 0): the encoder frozen, bf16 under autocast on
    GPUs (fp32 on CPU); the fp32 projector maps the transformer's width (heads x head dim) to the encoder's."""
    if not config.enabled:
        return None
    on_cuda = device.type == "cuda"
    encoder = DinoPatchFeatures.from_pretrained(
        config.encoder,
        dtype=torch.bfloat16 if on_cuda else torch.float32,
        cache_dir=cache_dir,
        frames_per_chunk=config.encoder_frames_per_chunk,
        autocast_dtype=torch.bfloat16 if on_cuda else None,
    )
    hidden_size = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    projector = CrepaProjector(hidden_size, encoder.hidden_size, config.projector_dim)
    return CrepaTerm(config, transformer, projector.to(device), encoder.to(device))


class CrepaTerm:
    """Encoder features of the clean frames (computed before the transformer forward), the block capture, and the
    projector (run inside `TransformerWithProjector.forward`); `loss` gives lambda(step) * L_align and statistics."""

    def __init__(
        self, config: CrepaConfig, transformer: nn.Module, projector: CrepaProjector, encoder: DinoPatchFeatures
    ) -> None:
        self.config, self.projector, self.encoder = config, projector, encoder
        self.capture = HiddenStateCapture(transformer, config.block_index)
        self._features: torch.Tensor | None = None
        self.cache_dtype = encoder.autocast_dtype or torch.float32  # stored features: bf16 where DINOv2 runs in bf16

    def lambda_at(self, step: int, max_train_steps: int) -> float:
        """lambda for the optimizer step after `step` completed ones (--crepa_scheduler's schedule; 0: skip CREPA)."""
        return self.config.lambda_at(step, max_train_steps)

    def encode(self, frames: torch.Tensor, token_grid: tuple[int, int], groups: list[list[int]]) -> torch.Tensor:
        """frames [B, F, 3, H, W] in [-1, 1] (the VAE's input) -> encoder features [B, T, N, D_enc] on the DiT's token
        grid, one per token frame (`groups`: the frames of each token frame)."""
        return self.encoder(frames, token_grid, select_frames(groups, self.config.frame_pooling))

    def prepare(self, features: torch.Tensor) -> None:
        """This step's features [B, T, N, D_enc] (from `encode`, or the condition cache); arms the block capture."""
        self._features = features.float()
        self.capture.arm(features.shape[1])

    def loss(
        self, projected: torch.Tensor, step: int, max_train_steps: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """lambda(step) * L_align for the projected block tokens against this step's features, and values to log."""
        if self._features is None:
            raise RuntimeError("CrepaTerm.loss() before prepare(): call prepare(features) before the forward.")
        features, self._features = self._features, None
        config, lambda_, distance = self.config, self.lambda_at(step, max_train_steps), self.config.effective_distance
        align_loss, stats = crepa_loss(
            projected, features, distance, config.tau, config.cumulative, config.normalize_by_frames
        )
        # No neighbour pairs, so nothing to log for them: REPA*, or too few token frames (a still has one).
        if distance == 0 or features.shape[1] <= (1 if config.cumulative else distance):
            del stats["similarity_neighbour"]
        return lambda_ * align_loss, {"crepa_loss": align_loss.detach(), "crepa_lambda": lambda_, **stats}

    def free_encoder(self) -> None:
        """After the --cache_conditions pass: DINOv2 leaves the device (its features are stored)."""
        self.encoder = None

    def remove(self) -> None:
        """Takes the block hook off the transformer."""
        self.capture.remove()

    def save_projector(self, directory: str | os.PathLike) -> None:
        state = {key: value.detach().contiguous().cpu() for key, value in self.projector.state_dict().items()}
        save_file(state, os.path.join(directory, PROJECTOR_FILE))

    def load_projector(self, directory: str | os.PathLike) -> None:
        path = os.path.join(directory, PROJECTOR_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} is missing: this checkpoint was saved without CREPA "
                "(resume it with --crepa_mode none, or start a new run)."
            )
        self.projector.load_state_dict(load_file(path))


class TransformerWithProjector(nn.Module):
    """The transformer and the CREPA projector as one trained module, so that DDP, DeepSpeed (one model per engine) and
    FSDP wrap one model whose forward runs both: forward(...) -> (transformer output, projected block tokens or None
    when `prepare` was not called for this forward). Wrapping leaves the hook, on the unwrapped transformer's block."""

    def __init__(self, transformer: nn.Module, term: CrepaTerm | None = None) -> None:
        super().__init__()
        transformer_blocks(transformer)  # fails early on a model without blocks to hook
        self.transformer = transformer
        self.projector, self._capture = (term.projector, term.capture) if term is not None else (None, None)

    def forward(self, *args, **kwargs):
        output = self.transformer(*args, **kwargs)
        if self.projector is None or not self._capture.armed:
            return output, None
        return output, self.projector(self._capture.pop())
