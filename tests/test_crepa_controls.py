"""CREPA controls: per-model defaults, the lambda schedule (a pure function of the optimizer step, exact on resume,
skipping the encoder at lambda 0), the projector in fp32 under mixed precision, and per-part gradient clipping."""

import argparse
import json
import math

import pytest
import torch
from helpers import (
    COGVIDEOX_SCRIPT,
    HUNYUAN_SCRIPT,
    assert_same_trained_weights,
    import_script,
    run_main,
    tiny_train_args,
)

from crepa_diffusers.crepa import CrepaConfig, CrepaProjector, add_crepa_args


def config_from(argv, default_lambda=0.5):
    parser = argparse.ArgumentParser()
    add_crepa_args(parser, default_lambda=default_lambda)
    return CrepaConfig.from_args(parser.parse_args(argv))


@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine", "polynomial"])
def test_each_schedule_follows_its_formula(scheduler):
    lam, end, warmup, decay, power = 0.8, 0.1, 4, 10, 2.0
    config = config_from(
        [
            "--crepa_lambda",
            str(lam),
            "--crepa_scheduler",
            scheduler,
            "--crepa_warmup_steps",
            str(warmup),
            "--crepa_decay_steps",
            str(decay),
            "--crepa_lambda_end",
            str(end),
            "--crepa_power",
            str(power),
        ]
    )

    def expected(step):
        if step < warmup:
            return lam * step / warmup
        p = min(1.0, (step - warmup) / decay)
        return {
            "constant": lam,
            "linear": lam + (end - lam) * p,
            "cosine": end + (lam - end) * 0.5 * (1 + math.cos(math.pi * p)),
            "polynomial": end + (lam - end) * (1 - p) ** power,
        }[scheduler]

    for step in (0, 1, 3, 4, 5, 7, 9, 13, 14, 15, 100):
        assert config.lambda_at(step, max_train_steps=100) == pytest.approx(expected(step), abs=1e-12), step
    if scheduler != "constant":
        assert config.lambda_at(warmup + decay, 100) == pytest.approx(end)
        assert config.lambda_at(warmup + decay // 2, 100) < lam


def test_decay_defaults_to_the_end_of_training_and_cutoff_zeroes_lambda():
    config = config_from(["--crepa_scheduler", "linear"])  # lambda_end 0, decay until --max_train_steps
    assert config.lambda_at(0, 10) == 0.5 and config.lambda_at(5, 10) == pytest.approx(0.25)
    assert config.lambda_at(10, 10) == 0.0
    cut = config_from(["--crepa_cutoff_step", "3"])
    assert [cut.lambda_at(step, 10) for step in range(5)] == [0.5, 0.5, 0.5, 0.0, 0.0]
    assert not config_from([]).may_skip_steps  # constant: the projector is used at every step
    assert cut.may_skip_steps and config.may_skip_steps and config_from(["--crepa_warmup_steps", "2"]).may_skip_steps
    assert not config_from(["--crepa_scheduler", "linear", "--crepa_lambda_end", "0.1"]).may_skip_steps


def test_schedule_flags_reject_bad_values(capsys):
    for argv in (
        ["--crepa_scheduler", "exponential"],
        ["--crepa_warmup_steps", "-1"],
        ["--crepa_power", "0"],
        ["--crepa_cutoff_step", "-2"],
        ["--crepa_lambda_end", "-0.1"],
    ):
        with pytest.raises(SystemExit):
            config_from(argv)
        assert argv[0] in capsys.readouterr().err


def test_hunyuan_default_block_is_10_and_cogvideox_8(dataset):
    for path, block, lam in ((HUNYUAN_SCRIPT, 10, 1.0), (COGVIDEOX_SCRIPT, 8, 0.5)):
        script = import_script(path)
        args = script.parse_args(["--pretrained_model_name_or_path", "x", "--instance_data_root", str(dataset)])
        assert (args.crepa_block_index, args.crepa_lambda) == (block, lam)


def test_cutoff_skips_the_encoder_and_logs_lambda(tiny_models, dataset, tmp_path, monkeypatch):
    """With --crepa_cutoff_step 2 the encoder runs at steps 1-2 only (counted), each row logs the lambda in force,
    and every row's loss is diffusion_loss + crepa_lambda * crepa_loss."""
    from accelerate.state import AcceleratorState

    from crepa_diffusers.features import DinoPatchFeatures

    calls = []
    original = DinoPatchFeatures.forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DinoPatchFeatures, "forward", counted)
    script = import_script(COGVIDEOX_SCRIPT)
    out = tmp_path / "out"
    args = script.parse_args(
        tiny_train_args(tiny_models["cogvideox-2b"], dataset, out, steps=4, extra=["--crepa_cutoff_step", "2"])
    )
    try:
        script.main(args)
    finally:
        AcceleratorState._reset_state(True)
    assert len(calls) == 2
    log = json.loads((out / "training_log.json").read_text())
    assert [row["crepa_lambda"] for row in log] == [0.5, 0.5, 0.0, 0.0]
    assert all("crepa_loss" in row for row in log[:2]) and not any("crepa_loss" in row for row in log[2:])
    for row in log:
        expected = row["diffusion_loss"] + row["crepa_lambda"] * row.get("crepa_loss", 0.0)
        assert row["loss"] == pytest.approx(expected, rel=1e-6)
    card = (out / "README.md").read_text()
    assert "crepa_cutoff_step" in card and "crepa_scheduler" in card


