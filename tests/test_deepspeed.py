"""DeepSpeed ZeRO-2 with two real ranks on this CPU machine, launched as users do with the shipped config:
`accelerate launch --config_file configs/accelerate_deepspeed_zero2_cpu.yaml SCRIPT ...`."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    COGVIDEOX_SCRIPT,
    HUNYUAN_SCRIPT,
    ROOT,
    assert_lora_changes_output,
    assert_same_trained_weights,
    launch,
    lora_state,
    offline_env,
    tiny_train_args,
)
from safetensors.torch import load_file


pytest.importorskip("deepspeed")  # in the test extras; a user's GPU install may lack it
ZERO2_CPU = ROOT / "configs" / "accelerate_deepspeed_zero2_cpu.yaml"


def zero2(script, argv, tmp_path, check=True, env=None):
    # From the repository root: the YAML names its DeepSpeed JSON by a relative path, as users run it.
    return launch(
        script,
        argv,
        ROOT,
        check=check,
        config_file=ZERO2_CPU,
        timeout=420,
        env=env or offline_env(OMP_NUM_THREADS="1", CREPA_LOG_LEVEL="DEBUG"),
    )


def check_zero2_run(result, out: Path, step: int, pipeline: str, model: Path) -> None:
    """Two ranks trained on different samples with identical weights; checkpoint-`step` holds both ranks' optimizer
    shards, the projector and an engine model copy of the trained parameters only; the LoRA changes the output."""
    log = result.stdout + result.stderr
    assert "2 processes (rank 0)" in log and "2 processes (rank 1)" in log
    samples = {rank: re.findall(rf"rank {rank} step \d+ samples (\[[\d, ]*\])", log) for rank in (0, 1)}
    assert len(samples[0]) == len(samples[1]) == step and samples[0] != samples[1], samples
    assert log.count("Trained weights identical on all 2 ranks") == 2
    checkpoint = out / f"checkpoint-{step}"
    shards = sorted(p.name for p in (checkpoint / "pytorch_model").glob("zero_pp_rank_*_optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert (checkpoint / "crepa_projector.safetensors").is_file()
    # The engine's copy of the model holds the trained parameters only, not the frozen base.
    states = torch.load(checkpoint / "pytorch_model" / "mp_rank_00_model_states.pt", weights_only=False)
    assert states["module"] and all("lora" in k or "projector" in k for k in states["module"])
    # The JSON's "auto" values came from the script's flags.
    config = states["ds_config"]
    assert (config["gradient_clipping"], config["train_micro_batch_size_per_gpu"]) == (0.5, 1)
    assert (config["gradient_accumulation_steps"], config["zero_optimization"]["stage"]) == (1, 2)
    assert_lora_changes_output(pipeline, model, out)


def test_zero2_two_ranks_hunyuan_trains_saves_shards_and_the_lora_loads(tiny_models, dataset, tmp_path):
    out = tmp_path / "out"
    result = zero2(
        HUNYUAN_SCRIPT,
        tiny_train_args(
            tiny_models["hunyuan"],
            dataset,
            out,
            steps=3,
            extra=[
                "--crepa_block_index",
                "2",
                "--max_sequence_length",
                "16",
                "--checkpointing_steps",
                "3",
                "--max_grad_norm",
                "0.5",
            ],
        ),
        tmp_path,
    )
    check_zero2_run(result, out, 3, "HunyuanVideoPipeline", tiny_models["hunyuan"])


def test_zero2_two_ranks_cogvideox_trains_and_resumes_from_latest_as_the_straight_run(tiny_models, dataset, tmp_path):
    model = tiny_models["cogvideox-5b"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["--crepa_block_index", "1", "--max_grad_norm", "0.5"]
    result = zero2(
        COGVIDEOX_SCRIPT,
        tiny_train_args(model, dataset, straight, steps=4, extra=[*common, "--checkpointing_steps", "4"]),
        tmp_path,
    )
    check_zero2_run(result, straight, 4, "CogVideoXPipeline", model)
    zero2(
        COGVIDEOX_SCRIPT,
        tiny_train_args(model, dataset, resumed, steps=2, extra=[*common, "--checkpointing_steps", "2"]),
        tmp_path,
    )
    result = zero2(
        COGVIDEOX_SCRIPT,
        tiny_train_args(
            model,
            dataset,
            resumed,
            steps=4,
            extra=[*common, "--checkpointing_steps", "4", "--resume_from_checkpoint", "latest"],
        ),
        tmp_path,
    )
    assert "Resuming from" in result.stderr
    assert_same_trained_weights(straight, resumed, "checkpoint-4")
    assert any((lora_state(resumed / "checkpoint-2")[k] - v).abs().max() > 0 for k, v in lora_state(resumed).items())


NAN_FROM_THIRD_FORWARD = """
import diffusers

