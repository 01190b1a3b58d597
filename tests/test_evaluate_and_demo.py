"""examples/evaluate_crepa.py (cross-frame consistency) and the README's offline demo command."""

import json
import subprocess
import sys

import decord
import numpy as np
import pytest
import torch
from helpers import ROOT, import_script, offline_env

from crepa_diffusers import testing


evaluate_crepa = import_script(ROOT / "examples" / "evaluate_crepa.py")


@pytest.fixture(scope="module")
def embedder(tiny_models):
    return evaluate_crepa.FrameEmbedder(str(tiny_models["dinov2"]), image_size=56)


def test_consistency_against_direct_cosines():
    features = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    scores = evaluate_crepa.consistency(features)
    cos = features @ features.T
    assert scores["adjacent"] == pytest.approx([cos[i, i - 1].item() for i in range(1, 5)], abs=1e-6)
    assert scores["first"] == pytest.approx([cos[i, 0].item() for i in range(1, 5)], abs=1e-6)
    # VBench's subject consistency: each similarity clamped at 0 before the two are averaged.
    expected = np.mean([(cos[i, i - 1].clamp(min=0) + cos[i, 0].clamp(min=0)).item() / 2 for i in range(1, 5)])
    assert scores["subject_consistency"] == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2 frames"):
        evaluate_crepa.consistency(features[:1])


def test_static_clip_scores_one(embedder):
    frames = evaluate_crepa.read_video(testing.sample_video_paths()["bikes"])[:1]
    scores = evaluate_crepa.consistency(embedder(np.repeat(frames, 12, axis=0)))
    assert scores["subject_consistency"] == pytest.approx(1.0, abs=1e-5)
    assert min(scores["adjacent"]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("clip", ["bikes", "carphone"])
def test_real_clip_beats_its_shuffled_frames(embedder, clip):
    frames = evaluate_crepa.read_video(testing.sample_video_paths()[clip])[:48]
    shuffled = frames[np.random.default_rng(0).permutation(len(frames))]
    natural = evaluate_crepa.consistency(embedder(frames))
    mixed = evaluate_crepa.consistency(embedder(shuffled))
    assert natural["mean_adjacent"] > mixed["mean_adjacent"]
    assert natural["subject_consistency"] > mixed["subject_consistency"]


def test_video_dirs_report_plot_and_grid(tiny_models, tmp_path):
    frames = evaluate_crepa.read_video(testing.sample_video_paths()["bikes"])[:24:2]
    (tmp_path / "natural").mkdir(), (tmp_path / "shuffled").mkdir()
    small = torch.nn.functional.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).float(), size=(68, 160))
    small = small.round().byte().permute(0, 2, 3, 1).numpy()
    testing.write_video(tmp_path / "natural" / "clip.mp4", small)
    testing.write_video(tmp_path / "shuffled" / "clip.mp4", small[np.random.default_rng(1).permutation(len(small))])
    out = tmp_path / "eval"
    report = evaluate_crepa.main(
        [
            "--video_dirs",
            str(tmp_path / "natural"),
            str(tmp_path / "shuffled"),
            "--encoder",
            str(tiny_models["dinov2"]),
            "--image_size",
            "56",
            "--output_dir",
            str(out),
        ]
    )
    saved = json.loads((out / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert set(saved["groups"]) == {"natural", "shuffled"}
    assert len(saved["groups"]["natural"]["videos"][0]["adjacent"]) == len(small) - 1
    assert saved["groups"]["natural"]["subject_consistency"] > saved["groups"]["shuffled"]["subject_consistency"]
    assert (out / "similarity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    grid = decord.VideoReader(str(out / "grid.mp4"))
    assert len(grid) == len(small)
    # Two 68x160 clips scaled to height 160 (width 376 each), side by side.
    assert grid[0].shape[:2] == (160, 2 * 376)


def test_generate_base_and_lora(tiny_models, tmp_path):
    from diffusers import CogVideoXPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = CogVideoXPipeline.from_pretrained(tiny_models["cogvideox-2b"])
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"]))
    for name, param in pipe.transformer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    CogVideoXPipeline.save_lora_weights(tmp_path / "my-lora", get_peft_model_state_dict(pipe.transformer))
    out = tmp_path / "eval"
    report = evaluate_crepa.main(
        [
            "--pretrained_model_name_or_path",
            str(tiny_models["cogvideox-2b"]),
            "--lora",
            str(tmp_path / "my-lora"),
            "--prompts",
            "a cat dances:::a bunny walks",
            "--num_frames",
            "9",
            "--height",
            "32",
            "--width",
            "48",
            "--num_inference_steps",
            "2",
            "--max_sequence_length",
            "16",
            "--encoder",
            str(tiny_models["dinov2"]),
            "--image_size",
            "56",
            "--output_dir",
            str(out),
            "--dtype",
            "fp32",
        ]
    )
    assert set(report["groups"]) == {"base", "my-lora"}
    assert [v["name"] for v in report["groups"]["base"]["videos"]] == ["a cat dances", "a bunny walks"]
    assert report["groups"]["base"]["videos"][0]["num_frames"] == 9
    assert report["groups"]["base"]["videos"][0]["adjacent"] != report["groups"]["my-lora"]["videos"][0]["adjacent"]
    grid = decord.VideoReader(str(out / "grid.mp4"))
    assert len(grid) == 9 and grid[0].shape[:2] == (2 * 160, 2 * 240)


def test_demo_command_core_produces_its_files(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "run_demo.py"), "--steps", "4", "--output_dir", str(out)],
        cwd=tmp_path,
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert "crepa" in (out / "README.md").read_text()
    assert list(out.glob("validation_video_*.mp4")) and list(out.glob("test_video_*.mp4"))
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "loss.png" in (out / "README.md").read_text()
