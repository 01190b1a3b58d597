"""The public recipe for adding CREPA to one's own diffusers loop gives what the script computes, and each training
script runs on its own, copied out of the repository, as users copy diffusers' examples."""

import argparse
import json
import shutil

import pytest
import torch
from helpers import (
    COGVIDEOX_SCRIPT,
    HUNYUAN_SCRIPT,
    assert_lora_changes_output,
    import_script,
    launch,
    lora_state,
    tiny_train_args,
)


def test_minimal_loop_with_the_public_api_matches_the_script(tiny_models, dataset, tmp_path):
    """README's recipe, written out here on a tiny CogVideoX with only `crepa_diffusers`' public API (plus diffusers,
    peft and the script's data pipeline for the batch): step 1 gives the same total, diffusion and CREPA losses as
    the script on the same batch and seed."""
    from accelerate.utils import set_seed
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXTransformer3DModel
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from transformers import AutoTokenizer, T5EncoderModel

    from crepa_diffusers import TransformerWithProjector, add_crepa_args, build_crepa, token_frame_groups
    from crepa_diffusers.training_utils import EpochShuffleSampler, step_generator

    model_dir, out = tiny_models["cogvideox-2b"], tmp_path / "out"
    argv = tiny_train_args(model_dir, dataset, out, steps=1)
    launch(COGVIDEOX_SCRIPT, argv, tmp_path)
    logged = json.loads((out / "training_log.json").read_text())[0]

    # The batch of step 1: the first clip of epoch 0's order, through the script's own dataset.
    script = import_script(COGVIDEOX_SCRIPT)
    script_args = script.parse_args(argv)
    items = script.load_video_items(script_args)
    example = script.VideoDataset(items, script_args)[next(iter(EpochShuffleSampler(len(items), seed=0)))]
    frames, prompts = example["frames"][None], [example["prompt"]]

    # ---- The recipe: models, LoRA, the CREPA term, one trained module.
    set_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    text_encoder = T5EncoderModel.from_pretrained(model_dir, subfolder="text_encoder")
    transformer = CogVideoXTransformer3DModel.from_pretrained(model_dir, subfolder="transformer")
    vae = AutoencoderKLCogVideoX.from_pretrained(model_dir, subfolder="vae")
    scheduler = CogVideoXDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    for module in (text_encoder, transformer, vae):
        module.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=8, init_lora_weights=True, target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    )
    cast_training_params(transformer, dtype=torch.float32)
    parser = argparse.ArgumentParser()
    add_crepa_args(parser, default_lambda=0.5)
    crepa_args = parser.parse_args(
        [
            "--crepa_encoder",
            str(model_dir.parent / "dinov2"),
            "--crepa_block_index",
            "1",
            "--crepa_projector_dim",
            "16",
        ]
    )
    crepa = build_crepa(crepa_args, transformer, torch.device("cpu"))
    model = TransformerWithProjector(transformer, crepa)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in crepa.projector.parameters()} <= {id(p) for p in trained}

    # ---- One step of diffusers' CogVideoX loss, plus lambda * L_align.
    generator = step_generator(0, 0, 0, "cpu")
    with torch.no_grad():
        latents = vae.encode(frames.permute(0, 2, 1, 3, 4)).latent_dist.sample(generator=generator)
        latents = (latents * vae.config.scaling_factor).permute(0, 2, 1, 3, 4)
        ids = tokenizer(
            prompts,
            padding="max_length",
            max_length=transformer.config.max_text_seq_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        prompt_embeds = text_encoder(ids)[0]
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    crepa.prepare(
        crepa.encode(frames, (32 // 16, 48 // 16), token_frame_groups(frames.shape[1]))
    )  # before the forward
    output, projected = model(
        hidden_states=noisy, encoder_hidden_states=prompt_embeds, timestep=timesteps, return_dict=False
    )
    prediction = scheduler.get_velocity(output[0], noisy, timesteps)
    weights = 1 / (1 - scheduler.alphas_cumprod[timesteps])
    diffusion_loss = (weights * (prediction - latents) ** 2).mean()
    align_loss, stats = crepa.loss(projected)
    loss = diffusion_loss + crepa.lambda_ * align_loss
    loss.backward()

    assert logged["diffusion_loss"] == pytest.approx(diffusion_loss.item(), rel=1e-5)
    assert logged["crepa_loss"] == pytest.approx(align_loss.item(), rel=1e-5, abs=1e-7)
    assert logged["similarity_self"] == pytest.approx(stats["similarity_self"].item(), rel=1e-5, abs=1e-7)
    assert logged["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert align_loss.item() != 0 and all(p.grad is not None for p in crepa.projector.parameters())


@pytest.mark.parametrize(
    "script_path, model, extra",
    [
        (COGVIDEOX_SCRIPT, "cogvideox-5b", []),
        (HUNYUAN_SCRIPT, "hunyuan", ["--max_sequence_length", "16"]),
    ],
)
def test_script_copied_alone_trains_and_its_lora_loads(tiny_models, dataset, tmp_path, script_path, model, extra):
    """A user copies one script into an empty folder of their own project (crepa-diffusers installed) and launches
    it there with accelerate: it trains, and the LoRA it writes loads into a fresh pipeline and changes its output."""
    workdir = tmp_path / "my_project"
    workdir.mkdir()
    copied = workdir / "train.py"
    shutil.copyfile(script_path, copied)
    out = workdir / "lora"
    launch(copied, tiny_train_args(tiny_models[model], dataset, out, steps=2, extra=extra), workdir)
    assert sorted(p.name for p in workdir.iterdir()) == ["accelerate_config.json", "lora", "train.py"]
    assert lora_state(out)
    pipeline = "CogVideoXPipeline" if script_path == COGVIDEOX_SCRIPT else "HunyuanVideoPipeline"
    assert_lora_changes_output(pipeline, tiny_models[model], out)
