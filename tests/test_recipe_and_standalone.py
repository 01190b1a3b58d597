"""The public recipe for adding CREPA to one's own diffusers loop gives what the script computes, and each training
script runs on its own, copied out of the repository, as users copy diffusers' examples."""

import argparse
import io
import json
import re
import shutil
import tokenize

import pytest
import torch
from helpers import (
    COGVIDEOX_SCRIPT,
    HUNYUAN_SCRIPT,
    ROOT,
    WAN_SCRIPT,
    assert_lora_changes_output,
    import_script,
    launch,
    lora_state,
    tiny_train_args,
)


def readme_recipe() -> str:
    """The code block of README's "Add CREPA to your own diffusers training script", as written there."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Add CREPA to your own diffusers training script") :]
    return section[section.index("```python\n") + len("```python\n") : section.index("```\n", 10)]


def test_readme_recipe_runs_in_a_plain_diffusers_loop_and_matches_the_script(
    tiny_models, dataset, tmp_path, monkeypatch
):
    """README's recipe, executed as written inside a plain diffusers-style CogVideoX loop (tiny models; only
    `crepa_diffusers`' public API, diffusers, peft and accelerate; the script's data pipeline for the batch): step 1
    gives the script's total, diffusion and CREPA losses on the same batch and seed, and follows the lambda schedule."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXTransformer3DModel
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from transformers import AutoTokenizer, T5EncoderModel

    from crepa_diffusers import CrepaTerm
    from crepa_diffusers.training_utils import EpochShuffleSampler, step_generator

    recipe = readme_recipe()
    assert len([line for line in recipe.splitlines() if line.strip()]) <= 25
    model_dir, out = tiny_models["cogvideox-2b"], tmp_path / "out"
    # A linear lambda decay over 4 steps: step 1 (index 0) still trains at the peak, as the recipe must compute it.
    crepa_flags = ["--crepa_scheduler", "linear", "--crepa_warmup_steps", "0"]
    argv = tiny_train_args(model_dir, dataset, out, steps=1, extra=crepa_flags)
    launch(COGVIDEOX_SCRIPT, argv, tmp_path)
    logged = json.loads((out / "training_log.json").read_text())[0]

    # The batch of step 1: the first clip of epoch 0's order, through the script's own dataset.
    script = import_script(COGVIDEOX_SCRIPT)
    script_args = script.parse_args(argv)
    items = script.load_video_items(script_args)
    example = script.VideoDataset(items, script_args)[next(iter(EpochShuffleSampler(len(items), seed=0)))]
    # Three steps of the same batch: step 1 is compared with the script; the lambda of every step with the schedule.
    train_dataloader = torch.utils.data.DataLoader([{"frames": example["frames"], "prompts": example["prompt"]}] * 3)

    # ---- A plain diffusers loop's own parts: models, LoRA, VAE/T5 encoding, noise, v-prediction loss.
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
    generator = step_generator(0, 0, 0, "cpu")

    def encode(frames, prompts):
        with torch.no_grad():
            latents = vae.encode(frames.permute(0, 2, 1, 3, 4)).latent_dist.sample(generator=generator)
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=transformer.config.max_text_seq_length,
                truncation=True,
                add_special_tokens=True,
                return_tensors="pt",
            ).input_ids
            return (latents * vae.config.scaling_factor).permute(0, 2, 1, 3, 4), text_encoder(ids)[0]

    def add_noise(latents):
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        return scheduler.add_noise(latents, noise, timesteps), timesteps

    def diffusion_loss(model_output, noisy, latents, timesteps):
        prediction = scheduler.get_velocity(model_output, noisy, timesteps)
        weights = 1 / (1 - scheduler.alphas_cumprod[timesteps])
        loss = (weights * (prediction - latents) ** 2).mean()
        seen.setdefault("diffusion_loss", []).append(loss.item())
        return loss

    seen = {}
    term_loss = CrepaTerm.loss

    def recorded_term_loss(self, projected, step, max_train_steps):
        term, logs = term_loss(self, projected, step, max_train_steps)
        seen.setdefault("crepa", []).append((term.item(), logs))
        return term, logs

    monkeypatch.setattr(CrepaTerm, "loss", recorded_term_loss)
    parser = argparse.ArgumentParser()
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--max_train_steps", type=int, default=4)
    crepa_argv = argv[argv.index("--crepa_encoder") : argv.index("--height")] + crepa_flags
    monkeypatch.setattr("sys.argv", ["train.py", *crepa_argv])  # what the recipe's parse_args() reads
    lora_params = [p for p in transformer.parameters() if p.requires_grad]
    namespace = {
        "torch": torch,
        "parser": parser,
        "transformer": transformer,
        "accelerator": Accelerator(cpu=True),
        "params_to_optimize": [{"params": lora_params, "lr": 1e-4}],
        "train_dataloader": train_dataloader,
        "encode": encode,
        "add_noise": add_noise,
        "diffusion_loss": diffusion_loss,
    }
    try:
        exec(compile(recipe, "README.md (recipe)", "exec"), namespace)
    finally:
        AcceleratorState._reset_state(True)

    crepa = namespace["crepa"]
    (first_term, crepa_logs), *_ = seen["crepa"]
    # lambda follows --crepa_scheduler linear over --max_train_steps 4: 0.5, 0.375, 0.25 at steps 1, 2, 3.
    assert [logs["crepa_lambda"] for _, logs in seen["crepa"]] == pytest.approx([0.5, 0.375, 0.25])
    assert logged["diffusion_loss"] == pytest.approx(seen["diffusion_loss"][0], rel=1e-5)
    assert logged["crepa_loss"] == pytest.approx(crepa_logs["crepa_loss"].item(), rel=1e-5, abs=1e-7)
    assert logged["crepa_lambda"] == crepa_logs["crepa_lambda"] == 0.5
    assert logged["similarity_self"] == pytest.approx(crepa_logs["similarity_self"].item(), rel=1e-5, abs=1e-7)
    assert logged["loss"] == pytest.approx(seen["diffusion_loss"][0] + first_term, rel=1e-5)
    assert crepa_logs["crepa_loss"].item() != 0
    assert all(p.grad is None for p in crepa.projector.parameters())  # zero_grad ran after the step
    assert any(p.abs().sum() > 0 for name, p in transformer.named_parameters() if "lora_B" in name)  # it stepped


