"""The CREPA term of a training step, bundled: frozen DINOv2 + block hook + projector. In a diffusers loop (README,
"Add CREPA to your own diffusers training script"): `crepa = build_crepa(args, transformer, device)`, train
`TransformerWithProjector(transformer, crepa)` with the projector's parameters beside the LoRA's, call
`crepa.prepare(crepa.encode(frames, ...))` before the forward (or prepare precomputed features; skip it where lambda
is 0: the projector then does no work), and add `crepa_lambda * crepa.loss(projected)[0]` to the diffusion loss.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

from .capture import HiddenStateCapture, transformer_blocks
from .checkpoints import PROJECTOR_FILE
from .crepa import CrepaConfig, CrepaProjector
from .features import DinoPatchFeatures, load_encoder_config, select_frames


def check_crepa_args(args: argparse.Namespace, num_blocks: int, model_name: str) -> None:
    """Before any weights load: the hooked block exists and --crepa_encoder is a DINOv2 (from its config alone)."""
    config = CrepaConfig.from_args(args)
    if not config.enabled:
        return
    if not 0 <= config.block_index < num_blocks:
        raise SystemExit(
            f"--crepa_block_index {config.block_index} is out of range: this {model_name} has "
            f"{num_blocks} blocks (valid indices 0..{num_blocks - 1})."
        )
    try:
        load_encoder_config(config.encoder, cache_dir=getattr(args, "cache_dir", None))
    except ValueError as error:
        raise SystemExit(str(error)) from None


def build_crepa(args: argparse.Namespace, transformer: nn.Module, device: torch.device) -> "CrepaTerm | None":
    """The CREPA term of a crepa/repa run (None for --crepa_mode none or --crepa_lambda 0). The encoder is frozen, in
    bf16 on GPUs (fp32 on CPU), and runs under bf16 autocast there; the projector maps the transformer's width
    (heads x head dim) to the encoder's and keeps fp32 parameters."""
    config = CrepaConfig.from_args(args)
    if not config.enabled:
        return None
    on_cuda = device.type == "cuda"
    encoder = DinoPatchFeatures.from_pretrained(
        config.encoder,
        dtype=torch.bfloat16 if on_cuda else torch.float32,
        cache_dir=getattr(args, "cache_dir", None),
        frames_per_chunk=config.encoder_frames_per_chunk,
        autocast_dtype=torch.bfloat16 if on_cuda else None,
    )
    hidden_size = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    projector = CrepaProjector(hidden_size, encoder.hidden_size, config.projector_dim)
    return CrepaTerm(config, transformer, projector.to(device), encoder.to(device))


class CrepaTerm:
    """Encoder features of the clean frames (computed before the transformer forward), the block capture, and the
    projector (run inside `TransformerWithProjector.forward`); `loss` gives L_align and its statistics."""

    def __init__(
        self, config: CrepaConfig, transformer: nn.Module, projector: CrepaProjector, encoder: DinoPatchFeatures
    ) -> None:
        self.config, self.projector, self.encoder = config, projector, encoder
        self.lambda_ = config.lambda_  # --crepa_lambda (the schedule's peak: see CrepaConfig.lambda_at)
        self.capture = HiddenStateCapture(transformer, config.block_index)
        self._features: torch.Tensor | None = None

    @property
    def cache_dtype(self) -> torch.dtype:
        """How --cache_conditions stores features: bf16 where the encoder runs in bf16 (half the disk and the read)."""
        return self.encoder.autocast_dtype or torch.float32

    def encode(self, frames: torch.Tensor, token_grid: tuple[int, int], groups: list[list[int]]) -> torch.Tensor:
        """frames [B, F, 3, H, W] in [-1, 1] (the VAE's input) -> encoder features [B, T, N, D_enc] on the DiT's token
        grid, one per token frame (`groups`: the frames of each token frame)."""
        return self.encoder(frames, token_grid, select_frames(groups, self.config.frame_pooling))

    def prepare(self, features: torch.Tensor) -> None:
        """This step's features [B, T, N, D_enc] (from `encode`, or the condition cache); arms the block capture."""
        self._features = features.float()
        self.capture.arm(features.shape[1])

    def loss(self, projected: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_align of the projected block tokens against this step's features, and detached statistics to log."""
        if self._features is None:
            raise RuntimeError("CrepaTerm.loss() before prepare(): call prepare(features) before the forward.")
        features, self._features = self._features, None
        return self.config.loss_and_stats(projected, features)

    def save_projector(self, directory: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        state = {key: value.detach().contiguous().cpu() for key, value in self.projector.state_dict().items()}
        save_file(state, os.path.join(directory, PROJECTOR_FILE))

    def load_projector(self, directory: str | os.PathLike) -> None:
        from safetensors.torch import load_file

        path = os.path.join(directory, PROJECTOR_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} is missing: this checkpoint was saved without CREPA "
                "(resume it with --crepa_mode none, or start a new run)."
            )
        self.projector.load_state_dict(load_file(path))


class TransformerWithProjector(nn.Module):
    """The transformer and the CREPA projector as one trained module, so that DDP, DeepSpeed (one model per engine)
    and FSDP wrap a single model whose forward runs both: forward(...) -> (transformer output, projected block
    tokens, or None when `prepare` was not called for this forward). The hook sits on the unwrapped transformer's
    block, which wrapping does not change."""

    def __init__(self, transformer: nn.Module, term: CrepaTerm | None = None) -> None:
        super().__init__()
        transformer_blocks(transformer)  # fails early on a model without blocks to hook
        self.transformer = transformer
        self.projector = term.projector if term is not None else None
        self._capture = term.capture if term is not None else None

    def forward(self, *args, **kwargs):
        output = self.transformer(*args, **kwargs)
        if self.projector is None or not self._capture.armed:
            return output, None
        return output, self.projector(self._capture.pop())
