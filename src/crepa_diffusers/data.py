"""Video datasets for the training scripts: decoded lazily (in DataLoader workers), one clip per item.

Sources, as in diffusers' `train_cogvideox_lora.py`:
- `--instance_data_root` with `--caption_column` / `--video_column` naming text files (one prompt / one relative
  video path per line, e.g. prompts.txt and videos.txt);
- `--dataset_name`: anything `datasets.load_dataset` takes (a Hub id, a local folder, or a .csv / .json / .jsonl
  file) with the caption and video columns; relative video paths resolve against `--instance_data_root`, else
  against the dataset file's folder.

Frame sampling follows diffusers (skip start/end, even stride, keep 4k+1 frames); frames are resized keeping the
aspect ratio so the short side fits, then cropped to height x width (`--video_reshape_mode center|random|none`).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

DATA_FILE_SUFFIXES = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DatasetError(ValueError):
    """Bad training data, found before any model is loaded."""


@dataclass(frozen=True)
class VideoItem:
    path: Path
    prompt: str


def _read_lines(path: Path, flag: str) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"{flag}: {path} does not exist (one entry per line is expected).")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_video_items(
    instance_data_root: str | None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    caption_column: str = "text",
    video_column: str = "video",
    cache_dir: str | None = None,
    id_token: str | None = None,
) -> list[VideoItem]:
    """The (video path, prompt) pairs of a run, checked for count mismatches and missing files."""
    if dataset_name is None:
        if instance_data_root is None:
            raise DatasetError("Give --instance_data_root (with prompt and video list files) or --dataset_name.")
        root = Path(instance_data_root)
        if not root.is_dir():
            raise DatasetError(f"--instance_data_root {root} is not a folder.")
        prompts = _read_lines(root / caption_column, "--caption_column")
        videos = _read_lines(root / video_column, "--video_column")
        source = f"{root / caption_column} and {root / video_column}"
    else:
        import datasets

        local = Path(dataset_name)
        if local.is_file():
            builder = DATA_FILE_SUFFIXES.get(local.suffix.lower())
            if builder is None:
                raise DatasetError(f"--dataset_name {local}: use a .csv, .json, .jsonl or .parquet file, or a folder.")
            dataset = datasets.load_dataset(builder, data_files=str(local), cache_dir=cache_dir)
            root = Path(instance_data_root) if instance_data_root else local.parent
        else:
            dataset = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
            root = Path(instance_data_root) if instance_data_root else (local if local.is_dir() else Path("."))
        train = dataset["train"]
        for flag, column in (("--caption_column", caption_column), ("--video_column", video_column)):
            if column not in train.column_names:
                raise DatasetError(
                    f"{flag} {column!r} is not a column of {dataset_name}: its columns are {train.column_names}."
                )
        prompts = [str(p).strip() for p in train[caption_column]]
        videos = [v if isinstance(v, str) else v.get("path", "") for v in train[video_column]]
        source = str(dataset_name)

    if len(prompts) != len(videos):
        raise DatasetError(
            f"{source}: {len(prompts)} prompts but {len(videos)} videos; each video needs exactly one prompt."
        )
    if not videos:
        raise DatasetError(f"{source}: no videos listed.")
    if id_token:
        prompts = [f"{id_token} {prompt}" for prompt in prompts]
    return [VideoItem(Path(v) if Path(v).is_absolute() else root / v, p) for v, p in zip(videos, prompts)]


def sample_frame_indices(
    num_available: int, max_num_frames: int, skip_frames_start: int = 0, skip_frames_end: int = 0, temporal_compression: int = 4
) -> list[int]:
    """diffusers' sampling: skip start/end, an even stride when there are more frames than needed, then drop
    trailing frames so the count is r*k+1."""
    start = min(skip_frames_start, num_available)
    end = max(0, num_available - skip_frames_end)
    if end <= start:
        indices = [start] if start < num_available else [max(0, num_available - 1)]
    elif end - start <= max_num_frames:
        indices = list(range(start, end))
    else:
        stride = (end - start) // max_num_frames
        indices = list(range(start, end, stride))[:max_num_frames]
    keep = (len(indices) - 1) // temporal_compression * temporal_compression + 1
    return indices[:keep]


def resize_and_crop(frames: torch.Tensor, height: int, width: int, mode: str = "center") -> torch.Tensor:
    """[F, C, H, W] -> [F, C, height, width]: resize so the frame covers the target, then crop (or stretch: none)."""
    if mode == "none":
        return F.interpolate(frames, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    src_h, src_w = frames.shape[-2:]
    scale = max(height / src_h, width / src_w)
    new_h, new_w = max(height, math.ceil(src_h * scale - 1e-6)), max(width, math.ceil(src_w * scale - 1e-6))
    frames = F.interpolate(frames, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    if mode == "random":
        top, left = random.randint(0, new_h - height), random.randint(0, new_w - width)
    elif mode == "center":
        top, left = (new_h - height) // 2, (new_w - width) // 2
    else:
        raise ValueError(f"--video_reshape_mode must be center, random or none, got {mode!r}")
    return frames[..., top : top + height, left : left + width]


def probe_videos(items: list[VideoItem], min_frames: int) -> list[tuple[int, str]]:
    """Every problem with the listed videos (missing, unreadable, too short): (item index, message naming the file)."""
    import decord

    problems = []
    for index, item in enumerate(items):
        if not item.path.is_file():
            problems.append((index, f"{item.path}: file not found"))
            continue
        try:
            num_frames = len(decord.VideoReader(str(item.path)))
        except Exception as error:  # decord raises its own DECORDError, and RuntimeError on corrupt headers
            reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
            problems.append((index, f"{item.path}: cannot be decoded ({reason})"))
            continue
        if num_frames < min_frames:
            problems.append((index, f"{item.path}: {num_frames} frames, fewer than the {min_frames} needed"))
    return problems


class VideoDataset(Dataset):
    """Decodes one clip per item when asked (in the DataLoader's workers): {"frames": [F, 3, H, W] in [-1, 1],
    "prompt": str, "index": int}."""

    def __init__(
        self,
        items: list[VideoItem],
        height: int,
        width: int,
        max_num_frames: int,
        skip_frames_start: int = 0,
        skip_frames_end: int = 0,
        video_reshape_mode: str = "center",
        temporal_compression: int = 4,
    ) -> None:
        self.items = items
        self.height, self.width, self.max_num_frames = height, width, max_num_frames
        self.skip_frames_start, self.skip_frames_end = skip_frames_start, skip_frames_end
        self.video_reshape_mode = video_reshape_mode
        self.temporal_compression = temporal_compression

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        import decord

        item = self.items[index]
        reader = decord.VideoReader(str(item.path))
        indices = sample_frame_indices(
            len(reader), self.max_num_frames, self.skip_frames_start, self.skip_frames_end, self.temporal_compression
        )
        frames = torch.from_numpy(reader.get_batch(indices).asnumpy())  # [F, H, W, C] uint8
        frames = frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        frames = resize_and_crop(frames, self.height, self.width, self.video_reshape_mode).clamp(-1, 1)
        return {"frames": frames.contiguous(), "prompt": item.prompt, "index": index}


def collate_videos(examples: list[dict]) -> dict:
    lengths = {example["frames"].shape[0] for example in examples}
    if len(lengths) > 1:
        raise DatasetError(
            f"A batch mixes clips of {sorted(lengths)} frames: with --train_batch_size > 1 every video needs at "
            "least --max_num_frames frames (or use --train_batch_size 1)."
        )
    return {
        "frames": torch.stack([example["frames"] for example in examples]),
        "prompts": [example["prompt"] for example in examples],
        "indices": torch.tensor([example["index"] for example in examples]),
    }
