"""The model card: README.md with the metadata the Hub parses, every CREPA and training setting, prompts and videos."""

from __future__ import annotations

import argparse
import re
from pathlib import Path


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
        widget=widget or None,
        tags=["text-to-video", "diffusers-training", "diffusers", "lora", "crepa", "template:sd-lora", *model_tags],
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

pipe = {pipeline_cls_name}.from_pretrained("{base_model}", dtype=torch.bfloat16).to("cuda")
pipe.load_lora_weights("{repo_id}", adapter_name="crepa-lora")  # the LoRA scale is stored in the file
video = pipe("{validation_prompts[0] if validation_prompts else "your prompt"}").frames[0]
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

## Validation prompts and videos

{prompts}

{videos}
{extra}
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    card.save(Path(output_dir) / "README.md")
    return Path(output_dir) / "README.md"


def crepa_card_settings(args: argparse.Namespace) -> dict:
    """Every --crepa_* setting of a run by flag name (`crepa_mode: none` for plain LoRA; REPA* shows distance 0)."""
    settings = {key: value for key, value in vars(args).items() if key.startswith("crepa_")}
    return {**settings, "crepa_adjacent_distance": 0 if args.crepa_mode == "repa" else args.crepa_adjacent_distance}


def training_card_settings(args: argparse.Namespace, global_step: int, model_variant: str, **extra) -> dict:
    return {
        "model": model_variant,
        "steps": global_step,
        "rank": args.rank,
        "lora_alpha": args.lora_alpha,
        "learning_rate": args.learning_rate,
        "train_batch_size": args.train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "resolution": f"{args.max_num_frames}x{args.height}x{args.width}",
        "mixed_precision": args.mixed_precision,
        "optimizer": args.optimizer,
        "seed": args.seed,
        "layerwise_upcasting": getattr(args, "layerwise_upcasting", False),
        **extra,
    }
