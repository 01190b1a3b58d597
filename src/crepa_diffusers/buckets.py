"""Resolution and length buckets: samples of different shapes train at their own aspect ratio and length, every
batch drawn from one bucket (finetrainers' --video_resolution_buckets FxHxW and --image_resolution_buckets HxW)."""

from __future__ import annotations

import math
from collections import Counter

from .training_utils import EpochShuffleSampler


Bucket = tuple[int, int, int]  # (frames, height, width); a still's bucket has 1 frame
Size = tuple[int, int]  # (height, width)


def parse_buckets(values: list[str], flag: str, image: bool = False) -> list[Bucket]:
    """'49x480x720' (FxHxW) or, for images, '480x720' (HxW) -> (frames, height, width) tuples, errors naming `flag`."""
    form = "HxW, e.g. 480x720" if image else "FxHxW, e.g. 49x480x720"
    buckets = []
    for value in values:
        parts = value.lower().split("x")
        if len(parts) != (2 if image else 3) or not all(part.strip().isdigit() and int(part) > 0 for part in parts):
            raise SystemExit(f"{flag} {value!r}: write each bucket as {form} (positive whole numbers).")
        bucket = tuple(int(part) for part in parts)
        buckets.append((1, *bucket) if image else bucket)
    return list(dict.fromkeys(buckets))  # a repeated bucket once


def check_buckets(
    buckets: list[Bucket], flag: str, temporal_compression: int, spatial_multiple: int, max_size: Size | None = None
) -> None:
    """Sizes the model takes: rk+1 frames for a causal VAE of temporal compression r (CogVideoX 1.5's token-frame
    patch of 2 is met by the scripts' front padding), height and width multiples of VAE x patch; `max_size` (height,
    width): CogVideoX 1.5's rotary grid, which ends at its sample size."""
    for frames, height, width in buckets:
        shape = (height, width) if "image" in flag else (frames, height, width)
        name = f"{flag} {'x'.join(map(str, shape))}"
        if (frames - 1) % temporal_compression:
            below = (frames - 1) // temporal_compression * temporal_compression + 1
            raise SystemExit(
                f"{name}: the VAE takes {temporal_compression}k+1 frames: use {below} or "
                f"{below + temporal_compression} frames."
            )
        for side, value in (("height", height), ("width", width)):
            if value % spatial_multiple:
                raise SystemExit(
                    f"{name}: the {side} {value} is not a multiple of {spatial_multiple} (VAE x patch size): use "
                    f"{max(spatial_multiple, round(value / spatial_multiple) * spatial_multiple)}."
                )
        if max_size is not None and (height > max_size[0] or width > max_size[1]):
            raise SystemExit(
                f"{name}: this model's position grid ends at {max_size[0]}x{max_size[1]} pixels (its transformer's "
                "sample size): use buckets within it."
            )


def choose_bucket(num_frames: int, height: int, width: int, buckets: list[Bucket]) -> Bucket | None:
    """The bucket for a sample of `num_frames` usable frames at height x width: among the buckets whose frame count it
    can fill, the closest aspect ratio; then the longest; then the size closest to its own. None: it fits none."""
    fitting = [bucket for bucket in buckets if bucket[0] <= num_frames]
    if not fitting:
        return None
    ratio, area = math.log(height / width), height * width

    def distance(bucket: Bucket):
        frames, bucket_height, bucket_width = bucket
        aspect = round(abs(math.log(bucket_height / bucket_width) - ratio), 6)
        return aspect, -frames, abs(math.log(bucket_height * bucket_width / area))

    return min(fitting, key=distance)


class BucketBatchSampler(EpochShuffleSampler):
    """Batches of sample indices, each from one bucket (`bucket_of[i]`), in an order set by (seed, epoch) alone:
    `EpochShuffleSampler`'s permutation dealt into per-bucket batches, each emitted when full; a bucket's last short
    batch is kept (drop_last=False, as diffusers' loaders). With W = `num_replicas` > 1 a bucket's batches leave in
    groups of W (the last group completed with its first batches): accelerate's `BatchSamplerShard` gives rank r
    batches r, r + W, ..., so every rank trains the same bucket at each step. No `batch_size` attribute: accelerate
    then deals the batches whole. The length is fixed, so `skip_first_batches` resumes exactly."""

    def __init__(self, bucket_of: list, batch_size: int, seed: int, num_replicas: int = 1) -> None:
        super().__init__(len(bucket_of), seed)
        self.bucket_of, self.size, self.replicas, self.counts = bucket_of, batch_size, num_replicas, Counter(bucket_of)

    def __len__(self) -> int:
        return sum(math.ceil(math.ceil(n / self.size) / self.replicas) * self.replicas for n in self.counts.values())

    def __iter__(self):
        filling, ready, done = {}, {}, {}  # per bucket: the batch being filled, full ones waiting, all full ones
        for index in super().__iter__():
            bucket = self.bucket_of[index]
            filling.setdefault(bucket, []).append(index)
            if len(filling[bucket]) == self.size:
                batch = filling.pop(bucket)
                ready.setdefault(bucket, []).append(batch)
                done.setdefault(bucket, []).append(batch)
                if len(ready[bucket]) == self.replicas:
                    yield from ready.pop(bucket)
        for bucket in sorted(self.counts, key=str):  # what is left, bucket by bucket in a fixed order
            group = ready.pop(bucket, []) + ([filling.pop(bucket)] if bucket in filling else [])
            first = done.get(bucket) or group
            yield from group + [first[i % len(first)] for i in range((-len(group)) % self.replicas)]


def buckets_from_flags(
    video: list[str] | None,
    image: list[str] | None,
    default: Bucket,
    temporal_compression: int,
    spatial_multiple: int,
    max_size: Size | None = None,
) -> tuple[list[Bucket], list[Bucket]]:
    """The video and still buckets of a run, checked against the model: --video_resolution_buckets (else `default`,
    from --max_num_frames / --height / --width), --image_resolution_buckets (else the video buckets' sizes)."""
    videos = parse_buckets(video, "--video_resolution_buckets") if video else [default]
    images = parse_buckets(image, "--image_resolution_buckets", image=True) if image else []
    images = images or sorted({(1, height, width) for _, height, width in videos})
    video_flag = "--video_resolution_buckets" if video else "--max_num_frames/--height/--width"
    check_buckets(videos, video_flag, temporal_compression, spatial_multiple, max_size)
    check_buckets(images, "--image_resolution_buckets", temporal_compression, spatial_multiple, max_size)
    return videos, images
