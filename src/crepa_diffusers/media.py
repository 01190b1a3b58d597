"""Reading training samples upright: videos with PyAV (their display rotation applied, as players and ffmpeg do;
decord ignores it and fails on such clips), stills with PIL (EXIF orientation applied) as one-frame videos. The
start-up probe and the DataLoader read through the same functions, so what the probe passes, training can read."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def _upright(frame) -> np.ndarray:
    """[H, W, 3] uint8 as displayed: PyAV's `frame.rotation` is the display matrix's counter-clockwise angle."""
    return np.rot90(frame.to_ndarray(format="rgb24"), k=round(frame.rotation / 90) % 4)


def count_packets(container, stream) -> int:
    """The frames a video stream stores (read, not decoded; a cut file lacks the last ones), from the start."""
    count = sum(1 for packet in container.demux(stream) if packet.size)
    container.seek(0)
    return count


def read_video(path: str | Path, pick: Callable[[int], list[int]]) -> torch.Tensor:
    """The frames `pick(num_frames)` of a video, upright: uint8 [F, H, W, 3]. Decodes up to the last one picked."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        wanted = pick(stream.frames or count_packets(container, stream))  # some containers list 0 frames
        needed, frames = set(wanted), {}
        for index, frame in enumerate(container.decode(stream)):
            if index in needed:
                frames[index] = _upright(frame)
            if index >= max(wanted):
                break
    missing = sorted(needed - set(frames))
    if missing:
        raise RuntimeError(
            f"{path}: frame {missing[0]} could not be decoded (the file holds fewer frames than listed)"
        )
    return torch.from_numpy(np.stack([frames[index] for index in wanted]))


def read_image(path: str | Path) -> torch.Tensor:
    """A still as a one-frame video, upright (EXIF orientation applied): uint8 [1, H, W, 3]."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(ImageOps.exif_transpose(image).convert("RGB")).copy())[None]


def probe(path: str | Path) -> tuple[int, int, int]:
    """(frames, height, width) as training reads the file (upright; a still has one frame): decodes its first frame
    through the same path and counts the frames the file stores, so a file training cannot read (or one cut short)
    fails here, before any model loads."""
    if is_image(path):
        return (1, *read_image(path).shape[1:3])
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        listed, stored = stream.frames, count_packets(container, stream)
    if listed and stored < listed:
        raise RuntimeError(
            f"it holds {stored} of the {listed} frames its header lists (cut short, e.g. a partial copy)"
        )
    return (stored, *read_video(path, lambda n: [0]).shape[1:3])


def read_sample(path: str | Path, pick: Callable[[int], list[int]]) -> torch.Tensor:
    """A training sample upright, uint8 [F, H, W, 3]: a still (one frame), or the frames `pick(num_frames)` of a video."""
    return read_image(path) if is_image(path) else read_video(path, pick)


def dataset_files(values: list, folder: str | Path) -> list[str]:
    """A dataset column's media as file paths: strings as they are; a `datasets.Image(decode=False)` value
    ({"path", "bytes"}) by its bytes where the dataset holds them (Hub parquet datasets do: their "path" is just the
    original name), written once to `folder` under a name from its content, else by its path."""
    import hashlib

    paths = []
    for value in values:
        value = {"path": value} if isinstance(value, str) else value or {}
        data, path = value.get("bytes"), value.get("path") or ""
        if data:
            target = Path(folder).resolve() / f"{hashlib.sha1(data).hexdigest()[:20]}{Path(path).suffix or '.png'}"
            if not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                staging = target.with_suffix(f".tmp{os.getpid()}")  # every rank may write it: whole or absent
                staging.write_bytes(data)
                os.replace(staging, target)
            path = str(target)
        paths.append(path)
    return paths
