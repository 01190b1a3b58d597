import decord
import numpy as np
import pytest
import torch

from crepa_diffusers import testing


@pytest.mark.parametrize("variant", testing.COGVIDEOX_VARIANTS)
def test_tiny_cogvideox_reloads_and_generates(tiny_models, variant):
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(tiny_models[f"cogvideox-{variant}"])
    assert pipe.transformer.config.patch_size_t == (2 if variant == "1.5" else None)
    assert pipe.transformer.config.use_rotary_positional_embeddings == (variant != "2b")
    frames = pipe(
        "a cat dances",
        num_frames=9,
        height=32,
        width=48,
        num_inference_steps=2,
        max_sequence_length=16,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).frames
    assert frames.shape[0] == 1 and frames.shape[2:] == (32, 48, 3) and frames.shape[1] >= 9
    assert np.isfinite(frames).all()


def test_tiny_hunyuan_reloads_and_generates(tiny_models):
    from diffusers import HunyuanVideoPipeline

    pipe = HunyuanVideoPipeline.from_pretrained(tiny_models["hunyuan"])
    assert (pipe.transformer.config.num_layers, pipe.transformer.config.num_single_layers) == (2, 2)
    frames = pipe(
        "a cat dances",
        num_frames=9,
        height=32,
        width=48,
        num_inference_steps=2,
        max_sequence_length=16,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).frames
    assert frames.shape == (1, 9, 32, 48, 3) and np.isfinite(frames).all()


@pytest.mark.parametrize("name, registers", [("dinov2", 0), ("dinov2-registers", 4)])
def test_tiny_dinov2_reloads(tiny_models, name, registers):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_models[name])
    assert getattr(model.config, "num_register_tokens", 0) == registers
    out = model(pixel_values=torch.randn(1, 3, 28, 42)).last_hidden_state
    assert out.shape == (1, 1 + registers + 6, 32)


def test_sample_videos_are_real_clips():
    paths = testing.sample_video_paths()
    assert {"bigbuckbunny", "bikes", "carphone"} <= paths.keys()
    reader = decord.VideoReader(str(paths["carphone"]))
    assert len(reader) > 49 and reader[0].shape == (144, 176, 3)


def test_write_video_roundtrip(tmp_path):
    frames = np.zeros((5, 20, 30, 3), dtype=np.uint8)
    for i in range(5):
        frames[i, :, :, i % 3] = 40 * i + 50
    path = testing.write_video(tmp_path / "clip.mp4", frames, fps=8)
    reader = decord.VideoReader(str(path))
    assert len(reader) == 5
    decoded = reader.get_batch(list(range(5))).asnumpy()
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames.astype(int)).max() <= 3


def test_make_video_folder(tmp_path):
    root = testing.make_video_folder(tmp_path / "data", num_videos=4)
    prompts = (root / "prompts.txt").read_text().splitlines()
    videos = (root / "videos.txt").read_text().splitlines()
    assert len(prompts) == len(videos) == 4
    assert all((root / v).is_file() for v in videos)
