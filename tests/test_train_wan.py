"""End-to-end runs of examples/train_wan_lora_crepa.py on tiny Wan 2.1 / 2.2 TI2V-5B pipelines and the real clips."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from helpers import (
    WAN_SCRIPT,
    assert_same_trained_weights,
    import_script,
    launch,
    lora_metadata,
    lora_state,
    run_main,
    tiny_train_args,
)
from safetensors.torch import load_file

from crepa_diffusers.training_utils import EpochShuffleSampler, step_generator


# TI2V-5B's VAE compresses 16x and the DiT patches 2x2: a token is 32 pixels, so its clips are 64x96 (a 2x3 grid).
SIZES = {"wan-2.1": ("32", "48"), "wan-2.2-5b": ("64", "96"), "wan-2.2-a14b": ("32", "48")}


def base_args(model, dataset, output_dir, steps=2, extra=()):
    height, width = SIZES[model.name]
    return tiny_train_args(
        model,
        dataset,
        output_dir,
        steps=steps,
        extra=["--max_sequence_length", "16", "--height", height, "--width", width, *extra],
    )


def generate(pipe, model_name="wan-2.1"):
    height, width = SIZES[model_name]
    return pipe(
        "a bunny walks",
        num_frames=9,
        height=int(height),
        width=int(width),
        num_inference_steps=2,
        max_sequence_length=16,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).frames


@pytest.fixture(scope="module")
def wan():
    return import_script(WAN_SCRIPT)


@pytest.mark.parametrize(
    "model_name, mode, block",
    [("wan-2.1", "crepa", 1), ("wan-2.1", "repa", 2), ("wan-2.1", "none", 0), ("wan-2.2-5b", "crepa", 2)],
)
def test_end_to_end(wan, tiny_models, dataset, tmp_path, monkeypatch, model_name, mode, block):
    """The three arms train on Wan 2.1 (REPA with fp8 weights; CREPA on TI2V-5B's 32-pixel tokens, with validation
    videos sampled at the trained --flow_shift); the LoRA loads with WanPipeline.load_lora_weights and changes the
    output; the card and the log say what ran."""
    from diffusers import WanPipeline
    from huggingface_hub import ModelCard

    model = tiny_models[model_name]
    out = tmp_path / "out"
    extra = ["--crepa_mode", mode, "--crepa_block_index", str(block)]
    extra += ["--layerwise_upcasting"] if mode == "repa" else []
    if model_name == "wan-2.2-5b":  # its folder's shift is 5.0: validation must sample with the trained 4.0
        extra += ["--flow_shift", "4", "--validation_prompt", "a cat", "--validation_steps", "2"]
        extra += ["--validation_num_inference_steps", "2", "--report_to", "tensorboard"]
    argv = base_args(model, dataset, out, extra=extra)
    sampled = []
    original = wan.log_validation
    monkeypatch.setattr(
        wan,
        "log_validation",
        lambda pipe, *a, **k: sampled.append(pipe.scheduler.config.flow_shift) or original(pipe, *a, **k),
    )
    if mode == "crepa" and model_name == "wan-2.1":  # as users run it; the others in this process
        launch(WAN_SCRIPT, argv, tmp_path)
    else:
        run_main(wan, argv)
    if model_name == "wan-2.2-5b":
        assert sampled == [4.0, 4.0]  # the step-2 validation and the final pipeline with the LoRA loaded
        assert sorted(p.name.split("_")[0] for p in out.glob("*.mp4")) == ["test", "validation"]
        assert list((out / "logs").rglob("events.out.tfevents.*"))

    state = lora_state(out)
    assert state and all(
        re.match(r"transformer\.blocks\.\d+\.attn[12]\.(to_[qkv]|to_out\.0)\.lora_[AB]", k) for k in state
    )
    assert {k.split(".")[3] for k in state} == {"attn1", "attn2"}  # self- and cross-attention, as finetrainers
    assert lora_metadata(out)["lora_alpha"] == 8
    comfy = load_file(str(out / "pytorch_lora_weights_comfyui.safetensors"))  # Wan's original names, for ComfyUI
    assert len(comfy) == len(state) * 3 // 2  # lora_A, lora_B and an .alpha per layer
    assert all(
        re.match(r"diffusion_model\.blocks\.\d+\.(self|cross)_attn\.[qkvo]\.(lora_[AB]\.weight|alpha)$", k)
        for k in comfy
    )

    card = ModelCard.load(out / "README.md")
    assert {"crepa", "wan", "lora", "text-to-video"} <= set(card.data.tags)
    settings = card.data.to_dict()["crepa"]
    assert settings["crepa_mode"] == mode and settings["crepa_block_index"] == block
    assert settings["crepa_lambda"] == 0.5

    log = json.loads((out / "training_log.json").read_text())
    assert len(log) == 2 and all(np.isfinite(row["loss"]) for row in log)
    assert all(("crepa_loss" in row) == (mode != "none") for row in log)

    pipe = WanPipeline.from_pretrained(model)
    before = generate(pipe, model_name)
    pipe.load_lora_weights(out)
    assert np.abs(generate(pipe, model_name) - before).max() > 1e-4, "the trained LoRA does not change the output"


def test_flow_matching_loss_matches_independent_computation(wan, tiny_models, dataset, tmp_path):
    """Step 1's logged diffusion loss equals MSE(transformer(x_t), noise - x0), recomputed here from the same random
    draws (u, then noise): x0 the VAE's mean normalised with latents_mean / latents_std, u logit-normal and the sigma
    shifted by the folder's flow_shift 3.0, x_t = (1 - s) x0 + s noise, UMT5 embeddings zero after the prompt."""
    from diffusers import WanPipeline

    model = tiny_models["wan-2.1"]
    out = tmp_path / "out"
    longer = ["--max_sequence_length", "32"]  # longer than the prompt: its embeddings end in padding
    run_main(wan, base_args(model, dataset, out, steps=1, extra=["--crepa_mode", "none", *longer]))
    logged = json.loads((out / "training_log.json").read_text())[0]["diffusion_loss"]

    pipe = WanPipeline.from_pretrained(model)
    args = wan.parse_args(base_args(model, dataset, out))
    items = wan.load_video_items(args)
    first = next(iter(EpochShuffleSampler(len(items), seed=0)))
    example = wan.VideoDataset(items, args)[first]
    frames = example["frames"][None]
    generator = step_generator(0, 0, 0, torch.device("cpu"))
    with torch.no_grad():
        x0 = pipe.vae.encode(frames.permute(0, 2, 1, 3, 4)).latent_dist.mean  # Wan's VAE encode: the mean
        mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)
        x0 = (x0 - mean) / std
        ids = pipe.tokenizer(
            [example["prompt"]], padding="max_length", max_length=32, truncation=True, return_tensors="pt"
        )
        assert 0 < ids.attention_mask.sum() < 32
        embeds = pipe.text_encoder(ids.input_ids, ids.attention_mask).last_hidden_state
        embeds = embeds * ids.attention_mask[..., None]  # Wan's padding: zeros after the prompt's tokens
        u = torch.sigmoid(torch.randn(1, generator=generator))  # logit-normal (0, 1)
        grid = 1 - torch.arange(1000) / 1000
        sigma = (3.0 * grid / (1 + 2.0 * grid))[int(u * 1000)]  # shift 3, the folder's flow_shift
        noise = torch.randn(x0.shape, generator=generator)
        x_t = (1 - sigma) * x0 + sigma * noise
        prediction = pipe.transformer(
            hidden_states=x_t, timestep=(sigma * 1000)[None], encoder_hidden_states=embeds, return_dict=False
        )[0]
    expected = torch.mean((prediction - (noise - x0)) ** 2).item()
    assert logged == pytest.approx(expected, rel=1e-4)
    # The same tolerance tells the right target and normalisation from the wrong ones.
    for wrong in ((prediction - (x0 - noise)), (prediction - noise), (prediction - (noise - x0 * std - mean))):
        assert logged != pytest.approx(torch.mean(wrong**2).item(), rel=1e-4)


