"""--cache_conditions: per-clip DINOv2 features and per-prompt text embeddings on disk, computed once."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

logger = logging.getLogger(__name__)


class ConditionCache:
    """Per-sample tensors (DINOv2 features, text embeddings) on disk, computed once and reused across epochs. A file's
    name is a hash of everything its content depends on (the video file's path, size and mtime, the frame sampling
    and resolution flags, the encoder or text model), so a changed flag or video never reuses a stale entry."""

    def __init__(self, directory: str | os.PathLike, salt: dict, num_samples: int | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.salt = json.dumps(salt, sort_keys=True, default=str)
        self.hits = self.misses = 0
        self.num_samples = num_samples  # the dataset's size: the first entry of a kind tells what all will take
        self._sized: set[str] = set()

    def key(self, kind: str, *parts) -> str:
        import hashlib
        return kind + "-" + hashlib.sha1(json.dumps([self.salt, kind, parts], default=str).encode()).hexdigest()[:20]

    def video_key(self, kind: str, path: Path, *parts) -> str:
        stat = Path(path).stat()
        return self.key(kind, str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, *parts)

    def load_or_compute(self, keys: list[str], compute: Callable[[], torch.Tensor | tuple], device: torch.device):
        """The batch's tensors (stacked on dim 0) from disk when every sample is cached, else `compute()` for the
        batch and each sample's slice written atomically."""
        from safetensors.torch import load_file, save_file
        paths = [self.directory / f"{key}.safetensors" for key in keys]
        if all(path.is_file() for path in paths):
            self.hits += len(paths)
            loaded = [load_file(str(path), device=str(device)) for path in paths]
            out = tuple(torch.stack([sample[str(i)] for sample in loaded]) for i in range(len(loaded[0])))
            return out if len(out) > 1 else out[0]
        self.misses += len(paths)
        result = compute()
        tensors = result if isinstance(result, tuple) else (result,)
        for sample, path in enumerate(paths):
            staging = path.with_suffix(f".tmp{os.getpid()}")
            save_file({str(i): t[sample].detach().contiguous().cpu() for i, t in enumerate(tensors)}, str(staging))
            os.replace(staging, path)
        self._check_space(keys[0].split("-")[0], paths[0].stat().st_size)
        return result

    def _check_space(self, kind: str, entry_bytes: int) -> None:
        """After the first entry of a kind: fail at step 1, not when the disk fills hours later."""
        if self.num_samples is None or kind in self._sized:
            return
        self._sized.add(kind)
        needed = entry_bytes * self.num_samples
        free = shutil.disk_usage(self.directory).free
        sizes = (f"--cache_conditions: {kind} entries take {entry_bytes / 1e6:.1f} MB each, {needed / 1e9:.2f} GB for "
                 f"{self.num_samples} samples; {self.directory} has {free / 1e9:.2f} GB free")
        logger.info(sizes)
        if needed > free:
            raise RuntimeError(f"{sizes}. Point --condition_cache_dir at a larger disk, or train without --cache_conditions.")


def make_condition_cache(args: argparse.Namespace, term=None, num_samples: int | None = None) -> ConditionCache | None:
    """The --cache_conditions cache (also handed to the CREPA term), keyed by every flag the clips depend on."""
    if not args.cache_conditions:
        return None
    salt = {name: getattr(args, name) for name in (
        "pretrained_model_name_or_path", "revision", "height", "width", "max_num_frames", "skip_frames_start",
        "skip_frames_end", "video_reshape_mode", "crepa_encoder", "crepa_frame_pooling", "max_sequence_length")
        if hasattr(args, name)}
    cache = ConditionCache(args.condition_cache_dir or Path(args.output_dir) / "condition_cache", salt, num_samples)
    if term is not None:
        term.cache = cache
    return cache


def cached(cache: ConditionCache | None, kind: str, names: list, compute: Callable, device: torch.device):
    """compute() through the cache, one key per sample (prompt text or video path)."""
    if cache is None:
        return compute()
    keys = [cache.video_key(kind, name) if isinstance(name, Path) else cache.key(kind, name) for name in names]
    return cache.load_or_compute(keys, compute, device)
