"""End-to-end runs of examples/train_cogvideox_lora_crepa.py on tiny models and the real sample clips."""

import json

import numpy as np
import pytest
import torch
from helpers import (
    COGVIDEOX_SCRIPT,
    assert_same_trained_weights,
    import_script,
    launch,
    lora_metadata,
    lora_state,
    run_main,
    tensorboard_images,
    tensorboard_tags,
    tiny_train_args,
)

from crepa_diffusers import testing


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = testing.make_video_folder(tmp_path_factory.mktemp("cog_data"), num_videos=3)
    prompts = (root / "prompts.txt").read_text().splitlines()
    videos = (root / "videos.txt").read_text().splitlines()
    with open(root / "metadata.csv", "w") as handle:
        handle.write("caption,file\n" + "".join(f'"{p}",{v}\n' for p, v in zip(prompts, videos)))
    with open(root / "metadata.jsonl", "w") as handle:
        handle.writelines(json.dumps({"caption": p, "file": v}) + "\n" for p, v in zip(prompts, videos))
    return root


def base_args(model, dataset, output_dir, source="files", steps=2, extra=()):
    data = {
        "files": None,
        "csv": [
            "--dataset_name",
            str(dataset / "metadata.csv"),
            "--caption_column",
            "caption",
            "--video_column",
            "file",
        ],
        "jsonl": [
            "--dataset_name",
            str(dataset / "metadata.jsonl"),
            "--caption_column",
            "caption",
            "--video_column",
            "file",
        ],
    }[source]
    return tiny_train_args(model, dataset, output_dir, steps=steps, data=data, extra=extra)


def generate(pipe, seed=0):
    return pipe(
        "a bunny walks in a green meadow",
        num_frames=9,
        height=32,
        width=48,
        num_inference_steps=2,
        max_sequence_length=16,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
    ).frames


VARIANT_SOURCE = {"2b": "files", "5b": "csv", "1.5": "jsonl"}


# Every mode on 2B; CREPA (and plain LoRA on 1.5's padded latents) on the rotary variants.
@pytest.mark.parametrize(
    "variant, mode",
    [("2b", "crepa"), ("2b", "repa"), ("2b", "none"), ("5b", "crepa"), ("1.5", "crepa"), ("1.5", "none")],
)
def test_end_to_end(cog, tiny_models, dataset, tmp_path, variant, mode):
    from diffusers import CogVideoXPipeline
    from huggingface_hub import ModelCard

    model = tiny_models[f"cogvideox-{variant}"]
    out = tmp_path / "out"
    validate = variant == "2b" and mode == "crepa"
    extra = ["--crepa_mode", mode]
    if validate:
        extra += [
            "--validation_prompt",
            "a cat dances:::a bunny",
            "--validation_steps",
            "2",
            "--validation_num_inference_steps",
            "2",
            "--report_to",
            "tensorboard",
        ]
    argv = base_args(model, dataset, out, VARIANT_SOURCE[variant], extra=extra)
    if validate:  # as users run it; the other runs in this process (a launch costs ~8 s of imports)
        launch(COGVIDEOX_SCRIPT, argv, tmp_path)
    else:
        run_main(cog, argv)

    state = lora_state(out)
    assert state and all(k.startswith("transformer.") and "lora" in k for k in state)
    metadata = lora_metadata(out)
    assert metadata["r"] == 4 and metadata["lora_alpha"] == 8

    card = ModelCard.load(out / "README.md")
    assert {"crepa", "cogvideox", "lora", "text-to-video"} <= set(card.data.tags)
    settings = card.data.to_dict()["crepa"]
    assert settings["crepa_mode"] == mode and settings["crepa_block_index"] == 1
    assert settings["crepa_adjacent_distance"] == (0 if mode == "repa" else 1)
    assert settings["crepa_lambda"] == 0.5 and settings["crepa_adjacent_tau"] == 1.0
    assert "crepa_encoder" in settings
    # A local base model is named in the text, not given as base_model metadata (the Hub only takes repo ids there).
    assert card.data.base_model is None and f"the local model `{model}`" in card.text

    log = json.loads((out / "training_log.json").read_text())
    assert [row["step"] for row in log] == [1, 2]
    assert all(np.isfinite(row["diffusion_loss"]) for row in log)
    assert all(("crepa_loss" in row) == (mode != "none") for row in log)
    if mode == "crepa":
        assert all(-1.0 - 2 * np.exp(-1) <= row["crepa_loss"] <= 1.0 + 2 * np.exp(-1) for row in log)
        assert all("similarity_neighbour" in row for row in log)
    if mode == "repa":
        assert all("similarity_neighbour" not in row and "similarity_self" in row for row in log)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    projector_files = list(out.glob("checkpoint-*/crepa_projector.safetensors"))
    assert projector_files == [] or mode != "none"

    base = CogVideoXPipeline.from_pretrained(model)
    before = generate(base)
    base.load_lora_weights(out, adapter_name="trained")
    after = generate(base)
    assert np.abs(after - before).max() > 1e-4, "the trained LoRA does not change the output"

    if validate:
        assert len(list(out.glob("validation_video_*.mp4"))) == 2
        assert len(list(out.glob("test_video_*.mp4"))) == 2
        assert "validation/video_0" in tensorboard_tags(out / "logs")["images"]
        gif = tensorboard_images(out / "logs", "test/video_1")[0]
        assert gif.encoded_image_string[:6] == b"GIF89a" and (gif.height, gif.width) == (32, 48)
        scalars = tensorboard_tags(out / "logs")["scalars"]
        assert {"loss", "diffusion_loss", "crepa_loss", "similarity_self", "similarity_neighbour", "lr"} <= set(
            scalars
        )
        assert "test_video_0" in (out / "README.md").read_text()


