"""Resolution and length buckets, stills and phone clips (issue 24): the mechanisms on their own, then the scripts
training on a mixed dataset (landscape, portrait, short and rotated phone clips, stills)."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    COGVIDEOX_SCRIPT,
    HUNYUAN_SCRIPT,
    WAN_SCRIPT,
    assert_same_trained_weights,
    import_script,
    lora_state,
    run_main,
    run_two_ranks,
    samples_per_rank,
    tiny_train_args,
)

from crepa_diffusers import buckets, media, testing
from crepa_diffusers.cache import ConditionCache
from crepa_diffusers.term import CrepaTerm
from crepa_diffusers.training_utils import EpochShuffleSampler


BUCKET_FLAGS = [
    "--video_resolution_buckets",
    "9x32x48",
    "9x48x32",
    "5x32x48",
    "--image_resolution_buckets",
    "32x48",
    "48x32",
]
# The bucket each file of make_mixed_folder goes to under BUCKET_FLAGS, worked out by hand: landscape clips
# (640x272, 176x144) 9x32x48; the portrait clip and the phone clip (stored 48x32 wide, displayed 32x48 tall) 9x48x32;
# the 6-frame clip only fills 5 frames; the portrait still 48x32; the landscape and square stills 32x48 (the square
# one is as close to both; the first listed wins).
EXPECTED = {
    "bikes.mp4": (9, 32, 48),
    "carphone.mp4": (9, 32, 48),
    "portrait.mp4": (9, 48, 32),
    "short.mp4": (5, 32, 48),
    "phone.mp4": (9, 48, 32),
    "still_portrait.png": (1, 48, 32),
    "still_landscape.jpg": (1, 32, 48),
    "still.webp": (1, 32, 48),
}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return testing.make_mixed_folder(tmp_path_factory.mktemp("mixed"))


def expected_buckets(root: Path) -> list[tuple[int, int, int]]:
    return [EXPECTED[Path(line).name] for line in (root / "videos.txt").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# The mechanisms


def test_bucket_strings_and_model_rules():
    assert buckets.parse_buckets(["49x480x720", "17X720x480"], "--video_resolution_buckets") == [
        (49, 480, 720),
        (17, 720, 480),
    ]
    assert buckets.parse_buckets(["480x720"], "--image_resolution_buckets", image=True) == [(1, 480, 720)]
    for value, flag, image in (
        ("480x720", "--video_resolution_buckets", False),
        ("49x480x720", "--image_resolution_buckets", True),
        ("49x480xabc", "--video_resolution_buckets", False),
        ("0x480x720", "--video_resolution_buckets", False),
    ):
        with pytest.raises(SystemExit, match=rf"{flag} '{value}': write each bucket as"):
            buckets.parse_buckets([value], flag, image)
    for bucket, message in (
        ((48, 480, 720), r"48x480x720: the VAE takes 4k\+1 frames: use 45 or 49 frames"),
        ((49, 488, 720), r"49x488x720: the height 488 is not a multiple of 16 \(VAE x patch size\): use 480"),
        ((49, 480, 700), r"49x480x700: the width 700 is not a multiple of 16 \(VAE x patch size\): use 704"),
    ):
        with pytest.raises(SystemExit, match=rf"--video_resolution_buckets {message}"):
            buckets.check_buckets([bucket], "--video_resolution_buckets", 4, 16)
    with pytest.raises(SystemExit, match=r"--image_resolution_buckets 720x480: this model's position grid ends at"):
        buckets.check_buckets([(1, 720, 480)], "--image_resolution_buckets", 4, 16, max_size=(480, 720))
    buckets.check_buckets([(1, 480, 720), (81, 480, 720)], "--video_resolution_buckets", 4, 16, (480, 720))


def test_choose_bucket_closest_aspect_then_longest():
    video = [(49, 480, 720), (17, 480, 720), (49, 720, 480), (17, 720, 480), (17, 512, 512)]
    assert buckets.choose_bucket(100, 1080, 1920, video) == (49, 480, 720)  # landscape, long enough for 49
    assert buckets.choose_bucket(30, 1080, 1920, video) == (17, 480, 720)  # too short for 49
    assert buckets.choose_bucket(100, 1920, 1080, video) == (49, 720, 480)  # portrait
    assert buckets.choose_bucket(100, 500, 510, video) == (17, 512, 512)  # square: the square bucket, shorter
    assert buckets.choose_bucket(16, 1080, 1920, video) is None  # fills no bucket
    # Same aspect ratio at two sizes: the size closest to the sample's own.
    assert buckets.choose_bucket(1, 300, 450, [(1, 960, 1440), (1, 320, 480)]) == (1, 320, 480)


def test_bucket_batch_sampler_alone():
    from accelerate.data_loader import BatchSamplerShard, SkipBatchSampler

    generator = torch.Generator().manual_seed(0)
    bucket_of = [("a", "b", "c")[i] for i in torch.randint(0, 3, (23,), generator=generator).tolist()]
    sampler = buckets.BucketBatchSampler(bucket_of, 3, seed=7)
    epoch0 = list(sampler)
    assert len(epoch0) == len(sampler) == sum(-(-bucket_of.count(b) // 3) for b in "abc")
    assert all(len({bucket_of[i] for i in batch}) == 1 for batch in epoch0)  # one bucket per batch
    assert sorted(i for batch in epoch0 for i in batch) == list(range(23))  # every sample once, nothing dropped
    assert sorted(len(batch) for batch in epoch0 if len(batch) < 3) == sorted(
        bucket_of.count(b) % 3 for b in "abc" if bucket_of.count(b) % 3
    )  # each bucket's last incomplete batch is kept
    assert list(sampler) == epoch0  # a function of (seed, epoch)
    sampler.use_epoch(1)
    assert list(sampler) != epoch0 and len(list(sampler)) == len(epoch0)

    # One bucket: exactly the batches of the shuffled order the scripts used before buckets.
    one = buckets.BucketBatchSampler([0] * 10, 4, seed=3)
    one.use_epoch(2)
    reference = EpochShuffleSampler(10, 3)
    reference.use_epoch(2)
    assert list(one) == list(torch.utils.data.BatchSampler(reference, 4, drop_last=False))

    # Two ranks, as accelerate shards it (BatchSamplerShard: rank r takes batches r, r + 2, ...): at every step both
    # ranks hold a batch of the same bucket, both have the same number of batches, and together every sample.
    two = buckets.BucketBatchSampler(bucket_of, 2, seed=7, num_replicas=2)
    ranks = [list(BatchSamplerShard(two, num_processes=2, process_index=rank)) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(two) // 2
    for batch_0, batch_1 in zip(*ranks):
        assert len({bucket_of[i] for i in batch_0 + batch_1}) == 1
    assert {i for rank in ranks for batch in rank for i in batch} == set(range(23))
    # A resume skips the batches an uninterrupted run trained on (accelerate's skip_first_batches), nothing else.
    for rank in (0, 1):
        shard = BatchSamplerShard(two, num_processes=2, process_index=rank)
        assert list(SkipBatchSampler(shard, 4)) == ranks[rank][4:]


def test_bucket_sampler_through_accelerate_prepare():
    """The prepared DataLoader of each of 2 ranks (accelerate's own wrapping) gives the same bucket per step."""
    from accelerate.data_loader import prepare_data_loader, skip_first_batches
    from accelerate.state import AcceleratorState

    bucket_of = [i % 3 for i in range(17)]
    dataset = torch.utils.data.TensorDataset(torch.arange(17))
    try:
        loaders = [
            prepare_data_loader(
                torch.utils.data.DataLoader(
                    dataset, batch_sampler=buckets.BucketBatchSampler(bucket_of, 2, seed=1, num_replicas=2)
                ),
                num_processes=2,
                process_index=rank,
                put_on_device=False,
            )
            for rank in (0, 1)
        ]
        seen = [[batch[0].tolist() for batch in loader] for loader in loaders]
        assert len(seen[0]) == len(seen[1]) == len(loaders[0])
        for batch_0, batch_1 in zip(*seen):
            assert len({bucket_of[i] for i in batch_0 + batch_1}) == 1
        assert [batch[0].tolist() for batch in skip_first_batches(loaders[1], 3)] == seen[1][3:]
    finally:
        AcceleratorState._reset_state(True)


def test_condition_cache_entries_are_keyed_by_bucket(tmp_path):
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Item:
        path: Path
        prompt: str
        bucket: tuple | None = None

    video = tmp_path / "clip.mp4"
    video.write_bytes(b"0" * 10)
    cache = ConditionCache(tmp_path / "cache", {"model": "m"})
    keys = {cache.item_key(Item(video, "p", bucket)) for bucket in ((9, 32, 48), (9, 48, 32), (5, 32, 48))}
    assert len(keys) == 3
    assert cache.item_key(Item(video, "p")) == cache.video_key(video, "p")  # no bucket: the key of before


def test_phone_clip_frames_come_out_upright(tmp_path):
    """Frames stored landscape with a display rotation come out as players show them: equal to the stored pattern
    rotated, and to ffmpeg's own auto-rotated decode (an independent reference). decord cannot read such clips."""
    import imageio_ffmpeg

    pattern = testing.orientation_pattern(9, 32, 48)
    for rotation in (90, -90, 180):
        path = testing.write_rotated_video(tmp_path / f"phone_{rotation}.mp4", pattern, rotation)
        frames = media.read_video(path, lambda n: list(range(n))).numpy()
        expected = np.rot90(pattern, k=rotation // 90, axes=(1, 2))  # counter-clockwise, as -display_rotation
        assert frames.shape == expected.shape
        assert np.abs(frames.astype(int) - expected).max() <= 8  # H.264 at crf 0 in yuv444p: near-lossless
        ffmpeg = subprocess.run(
            [
                imageio_ffmpeg.get_ffmpeg_exe(),
                "-v",
                "error",
                "-i",
                str(path),
                "-f",
                "rawvideo",
                "-pix_fmt",
                "rgb24",
                "-",
            ],
            capture_output=True,
            check=True,
        ).stdout
        np.testing.assert_array_equal(frames, np.frombuffer(ffmpeg, np.uint8).reshape(frames.shape))
        assert media.probe(path) == (9, *expected.shape[1:3])
    upright = media.read_video(tmp_path / "phone_90.mp4", lambda n: [3]).numpy()[0]  # 48 tall, 32 wide
    assert upright[40:, :8, 0].mean() > 200 and upright[:8, :8, 0].mean() < 50  # red top-left went bottom-left


def test_still_with_exif_orientation_comes_out_upright(tmp_path):
    from PIL import Image

    pattern = testing.orientation_pattern(1, 32, 48)[0]
    image = Image.fromarray(pattern)
    exif = image.getexif()
    exif[0x0112] = 6  # EXIF Orientation 6: rotate 90 degrees clockwise to display (a phone held upright)
    image.save(tmp_path / "photo.png", exif=exif)
    still = media.read_image(tmp_path / "photo.png").numpy()
    np.testing.assert_array_equal(still, np.rot90(pattern, k=-1)[None])
    assert media.probe(tmp_path / "photo.png") == (1, 48, 32)


# ---------------------------------------------------------------------------------------------------------------
# The scripts


def record_steps(script, monkeypatch) -> list[dict]:
    """Each micro-batch a script trains on: its sample indices, frame shape, CREPA feature shape and logged keys."""
    steps, original, prepare = [], script.training_loss, CrepaTerm.prepare

    def recording_prepare(self, features):
        steps[-1]["features"] = tuple(features.shape)
        return prepare(self, features)

    def recording_loss(batch, generator, parts, *args, **kwargs):
        frames = batch.get("frames")
        steps.append(
            {
                "indices": batch["indices"].tolist(),
                "shape": None if frames is None else tuple(frames.shape),
                "frames": None if frames is None else frames.clone(),
            }
        )
        loss, logs = original(batch, generator, parts, *args, **kwargs)
        steps[-1]["logs"] = set(logs)
        return loss, logs

    monkeypatch.setattr(script, "training_loss", recording_loss)
    monkeypatch.setattr(CrepaTerm, "prepare", recording_prepare)
    return steps


@pytest.mark.parametrize(
    "script_path, model, encoder",
    [
        (COGVIDEOX_SCRIPT, "cogvideox-5b", "dinov2"),
        (HUNYUAN_SCRIPT, "hunyuan", "dinov2-registers"),
        (WAN_SCRIPT, "wan-2.1", "dinov2"),
    ],
)
def test_mixed_dataset_trains_in_buckets(
    tiny_models, mixed, tmp_path, monkeypatch, caplog, script_path, model, encoder
):
    """Landscape, portrait, short and rotated phone clips and stills, batch size 2, one epoch: each batch holds one
    bucket, every sample trains once at its bucket's size, the phone clip upright; DINOv2 features on each bucket's
    token grid; a still's CREPA term is its self term."""
    script = import_script(script_path)
    steps = record_steps(script, monkeypatch)
    out = tmp_path / "out"
    extra = ["--train_batch_size", "2", *BUCKET_FLAGS]
    if script_path != COGVIDEOX_SCRIPT:
        extra += ["--max_sequence_length", "16"]
    with caplog.at_level("INFO"):
        run_main(script, tiny_train_args(tiny_models[model], mixed, out, steps=5, encoder=encoder, extra=extra))
    assert (
        "Buckets (frames x height x width: samples): 1x32x48: 2, 1x48x32: 1, 5x32x48: 1, 9x32x48: 2, " in caplog.text
    )
    assert "9x48x32: 2; 0 fit none" in caplog.text

    expected = expected_buckets(mixed)
    assert sorted(i for step in steps for i in step["indices"]) == list(range(8))  # one epoch: each sample once
    for step in steps:
        (bucket,) = {expected[i] for i in step["indices"]}  # one bucket per batch
        frames, height, width = bucket
        assert step["shape"] == (len(step["indices"]), frames, 3, height, width)
        token_frames = (frames - 1) // 4 + 1
        assert step["features"][1:3] == (token_frames, (height // 16) * (width // 16))
        assert ("similarity_neighbour" in step["logs"]) == (token_frames > 1)  # a still: the self term only
        assert "crepa_loss" in step["logs"]
    # The phone clip (sample 4), upright: the stored pattern turned as the display rotation says.
    (phone_step,) = [step for step in steps if 4 in step["indices"]]
    phone = phone_step["frames"][phone_step["indices"].index(4)]
    pattern = np.rot90(testing.orientation_pattern(13, 32, 48)[:9], k=1, axes=(1, 2)).copy()
    reference = torch.from_numpy(pattern).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert (phone - reference).abs().max() < 0.07
    log = json.loads((out / "training_log.json").read_text())
    assert len(log) == 5 and all(np.isfinite(row["loss"]) for row in log)
    assert any(value.abs().sum() > 0 for key, value in lora_state(out).items() if "lora_B" in key)


def test_images_alone_train(tiny_models, mixed, tmp_path, monkeypatch):
    """A list of stills only (CogVideoX 1.5: one latent frame, front-padded to its token-frame patch of 2)."""
    root = tmp_path / "stills"
    shutil.copytree(mixed, root)
    names = [line for line in (root / "videos.txt").read_text().splitlines() if not line.endswith(".mp4")]
    (root / "videos.txt").write_text("\n".join(names) + "\n")
    (root / "prompts.txt").write_text("\n".join(["a still photo"] * len(names)) + "\n")
    cog = import_script(COGVIDEOX_SCRIPT)
    steps = record_steps(cog, monkeypatch)
    out = tmp_path / "out"
    run_main(cog, tiny_train_args(tiny_models["cogvideox-1.5"], root, out, steps=2, extra=["--train_batch_size", "2"]))
    assert sorted(i for step in steps for i in step["indices"]) == [0, 1, 2]
    assert {step["shape"][1:] for step in steps} == {(1, 3, 32, 48)}  # one frame at --height x --width
    assert {step["features"][1:3] for step in steps} == {(1, 6)}
    assert any(value.abs().sum() > 0 for key, value in lora_state(out).items() if "lora_B" in key)


def test_mixed_dataset_with_condition_cache(cog, tiny_models, mixed, tmp_path):
    """--cache_conditions: one entry per sample and bucket; the cached steps train at their bucket's size."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    extra = ["--train_batch_size", "2", *BUCKET_FLAGS, "--cache_conditions", "--condition_cache_dir", str(cache)]
    run_main(cog, tiny_train_args(tiny_models["cogvideox-5b"], mixed, out, steps=5, extra=extra))
    assert len(list(cache.glob("*.safetensors"))) == 8
    assert len(json.loads((out / "training_log.json").read_text())) == 5


def test_resume_mid_epoch_equals_uninterrupted_run(tiny_models, mixed, tmp_path, monkeypatch):
    """Stopped after 3 of an epoch's 5 batches and resumed: the same next batches (into the second epoch) and the
    same trained weights as a run that never stopped."""
    cog = import_script(COGVIDEOX_SCRIPT)
    steps = record_steps(cog, monkeypatch)
    model, straight, resumed = tiny_models["cogvideox-2b"], tmp_path / "straight", tmp_path / "resumed"
    extra = ["--train_batch_size", "2", *BUCKET_FLAGS]

    def run(out, total, every, *more):
        run_main(
            cog, tiny_train_args(model, mixed, out, steps=total, extra=[*extra, "--checkpointing_steps", every, *more])
        )

    run(straight, 7, "7")
    straight_batches = [step["indices"] for step in steps]
    steps.clear()
    run(resumed, 3, "3")
    run(resumed, 7, "7", "--resume_from_checkpoint", "latest")
    assert [step["indices"] for step in steps] == straight_batches
    assert_same_trained_weights(straight, resumed, "checkpoint-7")


def test_two_ranks_draw_the_same_bucket_at_each_step(tiny_models, mixed, tmp_path):
    out = tmp_path / "out"
    argv = tiny_train_args(tiny_models["cogvideox-2b"], mixed, out, steps=5, extra=BUCKET_FLAGS)
    log = run_two_ranks(COGVIDEOX_SCRIPT, argv, tmp_path)
    samples = samples_per_rank(log)
    assert len(samples[0]) == len(samples[1]) == 5
    expected = expected_buckets(mixed)
    for batch_0, batch_1 in zip(samples[0], samples[1]):
        assert len({expected[i] for i in batch_0 + batch_1}) == 1, (batch_0, batch_1)
    assert {i for rank in (0, 1) for batch in samples[rank] for i in batch} == set(range(8))
    assert log.count("Trained weights identical on all 2 ranks") == 2


# ---------------------------------------------------------------------------------------------------------------
# Bad input, before any weights load


@pytest.mark.parametrize(
    "model, flags, message",
    [
        ("cogvideox-2b", ["--video_resolution_buckets", "9x32"], r"--video_resolution_buckets '9x32': write each"),
        ("cogvideox-2b", ["--image_resolution_buckets", "32-48"], r"--image_resolution_buckets '32-48': write each"),
        ("hunyuan", ["--video_resolution_buckets", "8x32x48"], r"8x32x48: the VAE takes 4k\+1 frames: use 5 or 9"),
        ("hunyuan", ["--image_resolution_buckets", "32x40"], r"32x40: the width 40 is not a multiple of 16"),
        (
            "cogvideox-1.5",
            ["--video_resolution_buckets", "9x48x32"],
            r"9x48x32: this model's position grid ends at 32x48",
        ),
    ],
)
def test_buckets_the_model_cannot_take(tiny_models, mixed, tmp_path, model, flags, message):
    script = import_script(HUNYUAN_SCRIPT if model == "hunyuan" else COGVIDEOX_SCRIPT)
    with pytest.raises(SystemExit, match=message):
        run_main(script, tiny_train_args(tiny_models[model], mixed, tmp_path / "out", extra=flags))
    assert not (tmp_path / "out").exists()


def test_undecodable_still_and_samples_that_fit_no_bucket(cog, tiny_models, mixed, tmp_path, caplog):
    root = tmp_path / "bad"
    shutil.copytree(mixed, root)
    (root / "videos" / "broken.jpg").write_bytes(b"not an image" * 50)
    with open(root / "videos.txt", "a") as handle:
        handle.write("videos/broken.jpg\n")
    with open(root / "prompts.txt", "a") as handle:
        handle.write("a broken photo\n")
    flags = ["--video_resolution_buckets", "9x32x48", "9x48x32"]  # the 6-frame clip fills none
    with pytest.raises(SystemExit) as stopped:
        run_main(cog, tiny_train_args(tiny_models["cogvideox-2b"], root, tmp_path / "out", extra=flags))
    message = str(stopped.value)
    assert "2 of 9 videos cannot be used" in message
    assert re.search(r"broken\.jpg: cannot be decoded", message)
    assert re.search(r"short\.mp4: 6 frames, fewer than the 9 needed", message)
    assert "--skip_invalid_videos" in message
    assert not (tmp_path / "out").exists()
    with caplog.at_level("INFO"):
        run_main(
            cog,
            tiny_train_args(
                tiny_models["cogvideox-2b"],
                root,
                tmp_path / "out2",
                steps=1,
                extra=[*flags, "--skip_invalid_videos", "--crepa_mode", "none"],
            ),
        )
    assert "; 1 fit none" in caplog.text and "Skipping 2 invalid videos" in caplog.text
    assert "Running training: 7 videos" in caplog.text


def test_image_column_of_a_dataset(cog, tiny_models, mixed, tmp_path):
    """--image_column: rows without a video take their image; a dataset of images alone needs no video column."""
    model, out = tiny_models["cogvideox-2b"], tmp_path / "out"
    mixed_rows = [
        {"caption": "a clip", "file": "videos/bikes.mp4", "image": None},
        {"caption": "a photo", "file": "", "image": "videos/still_landscape.jpg"},
    ]
    stills_rows = [{"caption": "a photo", "image": "videos/still_portrait.png"}]
    for name, rows, expected in (
        ("mixed.jsonl", mixed_rows, ["videos/bikes.mp4", "videos/still_landscape.jpg"]),
        ("stills.jsonl", stills_rows, ["videos/still_portrait.png"]),
    ):
        (tmp_path / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
        data = ["--dataset_name", str(tmp_path / name), "--caption_column", "caption", "--video_column", "file"]
        data += ["--image_column", "image", "--instance_data_root", str(mixed)]
        items = cog.load_video_items(cog.parse_args(tiny_train_args(model, mixed, out, data=data)))
        assert [item.path for item in items] == [mixed / path for path in expected]
        assert [item.prompt for item in items] == [row["caption"] for row in rows]


def test_images_a_hub_dataset_holds_as_bytes(cog, tiny_models, mixed, tmp_path):
    """Hub image datasets keep each image's bytes in the parquet file (its "path" is only the original name): the
    script writes them once under --output_dir and trains on them, upright, like any still."""
    import datasets

    stills = [mixed / "videos" / "still_landscape.jpg", mixed / "videos" / "still_portrait.png"]
    rows = {
        "caption": ["a photo", "another photo"],
        "image": [{"path": p.name, "bytes": p.read_bytes()} for p in stills],
    }
    features = datasets.Features({"caption": datasets.Value("string"), "image": datasets.Image()})
    hub_like = tmp_path / "hub_dataset"
    hub_like.mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(hub_like / "train.parquet"))
    out = tmp_path / "out"
    data = ["--dataset_name", str(hub_like), "--caption_column", "caption", "--image_column", "image"]
    items = cog.load_video_items(cog.parse_args(tiny_train_args(tiny_models["cogvideox-2b"], mixed, out, data=data)))
    assert [item.prompt for item in items] == rows["caption"]
    for item, still in zip(items, stills):
        assert item.path.parent == (out / "dataset_images").resolve() and item.path.suffix == still.suffix
        assert item.path.read_bytes() == still.read_bytes()
        torch.testing.assert_close(media.read_sample(item.path, None), media.read_sample(still, None))
    # And it trains: the stills' run ends with a LoRA.
    run_main(cog, tiny_train_args(tiny_models["cogvideox-2b"], mixed, out, steps=1, data=data))
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_cogvideox_1_5_buckets_of_every_length(tiny_models, mixed, tmp_path, monkeypatch):
    """CogVideoX 1.5 (token-frame patch 2): 9 frames (3 latents, one padded in front), 5 frames (2 latents) and stills
    (1 latent, padded) train in one run; its tiny model's position grid is 32x48, so every sample goes landscape."""
    cog = import_script(COGVIDEOX_SCRIPT)
    steps = record_steps(cog, monkeypatch)
    flags = ["--train_batch_size", "2", "--video_resolution_buckets", "9x32x48", "5x32x48"]
    run_main(cog, tiny_train_args(tiny_models["cogvideox-1.5"], mixed, tmp_path / "out", steps=5, extra=flags))
    assert sorted(i for step in steps for i in step["indices"]) == list(range(8))
    token_frames = {step["shape"][1]: step["features"][1] for step in steps}
    assert token_frames == {9: 2, 5: 1, 1: 1}  # ceil(latent frames / 2)


def test_a_video_cut_short_fails_the_probe(tmp_path):
    """A clip whose header lists more frames than the file stores (a partial download, with the index at the front)
    is refused by the start-up probe, not by the first batch that reaches its missing frames."""
    import subprocess

    import imageio_ffmpeg

    whole = testing.write_video(tmp_path / "whole.mp4", testing.orientation_pattern(33, 32, 48))
    front_index = tmp_path / "front_index.mp4"
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-i", str(whole), "-c", "copy"]
    subprocess.run([*command, "-movflags", "+faststart", str(front_index)], check=True)
    assert media.probe(front_index) == (33, 32, 48)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(front_index.read_bytes()[: front_index.stat().st_size // 2])
    with pytest.raises(RuntimeError, match="of the 33 frames its header lists"):
        media.probe(cut)
    with pytest.raises(RuntimeError):  # what training would have met mid-run
        media.read_video(cut, lambda n: list(range(n)))


def test_video_without_a_frame_count_in_its_header(tmp_path):
    """Matroska keeps no frame count (PyAV reports 0): the frames are counted from the packets."""
    import av

    pattern = testing.orientation_pattern(9, 32, 48)
    path = testing.write_video(tmp_path / "clip.mkv", pattern)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0
    assert media.probe(path) == (9, 32, 48)
    frames = media.read_video(path, lambda n: list(range(0, n, 2)))
    assert np.abs(frames.numpy().astype(int) - pattern[::2]).max() <= 8