def test_resume_in_the_middle_of_a_decay_equals_the_straight_run(tiny_models, dataset, tmp_path):
    model = tiny_models["cogvideox-2b"]
    schedule = ["--crepa_scheduler", "cosine", "--crepa_warmup_steps", "1", "--crepa_lambda_end", "0.1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cog = import_script(COGVIDEOX_SCRIPT)
    run_main(cog, tiny_train_args(model, dataset, straight, steps=4, extra=[*schedule, "--checkpointing_steps", "4"]))
    run_main(cog, tiny_train_args(model, dataset, resumed, steps=2, extra=[*schedule, "--checkpointing_steps", "2"]))
    run_main(
        cog,
        tiny_train_args(
            model,
            dataset,
            resumed,
            steps=4,
            extra=[*schedule, "--checkpointing_steps", "4", "--resume_from_checkpoint", "latest"],
        ),
    )
    assert_same_trained_weights(straight, resumed, "checkpoint-4")
    lambdas = [row["crepa_lambda"] for row in json.loads((straight / "training_log.json").read_text())]
    config = config_from(schedule)
    assert lambdas == pytest.approx([config.lambda_at(step, 4) for step in range(4)])
    assert lambdas[0] == 0.0 and 0.1 < lambdas[2] < lambdas[1] <= 0.5


def test_projector_runs_in_fp32_under_bf16_autocast():
    projector = CrepaProjector(8, 6, 16)
    dtypes = []
    for layer in projector.mlp:
        layer.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = projector(torch.randn(2, 3, 4, 8, dtype=torch.bfloat16))
        reference = torch.nn.functional.linear(torch.randn(2, 8), torch.randn(3, 8))  # autocast is really on
    assert reference.dtype == torch.bfloat16
    assert out.dtype == torch.float32 and dtypes == [torch.float32] * 5


def test_lora_is_clipped_alone_whatever_the_projector_gradients():
    """Per-part clipping: the LoRA's gradients after clipping are the same with CREPA (a projector part beside it)
    as without, and the projector is clipped to the same bound on its own."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from crepa_diffusers.training_utils import clip_grad_norms

    torch.manual_seed(0)
    lora = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(2)]
    projector = [torch.nn.Parameter(torch.randn(8))]
    lora_grads = [torch.randn(4, 4) * 3 for _ in lora]
    accelerator = Accelerator(cpu=True)
    try:
        results = {}
        for arm, parts in (("none", [lora]), ("crepa", [lora, projector])):
            for param, grad in zip(lora, lora_grads):
                param.grad = grad.clone()
            projector[0].grad = torch.full((8,), 100.0)
            norms = clip_grad_norms(accelerator, parts, max_norm=1.0)
            results[arm] = [p.grad.clone() for p in lora]
            assert norms[0] == pytest.approx(torch.cat([g.flatten() for g in lora_grads]).norm().item(), rel=1e-6)
        for a, b in zip(results["none"], results["crepa"]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert torch.cat([g.flatten() for g in results["crepa"]]).norm().item() == pytest.approx(1.0, rel=1e-5)
        assert projector[0].grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    finally:
        AcceleratorState._reset_state(True)


def test_per_part_clipping_unscales_fp16_gradients_once():
    """Under fp16 mixed precision (GradScaler) the step's gradients are unscaled once, then each part is clipped:
    clipping part after part with accelerate's clip_grad_norm_ would unscale twice (a RuntimeError on GPUs)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from crepa_diffusers.training_utils import clip_grad_norms

    torch.manual_seed(0)
    lora, projector = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    try:
        accelerator.native_amp, accelerator.scaler = True, torch.amp.GradScaler("cpu", init_scale=1024.0)
        accelerator.prepare(torch.optim.SGD([*lora.parameters(), *projector.parameters()], lr=0.1))
        x = torch.randn(3, 4)
        loss = lora(x).pow(2).sum() + projector(x).pow(2).sum()
        expected = [
            torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(m.parameters()), retain_graph=True)]).norm()
            for m in (lora, projector)
        ]
        accelerator.scaler.scale(loss).backward()
        norms = clip_grad_norms(accelerator, [list(lora.parameters()), list(projector.parameters())], max_norm=1e9)
        torch.testing.assert_close(torch.stack(norms), torch.stack(expected), rtol=1e-5, atol=0)
        with pytest.raises(RuntimeError, match="unscale_"):  # what per-part accelerate calls would have done
            accelerator.clip_grad_norm_(list(projector.parameters()), 1.0)
    finally:
        AcceleratorState._reset_state(True)