def test_lora_reloads_with_trained_scale(cog, tiny_models, dataset, tmp_path):
    """pipe.load_lora_weights must give the trained model's output (scale alpha/rank = 2) without set_adapters."""
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    model = tiny_models["cogvideox-5b"]
    out = tmp_path / "out"
    run_main(cog, base_args(model, dataset, out, extra=["--crepa_mode", "none"]))

    # The trained model, rebuilt as it was in memory: base + LoRA(r=4, alpha=8) with the trained weights.
    trained = CogVideoXTransformer3DModel.from_pretrained(model, subfolder="transformer")
    trained.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    state = {
        k[len("transformer.") :]
        .replace(".lora_A.weight", ".lora_A.default.weight")
        .replace(".lora_B.weight", ".lora_B.default.weight"): v
        for k, v in lora_state(out).items()
    }
    missing = set_peft_model_state_dict(trained, {k.replace(".default", ""): v for k, v in state.items()})
    assert not getattr(missing, "unexpected_keys", [])

    pipe = CogVideoXPipeline.from_pretrained(model)
    pipe.load_lora_weights(out)
    torch.manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 3, 4, 4, 6),
        "encoder_hidden_states": torch.randn(1, 16, 32),
        "timestep": torch.tensor([500]),
        "image_rotary_emb": pipe._prepare_rotary_positional_embeddings(32, 48, 3, torch.device("cpu")),
        "return_dict": False,
    }
    with torch.no_grad():
        expected = trained(**inputs)[0]
        loaded = pipe.transformer(**inputs)[0]
        pipe.transformer.disable_lora()
        base = pipe.transformer(**inputs)[0]
    assert (expected - base).abs().max() > 1e-4
    torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=1e-5)


