#!/usr/bin/env python
"""Cross-frame semantic consistency of generated videos, with and without a CREPA LoRA.

    # generate with the base model and with the LoRA (same prompts, same seeds), then score both
    python examples/evaluate_crepa.py --pretrained_model_name_or_path THUDM/CogVideoX-5b \
        --lora cogvideox-lora-crepa --prompts "a panda playing a guitar:::a cat dances" --output_dir eval

    # or score folders of existing videos (one group per folder)
    python examples/evaluate_crepa.py --video_dirs runs/base runs/crepa --output_dir eval

Each frame is embedded with a DINOv2 encoder (the CLS token, as VBench's subject consistency uses DINO's); per video
it reports the cosine similarity of every frame to the previous one (adjacent) and to the first one, and VBench's
subject-consistency formula, the mean over frames i >= 1 of (max(0, adjacent) + max(0, first)) / 2. The features are
DINOv2's, not VBench's DINO ViT-B/16 with its preprocessing: scores are not comparable with published VBench tables,
only between the groups of one report. Writes report.json,
similarity.png (per-frame similarity by group) and grid.mp4 (the groups side by side, one row per video).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".gif"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", help="Base CogVideoX or HunyuanVideo pipeline.")
    parser.add_argument("--lora", action="append", default=[], help="LoRA folder or Hub id (repeat for several).")
    parser.add_argument("--prompts", help="Prompts separated by --prompt_separator, or a text file (one per line).")
    parser.add_argument("--prompt_separator", default=":::")
    parser.add_argument("--video_dirs", nargs="+", help="Score these folders of videos instead of generating.")
    parser.add_argument("--encoder", default="facebook/dinov2-base", help="DINOv2 Hub id or local folder.")
    parser.add_argument("--image_size", type=int, default=224, help="Frames are resized to this square size.")
    parser.add_argument("--output_dir", default="crepa_eval")
    parser.add_argument("--num_frames", type=int, default=49)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=720)
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--guidance_scale", type=float, default=6.0)
    parser.add_argument("--max_sequence_length", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument(
        "--dtype", choices=["bf16", "fp16", "fp32"], default="bf16" if torch.cuda.is_available() else "fp32"
    )
    args = parser.parse_args(argv)
    if not args.video_dirs and not (args.pretrained_model_name_or_path and args.prompts):
        parser.error("give --video_dirs, or --pretrained_model_name_or_path with --prompts (and --lora).")
    return args


# ----------------------------------------------------------------------------------------------------------------
# The metric


class FrameEmbedder:
    """DINOv2 CLS features of frames: uint8 [F, H, W, 3] -> L2-normalised [F, D]."""

    def __init__(self, encoder: str, image_size: int = 224, device: str | torch.device = "cpu") -> None:
        from transformers import AutoModel

        self.model = AutoModel.from_pretrained(encoder).eval().to(device)
        if self.model.config.model_type not in ("dinov2", "dinov2_with_registers"):
            raise SystemExit(f"--encoder {encoder} is a {self.model.config.model_type!r} model, not DINOv2.")
        self.image_size, self.device = image_size, torch.device(device)

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        pixels = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
        pixels = F.interpolate(pixels, size=(self.image_size, self.image_size), mode="bicubic", antialias=True)
        pixels = ((pixels - IMAGENET_MEAN) / IMAGENET_STD).to(self.device, self.model.dtype)
        features = []
        for chunk in pixels.split(16):
            features.append(self.model(pixel_values=chunk).last_hidden_state[:, 0].float().cpu())
        return F.normalize(torch.cat(features), dim=-1)


def consistency(features: torch.Tensor) -> dict:
    """Per-frame adjacent / first-frame cosine similarity of normalised features [F, D], and VBench's subject
    consistency formula: the mean over frames i >= 1 of (max(0, adjacent_i) + max(0, first_i)) / 2."""
    if features.shape[0] < 2:
        raise ValueError("a video needs at least 2 frames to measure consistency")
    adjacent = (features[1:] * features[:-1]).sum(-1)
    first = (features[1:] * features[:1]).sum(-1)
    return {
        "adjacent": adjacent.tolist(),
        "first": first.tolist(),
        "mean_adjacent": adjacent.mean().item(),
        "mean_first": first.mean().item(),
        "subject_consistency": ((adjacent.clamp(min=0) + first.clamp(min=0)) / 2).mean().item(),
    }


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Every frame, upright (a phone clip's display rotation applied), as training reads videos: uint8 [F, H, W, 3]."""
    from crepa_diffusers import read_sample

    return read_sample(path, lambda num_frames: list(range(num_frames))).numpy()


# ----------------------------------------------------------------------------------------------------------------
# Generation


