"""What a run leaves for people: validation videos (mp4, tensorboard, wandb), the model card, the loss plot, the
Hub upload."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

def _tensorboard_gif_summary(tag: str, frames, fps: int):
    import io

    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    images = [Image.fromarray(frame) for frame in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    height, width = frames[0].shape[:2]
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=buffer.getvalue())
    return Summary(value=[Summary.Value(tag=tag, image=image)])


def log_validation_videos(accelerator, videos: list, prompts: list[str], output_dir: str, phase: str, step: int, fps: int) -> list[Path]:
    """Each video (a list of PIL frames or uint8 arrays) to an mp4 in output_dir, and to wandb and tensorboard."""
    import numpy as np
    from diffusers.utils import export_to_video

    paths = []
    for i, (video, prompt) in enumerate(zip(videos, prompts)):
        safe = re.sub(r"[^A-Za-z0-9_-]+", "_", prompt[:25]).strip("_") or "prompt"
        path = Path(output_dir) / f"{phase}_video_{i}_{safe}.mp4"
        export_to_video(video, str(path), fps=fps)
        paths.append(path)
        frames = [np.asarray(frame) for frame in video]
        if frames and frames[0].dtype != np.uint8:
            frames = [(np.clip(f, 0, 1) * 255).round().astype(np.uint8) for f in frames]
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                writer = tracker.writer
                writer._get_file_writer().add_summary(_tensorboard_gif_summary(f"{phase}/video_{i}", frames, fps), step)
                writer.add_text(f"{phase}/prompt_{i}", prompt, step)
                writer.flush()
            elif tracker.name == "wandb":
                import wandb

                tracker.log({phase: [wandb.Video(str(path), caption=f"{i}: {prompt}", format="mp4")]}, step=step)
    return paths


def write_model_card(
    output_dir: str,
    *,
    repo_id: str,
    base_model: str,
    model_tags: list[str],
    pipeline_cls_name: str,
    crepa_settings: dict,
    training_settings: dict,
    validation_prompts: list[str],
    video_files: list[Path],
    extra: str = "",
) -> Path:
    """README.md with YAML metadata that huggingface_hub.ModelCard parses."""
    from huggingface_hub import ModelCard, ModelCardData

    # A Hub id ("org/name") links to its page; a local folder is named as it is.
    on_hub = not Path(base_model).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", base_model) is not None
    base_link = f"[{base_model}](https://huggingface.co/{base_model})" if on_hub else f"the local model `{base_model}`"
    widget = [
        {"text": prompt, "output": {"url": Path(video).name}} for prompt, video in zip(validation_prompts, video_files)
    ]
    data = ModelCardData(
        base_model=base_model if on_hub else None,  # the Hub rejects a local path as base_model metadata
        library_name="diffusers",
        license="other",
        tags=["text-to-video", "diffusers-training", "diffusers", "lora", "crepa", "template:sd-lora", *model_tags],
        widget=widget or None,
    )
    data.crepa = crepa_settings
    rows = "\n".join(f"| `{key}` | `{value}` |" for key, value in crepa_settings.items())
    train_rows = "\n".join(f"| `{key}` | `{value}` |" for key, value in training_settings.items())
    prompts = "\n".join(f"- {p}" for p in validation_prompts) or "- (none)"
    videos = "\n".join(f"- [{Path(v).name}]({Path(v).name})" for v in video_files) or "- (none)"
    body = f"""
# {repo_id}

A LoRA for {base_link} trained with **CREPA** (Cross-frame Representation Alignment,
[arXiv 2506.09229](https://arxiv.org/abs/2506.09229)) with crepa-diffusers (`{pipeline_cls_name}`).

## Use

```python
import torch
from diffusers import {pipeline_cls_name}
from diffusers.utils import export_to_video

pipe = {pipeline_cls_name}.from_pretrained("{base_model}", torch_dtype=torch.bfloat16).to("cuda")
pipe.load_lora_weights("{repo_id}", adapter_name="crepa-lora")  # the LoRA scale is stored in the file
video = pipe("{validation_prompts[0] if validation_prompts else 'your prompt'}").frames[0]
export_to_video(video, "output.mp4", fps=8)
```

## CREPA settings

| setting | value |
|---|---|
{rows}

## Training settings

| setting | value |
|---|---|
{train_rows}

## Validation prompts

{prompts}

## Validation videos

{videos}
{extra}
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    path = Path(output_dir) / "README.md"
    card.save(path)
    return path


def hub_repo_id(args: argparse.Namespace) -> str:
    return args.hub_model_id or Path(args.output_dir).name


def create_hub_repo(args: argparse.Namespace) -> str:
    from huggingface_hub import create_repo

    return create_repo(hub_repo_id(args), exist_ok=True, token=args.hub_token).repo_id


def upload_output(args: argparse.Namespace, repo_id: str) -> None:
    from huggingface_hub import upload_folder

    upload_folder(
        repo_id=repo_id,
        folder_path=args.output_dir,
        commit_message="End of training",
        ignore_patterns=["step_*", "epoch_*", "checkpoint-*", ".checkpoint-*", "logs/*", "*.tmp"],
        token=args.hub_token,
    )


def crepa_card_settings(config) -> dict:
    return {
        "crepa_mode": config.mode,
        "crepa_lambda": config.lambda_,
        "crepa_block_index": config.block_index,
        "crepa_adjacent_distance": config.effective_distance,
        "crepa_adjacent_tau": config.tau,
        "crepa_cumulative_neighbors": config.cumulative,
        "crepa_normalize_by_frames": config.normalize_by_frames,
        "crepa_encoder": config.encoder,
        "crepa_projector_dim": config.projector_dim,
        "crepa_frame_pooling": config.frame_pooling,
    }


def training_card_settings(args: argparse.Namespace, global_step: int, model_variant: str) -> dict:
    return {
        "model": model_variant,
        "steps": global_step,
        "rank": args.rank,
        "lora_alpha": args.lora_alpha,
        "learning_rate": args.learning_rate,
        "train_batch_size": args.train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "resolution": f"{args.max_num_frames}x{args.height}x{args.width}",
        "mixed_precision": args.mixed_precision or "accelerate default",
        "optimizer": args.optimizer,
        "seed": args.seed,
    }


def write_loss_plot(history: list[dict], output_dir: str) -> Path | None:
    """loss.png: total / diffusion / CREPA losses and the similarities over steps (from the logged values)."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in history]
    fig, (losses, sims) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "diffusion_loss", "crepa_loss"):
        if key in history[0]:
            losses.plot(steps, [row[key] for row in history], label=key)
    for key in ("similarity_self", "similarity_neighbour"):
        if key in history[0]:
            sims.plot(steps, [row[key] for row in history], label=key)
    losses.set_xlabel("step"), losses.set_title("losses"), losses.legend()
    sims.set_xlabel("step"), sims.set_title("CREPA cosine similarity"), sims.legend() if sims.lines else None
    fig.tight_layout()
    path = Path(output_dir) / "loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    with open(Path(output_dir) / "training_log.json", "w") as handle:
        json.dump(history, handle)
    return path