def test_resume_matches_uninterrupted_run_and_limits_checkpoints(cog, tiny_models, dataset, tmp_path, caplog):
    """In this process (a resume in a fresh process is test_reliability's SIGTERM test and test_deepspeed's)."""
    model = tiny_models["cogvideox-2b"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_main(
        cog,
        base_args(
            model, dataset, straight, steps=4, extra=["--checkpointing_steps", "1", "--checkpoints_total_limit", "2"]
        ),
    )
    assert sorted(p.name for p in straight.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]

    run_main(cog, base_args(model, dataset, resumed, steps=2, extra=["--checkpointing_steps", "2"]))
    assert (resumed / "checkpoint-2").is_dir()
    with caplog.at_level("INFO"):
        run_main(
            cog,
            base_args(
                model,
                dataset,
                resumed,
                steps=4,
                extra=["--checkpointing_steps", "2", "--resume_from_checkpoint", "latest"],
            ),
        )
    assert f"Resuming from {resumed / 'checkpoint-2'}" in caplog.text

    assert_same_trained_weights(straight, resumed, "checkpoint-4")
    # The resumed run's log continues the history kept in the checkpoint: all 4 steps, as the straight run logged them.
    a = json.loads((straight / "training_log.json").read_text())
    b = json.loads((resumed / "training_log.json").read_text())
    assert [row["step"] for row in b] == [1, 2, 3, 4]
    for row_a, row_b in zip(a, b):
        assert row_a.keys() == row_b.keys()
        assert all(row_a[k] == pytest.approx(row_b[k], rel=1e-5, abs=1e-7) for k in row_a)
    # The checkpoint-2 LoRA differs from the final one: training went on after the resume.
    final = lora_state(resumed)
    assert any((lora_state(resumed / "checkpoint-2")[k] - final[k]).abs().max() > 0 for k in final)


def test_push_to_hub_uploads_weights_and_card(tiny_models, dataset, tmp_path, monkeypatch):
    import huggingface_hub
    from accelerate.state import AcceleratorState

    calls = {}

    class Repo:
        repo_id = "someone/tiny-crepa"

    def fake_create_repo(repo_id, exist_ok=False, token=None, **kwargs):
        calls["create"] = repo_id
        return Repo()

    def fake_upload_folder(repo_id, folder_path, **kwargs):
        from pathlib import Path

        calls["upload"] = (repo_id, sorted(p.name for p in Path(folder_path).iterdir()), kwargs)
        assert (Path(folder_path) / "pytorch_lora_weights.safetensors").is_file()
        assert "crepa" in (Path(folder_path) / "README.md").read_text()

    monkeypatch.setattr(huggingface_hub, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload_folder)
    script = import_script(COGVIDEOX_SCRIPT)
    args = script.parse_args(
        base_args(
            tiny_models["cogvideox-2b"],
            dataset,
            tmp_path / "tiny-crepa",
            steps=1,
            extra=["--push_to_hub", "--hub_model_id", "someone/tiny-crepa"],
        )
    )
    try:
        script.main(args)
    finally:
        AcceleratorState._reset_state(True)
    assert calls["create"] == "someone/tiny-crepa"
    repo_id, files, kwargs = calls["upload"]
    assert repo_id == "someone/tiny-crepa"
    assert {"pytorch_lora_weights.safetensors", "README.md"} <= set(files)
    assert "pytorch_lora_weights.safetensors" in kwargs["allow_patterns"]
    assert not any("checkpoint" in pattern or "cache" in pattern for pattern in kwargs["allow_patterns"])


def test_validation_videos_reach_wandb_offline(tiny_models, dataset, tmp_path):
    """--report_to wandb logs the validation and final videos (offline mode: the run is written locally)."""
    from helpers import offline_env

    out, wandb_dir = tmp_path / "out", tmp_path / "wandb_dir"
    wandb_dir.mkdir()
    launch(
        COGVIDEOX_SCRIPT,
        base_args(
            tiny_models["cogvideox-2b"],
            dataset,
            out,
            extra=[
                "--validation_prompt",
                "a cat dances",
                "--validation_steps",
                "2",
                "--validation_num_inference_steps",
                "2",
                "--report_to",
                "wandb",
            ],
        ),
        tmp_path,
        env=offline_env(WANDB_MODE="offline", WANDB_DIR=str(wandb_dir)),
    )
    runs = list((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    videos = sorted(p.name.split("_")[0] for p in (runs[0] / "files" / "media" / "videos").glob("*.mp4"))
    assert videos == ["test", "validation"]
    assert list(out.glob("validation_video_0_*.mp4")) and list(out.glob("test_video_0_*.mp4"))


@pytest.mark.parametrize(
    "extra",
    [
        [
            "--optimizer",
            "AdamW",
            "--gradient_checkpointing",
            "--gradient_accumulation_steps",
            "2",
            "--lr_scheduler",
            "cosine",
            "--lr_warmup_steps",
            "1",
            "--max_grad_norm",
            "0.5",
            "--scale_lr",
        ],
        [
            "--optimizer",
            "prodigy",
            "--learning_rate",
            "1.0",
            "--prodigy_safeguard_warmup",
            "--enable_slicing",
            "--enable_tiling",
            "--random_flip",
            "--video_reshape_mode",
            "random",
            "--dataloader_num_workers",
            "2",
        ],
    ],
    ids=["adamw-ckpt-accumulate-cosine", "prodigy-flip-workers"],
)
def test_training_options_run(cog, tiny_models, dataset, tmp_path, extra):
    out = tmp_path / "out"
    run_main(cog, base_args(tiny_models["cogvideox-5b"], dataset, out, extra=extra))
    log = json.loads((out / "training_log.json").read_text())
    assert [row["step"] for row in log] == [1, 2]
    assert all(np.isfinite(row["loss"]) and np.isfinite(row["crepa_loss"]) for row in log)
    if "cosine" in extra:  # a 1-step warm-up, then cosine decay
        assert log[0]["lr"] > log[1]["lr"] >= 0
    assert any(v.abs().max() > 0 for k, v in lora_state(out).items() if "lora_B" in k)


def test_8bit_adam_without_bitsandbytes_is_a_clear_error(cog, tiny_models, dataset, tmp_path):
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"--use_8bit_adam needs `pip install bitsandbytes`"):
        run_main(cog, base_args(tiny_models["cogvideox-2b"], dataset, tmp_path / "o", extra=["--use_8bit_adam"]))


def test_model_card_links_a_hub_base_model(tmp_path):
    from huggingface_hub import ModelCard

    from crepa_diffusers.model_card import write_model_card

    write_model_card(
        str(tmp_path),
        repo_id="me/lora",
        base_model="THUDM/CogVideoX-5b",
        model_tags=["cogvideox"],
        pipeline_cls_name="CogVideoXPipeline",
        crepa_settings={"crepa_mode": "crepa"},
        training_settings={"steps": 1},
        validation_prompts=["a cat"],
        video_files=[tmp_path / "v.mp4"],
    )
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "THUDM/CogVideoX-5b"
    assert "[THUDM/CogVideoX-5b](https://huggingface.co/THUDM/CogVideoX-5b)" in card.text
    assert card.data.widget == [{"text": "a cat", "output": {"url": "v.mp4"}}]
