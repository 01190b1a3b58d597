"""Capture one transformer block's video tokens as [B, T, N, D] with a forward hook."""

from __future__ import annotations

import torch
from torch import nn


def transformer_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The blocks in forward order: CogVideoX `transformer_blocks`; HunyuanVideo its 20 double-stream
    `transformer_blocks` then its 40 single-stream `single_transformer_blocks` (one global index); Wan `blocks`."""
    names = ("transformer_blocks", "single_transformer_blocks", "blocks")
    blocks = [block for name in names for block in getattr(transformer, name, [])]
    if not blocks:
        raise ValueError(f"{type(transformer).__name__} has no transformer_blocks to hook (is it wrapped?)")
    return blocks


class HiddenStateCapture:
    """Forward hook on block `block_index` of the (unwrapped) transformer. A CogVideoX or HunyuanVideo block returns
    (video_tokens, text_tokens), a Wan block the video tokens alone; the hook keeps the video tokens, [B, T*N, D] ->
    [B, T, N, D], and returns None so the block's output is untouched. Only the first call after `arm()` is kept:
    under gradient checkpointing the block runs again during backward."""

    def __init__(self, transformer: nn.Module, block_index: int) -> None:
        blocks = transformer_blocks(transformer)
        if not 0 <= block_index < len(blocks):
            raise ValueError(
                f"--crepa_block_index {block_index} is out of range: {type(transformer).__name__} has "
                f"{len(blocks)} blocks (valid indices 0..{len(blocks) - 1})."
            )
        self.block_index = block_index
        self._token_frames: int | None = None
        self._captured: torch.Tensor | None = None
        self._handle = blocks[block_index].register_forward_hook(self._hook)

    @property
    def armed(self) -> bool:
        return self._token_frames is not None

    def arm(self, token_frames: int) -> None:
        """Capture the next forward of the block, as `token_frames` frames of tokens."""
        self._token_frames, self._captured = token_frames, None

    def _hook(self, module: nn.Module, args, output) -> None:
        frames = self._token_frames
        if frames is None or self._captured is not None:
            return None
        video = output[0] if isinstance(output, tuple) else output
        batch, num_tokens, width = video.shape
        if num_tokens % frames:
            raise RuntimeError(f"block output has {num_tokens} video tokens, not a multiple of {frames} frames")
        self._captured = video.view(batch, frames, num_tokens // frames, width)

    def pop(self) -> torch.Tensor:
        """The captured [B, T, N, D] tokens; disarms until the next `arm()`."""
        if self._captured is None:
            raise RuntimeError(f"block {self.block_index} did not run since arm() (was the transformer called?)")
        captured, self._captured, self._token_frames = self._captured, None, None
        return captured

    def remove(self) -> None:
        """Takes the hook off the block (it stays there until then)."""
        self._handle.remove()
        self._token_frames = self._captured = None

    def __enter__(self) -> "HiddenStateCapture":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