def generate_groups(args) -> dict[str, list[tuple[str, np.ndarray]]]:
    from diffusers import DiffusionPipeline

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if os.path.isfile(args.prompts or ""):
        prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    else:
        prompts = [p.strip() for p in args.prompts.split(args.prompt_separator) if p.strip()]
    pipe = DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    extra = {} if args.max_sequence_length is None else {"max_sequence_length": args.max_sequence_length}

    def render() -> list[tuple[str, np.ndarray]]:
        videos = []
        for prompt in prompts:
            generator = torch.Generator(device=device).manual_seed(args.seed)
            frames = pipe(
                prompt=prompt,
                num_frames=args.num_frames,
                height=args.height,
                width=args.width,
                num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale,
                generator=generator,
                output_type="np",
                **extra,
            ).frames[0]
            videos.append((prompt, (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)))
        return videos

    groups = {"base": render()}
    for i, lora in enumerate(args.lora):
        name = Path(lora).name or f"lora{i}"
        pipe.load_lora_weights(lora, adapter_name=f"eval{i}")
        pipe.set_adapters([f"eval{i}"])
        groups[name] = render()
        pipe.delete_adapters([f"eval{i}"])
    return groups


def load_groups(video_dirs: list[str]) -> dict[str, list[tuple[str, np.ndarray]]]:
    groups = {}
    for directory in video_dirs:
        paths = sorted(p for p in Path(directory).iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        if not paths:
            raise SystemExit(f"--video_dirs {directory}: no videos ({', '.join(sorted(VIDEO_SUFFIXES))}) found.")
        groups[Path(directory).name] = [(p.name, read_video(p)) for p in paths]
    return groups


# ----------------------------------------------------------------------------------------------------------------
# Outputs


def write_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (adjacent, first) = plt.subplots(1, 2, figsize=(11, 4))
    for group, entry in report["groups"].items():
        length = min(len(v["adjacent"]) for v in entry["videos"])
        adjacent.plot(range(1, length + 1), np.mean([v["adjacent"][:length] for v in entry["videos"]], 0), label=group)
        first.plot(range(1, length + 1), np.mean([v["first"][:length] for v in entry["videos"]], 0), label=group)
    adjacent.set_title("similarity to the previous frame"), adjacent.set_xlabel("frame"), adjacent.legend()
    first.set_title("similarity to the first frame"), first.set_xlabel("frame"), first.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_grid(groups: dict[str, list[tuple[str, np.ndarray]]], path: Path, fps: int, height: int = 160) -> None:
    """Groups side by side (columns), one row per video; frames resized to a common height, padded in time."""
    from diffusers.utils import export_to_video

    def fit(frames: np.ndarray) -> torch.Tensor:
        video = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
        width = max(2, round(video.shape[-1] * height / video.shape[-2]) // 2 * 2)
        return F.interpolate(video, size=(height, width), mode="bilinear", antialias=True)

    rows = []
    num_rows = max(len(videos) for videos in groups.values())
    num_frames = max(len(frames) for videos in groups.values() for _, frames in videos)
    for row in range(num_rows):
        cells = []
        for videos in groups.values():
            video = fit(videos[row][1]) if row < len(videos) else torch.zeros(1, 3, height, height)
            index = torch.arange(num_frames).clamp(max=video.shape[0] - 1)  # hold the last frame
            cells.append(video[index])
        rows.append(torch.cat(cells, dim=-1))
    width = max(r.shape[-1] for r in rows)
    grid = torch.cat([F.pad(r, (0, width - r.shape[-1])) for r in rows], dim=-2)
    frames = grid.clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()
    export_to_video([f.astype(np.float32) / 255.0 for f in frames], str(path), fps=fps)


def evaluate(
    groups: dict[str, list[tuple[str, np.ndarray]]],
    embedder: FrameEmbedder,
    output_dir: str | os.PathLike,
    fps: int = 8,
) -> dict:
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    report = {
        "metric": "DINOv2 CLS cosine similarity; subject_consistency = mean_i (max(0, adjacent_i) + max(0, first_i))"
        " / 2 (VBench's formula on DINOv2 features: not comparable with published VBench tables)",
        "groups": {},
    }
    for group, videos in groups.items():
        scored = [
            {"name": name, "num_frames": len(frames), **consistency(embedder(frames))} for name, frames in videos
        ]
        report["groups"][group] = {
            "videos": scored,
            "mean_adjacent": float(np.mean([v["mean_adjacent"] for v in scored])),
            "mean_first": float(np.mean([v["mean_first"] for v in scored])),
            "subject_consistency": float(np.mean([v["subject_consistency"] for v in scored])),
        }
    (output / "report.json").write_text(json.dumps(report, indent=2))
    write_plot(report, output / "similarity.png")
    write_grid(groups, output / "grid.mp4", fps)
    return report


def main(argv=None) -> dict:
    args = parse_args(argv)
    groups = load_groups(args.video_dirs) if args.video_dirs else generate_groups(args)
    embedder = FrameEmbedder(args.encoder, args.image_size, "cuda" if torch.cuda.is_available() else "cpu")
    report = evaluate(groups, embedder, args.output_dir, args.fps)
    for group, entry in report["groups"].items():
        print(
            f"{group:>24}: subject consistency {entry['subject_consistency']:.4f}  "
            f"(adjacent {entry['mean_adjacent']:.4f}, first frame {entry['mean_first']:.4f})"
        )
    print(f"Wrote {Path(args.output_dir) / 'report.json'}, similarity.png, grid.mp4")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
