"""checkpoint-N folders written atomically (`latest` only ever names a complete one); the LoRA's adapter metadata."""

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
PROJECTOR_FILE = "crepa_projector.safetensors"  # written by term.CrepaTerm.save_projector


def list_checkpoints(output_dir: str | os.PathLike, diffusers: bool = False) -> list[Path]:
    """checkpoint-N folders, oldest first: this project's complete ones (with the completion marker) or, with
    `diffusers`, diffusers' example's."""
    root = Path(output_dir)
    found = [path for path in (root.iterdir() if root.is_dir() else []) if CHECKPOINT_PATTERN.match(path.name)]
    is_wanted = _from_diffusers if diffusers else (lambda path: (path / CHECKPOINT_COMPLETE).is_file())
    return sorted(filter(is_wanted, found), key=lambda path: (_step(path), path))


def _from_diffusers(path: Path) -> bool:
    """Written by diffusers' example (accelerate `save_state` with its LoRA hook): the LoRA file without the adapter
    metadata ours hold, no completion marker, no projector. Never changed here; a cut save of ours is not one."""
    from safetensors import safe_open

    lora = path / "pytorch_lora_weights.safetensors"
    if (path / CHECKPOINT_COMPLETE).exists() or (path / PROJECTOR_FILE).exists() or not lora.is_file():
        return False
    try:
        with safe_open(str(lora), "pt") as handle:
            return "lora_adapter_metadata" not in (handle.metadata() or {})
    except Exception:  # unreadable: not a checkpoint to resume from either way
        return False


def _step(path: Path) -> int:
    return int(CHECKPOINT_PATTERN.match(path.name).group(1))


def resolve_resume_checkpoint(
    resume_from_checkpoint: str | None, output_dir: str, rank: int | None = None, with_projector: bool | None = None
) -> Path | None:
    """The checkpoint to resume from ("latest": the newest complete one, ours or diffusers' example's), or None. The
    refusals below (SystemExit) come before any weights load; `rank` and `with_projector` are checked when given."""
    from safetensors import safe_open

    found, foreign = list_checkpoints(output_dir), list_checkpoints(output_dir, diffusers=True)
    path = None
    if resume_from_checkpoint == "latest" and not found + foreign:
        logger.warning("--resume_from_checkpoint latest: no complete checkpoint in %s: a new run starts", output_dir)
    elif resume_from_checkpoint is not None:
        path = max(found + foreign, key=_step) if resume_from_checkpoint == "latest" else Path(resume_from_checkpoint)
        path = path if path.is_absolute() or path.exists() else Path(output_dir) / path
    flag = f"--resume_from_checkpoint {resume_from_checkpoint}"
    fix = f"use one of {[p.name for p in found + foreign]} or a new run"
    later = [p.name for p in foreign if _step(p) > (_step(path) if path else 0)]
    if later:
        raise SystemExit(
            f"{output_dir} holds {later}, checkpoints another program (diffusers' example?) wrote after the step this "
            f"run starts from: this run would write its own checkpoints where they are, and never changes them. "
            f"Resume from the newest (--resume_from_checkpoint latest) or use another --output_dir."
        )
    if path is None:
        return None
    is_foreign = path.resolve() in {p.resolve() for p in list_checkpoints(path.parent, diffusers=True)}
    if not is_foreign and not (path / CHECKPOINT_COMPLETE).is_file():
        raise SystemExit(
            f"{flag}: no such folder, or incomplete (no {path / CHECKPOINT_COMPLETE}: its save was cut); {fix}."
        )
    if rank is None and with_projector is None:  # nothing to check it against
        return path
    try:
        with safe_open(str(path / "pytorch_lora_weights.safetensors"), "pt") as lora:
            ranks = {lora.get_slice(key).get_shape()[0] for key in lora.keys() if "lora_A" in key}
        has_projector = (path / PROJECTOR_FILE).is_file()
        if has_projector:
            safe_open(str(path / PROJECTOR_FILE), "pt").keys()
    except Exception as error:  # safetensors raises its own errors for truncated or foreign files
        raise SystemExit(f"{flag}: a file in {path} cannot be read ({error}); {fix}.") from None
    if rank is not None and ranks != {rank}:
        raise SystemExit(
            f"{flag}: {path} holds a LoRA of rank {sorted(ranks)}, not --rank {rank}: pass that, or {fix}."
        )
    if not is_foreign and with_projector is not None and has_projector != with_projector:
        raise SystemExit(
            f"{flag}: {path} was saved {'with' if has_projector else 'without'} a CREPA projector, unlike "
            f"this run: match --crepa_mode, or {fix}."
        )
    return path


