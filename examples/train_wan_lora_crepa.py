#!/usr/bin/env python
# coding=utf-8
"""LoRA fine-tuning of Wan 2.1 / 2.2 text-to-video, with the flags and outputs of diffusers' CogVideoX LoRA example.

    accelerate launch examples/train_wan_lora_crepa.py \
        --pretrained_model_name_or_path Wan-AI/Wan2.1-T2V-1.3B-Diffusers --instance_data_root data \
        --caption_column prompts.txt --video_column videos.txt --output_dir wan-lora-crepa ...

Wan 2.1 T2V 1.3B / 14B, Wan 2.2 TI2V-5B (as text-to-video) and one Wan 2.2 A14B expert per run (--wan22_expert).
Flow matching as Wan's trainers do: x_t = (1 - s) x0 + s noise, target noise - x0, s = shift * u / (1 + (shift - 1) u)
with u logit-normal and the folder's sampling shift (--flow_shift; 3.0 for Wan 2.1, 5.0 for TI2V-5B); text from
WanPipeline.encode_prompt (UMT5, each prompt's tokens then zeros up to --max_sequence_length, as Wan expects); x0 the
VAE's mean (Wan's own VAE encode returns it, never a sample), normalised with latents_mean / latents_std, as
WanPipeline undoes it. Needs `pip install crepa-diffusers`.
"""
# CREPA (arXiv 2506.09229) on top of that LoRA recipe: `grep -n "# CREPA"` lists every line it adds or changes.

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import random
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from crepa_diffusers import (
    ConditionCache,
    CrepaConfig,  # CREPA
    CrepaTerm,  # CREPA
    TransformerWithProjector,  # CREPA
    add_crepa_args,  # CREPA
    buckets,
    build_crepa,  # CREPA
    checkpoints,
    comfyui,
    dataset_files,
    memory,
    read_sample,
    token_frame_groups,  # CREPA
    training_utils,
    transformer_blocks,
    write_model_card,
)


logger = logging.getLogger("train_wan_lora_crepa")

VAE_TEMPORAL = 4  # Wan's VAEs: 4x temporal (4k+1 frames -> k+1 latent frames); 8x spatial (2.1), 16x (2.2 TI2V-5B)
DEFAULT_LORA_LAYERS = "to_q,to_k,to_v,to_out.0"