def test_resume_matches_uninterrupted_run(wan, tiny_models, dataset, tmp_path):
    model = tiny_models["wan-2.1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_main(wan, base_args(model, dataset, straight, steps=4, extra=["--checkpointing_steps", "2"]))
    run_main(wan, base_args(model, dataset, resumed, steps=2, extra=["--checkpointing_steps", "2"]))
    run_main(
        wan,
        base_args(
            model,
            dataset,
            resumed,
            steps=4,
            extra=["--checkpointing_steps", "2", "--resume_from_checkpoint", "latest"],
        ),
    )
    assert_same_trained_weights(straight, resumed, "checkpoint-4")


def test_lora_layers_regex_targets_blocks_only(wan, tiny_models):
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    config = WanTransformer3DModel.load_config(tiny_models["wan-2.1"], subfolder="transformer")
    with init_empty_weights():
        transformer = WanTransformer3DModel.from_config(config)
    pattern = re.compile(wan.lora_target_regex("attn1.to_q,ffn.net.0.proj,proj_out", transformer))
    assert pattern.fullmatch("blocks.2.attn1.to_q")
    assert pattern.fullmatch("blocks.0.ffn.net.0.proj")
    assert pattern.fullmatch("proj_out")
    assert not pattern.fullmatch("blocks.2.attn2.to_q")  # a dotted name picks self-attention only
    assert not pattern.fullmatch("condition_embedder.text_embedder.linear_1")
    with pytest.raises(SystemExit, match="'norm_q'.*matched no module"):
        wan.lora_target_regex("to_q,norm_q", transformer)


def edited_copy(source, target, subfolder, **changes):
    """A copy of a tiny pipeline folder whose `subfolder`/config.json (or model_index.json) has `changes`."""
    shutil.copytree(source, target)
    path = target / subfolder / "config.json" if subfolder else target / "model_index.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return target


@pytest.mark.parametrize(
    "subfolder, changes, extra, message",
    [
        ("", {"boundary_ratio": 0.875}, [], r"a Wan 2\.2 A14B pipeline \(two experts.*--wan22_expert high_noise"),
        (None, {}, ["--wan22_expert", "low_noise"], r"--wan22_expert low_noise: .* has one transformer"),
        (None, {}, ["--height", "48"], r"--height 48 is not a multiple of 32 \(VAE x16 times patch size 2\)"),
        (None, {}, ["--max_sequence_length", "16", "--crepa_block_index", "3"], r"--crepa_block_index 3.*3 blocks"),
    ],
)
def test_bad_model_or_flags_stop_before_weights_load(
    wan, tiny_models, dataset, tmp_path, monkeypatch, subfolder, changes, extra, message
):
    """A two-expert checkpoint without --wan22_expert (or the flag without one), a size the model cannot take, a block
    it does not have: a message naming the folder or flag, before any weights load (image-to-video checkpoints:
    test_user_defects.py, with the other scripts)."""
    from diffusers import WanTransformer3DModel

    model = tiny_models["wan-2.2-5b" if "--height" in extra else "wan-2.1"]
    if subfolder is not None:
        model = edited_copy(model, tmp_path / model.name, subfolder, **changes)

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the check")

    monkeypatch.setattr(WanTransformer3DModel, "from_pretrained", no_weights)
    with pytest.raises(SystemExit, match=message):
        run_main(wan, base_args(model, dataset, tmp_path / "out", extra=extra))


@pytest.mark.parametrize("expert", ["high_noise", "low_noise"])
def test_wan22_a14b_trains_one_expert_on_its_timesteps(wan, tiny_models, dataset, tmp_path, monkeypatch, expert):
    """--wan22_expert trains `transformer` on t >= 875 (boundary_ratio 0.875) or `transformer_2` below, as
    WanPipeline switches them; the LoRA loads into that expert (load_into_transformer_2 for the low-noise one) and
    changes the output; validation prompts are refused (sampling needs both experts)."""
    from diffusers import WanPipeline, WanTransformer3DModel

    model, out = tiny_models["wan-2.2-a14b"], tmp_path / "out"
    timesteps, original = [], WanTransformer3DModel.forward

    def recording_forward(self, hidden_states, timestep, *args, **kwargs):
        timesteps.append(float(timestep[0]))
        return original(self, hidden_states, timestep, *args, **kwargs)

    monkeypatch.setattr(WanTransformer3DModel, "forward", recording_forward)
    # u drawn mostly outside the expert's range (most of it > 0.3 for high_noise, < 0.3 for low_noise): only the
    # restriction to the expert's part of the table keeps every timestep on its side of 875.
    against = ["--flow_logit_mean", "2" if expert == "high_noise" else "-2"]
    run_main(wan, base_args(model, dataset, out, steps=6, extra=["--wan22_expert", expert, *against]))
    assert len(timesteps) == 6
    assert all(t >= 875 for t in timesteps) if expert == "high_noise" else all(t < 875 for t in timesteps)
    monkeypatch.setattr(WanTransformer3DModel, "forward", original)

    pipe = WanPipeline.from_pretrained(model)
    trained, other = (
        (pipe.transformer_2, pipe.transformer) if expert == "low_noise" else (pipe.transformer, pipe.transformer_2)
    )
    before = generate(pipe, "wan-2.2-a14b")
    pipe.load_lora_weights(out, **({"load_into_transformer_2": True} if expert == "low_noise" else {}))
    assert any("lora" in name for name, _ in trained.named_parameters())
    assert not any("lora" in name for name, _ in other.named_parameters())
    assert np.abs(generate(pipe, "wan-2.2-a14b") - before).max() > 1e-4
    with pytest.raises(SystemExit, match="--validation_prompt with --wan22_expert"):
        run_main(
            wan,
            base_args(
                model, dataset, tmp_path / "v", extra=["--wan22_expert", expert, "--validation_prompt", "a cat"]
            ),
        )
