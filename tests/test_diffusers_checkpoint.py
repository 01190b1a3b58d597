"""A user switching from diffusers' train_cogvideox_lora.py points --output_dir at its folder and resumes: the LoRA,
the step and the learning-rate schedule continue; that checkpoint is never changed or deleted."""

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from helpers import import_script, lora_state, run_main, tiny_train_args


RANK, ALPHA, STEP = 4, 8, 3


def write_diffusers_checkpoint(model: Path, output_dir: Path) -> dict[str, torch.Tensor]:
    """checkpoint-3 as diffusers' example writes it: accelerate's save_state with its save hook (the LoRA through
    CogVideoXPipeline.save_lora_weights, no adapter metadata; the model's weights popped), its one-group optimizer
    and its get_scheduler schedule stepped 3 times. Returns the LoRA it saved."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    accelerator = Accelerator(project_config=ProjectConfiguration(project_dir=str(output_dir)))
    try:
        transformer = CogVideoXTransformer3DModel.from_pretrained(model, subfolder="transformer")
        transformer.requires_grad_(False)
        transformer.add_adapter(
            LoraConfig(
                r=RANK, lora_alpha=ALPHA, init_lora_weights=True, target_modules=["to_k", "to_q", "to_v", "to_out.0"]
            )
        )

        def save_model_hook(models, weights, directory):
            for saved in models:
                layers = get_peft_model_state_dict(accelerator.unwrap_model(saved))
                weights.pop()
            CogVideoXPipeline.save_lora_weights(directory, transformer_lora_layers=layers)

        accelerator.register_save_state_pre_hook(save_model_hook)
        params = [p for p in transformer.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW([{"params": params, "lr": 1e-2}])
        lr_scheduler = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=4, num_training_steps=6)
        transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
        generator = torch.Generator().manual_seed(0)
        for _ in range(STEP):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        accelerator.save_state(str(output_dir / f"checkpoint-{STEP}"))
    finally:
        AcceleratorState._reset_state(True)
    folder = output_dir / f"checkpoint-{STEP}"
    assert {"pytorch_lora_weights.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= {
        p.name for p in folder.iterdir()
    }
    return lora_state(folder)


def fingerprint(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def cog():
    from helpers import COGVIDEOX_SCRIPT

    return import_script(COGVIDEOX_SCRIPT)


def test_resume_from_a_diffusers_example_checkpoint(cog, tiny_models, dataset, tmp_path, caplog):
    model, out = tiny_models["cogvideox-2b"], tmp_path / "from-diffusers"
    saved = write_diffusers_checkpoint(model, out)
    before = fingerprint(out / f"checkpoint-{STEP}")
    schedule = ["--lr_scheduler", "linear", "--lr_warmup_steps", "4", "--rank", str(RANK), "--lora_alpha", str(ALPHA)]

    # A run that starts where the checkpoint is and trains no step saves exactly its LoRA (with adapter metadata).
    caplog.set_level(logging.INFO)
    at_step = tmp_path / "at-step"
    at_step.mkdir()
    (at_step / f"checkpoint-{STEP}").symlink_to(out / f"checkpoint-{STEP}", target_is_directory=True)
    run_main(
        cog,
        tiny_train_args(model, dataset, at_step, steps=STEP, extra=[*schedule, "--resume_from_checkpoint", "latest"]),
    )
    final = lora_state(at_step)
    assert final.keys() == saved.keys()
    for key in saved:
        torch.testing.assert_close(final[key], saved[key].float(), rtol=0, atol=0)
    assert "written by diffusers' example" in caplog.text and "start fresh" in caplog.text

    # Resumed with checkpoints every step and a limit of 1: steps 4..6 only, the schedule where diffusers left it.
    extra = [
        *schedule,
        "--resume_from_checkpoint",
        "latest",
        "--checkpointing_steps",
        "1",
        "--checkpoints_total_limit",
        "1",
    ]
    run_main(cog, tiny_train_args(model, dataset, out, steps=6, extra=extra))
    history = json.loads((out / "training_log.json").read_text())
    assert [row["step"] for row in history] == [4, 5, 6]
    # linear warm-up 4 of 6 steps: lr(s) = 1e-2 * min(s / 4, (6 - s) / 2); from step 0 it would be 0.25e-2 at "4"
    assert [row["lr"] for row in history] == pytest.approx([1e-2, 0.5e-2, 0.0])
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-3",
        "checkpoint-6",
    ]
    assert fingerprint(out / f"checkpoint-{STEP}") == before  # never changed, never deleted


def test_new_run_beside_a_newer_diffusers_checkpoint_is_refused_before_weights_load(
    cog, tiny_models, dataset, tmp_path, monkeypatch
):
    import diffusers

    model, out = tiny_models["cogvideox-2b"], tmp_path / "out"
    write_diffusers_checkpoint(model, out)
    before = fingerprint(out / f"checkpoint-{STEP}")

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the checkpoint was checked")

    monkeypatch.setattr(diffusers.CogVideoXTransformer3DModel, "from_pretrained", no_weights)
    with pytest.raises(SystemExit, match=r"holds \['checkpoint-3'\].*--resume_from_checkpoint latest"):
        run_main(cog, tiny_train_args(model, dataset, out, steps=6))
    # Another --rank than the checkpoint's: refused before weights load too, with the folder named.
    with pytest.raises(SystemExit, match=r"checkpoint-3 holds a LoRA of rank \[4\], not --rank 8"):
        run_main(
            cog, tiny_train_args(model, dataset, out, extra=["--resume_from_checkpoint", "latest", "--rank", "8"])
        )
    assert fingerprint(out / f"checkpoint-{STEP}") == before
