"""End-to-end runs of examples/train_hunyuan_lora_crepa.py on a tiny HunyuanVideo and the real sample clips."""

import json

import numpy as np
import pytest
import torch
from helpers import (
    HUNYUAN_SCRIPT,
    assert_same_trained_weights,
    import_script,
    launch,
    lora_metadata,
    lora_state,
    run_main,
    tiny_train_args,
)

from crepa_diffusers.training_utils import EpochShuffleSampler, step_generator


def base_args(model, dataset, output_dir, steps=2, extra=()):
    return tiny_train_args(
        model,
        dataset,
        output_dir,
        steps=steps,
        encoder="dinov2-registers",
        extra=["--max_sequence_length", "16", *extra],
    )


def generate(pipe):
    return pipe(
        "a bunny walks",
        num_frames=9,
        height=32,
        width=48,
        num_inference_steps=2,
        max_sequence_length=16,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).frames


@pytest.fixture(scope="module")
def hunyuan():
    return import_script(HUNYUAN_SCRIPT)


@pytest.mark.parametrize("mode, block", [("crepa", 1), ("crepa", 3), ("repa", 2), ("none", 0)])
def test_end_to_end(hunyuan, tiny_models, dataset, tmp_path, mode, block):
    from diffusers import HunyuanVideoPipeline
    from huggingface_hub import ModelCard

    model = tiny_models["hunyuan"]
    out = tmp_path / "out"
    argv = base_args(model, dataset, out, extra=["--crepa_mode", mode, "--crepa_block_index", str(block)])
    if block == 1:  # as users run it; the others in this process (a launch costs ~8 s of imports)
        launch(HUNYUAN_SCRIPT, argv, tmp_path)
    else:
        run_main(hunyuan, argv)

    state = lora_state(out)
    assert all(k.startswith("transformer.") and "lora" in k for k in state)
    assert not [k for k in state if "token_refiner" in k or "context_embedder" in k], "the token refiner got a LoRA"
    assert any(k.startswith("transformer.transformer_blocks.") for k in state)
    assert any(k.startswith("transformer.single_transformer_blocks.") for k in state)
    assert lora_metadata(out)["lora_alpha"] == 8

    card = ModelCard.load(out / "README.md")
    assert {"crepa", "hunyuan-video", "lora", "text-to-video"} <= set(card.data.tags)
    settings = card.data.to_dict()["crepa"]
    assert settings["crepa_mode"] == mode and settings["crepa_block_index"] == block
    assert settings["crepa_lambda"] == 1.0

    log = json.loads((out / "training_log.json").read_text())
    assert len(log) == 2 and all(np.isfinite(row["loss"]) for row in log)
    assert all(("crepa_loss" in row) == (mode != "none") for row in log)

    pipe = HunyuanVideoPipeline.from_pretrained(model)
    before = generate(pipe)
    pipe.load_lora_weights(out)
    assert np.abs(generate(pipe) - before).max() > 1e-4, "the trained LoRA does not change the output"


def test_flow_matching_loss_matches_independent_computation(hunyuan, tiny_models, dataset, tmp_path):
    """Step 1's logged diffusion loss equals MSE(transformer(x_t), noise - x0) with x_t = (1 - s) x0 + s noise,
    recomputed here from the same random draws (VAE sample, then u, then noise) and the scheduler's shifted sigmas."""
    from diffusers import HunyuanVideoPipeline

    model = tiny_models["hunyuan"]
    out = tmp_path / "out"
    run_main(hunyuan, base_args(model, dataset, out, steps=1, extra=["--crepa_mode", "none"]))
    logged = json.loads((out / "training_log.json").read_text())[0]["diffusion_loss"]

    pipe = HunyuanVideoPipeline.from_pretrained(model)
    script = hunyuan
    args = script.parse_args(base_args(model, dataset, out))
    items = script.load_video_items(args)
    first = next(iter(EpochShuffleSampler(len(items), seed=0)))
    example = script.VideoDataset(items, args)[first]
    frames = example["frames"][None]
    generator = step_generator(0, 0, 0, torch.device("cpu"))
    with torch.no_grad():
        x0 = pipe.vae.encode(frames.permute(0, 2, 1, 3, 4)).latent_dist.sample(generator=generator)
        x0 = x0 * pipe.vae.config.scaling_factor
        embeds, pooled, mask = pipe.encode_prompt([example["prompt"]], max_sequence_length=16)
        u = torch.rand(1, generator=generator)
        sigmas = 7.0 * (1 - torch.arange(1000) / 1000) / (1 + 6.0 * (1 - torch.arange(1000) / 1000))  # shift 7
        index = int(u * 1000)
        sigma = sigmas[index]
        torch.testing.assert_close(pipe.scheduler.sigmas[index], sigma)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = (1 - sigma) * x0 + sigma * noise
        prediction = pipe.transformer(
            hidden_states=x_t,
            timestep=(sigma * 1000)[None],
            encoder_hidden_states=embeds,
            encoder_attention_mask=mask,
            pooled_projections=pooled,
            guidance=torch.tensor([1000.0]),
            return_dict=False,
        )[0]
    expected = torch.mean((prediction - (noise - x0)) ** 2).item()
    assert logged == pytest.approx(expected, rel=1e-4)
    # The same tolerance tells the right target from the wrong ones (sign flipped, or epsilon alone).
    for wrong_target in (x0 - noise, noise):
        assert logged != pytest.approx(torch.mean((prediction - wrong_target) ** 2).item(), rel=1e-4)


def test_resume_matches_uninterrupted_run_and_limits_checkpoints(hunyuan, tiny_models, dataset, tmp_path):
    model = tiny_models["hunyuan"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["--crepa_block_index", "2"]
    run_main(
        hunyuan,
        base_args(
            model,
            dataset,
            straight,
            steps=4,
            extra=[*common, "--checkpointing_steps", "1", "--checkpoints_total_limit", "3"],
        ),
    )
    assert sorted(p.name for p in straight.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    run_main(hunyuan, base_args(model, dataset, resumed, steps=2, extra=[*common, "--checkpointing_steps", "2"]))
    run_main(
        hunyuan,
        base_args(
            model,
            dataset,
            resumed,
            steps=4,
            extra=[*common, "--checkpointing_steps", "2", "--resume_from_checkpoint", "checkpoint-2"],
        ),
    )
    assert_same_trained_weights(straight, resumed, "checkpoint-4")


def test_lora_layers_regex_targets_blocks_only(tiny_models):
    import re

    from accelerate import init_empty_weights
    from diffusers import HunyuanVideoTransformer3DModel

    script = import_script(HUNYUAN_SCRIPT)
    config = HunyuanVideoTransformer3DModel.load_config(tiny_models["hunyuan"], subfolder="transformer")
    with init_empty_weights():
        transformer = HunyuanVideoTransformer3DModel.from_config(config)
    pattern = re.compile(script.lora_target_regex("to_q,to_out.0,add_q_proj", transformer))
    assert pattern.fullmatch("transformer_blocks.3.attn.to_q")
    assert pattern.fullmatch("single_transformer_blocks.39.attn.to_q")
    assert pattern.fullmatch("transformer_blocks.0.attn.add_q_proj")
    assert pattern.fullmatch("transformer_blocks.0.attn.to_out.0")
    assert not pattern.fullmatch("context_embedder.token_refiner.refiner_blocks.0.attn.to_q")
    assert not pattern.fullmatch("transformer_blocks.0.attn.to_k")
    assert not pattern.fullmatch("transformer_blocks.0.attn.to_outX0")
