"""--cache_conditions: what the frozen encoders give each clip (its VAE latents, its prompt's embeddings, its DINOv2
features), computed once in a pass before training, then read back by the DataLoader."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch


logger = logging.getLogger(__name__)


class ConditionCache:
    """One safetensors file per entry, named by a hash of all its content depends on (the video's path, size and
    mtime, its prompt and bucket, and `salt`: the frame sampling flags, the model ids), so a changed flag or video
    never reuses a stale entry. Each file is written to a staging name and renamed: whole or absent."""

    def __init__(self, directory: str | os.PathLike, salt: dict) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.salt = json.dumps(salt, sort_keys=True, default=str)

    def key(self, *parts) -> str:
        return hashlib.sha1(json.dumps([self.salt, parts], default=str).encode()).hexdigest()[:24]

    def video_key(self, path: Path, *parts) -> str:
        stat = Path(path).stat()
        return self.key(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, *parts)

    def item_key(self, item) -> str:
        """A sample's entry (`.path`, `.prompt`, and `.bucket` where it has one)."""
        bucket = getattr(item, "bucket", None)
        return self.video_key(item.path, item.prompt, *([list(bucket)] if bucket else []))

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def is_valid(self, key: str, required: set[str]) -> bool:
        """The entry's file is whole and holds the `required` tensors (a run without CREPA stores no features); a
        truncated or unreadable one is reported, and computed again like a missing one."""
        from safetensors import safe_open

        if not self.path(key).is_file():
            return False
        try:
            with safe_open(str(self.path(key)), "pt") as entry:  # checks that the header covers the whole file
                return required <= set(entry.keys())
        except Exception as error:
            logger.warning("--cache_conditions: %s is damaged (%s): computing it again.", self.path(key), error)
            return False

    def missing(self, items: list, required: set[str], rank: int = 0, world_size: int = 1) -> list[int]:
        """What the pass must encode: the indices of this rank's share of `items` (rank r: r, r + W, ...) whose
        entries are absent, damaged or lack a `required` tensor."""
        return [i for i in range(rank, len(items), world_size) if not self.is_valid(self.item_key(items[i]), required)]

    def save(self, key: str, tensors: dict[str, torch.Tensor]) -> int:
        """Write one entry atomically; returns its size in bytes."""
        from safetensors.torch import save_file

        staging = self.path(key).with_suffix(f".tmp{os.getpid()}")
        save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, str(staging))
        os.replace(staging, self.path(key))
        return self.path(key).stat().st_size

    def load(self, key: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(
                f"--cache_conditions: {path} is missing. Every process must see the cache: put "
                "--condition_cache_dir on a filesystem shared by all nodes."
            )
        return load_file(str(path))

    def check_space(self, entry_bytes: int, entries_left: int) -> None:
        """After the first entry of the pass: fail then, not when the disk fills hours later."""
        needed, free = entry_bytes * entries_left, shutil.disk_usage(self.directory).free
        sizes = f"--cache_conditions: entries take {entry_bytes / 1e6:.1f} MB each, {needed / 1e9:.2f} GB for the "
        sizes += f"{entries_left} still to write; {self.directory} has {free / 1e9:.2f} GB free"
        logger.info(sizes)
        if needed > free:
            raise SystemExit(
                f"{sizes}. Point --condition_cache_dir at a larger disk, or train without --cache_conditions."
            )
