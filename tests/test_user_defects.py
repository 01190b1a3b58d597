"""Defects a user hits trying the scripts: what goes to the Hub, runs lost at the end, late or raw errors, seeds,
resumed histories, and what the model card records. One test per defect."""

import gc
import json
import re
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    COGVIDEOX_SCRIPT,
    HUNYUAN_SCRIPT,
    ROOT,
    WAN_SCRIPT,
    assert_same_trained_weights,
    import_script,
    launch,
    lora_state,
    offline_env,
    run_main,
    tiny_train_args,
)


def fake_hub(monkeypatch):
    """create_repo / upload_folder replaced; the upload records the files huggingface_hub would send."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    calls = {}

    class Repo:
        repo_id = "someone/tiny-crepa"

    def fake_upload_folder(repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        files = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
        calls["uploaded"] = sorted(
            filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
        )

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kwargs: Repo())
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload_folder)
    return calls


def test_push_uploads_only_what_a_lora_repo_holds(cog, tiny_models, dataset, tmp_path, monkeypatch):
    """With --cache_conditions the DINOv2 features and prompt embeddings sit in OUTPUT_DIR/condition_cache: none of
    them, nor checkpoints or logs, may reach the Hub."""
    calls = fake_hub(monkeypatch)
    out = tmp_path / "tiny-crepa"
    run_main(
        cog,
        tiny_train_args(
            tiny_models["cogvideox-2b"],
            dataset,
            out,
            steps=2,
            extra=[
                "--push_to_hub",
                "--hub_model_id",
                "someone/tiny-crepa",
                "--cache_conditions",
                "--checkpointing_steps",
                "1",
                "--validation_prompt",
                "a cat",
                "--validation_steps",
                "2",
                "--validation_num_inference_steps",
                "1",
                "--report_to",
                "tensorboard",
            ],
        ),
    )
    assert list((out / "condition_cache").glob("*.safetensors")), "the cache was not written where expected"
    uploaded = calls["uploaded"]
    assert {"pytorch_lora_weights.safetensors", "README.md", "loss.png", "training_log.json"} <= set(uploaded)
    assert all(
        re.fullmatch(
            r"(pytorch_lora_weights\.safetensors|README\.md|loss\.png|training_log\.json|"
            r"(validation|test)_video_\d+_[\w-]+\.mp4)",
            name,
        )
        for name in uploaded
    ), uploaded


def test_final_videos_come_after_training_models_are_freed(cog, tiny_models, dataset, tmp_path, monkeypatch):
    """The final test loads a fresh pipeline only once the training transformer is gone, with VAE slicing and
    tiling as in training; when its videos fail, the LoRA, the card and the upload are still there."""
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    loaded = []
    original_load = CogVideoXTransformer3DModel.from_pretrained.__func__

    def recording_load(cls, *args, **kwargs):
        model = original_load(cls, *args, **kwargs)
        loaded.append(weakref.ref(model))
        return model

    seen = {}
    original_pipeline_load = CogVideoXPipeline.from_pretrained.__func__

    def checking_pipeline_load(cls, *args, **kwargs):
        gc.collect()
        seen["training_transformer_alive"] = loaded[0]() is not None
        pipe = original_pipeline_load(cls, *args, **kwargs)
        seen["pipe"] = pipe
        return pipe

    def failing_call(self, *args, **kwargs):
        seen["slicing_tiling"] = (self.vae.use_slicing, self.vae.use_tiling)
        raise RuntimeError("out of memory while sampling the final videos")

    monkeypatch.setattr(CogVideoXTransformer3DModel, "from_pretrained", classmethod(recording_load))
    monkeypatch.setattr(CogVideoXPipeline, "from_pretrained", classmethod(checking_pipeline_load))
    monkeypatch.setattr(CogVideoXPipeline, "__call__", failing_call)
    calls = fake_hub(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="out of memory while sampling the final videos"):
        run_main(
            cog,
            tiny_train_args(
                tiny_models["cogvideox-2b"],
                dataset,
                out,
                steps=1,
                extra=["--validation_prompt", "a cat", "--enable_slicing", "--enable_tiling", "--push_to_hub"],
            ),
        )
    assert seen["training_transformer_alive"] is False
    assert seen["slicing_tiling"] == (True, True)
    assert lora_state(out) and "crepa" in (out / "README.md").read_text()
    assert "pytorch_lora_weights.safetensors" in calls["uploaded"]


def test_hunyuan_validation_and_final_test_sample_alike(tiny_models, dataset, tmp_path, monkeypatch):
    """With --flow_shift both the validation and the final videos use that shift, and the card records it."""
    from diffusers import HunyuanVideoPipeline

    script = import_script(HUNYUAN_SCRIPT)
    shifts = []
    original = HunyuanVideoPipeline.__call__

    def recording_call(self, *args, **kwargs):
        shifts.append(self.scheduler.config.shift)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HunyuanVideoPipeline, "__call__", recording_call)
    out = tmp_path / "out"
    run_main(
        script,
        tiny_train_args(
            tiny_models["hunyuan"],
            dataset,
            out,
            steps=2,
            encoder="dinov2-registers",
            extra=[
                "--max_sequence_length",
                "16",
                "--flow_shift",
                "3.0",
                "--validation_prompt",
                "a cat",
                "--validation_steps",
                "2",
                "--validation_num_inference_steps",
                "1",
            ],
        ),
    )
    assert shifts == [3.0, 3.0]
    assert re.search(r"\| `sampling_flow_shift` \| `3.0` \|", (out / "README.md").read_text())


def without(argv, *flags):
    """argv without each flag and its value."""
    for flag in flags:
        index = argv.index(flag)
        argv = argv[:index] + argv[index + 2 :]
    return argv


def test_a_run_without_seed_draws_one_and_resume_reuses_it(cog, tiny_models, dataset, tmp_path, caplog):
    model = tiny_models["cogvideox-2b"]

    def args(out, steps, extra=()):
        return without(
            tiny_train_args(model, dataset, out, steps=steps, extra=["--checkpointing_steps", "2", *extra]), "--seed"
        )

    first, other = tmp_path / "first", tmp_path / "other"
    run_main(cog, args(first, 2))
    run_main(cog, args(other, 2))
    seeds = [
        int(re.search(r"\| `seed` \| `(\d+)` \|", (out / "README.md").read_text()).group(1)) for out in (first, other)
    ]
    assert seeds[0] != seeds[1], "two runs without --seed drew the same seed"
    assert any(not torch.equal(a, b) for a, b in zip(lora_state(first).values(), lora_state(other).values()))

    caplog.clear()
    run_main(cog, args(first, 4, ["--resume_from_checkpoint", "latest"]))
    assert f"seed {seeds[0]} (stored in the checkpoint)" in caplog.text
    straight = tmp_path / "straight"
    run_main(
        cog,
        tiny_train_args(
            model, dataset, straight, steps=4, extra=["--checkpointing_steps", "2", "--seed", str(seeds[0])]
        ),
    )  # the last --seed wins
    assert_same_trained_weights(straight, first, "checkpoint-4")


def test_checkpoint_missing_lora_tensors_fails_to_resume(cog, tiny_models, dataset, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "out"
    model = tiny_models["cogvideox-2b"]
    run_main(cog, tiny_train_args(model, dataset, out, steps=2, extra=["--checkpointing_steps", "2"]))
    path = out / "checkpoint-2" / "pytorch_lora_weights.safetensors"
    state = load_file(str(path))
    dropped = sorted(state)[0]
    del state[dropped]
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match=r"checkpoint-2: 1 LoRA tensors missing"):
        run_main(cog, tiny_train_args(model, dataset, out, steps=3, extra=["--resume_from_checkpoint", "latest"]))


def test_lora_metadata_and_card_precision(tiny_models, dataset, tmp_path):
    """The LoRA metadata holds only what loading needs (diffusers builds LoraConfig(**metadata)), and the card records
    the precision that ran when --mixed_precision was left to the accelerate config ("no" here)."""
    from peft import LoraConfig
    from safetensors import safe_open

    out = tmp_path / "out"
    argv = tiny_train_args(tiny_models["cogvideox-2b"], dataset, out, steps=1, extra=["--crepa_mode", "none"])
    launch(COGVIDEOX_SCRIPT, without(argv, "--mixed_precision"), tmp_path)
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        stored = json.loads(handle.metadata()["lora_adapter_metadata"])
    fields = {key.split(".", 1)[1]: value for key, value in stored.items()}
    assert {"r", "lora_alpha", "target_modules"} <= set(fields)
    assert set(fields) <= {
        "r",
        "lora_alpha",
        "target_modules",
        "lora_dropout",
        "bias",
        "use_dora",
        "use_rslora",
        "rank_pattern",
        "alpha_pattern",
    }, fields
    assert LoraConfig(**fields).lora_alpha == 8
    card = (out / "README.md").read_text()
    assert "| `mixed_precision` | `no` |" in card and "accelerate default" not in card


@pytest.mark.parametrize(
    "script_path, model",
    [(COGVIDEOX_SCRIPT, "cogvideox-2b"), (HUNYUAN_SCRIPT, "hunyuan"), (WAN_SCRIPT, "wan-2.1")],
)
def test_image_to_video_checkpoint_is_refused_before_loading(tiny_models, dataset, tmp_path, script_path, model):
    i2v = tmp_path / "i2v"
    shutil.copytree(tiny_models[model], i2v)
    config_path = i2v / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["in_channels"] = 2 * config["out_channels"] + (1 if model == "hunyuan" else 0)
    config_path.write_text(json.dumps(config))
    (i2v / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not loaded")
    with pytest.raises(SystemExit, match=r"in_channels.*image-to-video"):
        run_main(import_script(script_path), tiny_train_args(i2v, dataset, tmp_path / "out", steps=1))


def test_reshape_mode_none_crops_as_diffusers_and_stretch_stretches(cog):
    frames = torch.arange(2 * 3 * 8 * 16, dtype=torch.float32).view(2, 3, 8, 16)
    stretched = cog.resize_and_crop(frames, 8, 8, "stretch")
    assert stretched.shape == (2, 3, 8, 8)
    torch.testing.assert_close(
        stretched,
        torch.nn.functional.interpolate(frames, size=(8, 8), mode="bicubic", align_corners=False, antialias=True),
    )
    crops = {tuple(cog.resize_and_crop(frames, 8, 8, "none")[0, 0, 0, :2].tolist()) for _ in range(30)}
    assert len(crops) > 1, "--video_reshape_mode none must crop at random, as in diffusers"
    assert all(any(torch.equal(torch.tensor(c), frames[0, 0, 0, i : i + 2]) for i in range(9)) for c in crops)


def test_subject_consistency_follows_vbench_clamp():
    evaluate = import_script(ROOT / "examples" / "evaluate_crepa.py")
    features = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [-1.0, 0.1], [0.0, 1.0]]), dim=-1)
    scores = evaluate.consistency(features)
    cos = features @ features.T
    expected = np.mean([(max(0.0, cos[i, i - 1].item()) + max(0.0, cos[i, 0].item())) / 2 for i in (1, 2)])
    assert scores["subject_consistency"] == pytest.approx(expected, abs=1e-6)
    assert min(scores["adjacent"]) < 0  # the raw similarities are still reported unclamped


def test_user_mistakes_are_messages_not_tracebacks(cog, tiny_models, dataset, tmp_path, caplog):
    """A count mismatch, a missing resume checkpoint and an output folder that cannot be written each end in one
    message naming the file or flag, with no traceback and nothing trained: the first as a process (what a user
    sees), the others in this process (a SystemExit with the message, which Python prints without a traceback, and
    no exception logged before it)."""
    bad = tmp_path / "bad"
    shutil.copytree(dataset, bad)
    (bad / "prompts.txt").write_text("only one prompt\n")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    model = tiny_models["cogvideox-2b"]
    cases = [
        (tiny_train_args(model, bad, tmp_path / "o1"), r"1 prompts but 3 videos"),
        (
            tiny_train_args(model, dataset, tmp_path / "o2", extra=["--resume_from_checkpoint", "checkpoint-7"]),
            r"--resume_from_checkpoint checkpoint-7: no such folder",
        ),
        (tiny_train_args(model, dataset, blocker / "out"), r"--output_dir .*a_file/out cannot be written"),
    ]
    argv, message = cases[0]
    # The trainer itself (`accelerate launch` adds its own CalledProcessError traceback for any failing child).
    result = subprocess.run(
        [sys.executable, str(COGVIDEOX_SCRIPT), *argv],
        cwd=tmp_path,
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and re.search(message, result.stderr), result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for argv, message in cases[1:]:
        caplog.clear()
        with pytest.raises(SystemExit) as stopped:
            run_main(cog, argv)
        assert re.search(message, str(stopped.value)), stopped.value
        assert not [record for record in caplog.records if record.exc_info], caplog.text
    assert not list(tmp_path.glob("o*/pytorch_lora_weights.safetensors"))


def test_list_files_as_people_save_them(cog, tiny_models, dataset, tmp_path):
    """UTF-8 with a byte-order mark reads as plain UTF-8; a Latin-1 file is refused with its name."""
    root = tmp_path / "data"
    shutil.copytree(dataset, root)
    prompts = (root / "prompts.txt").read_text().splitlines()
    (root / "prompts.txt").write_text("\n".join(["café au lait"] + prompts[1:]) + "\n", encoding="utf-8-sig")
    items = cog.load_video_items(cog.parse_args(tiny_train_args(tiny_models["cogvideox-2b"], root, tmp_path / "o")))
    assert items[0].prompt == "café au lait"
    (root / "prompts.txt").write_bytes("café\n".encode("latin-1") * 3)
    with pytest.raises(SystemExit, match=r"--caption_column: .*prompts\.txt is not UTF-8 text"):
        cog.load_video_items(cog.parse_args(tiny_train_args(tiny_models["cogvideox-2b"], root, tmp_path / "o")))


def test_a_checkpoint_that_does_not_fit_is_refused_before_loading(cog, tiny_models, dataset, tmp_path, monkeypatch):
    """Another --rank, another --crepa_mode, a damaged file: refused from the checkpoint's files, before any model
    loads (loading is made to fail loudly here), naming the flag and the fix."""
    from diffusers import CogVideoXTransformer3DModel

    model, out = tiny_models["cogvideox-2b"], tmp_path / "out"
    run_main(cog, tiny_train_args(model, dataset, out, steps=2, extra=["--checkpointing_steps", "2"]))

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the checkpoint was checked")

    monkeypatch.setattr(CogVideoXTransformer3DModel, "from_pretrained", no_loading)
    resume = ["--resume_from_checkpoint", "latest", "--checkpointing_steps", "2"]
    with pytest.raises(SystemExit, match=r"holds a LoRA of rank \[4\], not --rank 8"):
        run_main(cog, tiny_train_args(model, dataset, out, steps=3, extra=[*resume, "--rank", "8"]))
    with pytest.raises(SystemExit, match=r"saved with a CREPA projector, unlike this run: match --crepa_mode"):
        run_main(cog, tiny_train_args(model, dataset, out, steps=3, extra=[*resume, "--crepa_mode", "none"]))
    lora = out / "checkpoint-2" / "pytorch_lora_weights.safetensors"
    lora.write_bytes(lora.read_bytes()[:100])
    with pytest.raises(SystemExit, match=r"a file in .*checkpoint-2 cannot be read.*use one of \['checkpoint-2'\]"):
        run_main(cog, tiny_train_args(model, dataset, out, steps=3, extra=resume))


@pytest.mark.parametrize(
    "script_path, model, extra, call",
    [
        (COGVIDEOX_SCRIPT, "cogvideox-2b", [], "max_sequence_length=16"),  # the tiny model's text length
        (HUNYUAN_SCRIPT, "hunyuan", ["--max_sequence_length", "16"], "height=32, width=48, num_frames=9"),
    ],
)
def test_no_dtype_warnings_and_the_card_snippet_runs(
    tiny_models, dataset, tmp_path, monkeypatch, capfd, script_path, model, extra, call
):
    """Loading in the training dtype as diffusers recommends: no "should be kept in float32" cast warning and no
    `torch_dtype` deprecation, in training or in the final test; the card's snippet runs warning-free, and on the
    oldest diffusers requirements.txt allows (`dtype=` exists from diffusers 0.40)."""
    import logging
    import warnings

    from packaging.version import Version

    script = import_script(script_path)
    out = tmp_path / "out"
    logged = []  # diffusers' and transformers' loggers do not propagate: listen on them directly
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    for name in ("diffusers", "transformers"):
        monkeypatch.setattr(logging.getLogger(name), "handlers", [*logging.getLogger(name).handlers, handler])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_main(
            script,
            tiny_train_args(
                tiny_models[model],
                dataset,
                out,
                steps=1,
                extra=[
                    "--mixed_precision",
                    "bf16",
                    "--validation_prompt",
                    "a cat",
                    "--validation_num_inference_steps",
                    "1",
                    *extra,
                ],
            ),
        )
        code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
        code = (
            code.replace('"cuda"', '"cpu"')
            .replace(f'"{out.name}"', f'"{out}"')
            .replace('("a cat")', f'("a cat", num_inference_steps=1, {call})')
        )
        monkeypatch.chdir(tmp_path)
        exec(compile(code, "card-snippet", "exec"), {})
    printed = capfd.readouterr()
    messages = [str(w.message) for w in caught] + logged + (printed.out + printed.err).splitlines()
    assert not [m for m in messages if "kept in float32" in m or "torch_dtype" in m], messages
    assert (tmp_path / "output.mp4").is_file()
    floor = re.search(r"^diffusers>=([\d.]+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert "dtype=torch.bfloat16" in code and Version(floor) >= Version("0.40.0")


def test_lora_and_projector_files_get_the_umask_mode(cog, tiny_models, dataset, tmp_path):
    """safetensors writes 0600; the LoRA and the projector (final and in checkpoints) get what the umask gives every
    other output file (0664 under umask 002, which differs from both 0600 and the common 0644)."""
    import os
    import stat

    out = tmp_path / "out"
    previous = os.umask(0o002)
    try:
        run_main(
            cog,
            tiny_train_args(tiny_models["cogvideox-2b"], dataset, out, steps=1, extra=["--checkpointing_steps", "1"]),
        )
    finally:
        os.umask(previous)
    files = [
        out / "pytorch_lora_weights.safetensors",
        out / "checkpoint-1" / "pytorch_lora_weights.safetensors",
        out / "checkpoint-1" / "crepa_projector.safetensors",
        out / "README.md",
    ]
    modes = {str(f.relative_to(out)): oct(stat.S_IMODE(f.stat().st_mode)) for f in files}
    assert modes == {str(f.relative_to(out)): "0o664" for f in files}