def checkpoint_state(path: Path) -> dict:
    """What the completion marker holds: the global step, and the run state the loop stored (seed, history). For a
    diffusers-example checkpoint: the step of its folder name (as diffusers reads it) and `diffusers_checkpoint`."""
    if not (path / CHECKPOINT_COMPLETE).is_file():
        return {"global_step": _step(path), "diffusers_checkpoint": True}
    return json.loads((path / CHECKPOINT_COMPLETE).read_text())


def load_diffusers_checkpoint(path: Path, transformer: nn.Module, lr_scheduler, num_processes: int) -> None:
    """Resume from diffusers' example's checkpoint-N, before `accelerator.prepare`: its LoRA into `transformer` (peft,
    adapter "default") and the schedule's position (scheduler.bin, else the step); the rest starts fresh (logged)."""
    import torch
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    lora = load_file(str(path / "pytorch_lora_weights.safetensors"))
    state = convert_unet_state_dict_to_peft({k[len("transformer.") :]: v for k, v in lora.items()})
    result = set_peft_model_state_dict(transformer, state, adapter_name="default")
    missing = [key for key in getattr(result, "missing_keys", []) if "lora_" in key]
    if getattr(result, "unexpected_keys", None) or missing:
        raise SystemExit(
            f"{path}: its LoRA does not fit this run's targets (e.g. {(result.unexpected_keys or missing)[:3]}): "
            "pass the --lora_layers it was trained with (diffusers' example: to_k,to_q,to_v,to_out.0)."
        )
    position = _step(path) * num_processes  # diffusers' loop steps accelerate's scheduler once per process per step
    try:
        position = torch.load(path / "scheduler.bin", weights_only=True)["last_epoch"]
    except Exception as error:  # missing, or a scheduler accelerate did not save as a state dict
        logger.warning("%s: scheduler.bin unreadable (%s); the schedule resumes from the step.", path, error)
    # LambdaLR has no public seek: set what its step() keeps (its load_state_dict needs the other program's
    # saved state, maybe unreadable, and leaves the optimizer's learning rate stale).
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
    scheduler.last_epoch, scheduler._step_count = position, position + 1
    lrs = [base * factor(position) for factor, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
    logger.warning(
        "Resuming from %s, written by diffusers' example: its LoRA, step %d and learning-rate schedule (lr %.3g) are "
        "restored; the optimizer moments, RNG states and data position are not (another program's), the optimizer "
        "and the CREPA projector start fresh and the data order is this script's from that step. Its file keeps no "
        "lora_alpha: the LoRA trains on at --lora_alpha, so pass the one that run used (diffusers' default: --rank).",
        path,
        _step(path),
        lrs[0],
    )


def save_checkpoint(
    accelerator, output_dir: str, global_step: int, total_limit: int | None, run_state: dict | None = None
) -> Path:
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
        match_umask(staging)
        (staging / CHECKPOINT_COMPLETE).write_text(json.dumps({**(run_state or {}), "global_step": global_step}))
        if final.exists() and not (final / CHECKPOINT_COMPLETE).is_file():  # never replace another program's
            raise RuntimeError(f"{final} exists and this project did not write it: it is left untouched.")
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


def match_umask(path: str | os.PathLike) -> None:
    """safetensors writes its files 0600: give them (a file, or every file under a folder) the mode the user's umask
    gives every other output, so a LoRA or checkpoint shared through a group or a web folder is readable."""
    status = Path("/proc/self/status")  # read, not set: os.umask(0) would open a window for other threads' files
    found = re.search(r"Umask:\s*(\d+)", status.read_text()) if status.is_file() else None
    umask = int(found.group(1), 8) if found else 0o022
    for file in [Path(path)] if Path(path).is_file() else Path(path).rglob("*"):
        if file.is_file():
            file.chmod(0o666 & ~umask)


def lora_adapter_metadata(transformer: nn.Module) -> dict:
    """For `save_lora_weights(..., **lora_adapter_metadata(t))`: `load_lora_weights` then restores alpha / rank."""
    # What rebuilds the LoRA at its trained scale. Not peft's whole `to_dict()`: diffusers builds
    # `LoraConfig(**metadata)`, and fields of a newer peft would be a TypeError for a user on an older one.
    fields = "r lora_alpha target_modules lora_dropout bias use_dora use_rslora rank_pattern alpha_pattern".split()
    config = transformer.peft_config["default"].to_dict()
    return {"transformer_lora_adapter_metadata": {key: config[key] for key in fields if key in config}}