# ----------------------------------------------------------------------------------------------------------------
# Flags: diffusers' names and defaults


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Wan LoRA training with CREPA.")  # CREPA
    model = parser.add_argument_group("Model")
    model.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="Hub id or local folder of the base diffusers pipeline.",
    )
    model.add_argument("--revision", type=str, default=None)
    model.add_argument("--variant", type=str, default=None, help="Variant of the model files, e.g. fp16.")
    model.add_argument("--cache_dir", type=str, default=None)

    data = parser.add_argument_group("Dataset")
    data.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="A Hub dataset id, a local dataset folder, or a .csv/.json/.jsonl/.parquet file with the "
        "caption and video columns.",
    )
    data.add_argument("--dataset_config_name", type=str, default=None)
    data.add_argument(
        "--instance_data_root",
        type=str,
        default=None,
        help="Folder holding the caption and video list files (and the videos they name).",
    )
    data.add_argument(
        "--video_column",
        type=str,
        default="video",
        help="The video-path column, or (with --instance_data_root) the file listing one video per line; "
        ".png/.jpg/.jpeg/.webp paths in it train as one-frame videos.",
    )
    data.add_argument(
        "--image_column",
        type=str,
        default=None,
        help="With --dataset_name: a column of image paths, for rows whose video column is empty (or absent).",
    )
    data.add_argument(
        "--video_resolution_buckets",
        nargs="+",
        default=None,
        metavar="FxHxW",
        help="Frames x height x width buckets, e.g. 49x512x768 49x768x512 17x512x768: each video trains in the "
        "bucket closest to its aspect ratio among those it has the frames for (the longest), resized to cover it "
        "and cropped (--video_reshape_mode); each batch from one bucket. Default: --max_num_frames x --height x "
        "--width.",
    )
    data.add_argument(
        "--image_resolution_buckets",
        nargs="+",
        default=None,
        metavar="HxW",
        help="Height x width buckets of the still images, e.g. 512x768 768x512 (default: the video buckets' sizes).",
    )
    data.add_argument(
        "--caption_column",
        type=str,
        default="text",
        help="The caption column, or (with --instance_data_root) the file listing one prompt per line.",
    )
    data.add_argument("--id_token", type=str, default=None, help="Prepended to every training prompt.")
    data.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="Workers that decode videos in the background (0: in the main process).",
    )
    data.add_argument(
        "--skip_invalid_videos",
        action="store_true",
        help="Drop missing, unreadable or too-short videos with a warning instead of stopping.",
    )

    val = parser.add_argument_group("Validation")
    val.add_argument(
        "--validation_prompt",
        type=str,
        default=None,
        help="One or more prompts separated by --validation_prompt_separator.",
    )
    val.add_argument("--validation_prompt_separator", type=str, default=":::")
    val.add_argument("--num_validation_videos", type=int, default=1)
    val.add_argument("--validation_epochs", type=int, default=50, help="Validate every N epochs.")
    val.add_argument(
        "--validation_steps",
        type=int,
        default=None,
        help="Validate every N optimizer steps (in addition to --validation_epochs).",
    )
    val.add_argument("--validation_num_inference_steps", type=int, default=50)
    val.add_argument(
        "--validation_guidance_scale",
        type=float,
        default=5.0,
        help="Classifier-free guidance of the validation videos (WanPipeline's default 5.0).",
    )

    train = parser.add_argument_group("Training")
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--rank", type=int, default=128, help="LoRA rank.")
    train.add_argument("--lora_alpha", type=float, default=128, help="LoRA alpha (scale = alpha / rank).")
    train.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Defaults to the accelerate config; bf16 on GPUs (Wan was trained in bf16).",
    )
    train.add_argument("--output_dir", type=str, default="wan-lora-crepa")
    train.add_argument("--height", type=int, default=480)
    train.add_argument("--width", type=int, default=832)
    train.add_argument(
        "--video_reshape_mode",
        type=str,
        default="center",
        choices=["center", "random", "none", "stretch"],
        help="Crop after resizing the short side: center, random, or none (a random crop, as in diffusers' "
        "script); stretch resizes to --height x --width ignoring the aspect ratio.",
    )
    train.add_argument("--fps", type=int, default=16, help="Validation videos' frame rate (Wan 2.1: 16, TI2V-5B: 24).")
    train.add_argument("--max_num_frames", type=int, default=81, help="Frames per clip (4k+1).")
    train.add_argument("--skip_frames_start", type=int, default=0)
    train.add_argument("--skip_frames_end", type=int, default=0)
    train.add_argument("--random_flip", action="store_true", help="Horizontally flip clips with probability 0.5.")
    train.add_argument("--train_batch_size", type=int, default=4)
    train.add_argument("--num_train_epochs", type=int, default=1)
    train.add_argument("--max_train_steps", type=int, default=None)
    train.add_argument("--checkpointing_steps", type=int, default=500)
    train.add_argument("--checkpoints_total_limit", type=int, default=None)
    train.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='A checkpoint-N folder, or "latest" for the newest complete one in --output_dir.',
    )
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--gradient_checkpointing", action="store_true")
    train.add_argument("--learning_rate", type=float, default=1e-4)
    train.add_argument("--scale_lr", action="store_true")
    train.add_argument("--lr_scheduler", type=str, default="constant")
    train.add_argument("--lr_warmup_steps", type=int, default=500)
    train.add_argument("--lr_num_cycles", type=int, default=1)
    train.add_argument("--lr_power", type=float, default=1.0)
    train.add_argument("--enable_slicing", action="store_true", help="VAE slicing.")
    train.add_argument("--enable_tiling", action="store_true", help="VAE tiling.")
    train.add_argument(
        "--cache_conditions",
        action="store_true",
        help="Before training, encode every clip once (what the frozen encoders give it, e.g. VAE latent mean, UMT5 "
        "text embeddings; under --condition_cache_dir, reused by later runs), then free the GPU of those encoders.",
    )
    train.add_argument(
        "--condition_cache_dir",
        type=str,
        default=None,
        help="Where --cache_conditions keeps its files (default: OUTPUT_DIR/condition_cache).",
    )
    train.add_argument(
        "--layerwise_upcasting",
        action="store_true",
        help="Store the frozen transformer weights in fp8 (float8_e4m3fn) and compute in the training "
        "dtype (diffusers' layerwise casting; the patch and condition embedders, norm layers, output layer and LoRA "
        "stay as they are).",
    )
    mem = parser.add_argument_group("Memory (README: fitting a 12-24 GB card)")
    mem.add_argument(
        "--offload_activations",
        action="store_true",
        help="Keep the gradient-checkpointed block inputs in pinned host memory between forward and backward, "
        "copied on a side CUDA stream while the blocks compute (host RAM: about what it saves on the GPU).",
    )
    mem.add_argument(
        "--blocks_to_swap",
        type=int,
        default=0,
        help="Keep the frozen weights of the last N transformer blocks in pinned host memory and stream each to the "
        "GPU one block ahead of use, in forward and backward (LoRA, norms and the rest stay on the GPU). Needs "
        "--gradient_checkpointing.",
    )
    mem.add_argument(
        "--selective_checkpointing",
        action="store_true",
        help="Gradient checkpointing that keeps each block's attention output and recomputes the rest: fewer FLOPs "
        "in backward, more memory (for large cards).",
    )
    mem.add_argument(
        "--offload_encoders",
        action="store_true",
        help="The frozen encoders and the VAE wait in host memory and visit the GPU one at a time, for their "
        "own forward (with --enable_tiling, the --cache_conditions pass fits the card the step fits).",
    )
    train.add_argument(
        "--max_nonfinite_steps",
        type=int,
        default=5,
        help="Stop after this many optimizer steps in a row with a NaN/inf loss (each is skipped).",
    )
    train.add_argument(
        "--logging_steps",
        type=int,
        default=10,
        help="Read the logged metrics off the device every N steps (each read is a host sync).",
    )

    opt = parser.add_argument_group("Optimizer")
    opt.add_argument("--optimizer", type=lambda s: s.lower(), default="adam", choices=["adam", "adamw", "prodigy"])
    opt.add_argument("--use_8bit_adam", action="store_true")
    opt.add_argument("--adam_beta1", type=float, default=0.9)
    opt.add_argument("--adam_beta2", type=float, default=0.95)
    opt.add_argument("--prodigy_beta3", type=float, default=None)
    opt.add_argument("--prodigy_decouple", action="store_true")
    opt.add_argument("--adam_weight_decay", type=float, default=1e-04)
    opt.add_argument("--adam_epsilon", type=float, default=1e-08)
    opt.add_argument("--max_grad_norm", type=float, default=1.0)
    opt.add_argument("--prodigy_use_bias_correction", action="store_true")
    opt.add_argument("--prodigy_safeguard_warmup", action="store_true")

    other = parser.add_argument_group("Other")
    other.add_argument("--tracker_name", type=str, default=None)
    other.add_argument("--push_to_hub", action="store_true")
    other.add_argument("--hub_token", type=str, default=None)
    other.add_argument("--hub_model_id", type=str, default=None)
    other.add_argument("--logging_dir", type=str, default="logs")
    other.add_argument("--allow_tf32", action="store_true")
    other.add_argument("--report_to", type=str, default=None, help='"tensorboard", "wandb" or "all".')

    wan = parser.add_argument_group("Wan")
    wan.add_argument("--max_sequence_length", type=int, default=512, help="UMT5 prompt tokens (WanPipeline's 512).")
    wan.add_argument(
        "--flow_shift",
        type=float,
        default=None,
        help="Shift of the flow-matching sigmas, in training and validation (default: the folder's sampling "
        "scheduler's flow_shift: 3.0 for Wan 2.1, 5.0 for TI2V-5B; the Wan authors sample 720p with 5.0).",
    )
    wan.add_argument(
        "--flow_weighting_scheme",
        choices=["none", "logit_normal", "mode"],
        default="logit_normal",
        help="Density of u before the shift: logit-normal (musubi-tuner's Wan --timestep_sampling shift), uniform, "
        "or SD3's mode.",
    )
    wan.add_argument("--flow_logit_mean", type=float, default=0.0, help="> 0: less noise (diffusers' sign).")
    wan.add_argument("--flow_logit_std", type=float, default=1.0)
    wan.add_argument("--flow_mode_scale", type=float, default=1.29)
    wan.add_argument(
        "--wan22_expert",
        choices=["high_noise", "low_noise"],
        default=None,
        help="Wan 2.2 A14B (two experts): the one this run trains, on its timesteps only: high_noise = `transformer` "
        "(t >= boundary_ratio x 1000), low_noise = `transformer_2` (below). Train each in its own run.",
    )
    wan.add_argument(
        "--lora_layers",
        type=str,
        default=DEFAULT_LORA_LAYERS,
        help="Comma-separated layers to adapt inside the blocks (a name or its dotted suffix): to_q,to_k,to_v,"
        "to_out.0 take self- and cross-attention; attn1.to_q ... only self-attention; ffn.net.0.proj,ffn.net.2 the "
        "feed-forward; proj_out also takes the output layer.",
    )
    add_crepa_args(  # CREPA: the --crepa_* flags
        parser,  # CREPA
        default_lambda=0.5,  # CREPA
        default_block_index=8,  # CREPA
        block_index_help="Wan's blocks (0..29 for 1.3B and TI2V-5B, 0..39 for 14B).",  # CREPA
        defaults_source="SimpleTuner's VIDEO_CREPA.md default for Wan and LTXVideo; no paper reports Wan",  # CREPA
    )  # CREPA
    args = parser.parse_args(input_args)

    # Errors that need no model, argparse-style, naming the flag.
    if args.dataset_name is None and args.instance_data_root is None:
        parser.error("give --instance_data_root (prompt/video list files) or --dataset_name.")
    if (args.max_num_frames - 1) % VAE_TEMPORAL != 0:
        parser.error(f"--max_num_frames {args.max_num_frames}: the video VAEs take 4k+1 frames (e.g. 49, 81, 9).")
    for flag in (
        "train_batch_size",
        "gradient_accumulation_steps",
        "num_train_epochs",
        "checkpointing_steps",
        "rank",
        "logging_steps",
        "max_nonfinite_steps",
        "validation_epochs",
        "max_num_frames",
        "max_train_steps",
        "validation_steps",
        "validation_num_inference_steps",
        "height",
        "width",
        "fps",
    ):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    nonnegative = ("skip_frames_start", "skip_frames_end", "lr_warmup_steps", "dataloader_num_workers")
    for flag in (*nonnegative, "num_validation_videos", "lora_alpha"):  # 0 videos: no validation, as in diffusers
        if getattr(args, flag) < 0 or (flag == "lora_alpha" and args.lora_alpha == 0):
            parser.error(f"--{flag} must be {'> 0' if flag == 'lora_alpha' else '>= 0'}, got {getattr(args, flag)}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        parser.error(f"--checkpoints_total_limit must be >= 1, got {args.checkpoints_total_limit}.")
    if args.cache_conditions and (args.random_flip or args.video_reshape_mode in ("random", "none")):
        parser.error(
            "--cache_conditions reuses each clip's features, so the clip must not change between epochs: "
            "drop --random_flip / --video_reshape_mode random or none (both crop at random), or the cache."
        )
    if args.flow_shift is not None and args.flow_shift <= 0:
        parser.error(f"--flow_shift must be > 0, got {args.flow_shift}.")
    if args.report_to in ("wandb", "all") and args.hub_token is not None:
        parser.error("--report_to wandb with --hub_token would expose the token: log in with `hf auth login`.")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Dataset: (video, prompt) pairs from list files, a CSV/JSON/Parquet file or a Hub dataset, decoded lazily


@dataclass(frozen=True)
class VideoItem:
    path: Path
    prompt: str
    bucket: tuple[int, int, int] | None = None  # (frames, height, width) it trains at; None: the flags' size


DATA_FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _read_lines(path: Path, flag: str) -> list[str]:
    if not path.is_file():
        raise SystemExit(f"{flag}: {path} does not exist (one entry per line is expected).")
    try:  # UTF-8 with or without the byte-order mark some editors write
        return [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except UnicodeDecodeError as error:
        raise SystemExit(f"{flag}: {path} is not UTF-8 text ({error.reason} at byte {error.start}): save it as UTF-8.")


def load_video_items(args: argparse.Namespace) -> list[VideoItem]:
    """diffusers' two sources: --instance_data_root with list files named by --caption_column / --video_column, or
    --dataset_name (a Hub id, a folder, or a .csv/.json/.jsonl/.parquet file) with those columns. Relative video
    paths resolve against --instance_data_root, else against the dataset file's folder."""
    if args.dataset_name is None:
        root = Path(args.instance_data_root)
        if not root.is_dir():
            raise SystemExit(f"--instance_data_root {root} is not a folder.")
        prompts = _read_lines(root / args.caption_column, "--caption_column")
        videos = _read_lines(root / args.video_column, "--video_column")
        source = f"{root / args.caption_column} and {root / args.video_column}"
    else:
        import datasets

        local = Path(args.dataset_name)
        if local.is_file():
            builder = DATA_FILE_BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise SystemExit(f"--dataset_name {local}: use a .csv, .json, .jsonl or .parquet file, or a folder.")
            dataset = datasets.load_dataset(builder, data_files=str(local), cache_dir=args.cache_dir)
            default_root = local.parent
        else:
            dataset = datasets.load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir)
            default_root = local if local.is_dir() else Path(".")
        root = Path(args.instance_data_root) if args.instance_data_root else default_root
        train = dataset["train"]
        media = [c for c in (args.video_column, args.image_column) if c in train.column_names]  # video, else image
        for flag, column in (("--caption_column", args.caption_column), ("--video_column", args.video_column)):
            if column not in train.column_names and not (flag == "--video_column" and media):
                raise SystemExit(
                    f"{flag} {column!r} is not a column of {args.dataset_name}: its columns are {train.column_names}."
                )
        prompts = [str(p).strip() for p in train[args.caption_column]]
        if args.image_column in media and isinstance(train.features[args.image_column], datasets.Image):
            train = train.cast_column(args.image_column, datasets.Image(decode=False))  # path/bytes, not PIL
        # Images a Hub dataset holds as bytes are written once under --output_dir, then read like any file.
        paths = [dataset_files(train[c], Path(args.output_dir, "dataset_images")) for c in media]
        videos = [next((path for path in row if path), "") for row in zip(*paths)]
        source = str(args.dataset_name)
    if len(prompts) != len(videos):
        raise SystemExit(
            f"{source}: {len(prompts)} prompts but {len(videos)} videos; each video needs exactly one prompt."
        )
    if not videos:
        raise SystemExit(f"{source}: no videos listed.")
    if args.id_token:
        # diffusers joins id_token + prompt as given; a space here keeps "--id_token TOK" from gluing to the first
        # word, and the rstrip makes diffusers' usual "--id_token 'TOK '" give the same prompts as there.
        prompts = [f"{args.id_token.rstrip()} {prompt}" for prompt in prompts]
    return [VideoItem(Path(v) if Path(v).is_absolute() else root / v, p) for v, p in zip(videos, prompts)]


def sample_frame_indices(num_available: int, max_num_frames: int, skip_start: int = 0, skip_end: int = 0) -> list[int]:
    """diffusers' sampling: skip start/end, an even stride when there are more frames than needed, then drop
    trailing frames so the count is 4k+1."""
    start, end = min(skip_start, num_available), max(0, num_available - skip_end)
    if end <= start:
        indices = [start] if start < num_available else [max(0, num_available - 1)]
    elif end - start <= max_num_frames:
        indices = list(range(start, end))
    else:
        indices = list(range(start, end, (end - start) // max_num_frames))[:max_num_frames]
    return indices[: (len(indices) - 1) // VAE_TEMPORAL * VAE_TEMPORAL + 1]


def resize_and_crop(frames: torch.Tensor, height: int, width: int, mode: str = "center") -> torch.Tensor:
    """[F, C, H, W] -> [F, C, height, width]: resize so the frame covers the target, then crop (center, or at random
    for random and none, as diffusers' script does), or stretch to the target."""
    if mode == "stretch":
        return F.interpolate(frames, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    src_h, src_w = frames.shape[-2:]
    scale = max(height / src_h, width / src_w)
    new_h, new_w = max(height, math.ceil(src_h * scale - 1e-6)), max(width, math.ceil(src_w * scale - 1e-6))
    frames = F.interpolate(frames, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    if mode in ("random", "none"):
        top, left = random.randint(0, new_h - height), random.randint(0, new_w - width)
    else:
        top, left = (new_h - height) // 2, (new_w - width) // 2
    return frames[..., top : top + height, left : left + width]


class VideoDataset(Dataset):
    """One clip per item, decoded when the DataLoader asks (in its workers), never all at start-up:
    {"frames": [F, 3, H, W] in [-1, 1], "prompt": str, "index": int}; with a condition cache, the clip's precomputed
    {"conditions": {name: tensor}} instead of its frames (nothing is decoded)."""

    def __init__(self, items: list[VideoItem], args: argparse.Namespace, cache: ConditionCache | None = None) -> None:
        self.items, self.args, self.cache = items, args, cache

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        args, item = self.args, self.items[index]
        if self.cache is not None:
            return {"conditions": self.cache.load(self.cache.item_key(item)), "prompt": item.prompt, "index": index}
        num_frames, height, width = item.bucket or (args.max_num_frames, args.height, args.width)
        frames = read_sample(  # [F, H, W, C] uint8, upright (phone clips' display rotation applied); a still: F = 1
            item.path, lambda n: sample_frame_indices(n, num_frames, args.skip_frames_start, args.skip_frames_end)
        )
        frames = frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        frames = resize_and_crop(frames, height, width, args.video_reshape_mode).clamp(-1, 1)
        return {"frames": frames.contiguous(), "prompt": item.prompt, "index": index}


def collate_fn(examples: list[dict]) -> dict:
    batch = {
        "prompts": [example["prompt"] for example in examples],
        "indices": torch.tensor([example["index"] for example in examples]),
    }
    if "conditions" in examples[0]:
        return {
            **batch,
            "conditions": {
                name: torch.stack([example["conditions"][name] for example in examples])
                for name in examples[0]["conditions"]
            },
        }
    lengths = {example["frames"].shape[0] for example in examples}
    if len(lengths) > 1:
        raise ValueError(
            f"A batch mixes clips of {sorted(lengths)} frames: with --train_batch_size > 1 every video "
            "needs at least --max_num_frames frames (or use --train_batch_size 1)."
        )
    return {**batch, "frames": torch.stack([example["frames"] for example in examples])}


def random_flip(frames: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each clip of [B, F, C, H, W] horizontally with probability 0.5 (drawn from the step's generator)."""
    flip = torch.rand(frames.shape[0], generator=generator, device=generator.device) < 0.5
    return torch.where(flip.to(frames.device).view(-1, 1, 1, 1, 1), frames.flip(-1), frames)


# ----------------------------------------------------------------------------------------------------------------
# Wan: LoRA targets, flow-matching sigmas, and one step's loss


def lora_target_regex(lora_layers: str, transformer: torch.nn.Module) -> str:
    """peft regex: the named layers (any layer, e.g. to_q, attn1.to_q, ffn.net.0.proj) inside blocks.N, and the
    output layer's proj_out; never the condition embedders. A name matching no layer stops the run."""
    return training_utils.lora_target_regex(lora_layers, transformer, ("blocks",), ("proj_out",))


def sample_flow_sigmas(args, scheduler, batch_size: int, generator: torch.Generator, device):
    """u from the weighting density, then the scheduler's sigma and timestep at that position: the scheduler holds
    1000 sigmas shifted by --flow_shift, s = shift * u / (1 + (shift - 1) * u), the shift WanPipeline samples with
    (its UniPC scheduler's flow_shift). With logit-normal u it is musubi-tuner's Wan recipe (docs/wan.md:
    --timestep_sampling shift --discrete_flow_shift 3.0: sigmoid(randn), then the shift)."""
    if args.flow_weighting_scheme == "logit_normal":
        u = torch.sigmoid(
            torch.randn(batch_size, generator=generator, device=device) * args.flow_logit_std + args.flow_logit_mean
        )
    else:
        u = torch.rand(batch_size, generator=generator, device=device)
        if args.flow_weighting_scheme == "mode":
            u = 1 - u - args.flow_mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if scheduler.sigmas.device != u.device:  # once: indexing CPU tables with a device index would sync every step
        scheduler.sigmas, scheduler.timesteps = scheduler.sigmas.to(u.device), scheduler.timesteps.to(u.device)
    index = (u * len(scheduler.sigmas)).long().clamp(0, len(scheduler.sigmas) - 1)  # an A14B expert: its range only
    return scheduler.sigmas[index], scheduler.timesteps[index]


@dataclass
class Parts:
    """A Wan step's models and settings, built once in main() (anything that drives training_loss can build one)."""

    pipe: object  # WanPipeline: encode_prompt is the text path; vae for the latents
    model: torch.nn.Module  # CREPA: TransformerWithProjector, as prepared by accelerate (DDP/DeepSpeed-wrapped)
    scheduler: object  # the training scheduler (its shifted sigmas)
    weight_dtype: torch.dtype
    device: torch.device
    token_pixels: int  # CREPA: pixels per token side: VAE spatial factor x patch size (16; 32 for TI2V-5B)
    latents_mean: torch.Tensor  # [1, C, 1, 1, 1] on the device, from the VAE config: built once, not per step
    latents_std: torch.Tensor
    args: argparse.Namespace  # flow_*, max_sequence_length, random_flip
    forward_context: object = contextlib.nullcontext()  # around the transformer's forward: memory.ActivationOffload


def encode_conditions(
    frames: torch.Tensor,
    prompts: list[str],
    parts: Parts,
    crepa: CrepaTerm | None = None,  # CREPA
) -> dict[str, torch.Tensor]:
    """What the frozen encoders give a batch: the VAE's latent mean (x0 is the mean: nothing samples, so the
    log-variance is not kept) and the UMT5 embeddings (zeros after each prompt's tokens). Every step; or once per
    clip, before training, with the cache."""
    dtype = parts.weight_dtype
    with torch.no_grad():
        embeds, _ = parts.pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            max_sequence_length=parts.args.max_sequence_length,
            device=parts.device,
            dtype=dtype,
        )
        conditions = {
            "latents": parts.pipe.vae.encode(frames.permute(0, 2, 1, 3, 4).to(dtype)).latent_dist.mean,
            "prompt_embeds": embeds,
        }
    if crepa is not None:  # CREPA: and the DINOv2 features on the DiT's token grid
        # CREPA: the batch's own size (its bucket): DINOv2's patch grid is the DiT's token grid at every size
        grid = (frames.shape[-2] // parts.token_pixels, frames.shape[-1] // parts.token_pixels)  # CREPA
        conditions["features"] = crepa.encode(frames, grid, token_frame_groups(frames.shape[1], VAE_TEMPORAL))  # CREPA
    return conditions


def precompute_conditions(
    items: list[VideoItem],
    todo: list[int],
    args: argparse.Namespace,
    cache: ConditionCache,
    parts: Parts,
    crepa: CrepaTerm | None,  # CREPA
    accelerator,
    prompts: list[str],
    validation_key: str,
    encode_validation: bool,
) -> list[dict] | None:
    """--cache_conditions, the phase before the first step: each rank encodes the clips `todo` of its share (rank r:
    clips r, r + W, ...) whose entries are not already whole on disk (a second or resumed run encodes nothing), and
    the validation prompts' UMT5 embeddings (and the empty negative prompt's). Returns the main process's validation
    inputs (embeddings: the text encoders leave after this), None elsewhere."""
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(VideoDataset(items, args), todo),
        batch_size=1,
        collate_fn=collate_fn,
        num_workers=args.dataloader_num_workers,
    )
    progress = tqdm(loader, desc="Encoding clips", disable=not accelerator.is_local_main_process)
    with training_utils.StopRequest() as stop:  # preemption during the pass: what is written is whole and reused
        for n, batch in enumerate(progress):
            conditions = encode_conditions(batch["frames"].to(parts.device), batch["prompts"], parts, crepa)  # CREPA
            if crepa is not None:  # CREPA: stored in the encoder's dtype (bf16 on GPUs)
                conditions["features"] = conditions["features"].to(crepa.cache_dtype)  # CREPA
            item = items[todo[n]]
            size = cache.save(cache.item_key(item), {k: v[0] for k, v in conditions.items()})
            logger.debug("rank %d encoded clip %d", accelerator.process_index, todo[n])
            if n == 0:  # the disk must hold every entry: checked after the first, not when it fills hours later
                cache.check_space(size, (len(todo) - 1) * accelerator.num_processes)
            if stop.signal is not None:
                logger.warning(
                    "Stopped the --cache_conditions pass after a signal (%d of %d clips encoded); the next "
                    "run reuses them.",
                    n + 1,
                    len(todo),
                )
                sys.exit(stop.exit_status)
    logger.info(
        "--cache_conditions: rank %d encoded %d clips, reused %d",
        accelerator.process_index,
        len(todo),
        len(range(accelerator.process_index, len(items), accelerator.num_processes)) - len(todo),
    )
    accelerator.wait_for_everyone()
    # Validation samples from stored prompt embeddings, with WanPipeline's classifier-free guidance (negative "").
    names = ("prompt_embeds", "negative_prompt_embeds")
    if encode_validation:
        with torch.no_grad():
            embeds_of = {
                i: parts.pipe.encode_prompt(
                    [p],
                    negative_prompt=[""],
                    max_sequence_length=args.max_sequence_length,
                    device=parts.device,
                    dtype=parts.weight_dtype,
                )
                for i, p in enumerate(prompts)
            }
        cache.save(
            validation_key,
            {f"{name}_{i}": tensor[0] for i, tensors in embeds_of.items() for name, tensor in zip(names, tensors)},
        )
    if not (prompts and accelerator.is_main_process):
        return None
    embeds = {name: e[None].to(parts.device) for name, e in cache.load(validation_key).items()}
    return [{name: embeds[f"{name}_{i}"] for name in names} for i in range(len(prompts))]


def training_loss(
    batch: dict,
    generator: torch.Generator,
    parts: Parts,
    crepa: CrepaTerm | None,  # CREPA
    step: int,  # CREPA: for the lambda schedule
    max_train_steps: int,  # CREPA
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch's loss: flow matching, target noise - x0, and the values to log. x0 is the VAE's mean, as Wan's
    own VAE encode returns (Wan2.1 wan/modules/vae.py: `return mu`), normalised per channel,
    (x - latents_mean) / latents_std: WanPipeline undoes exactly this."""
    args, device, dtype = parts.args, parts.device, parts.weight_dtype
    # CREPA: lambda follows --crepa_scheduler by optimizer step; at 0 the encoder, hook and projector do no work.
    use_crepa = crepa is not None and crepa.lambda_at(step, max_train_steps) > 0  # CREPA
    if "conditions" in batch:  # --cache_conditions: encoded before training
        conditions = {name: tensor.to(device, non_blocking=True) for name, tensor in batch["conditions"].items()}
    else:
        frames = batch["frames"].to(device)  # [B, F, 3, H, W] in [-1, 1]: the VAE's input
        if args.random_flip:
            frames = random_flip(frames, generator)
        conditions = encode_conditions(frames, batch["prompts"], parts, crepa if use_crepa else None)  # CREPA
    latents = (conditions["latents"].float() - parts.latents_mean) / parts.latents_std  # [B, C, F, h, w]
    batch_size = latents.shape[0]
    sigmas, timesteps = sample_flow_sigmas(args, parts.scheduler, batch_size, generator, device)
    noise = torch.randn(latents.shape, device=device, dtype=latents.dtype, generator=generator)
    sigma = sigmas.view(-1, 1, 1, 1, 1)
    noisy = (1 - sigma) * latents + sigma * noise
    if use_crepa:  # CREPA
        crepa.prepare(conditions["features"])  # CREPA: this step's DINOv2 features; arms the block hook
    with parts.forward_context:  # --offload_activations: saved tensors to the host
        # One timestep per sample: TI2V-5B's pipeline repeats it per token (`expand_timesteps`), the same values
        # for text-to-video, where no frame is a given image.
        output, projected = parts.model(  # CREPA: the projected block tokens come back beside the output
            hidden_states=noisy.to(dtype),
            timestep=timesteps,
            encoder_hidden_states=conditions["prompt_embeds"],
            return_dict=False,
        )
        model_pred = output[0]  # CREPA: the transformer's own output, as a plain `transformer(...)[0]`
    loss = ((model_pred.float() - (noise - latents)) ** 2).reshape(batch_size, -1).mean(1).mean()
    logs = {"diffusion_loss": loss.detach()}  # CREPA: logged apart from the total
    if projected is not None:  # CREPA: lambda(step) * L_align of the block tokens against the features
        crepa_term, crepa_logs = crepa.loss(projected, step, max_train_steps)  # CREPA
        logs.update(crepa_logs)  # CREPA
        loss = loss + crepa_term  # CREPA: L = L_diffusion + lambda * L_align
    elif crepa is not None:  # CREPA
        logs["crepa_lambda"] = 0.0  # CREPA
    return loss, logs


# ----------------------------------------------------------------------------------------------------------------
# Validation videos: mp4 files in --output_dir, and the trackers (wandb, and tensorboard as animated GIFs)


def _tensorboard_gif(tag: str, frames: list, fps: int):
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    images = [Image.fromarray(frame) for frame in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    height, width = frames[0].shape[:2]
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=buffer.getvalue())
    return Summary(value=[Summary.Value(tag=tag, image=image)])


def log_validation(
    pipe,
    args: argparse.Namespace,
    accelerator,
    prompts: list[str],
    phase: str,
    step: int,
    pipeline_args: dict,
    text_inputs: list[dict] | None = None,
) -> list[Path]:
    """`text_inputs`: per prompt, the pipeline's text arguments (precomputed embeddings under --cache_conditions)."""
    import numpy as np
    from diffusers.utils import export_to_video

    pipe.set_progress_bar_config(disable=True)
    paths = []
    for prompt, text_input in zip(prompts, text_inputs or [{"prompt": prompt} for prompt in prompts]):
        for i in range(args.num_validation_videos):
            generator = torch.Generator(device=accelerator.device).manual_seed((args.seed or 0) + i)
            video = pipe(
                **text_input,
                height=args.height,
                width=args.width,
                num_frames=args.max_num_frames,
                num_inference_steps=args.validation_num_inference_steps,
                generator=generator,
                output_type="np",
                **pipeline_args,
            ).frames[0]
            index = len(paths)
            safe = re.sub(r"[^A-Za-z0-9_-]+", "_", prompt[:25]).strip("_") or "prompt"
            path = Path(args.output_dir) / f"{phase}_video_{index}_{safe}.mp4"
            export_to_video(video, str(path), fps=args.fps)
            paths.append(path)
            frames = [(np.clip(frame, 0, 1) * 255).round().astype(np.uint8) for frame in video]
            for tracker in accelerator.trackers:
                if tracker.name == "tensorboard":  # _get_file_writer: no public call logs a GIF without moviepy
                    tracker.writer._get_file_writer().add_summary(
                        _tensorboard_gif(f"{phase}/video_{index}", frames, args.fps), step
                    )
                    tracker.writer.add_text(f"{phase}/prompt_{index}", prompt, step)
                    tracker.writer.flush()
                elif tracker.name == "wandb":
                    import wandb

                    tracker.log(
                        {phase: [wandb.Video(str(path), caption=f"{index}: {prompt}", format="mp4")]}, step=step
                    )
    logger.info("Validation (%s, step %d): %d videos", phase, step, len(paths))
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Logging: metrics summed on the device, the loss plot and log


class MetricSums:
    """Logged values summed on the device and read once per logging step (each read is a host sync). Each key is
    averaged over the micro-batches that reported it (a step may leave a key out)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, torch.Tensor | float]) -> None:
        for key, value in values.items():
            value = value.detach().float() if isinstance(value, torch.Tensor) else float(value)
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts.get(key, 0) + 1

    def pop_means(self) -> dict[str, float]:
        means = {key: total / self.counts[key] for key, total in self.sums.items()}
        on_device = [key for key, mean in means.items() if isinstance(mean, torch.Tensor)]
        if on_device:  # one host sync for all
            means.update(zip(on_device, torch.stack([means[key] for key in on_device]).tolist()))
        self.sums, self.counts = {}, {}
        return means


def write_loss_plot(history: list[dict], output_dir: str) -> Path | None:
    """loss.png: the losses over steps (from the logged values)."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in history]
    fig, (losses, sims) = plt.subplots(1, 2, figsize=(11, 4))  # CREPA: the similarities beside the losses
    for axes, keys in (
        (losses, ("loss", "diffusion_loss", "crepa_loss")),  # CREPA
        (sims, ("similarity_self", "similarity_neighbour")),  # CREPA
    ):
        for key in keys:  # CREPA: a row lacks the CREPA values where lambda was 0 all through its window
            if any(key in row for row in history):
                axes.plot(steps, [row.get(key, float("nan")) for row in history], label=key)
    losses.set_xlabel("step"), losses.set_title("losses"), losses.legend()
    sims.set_xlabel("step"), sims.set_title("CREPA cosine similarity"), sims.legend() if sims.lines else None  # CREPA
    fig.tight_layout()
    path = Path(output_dir) / "loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    with open(Path(output_dir) / "training_log.json", "w") as handle:
        json.dump(history, handle)
    return path


def get_optimizer(args: argparse.Namespace, params_to_optimize: list[dict]) -> torch.optim.Optimizer:
    if args.optimizer == "prodigy":
        try:
            import prodigyopt
        except ImportError as error:
            raise ImportError("--optimizer prodigy needs `pip install prodigyopt`.") from error
        if args.learning_rate <= 0.1:
            logger.warning("Prodigy usually wants --learning_rate around 1.0, got %s.", args.learning_rate)
        return prodigyopt.Prodigy(
            params_to_optimize,
            betas=(args.adam_beta1, args.adam_beta2),
            beta3=args.prodigy_beta3,
            weight_decay=args.adam_weight_decay,
            eps=args.adam_epsilon,
            decouple=args.prodigy_decouple,
            use_bias_correction=args.prodigy_use_bias_correction,
            safeguard_warmup=args.prodigy_safeguard_warmup,
        )
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError("--use_8bit_adam needs `pip install bitsandbytes` (CUDA).") from error
        optimizer_class = bnb.optim.AdamW8bit if args.optimizer == "adamw" else bnb.optim.Adam8bit
    else:
        optimizer_class = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    return optimizer_class(
        params_to_optimize,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.adam_weight_decay,
    )


# ----------------------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> Path:
    import diffusers
    from accelerate import Accelerator, init_empty_weights
    from accelerate.utils import (
        DistributedDataParallelKwargs,
        DistributedType,
        ProjectConfiguration,
        set_seed,
    )
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params, free_memory
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, UMT5EncoderModel

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logging.getLogger("crepa_diffusers").setLevel(os.environ.get("CREPA_LOG_LEVEL", "INFO").upper())
    logger.setLevel(os.environ.get("CREPA_LOG_LEVEL", "INFO").upper())  # DEBUG: which samples each rank trains on
    base, load = args.pretrained_model_name_or_path, {"revision": args.revision, "cache_dir": args.cache_dir}

    # ---- Checks that need only configs and file headers: fail before any weights load.
    pipeline_config = WanPipeline.load_config(base, **load)
    boundary = pipeline_config.get("boundary_ratio")  # Wan 2.2 A14B: `transformer` above it, `transformer_2` below
    if (boundary is None) != (args.wan22_expert is None):
        raise SystemExit(
            f"{base}: a Wan 2.2 A14B pipeline (two experts, boundary_ratio {boundary}): pick the one to train with "
            "--wan22_expert high_noise or low_noise."
            if boundary is not None
            else f"--wan22_expert {args.wan22_expert}: {base} has one transformer (no boundary_ratio); drop the flag."
        )
    if boundary is not None and args.validation_prompt and args.num_validation_videos:
        raise SystemExit(
            "--validation_prompt with --wan22_expert: sampling needs both experts, and this run trains one. Drop "
            "the prompts and sample the saved LoRA with WanPipeline (load_lora_weights(..., load_into_transformer_2="
            "True) for the low_noise expert)."
        )
    expert = "transformer_2" if args.wan22_expert == "low_noise" else "transformer"  # the transformer this run trains
    config = WanTransformer3DModel.load_config(base, subfolder=expert, **load)
    vae_spatial = AutoencoderKLWan.load_config(base, subfolder="vae", **load).get("scale_factor_spatial") or 8
    patch_t, patch_h, patch_w = config["patch_size"]
    if config["in_channels"] != config["out_channels"] or config.get("image_dim"):
        raise SystemExit(
            f"{base}: {expert}/config.json has in_channels={config['in_channels']}, out_channels="
            f"{config['out_channels']}, image_dim={config.get('image_dim')}: an image-to-video checkpoint (image "
            "latents or CLIP image tokens joined to the input). This script trains text-to-video Wan, e.g. "
            "Wan-AI/Wan2.1-T2V-1.3B-Diffusers or Wan-AI/Wan2.2-TI2V-5B-Diffusers."
        )
    if patch_t != 1 or patch_h != patch_w:
        raise SystemExit(f"patch_size={config['patch_size']} is not supported (Wan uses (1, 2, 2)).")
    multiple = vae_spatial * patch_h
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value <= 0 or value % multiple:
            raise SystemExit(
                f"{flag} {value} is not a multiple of {multiple} (VAE x{vae_spatial} times patch size "
                f"{patch_h}): use e.g. {max(multiple, round(value / multiple) * multiple)}."
            )
    with init_empty_weights():  # a weightless model: every --lora_layers name is checked against its layers
        lora_targets = lora_target_regex(args.lora_layers, WanTransformer3DModel.from_config(config))
    crepa_config = CrepaConfig.from_args(args)  # CREPA: the --crepa_* settings as values
    crepa_config.check(  # CREPA: block index, encoder (from configs)
        config["num_layers"],  # CREPA
        f"Wan ({config['num_layers']} blocks)",  # CREPA
        args.cache_dir,  # CREPA
    )  # CREPA
    video_buckets, image_buckets = buckets.buckets_from_flags(
        args.video_resolution_buckets,
        args.image_resolution_buckets,
        (args.max_num_frames, args.height, args.width),
        VAE_TEMPORAL,
        multiple,
    )
    checkpointing = args.gradient_checkpointing or args.selective_checkpointing
    memory.check_memory_flags(args.blocks_to_swap, config["num_layers"], checkpointing)
    resume_path = checkpoints.resolve_resume_checkpoint(
        args.resume_from_checkpoint,
        args.output_dir,
        args.rank,
        crepa_config.enabled,  # CREPA: projector or not
    )
    items = training_utils.check_videos(  # each sample read as training reads it, and given its bucket
        load_video_items(args),
        args.skip_frames_start + args.skip_frames_end,
        video_buckets,
        image_buckets,
        args.skip_invalid_videos,
    )
    training_utils.check_output_dir(args.output_dir)

    # ---- Accelerator (no --mixed_precision: bf16 on CUDA; on a Mac or a CPU-only machine, accelerate's config)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision or ("bf16" if torch.cuda.is_available() else None),
        log_with=args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=Path(args.output_dir, args.logging_dir)
        ),
        # CREPA: DDP seeks unused parameters (a graph traversal a step) only if a lambda-0 step skips the projector
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=crepa_config.may_skip_steps),  # CREPA
        ],
    )
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed and args.blocks_to_swap:
        raise SystemExit(
            "--blocks_to_swap does not run under DeepSpeed (its engine places the weights): use one or the other."
        )
    if deepspeed and accelerator.state.deepspeed_plugin.deepspeed_config.get("gradient_clipping") in (None, "auto"):
        # The config's "auto" would become accelerate's fixed 1.0: --max_grad_norm decides, as without DeepSpeed.
        accelerator.state.deepspeed_plugin.deepspeed_config["gradient_clipping"] = args.max_grad_norm
    if deepspeed and {"optimizer", "scheduler"} & set(accelerator.state.deepspeed_plugin.deepspeed_config):
        raise SystemExit(
            "The DeepSpeed config has an optimizer/scheduler block: delete it. This script builds both from "
            "--optimizer / --lr_scheduler (it clips the gradients itself and skips non-finite steps)."
        )
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config if deepspeed else {}
    if ds_config.get("train_micro_batch_size_per_gpu") == "auto":  # it reads the loader's batch_size, None: buckets
        ds_config["train_micro_batch_size_per_gpu"] = args.train_batch_size
    if accelerator.mixed_precision == "fp16":
        logger.warning("Wan was trained in bf16; fp16 may overflow: prefer --mixed_precision bf16.")
    args.mixed_precision = accelerator.mixed_precision  # what runs, for the trackers and the card
    resume_state = checkpoints.checkpoint_state(resume_path) if resume_path is not None else {}
    if args.seed is None and resume_state.get("seed") is not None:
        args.seed = resume_state["seed"]
        logger.info("Using seed %d (stored in the checkpoint)", args.seed)
    elif args.seed is None:  # drawn once, the same on every rank, stored in checkpoints and the card
        from accelerate.utils import broadcast_object_list

        args.seed = broadcast_object_list([secrets.randbelow(2**31)])[0]
        logger.info("Using seed %d (drawn: pass --seed %d to repeat this run)", args.seed, args.seed)
    set_seed(args.seed)
    repo_id = None
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.push_to_hub:
            from huggingface_hub import create_repo

            repo_id = create_repo(
                args.hub_model_id or Path(args.output_dir).name, exist_ok=True, token=args.hub_token
            ).repo_id

    # ---- Models: the frozen base in the training dtype, LoRA (fp32) on the blocks' attention projections.
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device
    tokenizer = AutoTokenizer.from_pretrained(base, subfolder="tokenizer", **load)
    prompts = [p.strip() for p in (args.validation_prompt or "").split(args.validation_prompt_separator) if p.strip()]
    prompts = prompts if args.num_validation_videos else []  # --num_validation_videos 0: no validation videos
    # --cache_conditions: the clips of this rank still to encode. With none, and the validation prompts' embeddings
    # stored too, the text encoders are never loaded (a resumed or second run).
    cache = None
    if args.cache_conditions:  # an entry is keyed by every flag its tensors depend on: a changed flag re-encodes
        cache_key_flags = (
            "pretrained_model_name_or_path",
            "revision",
            "variant",
            "height",
            "width",
            "max_num_frames",
            "skip_frames_start",
            "skip_frames_end",
            "video_reshape_mode",
            "crepa_mode",  # CREPA
            "crepa_encoder",  # CREPA
            "crepa_frame_pooling",  # CREPA
            "max_sequence_length",
            "mixed_precision",
        )
        cache = ConditionCache(
            args.condition_cache_dir or Path(args.output_dir, "condition_cache"),
            salt={flag: getattr(args, flag) for flag in cache_key_flags},
        )
    required = {
        "latents",
        "prompt_embeds",
        *(["features"] if crepa_config.enabled else []),  # CREPA
    }
    todo = cache.missing(items, required, accelerator.process_index, accelerator.num_processes) if cache else []
    validation_key = cache.key("validation prompts", prompts) if cache else None
    validates = bool(prompts) and accelerator.is_main_process  # validation videos come from the main process only
    encode_validation = cache is not None and validates and not cache.is_valid(validation_key, {"prompt_embeds_0"})
    need_text = cache is None or bool(todo) or encode_validation
    if not need_text:
        logger.info(
            "--cache_conditions: rank %d has every entry it needs; no text encoder loaded", accelerator.process_index
        )
    text_encoder = (
        UMT5EncoderModel.from_pretrained(base, subfolder="text_encoder", dtype=weight_dtype, **load)
        if need_text
        else None
    )
    transformer = WanTransformer3DModel.from_pretrained(
        base, subfolder=expert, dtype=weight_dtype, variant=args.variant, **load
    )
    vae = AutoencoderKLWan.from_pretrained(base, subfolder="vae", dtype=weight_dtype, variant=args.variant, **load)
    # The Hub folders hold the sampling scheduler (UniPC with flow sigmas); training draws from the same shifted
    # flow-matching sigmas in a FlowMatchEulerDiscreteScheduler's table, and validation samples with the folder's.
    sampling_config = FlowMatchEulerDiscreteScheduler.load_config(base, subfolder="scheduler", **load)
    if args.flow_shift is None:
        args.flow_shift = sampling_config.get("flow_shift") or sampling_config.get("shift") or 3.0
    shift_name = "flow_shift" if "flow_shift" in sampling_config else "shift"  # UniPC's name, or FlowMatchEuler's
    sampling_scheduler = getattr(diffusers, sampling_config["_class_name"]).from_config(
        sampling_config, **{shift_name: args.flow_shift}
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=args.flow_shift)
    if boundary is not None:  # the expert's part of the (descending) table, as WanPipeline switches at t = boundary
        high = scheduler.timesteps >= boundary * scheduler.config.num_train_timesteps
        keep = high if args.wan22_expert == "high_noise" else ~high
        scheduler.sigmas, scheduler.timesteps = scheduler.sigmas[keep], scheduler.timesteps[keep]
    if args.enable_slicing:
        vae.enable_slicing()
    if args.enable_tiling:
        vae.enable_tiling()
    transformer.requires_grad_(False)  # reaches the GPU after the --cache_conditions pass (below), not beside it
    for module in (text_encoder, vae) if need_text else (vae,):
        module.requires_grad_(False)
        module.to("cpu" if args.offload_encoders else device)  # loaded in weight_dtype: no .to(dtype) cast
    if checkpointing:  # --selective_checkpointing keeps the attention outputs
        transformer.enable_gradient_checkpointing(
            memory.selective_checkpointing() if args.selective_checkpointing else None
        )
    transformer.add_adapter(
        LoraConfig(
            r=args.rank,
            lora_alpha=args.lora_alpha,
            init_lora_weights=True,
            target_modules=lora_targets,
        )
    )
    cast_training_params(transformer, dtype=torch.float32)  # LoRA weights train in fp32 over the frozen base
    if args.layerwise_upcasting:  # frozen weights in fp8, upcast per layer (Wan's own skip list: embedders, norms)
        training_utils.enable_fp8_weights(transformer, compute_dtype=weight_dtype)
    # CREPA: frozen DINOv2 + block hook + projector (None for --crepa_mode none)
    crepa = build_crepa(crepa_config, transformer, device, args.cache_dir)  # CREPA
    model = TransformerWithProjector(transformer, crepa)  # CREPA: one trained module for DDP/DeepSpeed/FSDP
    if args.offload_encoders:  # one frozen encoder on the device at a time
        dinov2 = crepa.encoder.encoder if crepa is not None else None  # CREPA: DINOv2 takes its turn too
        memory.offload_models_in_turn([text_encoder, vae, dinov2], device)  # CREPA
    if args.blocks_to_swap:  # after the fp8 cast: the host keeps the stored dtype
        memory.BlockSwap(transformer_blocks(transformer), args.blocks_to_swap, device)

    # accelerate's save_state / load_state write the LoRA (diffusers format) only, never the frozen base.
    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for saved in models:
                unwrapped = accelerator.unwrap_model(saved)
                WanPipeline.save_lora_weights(
                    output_dir,
                    transformer_lora_layers=get_peft_model_state_dict(unwrapped.transformer),  # CREPA
                    **checkpoints.lora_adapter_metadata(unwrapped.transformer),  # CREPA
                )
                if crepa is not None:  # CREPA: and the projector
                    crepa.save_projector(output_dir)  # CREPA
        while weights:
            weights.pop()

    def load_model_hook(models, input_dir):
        while models:
            unwrapped = accelerator.unwrap_model(models.pop())
            lora_state_dict = WanPipeline.lora_state_dict(input_dir)
            lora_state_dict = lora_state_dict[0] if isinstance(lora_state_dict, tuple) else lora_state_dict
            state = {k[len("transformer.") :]: v for k, v in lora_state_dict.items() if k.startswith("transformer.")}
            result = set_peft_model_state_dict(
                unwrapped.transformer,  # CREPA
                convert_unet_state_dict_to_peft(state),
                adapter_name="default",
            )
            if getattr(result, "unexpected_keys", None):
                raise RuntimeError(
                    f"{input_dir}: LoRA keys that do not match this model: {result.unexpected_keys[:5]}"
                )
            missing = [key for key in getattr(result, "missing_keys", []) if "lora_" in key]
            if missing:
                raise RuntimeError(
                    f"{input_dir}: {len(missing)} LoRA tensors missing (e.g. {missing[:3]}): the checkpoint "
                    "is incomplete or from another --rank. Resume from another one."
                )
            if crepa is not None:  # CREPA
                crepa.load_projector(input_dir)  # CREPA

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    lora_params = [p for p in transformer.parameters() if p.requires_grad]
    params_to_optimize = [{"params": lora_params, "lr": args.learning_rate}]
    if crepa is not None:  # CREPA: the projector trains with the LoRA
        params_to_optimize.append({"params": list(crepa.projector.parameters()), "lr": args.learning_rate})  # CREPA
    trained_params = [p for group in params_to_optimize for p in group["params"]]
    # CREPA: the projector clipped apart from the LoRA: the LoRA's update rule is the same for crepa, repa and none
    clipped_parts = [lora_params, list(crepa.projector.parameters()) if crepa is not None else []]  # CREPA
    optimizer = get_optimizer(args, params_to_optimize)

    # ---- Data: decoded lazily by the DataLoader workers; accelerate gives each rank its own shard. The order is a
    # function of (seed, epoch) and the noise of (seed, step, micro-batch, rank), so a resumed run continues exactly.
    seed = args.seed
    # One pipeline object: its encode_prompt is the text path of training, and it renders the validation videos
    # (with its own scheduler: set_timesteps would rewrite the training sigmas).
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=sampling_scheduler,
        expand_timesteps=pipeline_config.get("expand_timesteps", False),
    )
    parts = Parts(
        pipe=pipe,
        model=model,  # CREPA
        scheduler=scheduler,
        weight_dtype=weight_dtype,
        device=device,
        token_pixels=multiple,  # CREPA
        latents_mean=torch.tensor(vae.config.latents_mean, device=device).view(1, -1, 1, 1, 1),
        latents_std=torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1, 1),
        args=args,
        forward_context=memory.ActivationOffload(device) if args.offload_activations else contextlib.nullcontext(),
    )
    pipeline_args = {"guidance_scale": args.validation_guidance_scale, "max_sequence_length": args.max_sequence_length}
    validation_inputs = None
    if cache is not None:  # --cache_conditions: one pass before training; the loop then reads the stored entries
        validation_inputs = precompute_conditions(
            items,
            todo,
            args,
            cache,
            parts,
            crepa,  # CREPA
            accelerator,
            prompts,
            validation_key,
            encode_validation,
        )
        # The frozen encoders leave the GPU for the whole run.
        pipe.text_encoder = text_encoder = vae.encoder = None
        if crepa is not None:  # CREPA
            crepa.free_encoder()  # CREPA: DINOv2 served the pass
        free_memory()
    # The transformer (fp8 already with --layerwise_upcasting) joins the GPU now: with the cache, after the encoders
    # left it, so the two never share it (Wan 14B: 28 GB of bf16 transformer beside 11 GB of UMT5).
    transformer.to(device)
    train_dataset = VideoDataset(items, args, cache)
    # Every batch from one bucket; the same bucket on every rank at each step (accelerate deals rank r its share).
    sampler = buckets.BucketBatchSampler(
        [item.bucket for item in items], args.train_batch_size, seed, accelerator.num_processes
    )
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset,
        batch_sampler=sampler,
        collate_fn=collate_fn,
        num_workers=args.dataloader_num_workers,
    )
    num_update_steps_per_epoch = math.ceil(
        math.ceil(len(train_dataloader) / accelerator.num_processes) / args.gradient_accumulation_steps
    )
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
    if resume_state.get("diffusers_checkpoint"):  # diffusers' example wrote it: its LoRA and schedule, before prepare
        checkpoints.load_diffusers_checkpoint(resume_path, transformer, lr_scheduler, accelerator.num_processes)
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(  # CREPA: model, not transformer
        model,  # CREPA
        optimizer,
        train_dataloader,
        lr_scheduler,
    )
    parts.model = model  # CREPA: the prepared (DDP/DeepSpeed-wrapped) module trains
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)
    if accelerator.is_main_process:
        accelerator.init_trackers(
            args.tracker_name or "wan-lora-crepa",
            # Never the Hub token: tensorboard writes the config into the run's hparams under --output_dir.
            config={
                k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"
            },
        )

    def validate(step: int) -> None:
        if not (prompts and accelerator.is_main_process):
            return
        with torch.no_grad(), torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32):
            log_validation(pipe, args, accelerator, prompts, "validation", step, pipeline_args, validation_inputs)

    global_step, history = 0, []
    if resume_path is not None:
        logger.info("Resuming from %s", resume_path)
        if not resume_state.get("diffusers_checkpoint"):
            accelerator.load_state(
                str(resume_path), **({"load_module_strict": False} if deepspeed else {})
            )  # no frozen base
        global_step, history = resume_state["global_step"], resume_state.get("history", [])
    first_epoch = global_step // num_update_steps_per_epoch
    logger.info(
        "***** Running training: %d videos, %d epochs, %d steps, %d processes (rank %d) *****",
        len(train_dataset),
        args.num_train_epochs,
        args.max_train_steps,
        accelerator.num_processes,
        accelerator.process_index,
    )

    # ---- Training loop
    progress_bar = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    metrics = MetricSums()
    nonfinite = training_utils.NonFiniteSteps(args.max_nonfinite_steps)
    interrupted = False
    micro_batch = 0  # position inside the current gradient-accumulation window
    with training_utils.StopRequest() as stop:
        for epoch in range(first_epoch, args.num_train_epochs):
            if global_step >= args.max_train_steps or interrupted:
                break
            model.train()  # CREPA
            sampler.use_epoch(epoch)
            skip = (global_step - epoch * num_update_steps_per_epoch) * args.gradient_accumulation_steps
            loader = accelerator.skip_first_batches(train_dataloader, skip) if skip > 0 else train_dataloader
            for step, batch in enumerate(loader):
                generator = training_utils.step_generator(
                    seed, global_step, accelerator.process_index, device, micro_batch
                )
                logger.debug(
                    "rank %d step %d samples %s", accelerator.process_index, global_step + 1, batch["indices"].tolist()
                )
                with accelerator.accumulate(model):  # CREPA
                    # CREPA: the CREPA term, and the optimizer step for its lambda schedule
                    loss, logs = training_loss(
                        batch,
                        generator,
                        parts,
                        crepa,  # CREPA
                        global_step,  # CREPA
                        args.max_train_steps,  # CREPA
                    )
                    # A NaN/inf loss on any rank in any micro-batch skips the optimizer step on every rank.
                    nonfinite.add(loss)
                    # DeepSpeed's engine steps inside backward(): there the skip is decided before it.
                    if not deepspeed or nonfinite.step_is_finite(accelerator):
                        accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        if nonfinite.step_is_finite(accelerator):
                            training_utils.clip_grad_norms(accelerator, clipped_parts, args.max_grad_norm)  # CREPA
                            optimizer.step()
                            lr_scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                    metrics.add({"loss": loss.detach(), **logs})
                if not accelerator.sync_gradients:
                    micro_batch += 1
                    continue
                micro_batch = 0
                global_step += 1
                progress_bar.update(1)
                if nonfinite.in_a_row:
                    accelerator.log({"skipped_nonfinite_steps": nonfinite.in_a_row}, step=global_step)
                if global_step % args.logging_steps == 0 or global_step == args.max_train_steps:
                    window_means = {**metrics.pop_means(), "lr": lr_scheduler.get_last_lr()[0]}
                    progress_bar.set_postfix(
                        **{k: f"{v:.4g}" for k, v in window_means.items() if k in ("loss", "crepa_loss")}  # CREPA
                    )
                    accelerator.log(window_means, step=global_step)
                    history.append({"step": global_step, **window_means})
                interrupted = stop.requested(accelerator)
                if global_step % args.checkpointing_steps == 0 or interrupted:
                    checkpoints.save_checkpoint(
                        accelerator,
                        args.output_dir,
                        global_step,
                        args.checkpoints_total_limit,
                        {"seed": args.seed, "history": history},
                    )
                if interrupted:
                    logger.warning(
                        "Stopped at step %d after a signal; resume with --resume_from_checkpoint latest.", global_step
                    )
                    break
                if args.validation_steps and global_step % args.validation_steps == 0:
                    validate(global_step)
                if global_step >= args.max_train_steps:
                    break
            if not interrupted and (epoch + 1) % args.validation_epochs == 0:
                validate(global_step)
    progress_bar.close()

    # ---- The LoRA with its metadata and the loss plot; then, once training's models are freed, the final videos
    # from a fresh pipeline with the saved LoRA loaded, the model card and the Hub upload.
    training_utils.check_ranks_agree(accelerator, trained_params)
    accelerator.wait_for_everyone()
    finished = accelerator.is_main_process and not interrupted
    if finished:
        WanPipeline.save_lora_weights(
            args.output_dir,
            transformer_lora_layers=get_peft_model_state_dict(transformer),
            **checkpoints.lora_adapter_metadata(transformer),
        )
        # The same LoRA for ComfyUI's native loader (Wan's original names, an .alpha per layer): exact.
        comfyui.convert_file(args.output_dir)
        for saved in ("pytorch_lora_weights.safetensors", comfyui.COMFYUI_FILE):
            checkpoints.match_umask(Path(args.output_dir, saved))
        write_loss_plot(history, args.output_dir)
    # Free what training held before loading a second pipeline (as diffusers does): two copies would not fit the GPU.
    transformer = text_encoder = vae = pipe = parts = optimizer = lr_scheduler = None
    model = crepa = clipped_parts = None  # CREPA
    train_dataloader = lora_params = trained_params = params_to_optimize = None
    accelerator.free_memory()
    free_memory()
    final_error = None
    if finished:
        videos = []
        if prompts:
            try:
                fresh = WanPipeline.from_pretrained(base, dtype=weight_dtype, variant=args.variant, **load)
                fresh.scheduler = type(sampling_scheduler).from_config(sampling_scheduler.config)  # --flow_shift
                fresh.load_lora_weights(args.output_dir, adapter_name="wan-lora-crepa")  # scale from the metadata
                if args.enable_slicing:
                    fresh.vae.enable_slicing()
                if args.enable_tiling:
                    fresh.vae.enable_tiling()
                videos = log_validation(
                    fresh.to(device), args, accelerator, prompts, "test", global_step, pipeline_args
                )
                del fresh
            except Exception as error:  # the LoRA is saved: the card and the upload still follow, then the error
                logger.exception("The final videos failed; writing the model card (and uploading) without them.")
                final_error = error
        write_model_card(
            args.output_dir,
            repo_id=repo_id or args.hub_model_id or Path(args.output_dir).name,
            base_model=base,
            model_tags=["wan", "wan-video"],
            pipeline_cls_name="WanPipeline",
            crepa_settings=crepa_config.card_settings(),  # CREPA
            training_settings={
                "model": f"Wan ({config['num_layers']} blocks, {config['num_attention_heads']} heads)",
                "steps": global_step,
                "rank": args.rank,
                "lora_alpha": args.lora_alpha,
                "learning_rate": args.learning_rate,
                "train_batch_size": args.train_batch_size,
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "resolution": f"{args.max_num_frames}x{args.height}x{args.width}",
                "video_resolution_buckets": args.video_resolution_buckets,
                "image_resolution_buckets": args.image_resolution_buckets,
                "mixed_precision": args.mixed_precision,
                "optimizer": args.optimizer,
                "seed": args.seed,
                "layerwise_upcasting": args.layerwise_upcasting,
                "flow_shift": args.flow_shift,
                "wan22_expert": args.wan22_expert,
            },
            validation_prompts=prompts,
            video_files=videos,
            extra=comfyui.WAN_CARD_SECTION
            + ("\nLoad it with `load_lora_weights(..., load_into_transformer_2=True)`." * (expert != "transformer"))
            + ("\n## Training curves\n\n![losses](loss.png)\n" if history else ""),
        )
        if args.push_to_hub:
            from huggingface_hub import upload_folder

            # Only what a LoRA repository holds (an allow-list): never the condition cache, checkpoints or logs.
            upload_folder(
                repo_id=repo_id,
                folder_path=args.output_dir,
                commit_message="End of training",
                allow_patterns=[
                    "pytorch_lora_weights.safetensors",
                    comfyui.COMFYUI_FILE,
                    "README.md",
                    "validation_video_*.mp4",
                    "test_video_*.mp4",
                    "loss.png",
                    "training_log.json",
                ],
                token=args.hub_token,
            )
    # Every rank waits until the main one has written everything: a rank that exits early tears down its process
    # group while gloo's threads may still release the last collective's tensors, and the run must not look
    # finished before its files exist.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if final_error is not None:
        raise final_error
    if interrupted:  # a saved checkpoint, not a finished LoRA: 128 + the signal, as a shell reports it
        sys.exit(stop.exit_status)
    return Path(args.output_dir)


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
