"""Running the example scripts the way users do: `accelerate launch SCRIPT ...` in a subprocess, offline."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file


ROOT = Path(__file__).resolve().parents[1]
COGVIDEOX_SCRIPT = ROOT / "examples" / "train_cogvideox_lora_crepa.py"
HUNYUAN_SCRIPT = ROOT / "examples" / "train_hunyuan_lora_crepa.py"
WAN_SCRIPT = ROOT / "examples" / "train_wan_lora_crepa.py"
# Launched scripts start through this shim: what several CPU ranks need (gloo), kept out of the scripts.
CPU_RANKS = ROOT / "tests" / "cpu_ranks.py"


def offline_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="offline",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="2",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def accelerate_config(directory: Path) -> Path:
    from accelerate.utils import write_basic_config

    path = directory / "accelerate_config.json"
    if not path.exists():
        write_basic_config(mixed_precision="no", save_location=str(path))
    return path


def launch(
    script: Path,
    args: list[str],
    tmp_path: Path,
    check: bool = True,
    env: dict | None = None,
    timeout: int = 600,
    config_file: Path | None = None,
) -> subprocess.CompletedProcess:
    """`accelerate launch` (a basic one-process config unless `config_file`) in `tmp_path`."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_file or accelerate_config(tmp_path)),
        str(CPU_RANKS),
        str(script),
        *args,
    ]
    result = run_in_own_session(script.name, command, tmp_path, env or offline_env(), timeout, subprocess.PIPE)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{script.name} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
        )
    return result


def run_in_own_session(
    name: str, command: list[str], cwd: Path, env: dict, timeout: int, stderr
) -> subprocess.CompletedProcess:
    """Runs `command` (`name` in messages) in a session of its own, so that on a timeout its children (a launcher's
    ranks) are killed with it, never left behind; `stderr`: subprocess.PIPE, or subprocess.STDOUT into stdout."""
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True
    )
    try:
        stdout, errors = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, errors = process.communicate()
        output = errors if stderr == subprocess.PIPE else stdout
        raise AssertionError(f"{name} timed out after {timeout} s:\n{output[-8000:]}") from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, errors)


def run_two_ranks(script: Path, argv: list[str], cwd: Path, timeout: int = 300) -> str:
    """`ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 SCRIPT ...` through the CPU shim: two real gloo ranks,
    both of which must report 2 processes. Its own process group, so that a hang is killed with every rank (not only
    torchrun, leaving ranks behind). Returns the combined log."""
    env = offline_env(ACCELERATE_USE_CPU="true", CREPA_LOG_LEVEL="DEBUG", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(CPU_RANKS), str(script), *argv]
    result = run_in_own_session(f"2-process {script.name}", command, cwd, env, timeout, subprocess.STDOUT)
    log = result.stdout
    assert result.returncode == 0, log[-6000:]
    assert "2 processes (rank 0)" in log and "2 processes (rank 1)" in log
    return log


def samples_per_rank(log: str) -> dict[int, list[list[int]]]:
    """The sample indices each rank trained on at each step (its CREPA_LOG_LEVEL=DEBUG lines)."""
    return {
        rank: [json.loads(s) for s in re.findall(rf"rank {rank} step \d+ samples (\[[\d, ]*\])", log)]
        for rank in (0, 1)
    }


def run_main(script, argv: list[str]):
    """The script's main() in this process (so a test can patch what it calls), accelerate's state reset after."""
    from accelerate.state import AcceleratorState

    try:
        return script.main(script.parse_args(argv))
    finally:
        AcceleratorState._reset_state(True)


def import_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def lora_state(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / "pytorch_lora_weights.safetensors"))


def lora_metadata(directory: Path) -> dict:
    with safe_open(str(Path(directory) / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        metadata = handle.metadata() or {}
    # diffusers stores {"transformer.r": ..., "transformer.lora_alpha": ...} under "lora_adapter_metadata".
    stored = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    return {k[len("transformer.") :]: v for k, v in stored.items() if k.startswith("transformer.")}


def assert_lora_changes_output(pipeline_name: str, model_dir: Path, lora_dir: Path) -> None:
    """The LoRA in `lora_dir` loads into a fresh pipeline of `model_dir` and changes what it generates."""
    import diffusers
    import numpy as np

    pipe = getattr(diffusers, pipeline_name).from_pretrained(model_dir)

    def generate():
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

    before = generate()
    pipe.load_lora_weights(lora_dir)
    assert np.abs(generate() - before).max() > 1e-4, f"the LoRA in {lora_dir} does not change the output"


def tensorboard_tags(log_dir: Path) -> dict[str, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: dict[str, list[str]] = {}
    for event_file in Path(log_dir).rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(event_file), size_guidance={"images": 0, "scalars": 0})
        accumulator.Reload()
        for kind, names in accumulator.Tags().items():
            if isinstance(names, list):
                tags.setdefault(kind, []).extend(names)
    return tags


def tensorboard_images(log_dir: Path, tag: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images = []
    for event_file in Path(log_dir).rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(event_file), size_guidance={"images": 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["images"]:
            images.extend(accumulator.Images(tag))
    return images


def assert_same_trained_weights(run_a: Path, run_b: Path, checkpoint: str) -> None:
    """Final LoRA and the checkpoint's CREPA projector are equal in two runs (e.g. straight vs resumed)."""
    a, b = lora_state(run_a), lora_state(run_b)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    pa = load_file(str(Path(run_a) / checkpoint / "crepa_projector.safetensors"))
    pb = load_file(str(Path(run_b) / checkpoint / "crepa_projector.safetensors"))
    assert pa.keys() == pb.keys() and pa
    for key in pa:
        torch.testing.assert_close(pa[key], pb[key], rtol=1e-5, atol=1e-6)


def text_file_data(dataset: Path) -> list[str]:
    return ["--instance_data_root", str(dataset), "--caption_column", "prompts.txt", "--video_column", "videos.txt"]


def tiny_train_args(
    model: Path,
    dataset: Path,
    output_dir: Path,
    *,
    steps: int = 2,
    data: list[str] | None = None,
    encoder: str = "dinov2",
    extra=(),
) -> list[str]:
    """Flags of a few-step run on a tiny model from `tiny_models` (its DINOv2 sits beside it) and 9x32x48 clips."""
    return [
        "--pretrained_model_name_or_path",
        str(model),
        *(data or text_file_data(dataset)),
        "--crepa_encoder",
        str(Path(model).parent / encoder),
        "--crepa_block_index",
        "1",
        "--crepa_projector_dim",
        "16",
        "--height",
        "32",
        "--width",
        "48",
        "--max_num_frames",
        "9",
        "--train_batch_size",
        "1",
        "--max_train_steps",
        str(steps),
        "--checkpointing_steps",
        "100",
        "--rank",
        "4",
        "--lora_alpha",
        "8",
        "--learning_rate",
        "1e-2",
        "--lr_scheduler",
        "constant",
        "--lr_warmup_steps",
        "0",
        "--seed",
        "0",
        "--mixed_precision",
        "no",
        "--logging_steps",
        "1",
        "--output_dir",
        str(output_dir),
        *extra,
    ]