@pytest.mark.parametrize(
    "script_path, model, extra",
    [
        (COGVIDEOX_SCRIPT, "cogvideox-5b", []),
        (HUNYUAN_SCRIPT, "hunyuan", ["--max_sequence_length", "16"]),
        (WAN_SCRIPT, "wan-2.1", ["--max_sequence_length", "16"]),
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
    pipeline = {COGVIDEOX_SCRIPT: "CogVideoXPipeline", HUNYUAN_SCRIPT: "HunyuanVideoPipeline"}.get(
        script_path, "WanPipeline"
    )
    assert_lora_changes_output(pipeline, tiny_models[model], out)


@pytest.mark.parametrize("script_path", [COGVIDEOX_SCRIPT, HUNYUAN_SCRIPT, WAN_SCRIPT])
def test_the_package_lists_everything_the_scripts_import(script_path):
    """A user's own loop finds in `crepa_diffusers.__all__` every name the scripts use: they import nothing else of
    the package, and nothing from its submodules."""
    import ast

    import crepa_diffusers

    imported = {
        (node.module, alias.name)
        for node in ast.walk(ast.parse(script_path.read_text()))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("crepa_diffusers")
        for alias in node.names
    }
    assert imported and {module for module, _ in imported} == {"crepa_diffusers"}
    assert {name for _, name in imported} <= set(crepa_diffusers.__all__)
    assert all(hasattr(crepa_diffusers, name) for name in crepa_diffusers.__all__)


# What only CREPA brings into a script: its names in code, and its words in text (the package's and the scripts' own
# names, such as `crepa_diffusers` or the `cogvideox-lora-crepa` output folder, are not CREPA code).
CREPA_NAMES = {"crepa", "crepa_config", "CrepaConfig", "CrepaTerm", "TransformerWithProjector", "add_crepa_args"}
CREPA_NAMES |= {"build_crepa", "token_frame_groups", "projected", "projector", "dinov2", "clipped_parts", "use_crepa"}
CREPA_WORDS = re.compile(r"crepa|dinov2|projector|lambda", re.IGNORECASE)
PROJECT_NAMES = re.compile(r"crepa_diffusers|crepa-diffusers|lora[-_]crepa|CREPA_LOG_LEVEL", re.IGNORECASE)


def unmarked_crepa_lines(source: str) -> list[int]:
    """Lines that use a CREPA name in code or say a CREPA word in a string, without a `# CREPA` comment."""
    lines, found = source.splitlines(), set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        name = token.type == tokenize.NAME and not PROJECT_NAMES.fullmatch(token.string)
        if name and (token.string in CREPA_NAMES or token.string.startswith("crepa_")):
            found.add(token.start[0])
        elif token.type == tokenize.STRING:  # each line of the string on its own
            for row, text in enumerate(token.string.splitlines(), start=token.start[0]):
                if CREPA_WORDS.search(PROJECT_NAMES.sub("", text)):
                    found.add(row)
    return sorted(row for row in found if "# CREPA" not in lines[row - 1])


def test_crepa_marks_find_an_unmarked_crepa_line():
    source = (
        'import crepa_diffusers\nloss = loss + crepa_term  # CREPA\nloss = loss + crepa_term\nhelp="DINOv2 features"\n'
    )
    assert unmarked_crepa_lines(source) == [3, 4]


@pytest.mark.parametrize("script_path", [COGVIDEOX_SCRIPT, HUNYUAN_SCRIPT, WAN_SCRIPT])
def test_grep_crepa_marks_every_line_crepa_adds(script_path):
    """README: `grep -n "# CREPA"` lists every line CREPA adds to a script: no line uses a CREPA name in code or says
    a CREPA word in its text without the mark."""
    source = script_path.read_text()
    unmarked = [(row, source.splitlines()[row - 1].strip()) for row in unmarked_crepa_lines(source)]
    assert unmarked == []
