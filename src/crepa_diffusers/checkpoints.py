"""checkpoint-N folders written atomically (`latest` only ever names a complete one), and the LoRA's adapter metadata."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from torch import nn

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
CHECKPOINT_COMPLETE = "checkpoint_complete.json"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint-N folders, oldest first (a folder without the completion marker is ignored)."""
    root = Path(output_dir)
    found = [(int(match.group(1)), path) for path in (root.iterdir() if root.is_dir() else [])
             if (match := CHECKPOINT_PATTERN.match(path.name)) and (path / CHECKPOINT_COMPLETE).is_file()]
    return [path for _, path in sorted(found)]


def resolve_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str) -> Path | None:
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.warning("--resume_from_checkpoint latest: no complete checkpoint in %s, starting a new run.", output_dir)
            return None
        return checkpoints[-1]
    path = Path(resume_from_checkpoint)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / path
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume_from_checkpoint}: no such folder (looked in {path}). "
                                f"Use \"latest\" or one of: {[p.name for p in list_checkpoints(output_dir)] or 'none found'}.")
    if not (path / CHECKPOINT_COMPLETE).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {path} is incomplete (no {CHECKPOINT_COMPLETE}; the save was "
                                "interrupted).")
    return path


def checkpoint_state(path: Path) -> dict:
    """What the completion marker holds: the global step, and the run state the loop stored (seed, history)."""
    return json.loads((path / CHECKPOINT_COMPLETE).read_text())


def save_checkpoint(accelerator, output_dir: str, global_step: int, total_limit: int | None,
                    run_state: dict | None = None) -> Path:
    """accelerate state into checkpoint-N.tmp, then a completion marker holding the step and `run_state` (JSON: the
    seed, the logged history), then an atomic rename; older checkpoints beyond `total_limit` are removed only after
    the new one is complete. Every process must call this."""
    final = Path(output_dir) / f"checkpoint-{global_step}"
    staging = Path(output_dir) / f".checkpoint-{global_step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    # Under DeepSpeed the engine would also save the frozen base model (GBs): the hooks save the LoRA and projector.
    deepspeed = accelerator.distributed_type == "DEEPSPEED"
    accelerator.save_state(str(staging), **({"exclude_frozen_parameters": True} if deepspeed else {}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (staging / CHECKPOINT_COMPLETE).write_text(json.dumps({**(run_state or {}), "global_step": global_step}))
        if final.exists():  # re-saving the same step (e.g. after a signal at a checkpoint step)
            shutil.rmtree(final)
        os.replace(staging, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                logger.info("Removing checkpoint %s (--checkpoints_total_limit %d)", old, total_limit)
                shutil.rmtree(old)
        logger.info("Saved state to %s", final)
    accelerator.wait_for_everyone()
    return final


# What `load_lora_weights` needs to rebuild the LoRA at its trained scale. Not peft's whole `to_dict()`: diffusers
# builds `LoraConfig(**metadata)`, and fields of a newer peft would be a TypeError for a user on an older one.
LORA_METADATA_FIELDS = ("r", "lora_alpha", "target_modules", "lora_dropout", "bias", "use_dora", "use_rslora",
                        "rank_pattern", "alpha_pattern")


def lora_adapter_metadata(transformer: nn.Module) -> dict:
    """For `save_lora_weights(..., **lora_adapter_metadata(t))`: `load_lora_weights` then restores alpha / rank."""
    config = transformer.peft_config["default"].to_dict()
    return {"transformer_lora_adapter_metadata": {key: config[key] for key in LORA_METADATA_FIELDS if key in config}}
