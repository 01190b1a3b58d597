"""Frozen DINOv2 patch features of the batch's clean frames, on the DiT's token-frame and token-grid layout."""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn


def token_frame_groups(num_frames: int, temporal_compression: int = 4, patch_size_t: int = 1) -> list[list[int]]:
    """The pixel frames behind each token frame of a causal video VAE (+ temporal patching): latent frame 0 <- pixel
    frame 0; latent i >= 1 <- pixel frames r(i-1)+1 .. r*i. With patch_size_t = p > 1 the latents are padded at the
    front with copies of latent 0 to a multiple of p (as CogVideoX 1.5 does), and a token frame covers p consecutive
    latents: the union of their pixel frames."""
    r, p = temporal_compression, patch_size_t
    if num_frames < 1 or (num_frames - 1) % r != 0:
        below, above = r * max(0, (num_frames - 1) // r) + 1, r * ((num_frames - 1) // r + 1) + 1
        raise ValueError(
            f"{num_frames} frames cannot be encoded by a causal VAE with temporal compression {r}: use "
            f"{r}k+1 frames (e.g. {below} or {above})."
        )
    latent_groups = [[0]] + [list(range(r * (i - 1) + 1, r * i + 1)) for i in range(1, (num_frames - 1) // r + 1)]
    latent_groups = [latent_groups[0]] * (-len(latent_groups) % p) + latent_groups
    return [sorted(set().union(*latent_groups[start : start + p])) for start in range(0, len(latent_groups), p)]


def select_frames(groups: list[list[int]], pooling: str = "mean") -> list[list[int]]:
    """mean: every frame of a token frame, averaged; center: only its middle frame (a quarter of the encoder
    cost at temporal compression 4)."""
    if pooling in ("mean", "center"):
        return groups if pooling == "mean" else [[group[len(group) // 2]] for group in groups]
    raise ValueError(f"--crepa_frame_pooling must be mean or center, got {pooling!r}")


def pooling_matrix(groups: list[list[int]], num_frames: int) -> torch.Tensor:
    """[T, F] rows that average each group's frames: features[T] = matrix @ frame_features[F]."""
    matrix = torch.zeros(len(groups), num_frames)
    for token_frame, frames in enumerate(groups):
        matrix[token_frame, frames] = 1.0 / len(frames)
    return matrix


def require_dinov2(model_type: str | None, name: str) -> None:
    if model_type not in ("dinov2", "dinov2_with_registers"):
        raise ValueError(
            f"--crepa_encoder {name!r} is a {model_type!r} model, not DINOv2: CREPA aligns with DINOv2 "
            "patch tokens (transformers Dinov2Model / Dinov2WithRegistersModel: facebook/dinov2-giant, "
            "facebook/dinov2-base, facebook/dinov2-with-registers-giant, ...)."
        )


def load_encoder_config(name_or_path: str | os.PathLike, **kwargs):
    """The encoder's config, checked to be a DINOv2 one: cheap (no weights), so scripts call it before training."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--crepa_encoder {str(name_or_path)!r} could not be loaded ({error}). Give a Hub id such as "
            "facebook/dinov2-giant or a local folder saved with save_pretrained."
        ) from error
    require_dinov2(config.model_type, str(name_or_path))
    return config


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host-built tensor onto the device without a host sync: a copy from pageable memory blocks until the
    device queue drains, one from pinned memory does not."""
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor.to(device)


class DinoPatchFeatures(nn.Module):
    """A frozen DINOv2 (transformers) that turns clean frames into per-token-frame patch features: frames
    [B, F, 3, H, W] in [-1, 1] -> [B, T, h_tok * w_tok, D_enc]. Each frame is resized to (h_tok * P, w_tok * P), P the
    encoder's patch size, so the encoder's patch grid is the DiT's token grid and no token interpolation is needed;
    patch tokens after the final layer norm (no CLS, no registers); frames of a token frame are mean-pooled."""

    def __init__(self, encoder: nn.Module, frames_per_chunk: int = 16, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        config = encoder.config
        require_dinov2(getattr(config, "model_type", None), type(encoder).__name__)
        self.encoder = encoder.eval().requires_grad_(False)
        self.patch_size: int = config.patch_size
        self.hidden_size: int = config.hidden_size
        # CLS first, then the registers, then the patch tokens.
        self.num_prefix_tokens: int = 1 + getattr(config, "num_register_tokens", 0)
        self.frames_per_chunk, self.autocast_dtype = frames_per_chunk, autocast_dtype
        # DINOv2's input normalisation: ImageNet's mean and std.
        self.register_buffer("mean", torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        dtype: torch.dtype = torch.float32,
        frames_per_chunk: int = 16,
        autocast_dtype: torch.dtype | None = None,
        **kwargs,
    ) -> "DinoPatchFeatures":
        from transformers import AutoModel

        config = load_encoder_config(name_or_path, **kwargs)
        encoder = AutoModel.from_pretrained(name_or_path, config=config, dtype=dtype, **kwargs)
        return cls(encoder, frames_per_chunk=frames_per_chunk, autocast_dtype=autocast_dtype)

    def _autocast(self, device: torch.device):  # bf16 on GPUs; none on the CPU (and the benchmark's meta device)
        return torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()

    @torch.no_grad()
    def forward(self, frames: torch.Tensor, token_grid: tuple[int, int], groups: list[list[int]]) -> torch.Tensor:
        if frames.ndim != 5 or frames.shape[2] != 3:
            raise ValueError(f"expected frames [B, F, 3, H, W], got {tuple(frames.shape)}")
        # Encode only the frames some token frame uses, then renumber the groups over those.
        used = sorted({frame for group in groups for frame in group})
        groups = [[used.index(frame) for frame in group] for group in groups]
        num_frames = len(used)
        h_tok, w_tok = token_grid
        size = (h_tok * self.patch_size, w_tok * self.patch_size)
        if num_frames < frames.shape[1]:
            frames = frames.index_select(1, _to_device(torch.tensor(used), frames.device))
        features = []
        for chunk in frames.flatten(0, 1).split(self.frames_per_chunk):
            chunk = chunk.to(self.mean.device, torch.float32)
            chunk = F.interpolate((chunk + 1) / 2, size=size, mode="bicubic", align_corners=False, antialias=True)
            chunk = (chunk - self.mean) / self.std
            with self._autocast(chunk.device):
                out = self.encoder(pixel_values=chunk.to(self.encoder.dtype)).last_hidden_state
            features.append(out[:, self.num_prefix_tokens :].float())
        patch_features = torch.cat(features).unflatten(0, (frames.shape[0], num_frames))  # [B, F, N, D]
        if patch_features.shape[2] != h_tok * w_tok:
            raise RuntimeError(f"encoder gave {patch_features.shape[2]} patch tokens, expected {h_tok}x{w_tok}")
        pool = _to_device(pooling_matrix(groups, num_frames), patch_features.device)
        return torch.einsum("tf,bfnd->btnd", pool, patch_features)
