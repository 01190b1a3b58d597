"""Bad input stops before training with a message naming the file/flag; interruptions and NaNs lose nothing;
two processes really train as one."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from helpers import (
    COGVIDEOX_SCRIPT,
    HUNYUAN_SCRIPT,
    accelerate_config,
    import_script,
    launch,
    lora_state,
    offline_env,
    run_main,
    run_two_ranks,
    samples_per_rank,
    tiny_train_args,
)

from crepa_diffusers import checkpoints, testing, training_utils


def args_for(model, dataset, output_dir, steps=2, extra=()):
    return tiny_train_args(model, dataset, output_dir, steps=steps, extra=extra)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one test per case, each stopping before any model weights load.


def bad_dataset(tmp_path, dataset, **changes):
    root = tmp_path / "bad"
    shutil.copytree(dataset, root)
    for name, text in changes.items():
        (root / name.replace("_txt", ".txt")).write_text(text)
    return root


def test_missing_data_root(cog, tiny_models, tmp_path):
    argv = args_for(tiny_models["cogvideox-2b"], tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(SystemExit, match=r"--instance_data_root .*nowhere is not a folder"):
        run_main(cog, argv)


def test_missing_column_file(cog, tiny_models, dataset, tmp_path):
    root = bad_dataset(tmp_path, dataset)
    (root / "prompts.txt").unlink()
    with pytest.raises(SystemExit, match=r"--caption_column: .*prompts\.txt does not exist"):
        run_main(cog, args_for(tiny_models["cogvideox-2b"], root, tmp_path / "out"))


def test_caption_and_video_counts_differ(cog, tiny_models, dataset, tmp_path):
    root = bad_dataset(tmp_path, dataset, prompts_txt="only one prompt\n")
    with pytest.raises(SystemExit, match=r"1 prompts but 3 videos"):
        run_main(cog, args_for(tiny_models["cogvideox-2b"], root, tmp_path / "out"))


def test_every_bad_video_is_reported_at_once(cog, tiny_models, dataset, tmp_path, caplog):
    root = bad_dataset(tmp_path, dataset)
    (root / "videos" / "broken.mp4").write_bytes(b"this is not a video" * 100)
    frames = torch.randint(0, 255, (5, 32, 48, 3), dtype=torch.uint8).numpy()
    testing.write_video(root / "videos" / "short.mp4", frames)
    videos = (root / "videos.txt").read_text().splitlines()
    (root / "videos.txt").write_text(
        "\n".join(videos + ["videos/missing.mp4", "videos/broken.mp4", "videos/short.mp4"])
    )
    (root / "prompts.txt").write_text("\n".join(["p"] * 6))
    with pytest.raises(SystemExit) as stopped:  # what the interpreter prints, without a traceback
        run_main(cog, args_for(tiny_models["cogvideox-2b"], root, tmp_path / "out"))
    message = str(stopped.value)
    assert "3 of 6 videos cannot be used" in message
    assert re.search(r"missing\.mp4: file not found", message)
    assert re.search(r"broken\.mp4: cannot be decoded", message)
    assert re.search(r"short\.mp4: 5 frames, fewer than the 9 needed", message)
    assert "--skip_invalid_videos" in message
    assert not (tmp_path / "out").exists(), "nothing may be written before the data is valid"

    with caplog.at_level("INFO"):
        run_main(
            cog,
            args_for(
                tiny_models["cogvideox-2b"],
                root,
                tmp_path / "out2",
                extra=["--skip_invalid_videos", "--crepa_mode", "none"],
            ),
        )
    assert "Skipping 3 invalid videos" in caplog.text
    assert "Running training: 3 videos" in caplog.text
    assert (tmp_path / "out2" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--height", "40", r"--height 40 is not a multiple of 16"),
        ("--width", "50", r"--width 50 is not a multiple of 16"),
    ],
)
def test_sizes_the_vae_and_patch_grid_cannot_take(cog, tiny_models, dataset, tmp_path, flag, value, message):
    with pytest.raises(SystemExit, match=message):
        run_main(cog, args_for(tiny_models["cogvideox-2b"], dataset, tmp_path / "out", extra=[flag, value]))


def test_frame_count_the_vae_cannot_take(cog, tiny_models, dataset, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_main(
            cog, args_for(tiny_models["cogvideox-2b"], dataset, tmp_path / "out", extra=["--max_num_frames", "8"])
        )
    assert "--max_num_frames 8: the video VAEs take 4k+1 frames" in capsys.readouterr().err


@pytest.mark.parametrize(
    "script_path, model, index, blocks", [(COGVIDEOX_SCRIPT, "cogvideox-2b", 3, 3), (HUNYUAN_SCRIPT, "hunyuan", 4, 4)]
)
def test_block_index_beyond_the_model(tiny_models, dataset, tmp_path, script_path, model, index, blocks):
    script = import_script(script_path)
    argv = args_for(tiny_models[model], dataset, tmp_path / "out", extra=["--crepa_block_index", str(index)])
    with pytest.raises(SystemExit, match=rf"--crepa_block_index {index} is out of range.* {blocks} blocks"):
        run_main(script, argv)


def test_encoder_that_is_not_dinov2(cog, tiny_models, dataset, tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(tmp_path / "vit")
    argv = args_for(tiny_models["cogvideox-2b"], dataset, tmp_path / "out") + [
        "--crepa_encoder",
        str(tmp_path / "vit"),
    ]
    with pytest.raises(SystemExit, match=r"--crepa_encoder .*vit' is a 'vit' model, not DINOv2"):
        run_main(cog, argv)


def test_resume_checkpoint_that_does_not_exist(cog, tiny_models, dataset, tmp_path):
    argv = args_for(
        tiny_models["cogvideox-2b"], dataset, tmp_path / "out", extra=["--resume_from_checkpoint", "checkpoint-99"]
    )
    with pytest.raises(SystemExit, match=r"--resume_from_checkpoint checkpoint-99: no such folder"):
        run_main(cog, argv)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--crepa_adjacent_tau", "-1"], "--crepa_adjacent_tau"),
        (["--train_batch_size", "0"], "--train_batch_size must be >= 1"),
        (["--validation_epochs", "0"], "--validation_epochs must be >= 1"),  # diffusers' script divides by it
        (["--rank", "0"], "--rank must be >= 1"),
        (["--max_train_steps", "0"], "--max_train_steps must be >= 1"),  # would save an untrained LoRA
        (["--max_num_frames", "-3"], "--max_num_frames must be >= 1"),  # -3 is 4k+1
        (["--skip_frames_start", "-1"], "--skip_frames_start must be >= 0"),
        (["--lora_alpha", "0"], "--lora_alpha must be > 0"),
    ],
)
def test_invalid_flag_values(cog, tiny_models, dataset, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        cog.parse_args(args_for(tiny_models["cogvideox-2b"], dataset, tmp_path / "out", extra=argv))
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints that a crash interrupted


class TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    accelerator = Accelerator(cpu=True)
    try:
        accelerator.prepare(TinyModel())
        checkpoints.save_checkpoint(accelerator, str(tmp_path), 2, total_limit=1)
        original = accelerator.save_state

        def crash_midway(output_dir, **kwargs):
            original(output_dir, **kwargs)  # files written, then the machine dies before the marker and rename
            raise KeyboardInterrupt("power cut")

        monkeypatch.setattr(accelerator, "save_state", crash_midway)
        with pytest.raises(KeyboardInterrupt):
            checkpoints.save_checkpoint(accelerator, str(tmp_path), 4, total_limit=1)
    finally:
        AcceleratorState._reset_state(True)
    assert (tmp_path / ".checkpoint-4.tmp").is_dir()
    assert (tmp_path / "checkpoint-2").is_dir(), "the limit deleted the newest complete checkpoint"
    # A checkpoint-N folder without the completion marker (e.g. copied half-way) is ignored too.
    shutil.copytree(tmp_path / ".checkpoint-4.tmp", tmp_path / "checkpoint-6")
    assert checkpoints.resolve_resume_checkpoint("latest", str(tmp_path)) == tmp_path / "checkpoint-2"
    with pytest.raises(SystemExit, match="incomplete"):
        checkpoints.resolve_resume_checkpoint(str(tmp_path / "checkpoint-6"), str(tmp_path))


def test_half_written_checkpoint_resumes_from_previous(cog, tiny_models, dataset, tmp_path, caplog):
    out = tmp_path / "out"
    run_main(cog, args_for(tiny_models["cogvideox-2b"], dataset, out, steps=2, extra=["--checkpointing_steps", "2"]))
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-3")
    (out / "checkpoint-3" / checkpoints.CHECKPOINT_COMPLETE).unlink()
    (out / "checkpoint-3" / "optimizer.bin").write_bytes(b"truncated")
    run_main(
        cog, args_for(tiny_models["cogvideox-2b"], dataset, out, steps=3, extra=["--resume_from_checkpoint", "latest"])
    )
    assert re.search(r"Resuming from .*checkpoint-2\b", caplog.text)


# ---------------------------------------------------------------------------------------------------------------
# SIGTERM (preemption)


def test_sigterm_saves_a_checkpoint_and_resume_matches(tiny_models, dataset, tmp_path):
    model = tiny_models["cogvideox-2b"]
    out = tmp_path / "interrupted"
    argv = args_for(model, dataset, out, steps=500, extra=["--checkpointing_steps", "1000"])
    process = subprocess.Popen(
        [sys.executable, str(COGVIDEOX_SCRIPT), *argv],
        cwd=tmp_path,
        env=offline_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = ""
    deadline = time.time() + 120
    while time.time() < deadline:
        seen += process.stderr.read(1)
        if re.search(r"\| *[3-9]/500", seen):
            break
    process.send_signal(signal.SIGTERM)
    rest = process.stderr.read()
    assert process.wait(timeout=120) == 128 + signal.SIGTERM, rest[-3000:]  # told from a finished run
    stopped = re.search(r"Stopped at step (\d+) after a signal", rest)
    assert stopped, rest[-3000:]
    step = int(stopped.group(1))
    assert 3 <= step < 500
    assert (out / f"checkpoint-{step}" / checkpoints.CHECKPOINT_COMPLETE).is_file()
    assert not (out / "pytorch_lora_weights.safetensors").exists(), "an interrupted run is not a finished LoRA"

    launch(
        COGVIDEOX_SCRIPT,
        args_for(
            model,
            dataset,
            out,
            steps=step + 2,
            extra=["--checkpointing_steps", "1000", "--resume_from_checkpoint", "latest"],
        ),
        tmp_path,
    )
    straight = tmp_path / "straight"
    launch(
        COGVIDEOX_SCRIPT,
        args_for(model, dataset, straight, steps=step + 2, extra=["--checkpointing_steps", str(step)]),
        tmp_path,
    )
    a, b = lora_state(straight), lora_state(out)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_a_signal_to_the_launcher_alone_saves_and_stops_the_trainer(tiny_models, dataset, tmp_path):
    """`docker stop` or a scheduler signals only `accelerate launch`, which exits at once: the trainer it started
    (now orphaned) still finishes its step, saves a checkpoint and stops, instead of training on and saving nothing."""
    out = tmp_path / "out"
    argv = args_for(tiny_models["cogvideox-2b"], dataset, out, steps=5000, extra=["--checkpointing_steps", "10000"])
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(accelerate_config(tmp_path)),
        str(COGVIDEOX_SCRIPT),
        *argv,
    ]
    launcher = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=offline_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    # The trainer shares the launcher's stderr pipe: reading it to its end waits for the trainer, whatever its parent.
    watchdog = threading.Timer(150, os.killpg, (launcher.pid, signal.SIGKILL))
    watchdog.start()
    try:
        seen = ""
        while not re.search(r"\| *[3-9]/5000", seen):
            seen += launcher.stderr.read(1) or "(stderr closed)"
            assert not seen.endswith("(stderr closed)"), seen[-3000:]
        launcher.send_signal(signal.SIGTERM)  # the launcher only, not its process group
        assert launcher.wait(timeout=30) != 0
        rest = launcher.stderr.read()
    finally:
        watchdog.cancel()
    stopped = re.search(r"Stopped at step (\d+) after a signal", rest)
    assert stopped, rest[-3000:]
    assert (out / f"checkpoint-{stopped.group(1)}" / checkpoints.CHECKPOINT_COMPLETE).is_file()


def test_a_process_group_signal_is_one_stop_request():
    """A process-group kill reaches the trainer and its launcher: the trainer's SIGTERM and the launcher's death
    (SIGUSR1) arrive together and CPython handles them in signal-number order (SIGUSR1 first): one stop request, the
    exit status SIGTERM's; so is a SIGTERM a scheduler and torchrun both deliver. A SIGINT more than a second later
    stops at once."""
    before = signal.getsignal(signal.SIGUSR1)
    both = {signal.SIGTERM, signal.SIGUSR1}
    with training_utils.StopRequest() as stop:
        signal.pthread_sigmask(signal.SIG_BLOCK, both)  # as while the main thread sits in a C call
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, both)
        os.kill(os.getpid(), signal.SIGTERM)  # forwarded again, within the second
        time.sleep(0.05)
        assert stop.signal == signal.SIGTERM and stop.exit_status == 143
        time.sleep(1.1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGUSR1) is before


# ---------------------------------------------------------------------------------------------------------------
# Non-finite losses


def test_nonfinite_losses_are_skipped_then_stop(cog, tiny_models, dataset, tmp_path, monkeypatch):
    from diffusers import CogVideoXTransformer3DModel
    from safetensors.torch import load_file

    original = CogVideoXTransformer3DModel.forward
    calls = {"n": 0}

    def forward_with_nan_from_step_3(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= 3:
            return (output[0] * float("nan"),)
        return output

    monkeypatch.setattr(CogVideoXTransformer3DModel, "forward", forward_with_nan_from_step_3)
    out = tmp_path / "out"
    argv = args_for(
        tiny_models["cogvideox-2b"],
        dataset,
        out,
        steps=10,
        extra=["--checkpointing_steps", "1", "--max_nonfinite_steps", "2"],
    )
    with pytest.raises(
        training_utils.NonFiniteLossError, match=r"NaN/inf for 2 optimizer steps in a row.*--mixed_precision bf16"
    ):
        run_main(cog, argv)
    assert calls["n"] == 4
    good, skipped = out / "checkpoint-2", out / "checkpoint-3"
    assert not (out / "checkpoint-4").exists()
    for name in ("pytorch_lora_weights.safetensors", "crepa_projector.safetensors"):
        a, b = load_file(str(good / name)), load_file(str(skipped / name))
        for key in a:
            assert torch.isfinite(a[key]).all()
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)  # the skipped step changed nothing
    first = load_file(str(out / "checkpoint-1" / "pytorch_lora_weights.safetensors"))
    assert any(not torch.equal(first[k], load_file(str(good / "pytorch_lora_weights.safetensors"))[k]) for k in first)


@pytest.mark.parametrize("deepspeed", [False, True])
def test_nonfinite_decision_over_micro_batches(deepspeed):
    """The loop's calls, as in the scripts: `add` every micro-batch, `step_is_finite` at the step's last one (and,
    under DeepSpeed, before every backward). A NaN in any micro-batch skips its whole step; the next step starts
    clean; the decision is taken once per call site with one reduce each, and a second call reuses it."""
    from types import SimpleNamespace

    reduces = []
    accelerator = SimpleNamespace(
        num_processes=1,
        distributed_type="DEEPSPEED" if deepspeed else "NO",
        gradient_accumulation_steps=1 if deepspeed else 2,
        mixed_precision="no",
        sync_gradients=False,
        reduce=lambda tensor, reduction: reduces.append(tensor.item()) or tensor,
    )
    nonfinite = training_utils.NonFiniteSteps(max_in_a_row=2)
    nan, one = torch.tensor(float("nan")), torch.tensor(1.0)
    steps = [[one, nan], [one, one], [nan, one], [nan, nan]] if not deepspeed else [[nan], [one], [nan], [nan]]
    decisions = []
    with pytest.raises(training_utils.NonFiniteLossError):
        for micro_batches in steps:
            for index, loss in enumerate(micro_batches):
                accelerator.sync_gradients = index == len(micro_batches) - 1
                nonfinite.add(loss)
                if deepspeed:
                    nonfinite.step_is_finite(accelerator)  # before backward
                if accelerator.sync_gradients:
                    decisions.append(nonfinite.step_is_finite(accelerator))
                    assert nonfinite.step_is_finite(accelerator) == decisions[-1]  # reused, no new reduce
    assert decisions == [False, True, False]  # the third skip in a row (limit 2) raised
    assert reduces == [0.0, 1.0, 0.0, 0.0]  # one reduce per optimizer step


def test_nonfinite_message_names_the_fp16_fix():
    assert "--mixed_precision bf16" in training_utils.nonfinite_message(3, "fp16")
    assert "You train in fp16" in training_utils.nonfinite_message(3, "fp16")
    assert "--resume_from_checkpoint latest" in training_utils.nonfinite_message(3, "no")


# ---------------------------------------------------------------------------------------------------------------
# Two processes (gloo on CPU)


@pytest.mark.parametrize(
    "script_path, model, block, extra, micro_batches",
    [
        # The multi-GPU configuration most users run: gradient checkpointing and accumulation under DDP.
        (COGVIDEOX_SCRIPT, "cogvideox-5b", 1, ["--gradient_checkpointing", "--gradient_accumulation_steps", "2"], 6),
        # A lambda cutoff inside the run: step 3 leaves the projector unused, which DDP must allow; fp8 frozen weights,
        # which DDP (gloo) must not broadcast.
        (HUNYUAN_SCRIPT, "hunyuan", 2, ["--crepa_cutoff_step", "2", "--layerwise_upcasting"], 3),
    ],
)
def test_two_process_run(tiny_models, dataset, tmp_path, script_path, model, block, extra, micro_batches):
    out = tmp_path / "out"
    argv = args_for(
        tiny_models[model],
        dataset,
        out,
        steps=3,
        extra=["--crepa_block_index", str(block), "--checkpointing_steps", "3", *extra],
    )
    if script_path == HUNYUAN_SCRIPT:
        argv += ["--max_sequence_length", "16"]
    log = run_two_ranks(script_path, argv, tmp_path)
    samples = samples_per_rank(log)
    assert len(samples[0]) == len(samples[1]) == micro_batches
    assert any(a != b for a, b in zip(samples[0], samples[1])), samples
    assert log.count("Trained weights identical on all 2 ranks") == 2
    state = lora_state(out)
    assert state and all(torch.isfinite(v).all() for v in state.values())
    assert (out / "checkpoint-3" / "crepa_projector.safetensors").is_file()
    lambdas = [row["crepa_lambda"] for row in json.loads((out / "training_log.json").read_text())]
    assert lambdas == ([0.5] * 3 if script_path == COGVIDEOX_SCRIPT else [1.0, 1.0, 0.0])
    pipeline_cls = "CogVideoXPipeline" if script_path == COGVIDEOX_SCRIPT else "HunyuanVideoPipeline"
    import diffusers

    pipe = getattr(diffusers, pipeline_cls).from_pretrained(tiny_models[model])
    pipe.load_lora_weights(out)
    assert any("lora" in name for name, _ in pipe.transformer.named_parameters())


def test_large_seeds_give_valid_generators():
    """A drawn or user seed up to 2**32 - 1 (diffusers' set_seed range) at any step, rank and micro-batch."""
    generators = [
        training_utils.step_generator(2**32 - 1, 10**7, 63, "cpu", 15),
        training_utils.step_generator(2**32 - 2, 10**7, 63, "cpu", 15),
    ]
    assert not torch.equal(torch.rand(4, generator=generators[0]), torch.rand(4, generator=generators[1]))
    assert len(list(training_utils.EpochShuffleSampler(5, 2**32 - 1))) == 5


def test_micro_batches_of_a_step_draw_different_noise():
    a = training_utils.step_generator(0, 5, 0, torch.device("cpu"), micro_batch=0)
    b = training_utils.step_generator(0, 5, 0, torch.device("cpu"), micro_batch=1)
    again = training_utils.step_generator(0, 5, 0, torch.device("cpu"), micro_batch=1)
    assert not torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
    assert torch.equal(
        torch.rand(4, generator=training_utils.step_generator(0, 5, 0, torch.device("cpu"), 1)),
        torch.rand(4, generator=again),
    )


def test_resuming_a_finished_run_trains_no_further(cog, tiny_models, dataset, tmp_path, caplog):
    out = tmp_path / "out"
    run_main(cog, args_for(tiny_models["cogvideox-2b"], dataset, out, steps=2, extra=["--checkpointing_steps", "2"]))
    first = lora_state(out)
    run_main(
        cog,
        args_for(
            tiny_models["cogvideox-2b"],
            dataset,
            out,
            steps=2,
            extra=["--checkpointing_steps", "2", "--resume_from_checkpoint", "latest"],
        ),
    )
    assert "Resuming from" in caplog.text
    for key, value in lora_state(out).items():
        assert torch.equal(value, first[key])
