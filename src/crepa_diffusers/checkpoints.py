"""checkpoint-N folders written atomically, and the LoRA (diffusers format, with its adapter metadata) and
CREPA projector state inside them."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
CHECKPOINT_COMPLETE = "checkpoint_complete.json"
PROJECTOR_FILE = "crepa_projector.safetensors"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint-N folders, oldest first (a folder without the completion marker is ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in root.iterdir()
        if path.is_dir() and (match := CHECKPOINT_PATTERN.match(path.name)) and (path / CHECKPOINT_COMPLETE).is_file()
    ]
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
        raise FileNotFoundError(
            f"--resume_from_checkpoint {resume_from_checkpoint}: no such folder (looked in {path}). Use \"latest\" "
            f"or one of: {[p.name for p in list_checkpoints(output_dir)] or 'none found'}."
        )
    if not (path / CHECKPOINT_COMPLETE).is_file():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {path} is incomplete (no {CHECKPOINT_COMPLETE}; the save was interrupted)."
        )
    return path


def checkpoint_step(path: Path) -> int:
    return json.loads((path / CHECKPOINT_COMPLETE).read_text())["global_step"]


def save_checkpoint(accelerator, output_dir: str, global_step: int, total_limit: int | None) -> Path:
    """accelerate state into checkpoint-N.tmp, a completion marker last, then an atomic rename; older checkpoints
    beyond `total_limit` are removed only after the new one is complete. Every process must call this."""
    final = Path(output_dir) / f"checkpoint-{global_step}"
    staging = Path(output_dir) / f".checkpoint-{global_step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (staging / CHECKPOINT_COMPLETE).write_text(json.dumps({"global_step": global_step}))
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


def lora_metadata(transformer: nn.Module) -> dict:
    """peft config of the LoRA, so load_lora_weights restores alpha / rank without set_adapters."""
    return {"transformer_lora_adapter_metadata": transformer.peft_config["default"].to_dict()}


def save_lora(pipeline_cls, directory: str | os.PathLike, transformer: nn.Module, dtype: torch.dtype | None = None):
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer)
    if dtype is not None:
        state = {key: value.to(dtype) for key, value in state.items()}
    pipeline_cls.save_lora_weights(directory, transformer_lora_layers=state, **lora_metadata(transformer))


def load_lora_into(pipeline_cls, directory: str | os.PathLike, transformer: nn.Module) -> None:
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state = pipeline_cls.lora_state_dict(directory)
    if isinstance(state, tuple):  # newer diffusers may return (state_dict, metadata)
        state = state[0]
    state = {k[len("transformer."):]: v for k, v in state.items() if k.startswith("transformer.")}
    incompatible = set_peft_model_state_dict(transformer, convert_unet_state_dict_to_peft(state), adapter_name="default")
    unexpected = getattr(incompatible, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"{directory}: LoRA keys that do not match this model: {unexpected[:5]}")


def register_state_hooks(accelerator, pipeline_cls) -> None:
    """accelerate save/load_state writes the LoRA (diffusers format) and the CREPA projector of the
    TransformerWithProjector, not the frozen base model."""
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                model = accelerator.unwrap_model(model)
                save_lora(pipeline_cls, output_dir, model.transformer)
                if model.projector is not None:
                    state = {k: v.detach().contiguous().cpu() for k, v in model.projector.state_dict().items()}
                    save_file(state, os.path.join(output_dir, PROJECTOR_FILE))
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            load_lora_into(pipeline_cls, input_dir, model.transformer)
            if model.projector is not None:
                path = os.path.join(input_dir, PROJECTOR_FILE)
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{path} is missing: this checkpoint was saved without CREPA.")
                model.projector.load_state_dict(load_file(path))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