_forward = diffusers.CogVideoXTransformer3DModel.forward
_calls = [0]


def _nan_from_the_third_call(self, *args, **kwargs):
    output = _forward(self, *args, **kwargs)
    _calls[0] += 1
    return (output[0] * float("nan"),) if _calls[0] >= 3 else output


diffusers.CogVideoXTransformer3DModel.forward = _nan_from_the_third_call
"""


@pytest.mark.parametrize("accumulation", [1, 2])
def test_nonfinite_loss_under_deepspeed_is_skipped_or_stops(tiny_models, dataset, tmp_path, accumulation):
    """DeepSpeed steps inside backward(): a NaN loss is caught before it. Without accumulation that step is really
    skipped (checkpoint-3 equals checkpoint-2) until --max_nonfinite_steps stops the run; with accumulation the run
    stops at once with a message. Never a silent update."""
    hook = tmp_path / "nan_hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(NAN_FROM_THIRD_FORWARD)  # every process imports it at start-up
    env = offline_env(OMP_NUM_THREADS="1", PYTHONPATH=str(hook))
    out = tmp_path / "out"
    result = zero2(
        COGVIDEOX_SCRIPT,
        tiny_train_args(
            tiny_models["cogvideox-2b"],
            dataset,
            out,
            steps=6,
            extra=[
                "--checkpointing_steps",
                "1",
                "--max_nonfinite_steps",
                "2",
                "--gradient_accumulation_steps",
                str(accumulation),
            ],
        ),
        tmp_path,
        check=False,
        env=env,
    )
    assert result.returncode != 0
    if accumulation == 2:
        assert "cannot be skipped" in result.stderr
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
        return
    assert "NaN/inf for 2 optimizer steps in a row" in result.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    for name in ("pytorch_lora_weights.safetensors", "crepa_projector.safetensors"):
        good, skipped = load_file(str(out / "checkpoint-2" / name)), load_file(str(out / "checkpoint-3" / name))
        for key in good:
            assert torch.isfinite(good[key]).all()
            torch.testing.assert_close(good[key], skipped[key], rtol=0, atol=0)
    first = lora_state(out / "checkpoint-1")
    assert any(not torch.equal(first[k], lora_state(out / "checkpoint-2")[k]) for k in first)
    history = json.loads((out / "checkpoint-3" / "checkpoint_complete.json").read_text())["history"]
    assert [row["step"] for row in history] == [1, 2, 3] and np.isnan(history[2]["loss"])


def test_shipped_multi_gpu_configs_parse_and_name_real_classes():
    """The GPU configs cannot run here (no GPUs; accelerate runs FSDP on no CPU ranks): check what can be checked,
    that accelerate reads them and that the DeepSpeed JSON leaves batch, accumulation and clipping to the scripts."""
    import diffusers.models.transformers.cogvideox_transformer_3d as cogvideox
    from accelerate.commands.config.config_args import load_config_from_file

    fsdp = load_config_from_file(str(ROOT / "configs" / "accelerate_fsdp2_8gpu.yaml"))
    assert fsdp.distributed_type == "FSDP" and fsdp.fsdp_config["fsdp_version"] == 2
    assert hasattr(cogvideox, fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"])
    for name in ("accelerate_deepspeed_zero2.yaml", "accelerate_deepspeed_zero2_cpu.yaml"):
        config = load_config_from_file(str(ROOT / "configs" / name))
        assert config.distributed_type == "DEEPSPEED" and not config.use_cpu
        assert (ROOT / config.deepspeed_config["deepspeed_config_file"]).is_file()
    ds = json.loads((ROOT / "configs" / "deepspeed_zero2.json").read_text())
    assert {ds[k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")} == {
        "auto"
    }
    assert ds["zero_optimization"]["stage"] == 2
