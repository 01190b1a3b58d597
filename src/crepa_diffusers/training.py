"""What both training scripts need and is not model-specific: flags, checks, optimizer, seeded data order and
noise, the CREPA term and the trained module, the optimisation loop, and the end of training (checkpoints:
`checkpoints.py`; videos, card and Hub: `reporting.py`; the condition cache: `cache.py`)."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .cache import ConditionCache
from .checkpoints import checkpoint_step, register_state_hooks, save_checkpoint, save_lora
from .reporting import (
    create_hub_repo,
    crepa_card_settings,
    hub_repo_id,
    log_validation_videos,
    training_card_settings,
    upload_output,
    write_loss_plot,
    write_model_card,
)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Flags (named and defaulted as in diffusers' train_cogvideox_lora.py)


def add_common_args(
    parser: argparse.ArgumentParser,
    *,
    output_dir: str,
    height: int,
    width: int,
    guidance_scale: float,
) -> None:
    model = parser.add_argument_group("Model")
    model.add_argument("--pretrained_model_name_or_path", type=str, required=True,
                       help="Hub id or local folder of the base diffusers pipeline.")
    model.add_argument("--revision", type=str, default=None)
    model.add_argument("--variant", type=str, default=None, help="Variant of the model files, e.g. fp16.")
    model.add_argument("--cache_dir", type=str, default=None)

    data = parser.add_argument_group("Dataset")
    data.add_argument("--dataset_name", type=str, default=None,
                      help="A Hub dataset id, a local dataset folder, or a .csv/.json/.jsonl/.parquet file with the "
                      "caption and video columns.")
    data.add_argument("--dataset_config_name", type=str, default=None)
    data.add_argument("--instance_data_root", type=str, default=None,
                      help="Folder holding the caption and video list files (and the videos they name).")
    data.add_argument("--video_column", type=str, default="video",
                      help="The video-path column, or (with --instance_data_root) the file listing one video per line.")
    data.add_argument("--caption_column", type=str, default="text",
                      help="The caption column, or (with --instance_data_root) the file listing one prompt per line.")
    data.add_argument("--id_token", type=str, default=None, help="Prepended to every training prompt.")
    data.add_argument("--dataloader_num_workers", type=int, default=0,
                      help="Workers that decode videos in the background (0: in the main process).")
    data.add_argument("--skip_invalid_videos", action="store_true",
                      help="Drop missing, unreadable or too-short videos with a warning instead of stopping.")

    val = parser.add_argument_group("Validation")
    val.add_argument("--validation_prompt", type=str, default=None,
                     help="One or more prompts separated by --validation_prompt_separator.")
    val.add_argument("--validation_prompt_separator", type=str, default=":::")
    val.add_argument("--num_validation_videos", type=int, default=1)
    val.add_argument("--validation_epochs", type=int, default=50, help="Validate every N epochs.")
    val.add_argument("--validation_steps", type=int, default=None,
                     help="Validate every N optimizer steps (in addition to --validation_epochs).")
    val.add_argument("--validation_num_inference_steps", type=int, default=50)
    val.add_argument("--guidance_scale", type=float, default=guidance_scale)

    train = parser.add_argument_group("Training")
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--rank", type=int, default=128, help="LoRA rank.")
    train.add_argument("--lora_alpha", type=float, default=128, help="LoRA alpha (scale = alpha / rank).")
    train.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                       help="Defaults to the accelerate config; bf16 is used for models that NaN in fp16.")
    train.add_argument("--output_dir", type=str, default=output_dir)
    train.add_argument("--height", type=int, default=height)
    train.add_argument("--width", type=int, default=width)
    train.add_argument("--video_reshape_mode", type=str, default="center", choices=["center", "random", "none"])
    train.add_argument("--fps", type=int, default=8, help="Frame rate of the validation videos.")
    train.add_argument("--max_num_frames", type=int, default=49, help="Frames per clip (4k+1).")
    train.add_argument("--skip_frames_start", type=int, default=0)
    train.add_argument("--skip_frames_end", type=int, default=0)
    train.add_argument("--random_flip", action="store_true", help="Horizontally flip clips with probability 0.5.")
    train.add_argument("--train_batch_size", type=int, default=4)
    train.add_argument("--num_train_epochs", type=int, default=1)
    train.add_argument("--max_train_steps", type=int, default=None)
    train.add_argument("--checkpointing_steps", type=int, default=500)
    train.add_argument("--checkpoints_total_limit", type=int, default=None)
    train.add_argument("--resume_from_checkpoint", type=str, default=None,
                       help='A checkpoint-N folder, or "latest" for the newest complete one in --output_dir.')
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
    train.add_argument("--cache_conditions", action="store_true",
                       help="Compute the DINOv2 features of each clip and the embedding of each prompt once and reuse "
                       "them in later epochs (saved under --condition_cache_dir).")
    train.add_argument("--condition_cache_dir", type=str, default=None,
                       help="Where --cache_conditions keeps its files (default: OUTPUT_DIR/condition_cache).")
    train.add_argument("--max_nonfinite_steps", type=int, default=5,
                       help="Stop after this many optimizer steps in a row with a NaN/inf loss (each is skipped).")
    train.add_argument("--logging_steps", type=int, default=10,
                       help="Read the logged metrics off the device every N steps (each read is a host sync).")

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


def check_common_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Flag errors that need no model: argparse-style exit naming the flag."""
    if args.dataset_name is None and args.instance_data_root is None:
        parser.error("give --instance_data_root (prompt/video list files) or --dataset_name.")
    if (args.max_num_frames - 1) % 4 != 0:
        parser.error(f"--max_num_frames {args.max_num_frames}: the video VAEs take 4k+1 frames (e.g. 49, 81, 9).")
    for flag in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "checkpointing_steps",
                 "logging_steps", "max_nonfinite_steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        parser.error(f"--checkpoints_total_limit must be >= 1, got {args.checkpoints_total_limit}.")
    if args.cache_conditions and (args.random_flip or args.video_reshape_mode == "random"):
        parser.error("--cache_conditions reuses each clip's features, so the clip must not change between epochs: "
                     "drop --random_flip / --video_reshape_mode random, or the cache.")
    if args.report_to in ("wandb", "all") and args.hub_token is not None:
        parser.error("--report_to wandb with --hub_token would expose the token: log in with `hf auth login`.")


def check_spatial_size(args: argparse.Namespace, multiple: int, why: str) -> None:
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value <= 0 or value % multiple:
            near = max(multiple, round(value / multiple) * multiple)
            raise SystemExit(f"{flag} {value} is not a multiple of {multiple} ({why}): use e.g. {near}.")


def check_encoder(crepa, cache_dir: str | None = None) -> None:
    """--crepa_encoder must be a DINOv2 with patch tokens: checked from its config, before any weights load."""
    if not crepa.enabled:
        return
    from .features import load_encoder_config

    try:
        load_encoder_config(crepa.encoder, cache_dir=cache_dir)
    except ValueError as error:
        raise SystemExit(str(error)) from None


def check_block_index(crepa, num_blocks: int, model_name: str) -> None:
    if crepa.enabled and not 0 <= crepa.block_index < num_blocks:
        raise SystemExit(f"--crepa_block_index {crepa.block_index} is out of range: this {model_name} has "
                         f"{num_blocks} blocks (valid indices 0..{num_blocks - 1}).")


def validation_prompts(args: argparse.Namespace) -> list[str]:
    if not args.validation_prompt:
        return []
    return [p.strip() for p in args.validation_prompt.split(args.validation_prompt_separator) if p.strip()]


# ----------------------------------------------------------------------------------------------------------------
# Optimizer


def build_optimizer(args: argparse.Namespace, param_groups: list[dict]) -> torch.optim.Optimizer:
    if args.optimizer == "prodigy":
        try:
            import prodigyopt
        except ImportError as error:
            raise ImportError("--optimizer prodigy needs `pip install prodigyopt`.") from error
        if args.learning_rate <= 0.1:
            logger.warning("Prodigy usually wants --learning_rate around 1.0, got %s.", args.learning_rate)
        return prodigyopt.Prodigy(
            param_groups, betas=(args.adam_beta1, args.adam_beta2), beta3=args.prodigy_beta3,
            weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, decouple=args.prodigy_decouple,
            use_bias_correction=args.prodigy_use_bias_correction, safeguard_warmup=args.prodigy_safeguard_warmup,
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
        param_groups, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, weight_decay=args.adam_weight_decay
    )


# ----------------------------------------------------------------------------------------------------------------
# Reproducible data order and noise (exact resume)


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A permutation that depends only on (seed, epoch), so a resumed run sees the same order.

    Named `use_epoch`, not `set_epoch`: accelerate calls `set_epoch(iteration_count)` on each new iterator, which
    would restart the order at epoch 0 after a resume.
    """

    def __init__(self, length: int, seed: int) -> None:
        self.length, self.seed, self.epoch = length, seed, 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


def step_generator(seed: int, step: int, process_index: int, device: torch.device,
                   micro_batch: int = 0) -> torch.Generator:
    """The random stream of one micro-batch of one optimizer step on one rank: noise, timesteps and VAE samples are a
    function of (seed, step, micro-batch, rank), so resuming from a checkpoint reproduces them exactly."""
    generator = torch.Generator(device=device)
    generator.manual_seed(((seed * 1_000_003 + step) * 1_009 + process_index) * 101 + micro_batch)
    return generator


def random_flip(frames: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each clip of [B, F, C, H, W] horizontally with probability 0.5."""
    flip = torch.rand(frames.shape[0], generator=generator, device=generator.device) < 0.5
    flip = flip.to(frames.device).view(-1, 1, 1, 1, 1)
    return torch.where(flip, frames.flip(-1), frames)


# ----------------------------------------------------------------------------------------------------------------
# Interruptions and non-finite losses


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop finishes its step, saves a checkpoint and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # a second signal: stop now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.signal = signum
        logger.warning("Received %s: finishing this step, saving a checkpoint, then exiting.", signal.Signals(signum).name)

    def requested(self, accelerator) -> bool:
        """True on every rank if any rank was signalled (a collective: call it on all ranks at the same step)."""
        if accelerator.num_processes == 1:
            return self.signal is not None
        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class NonFiniteLossError(RuntimeError):
    pass


def nonfinite_message(steps: int, mixed_precision: str) -> str:
    precision = f" You train in {mixed_precision}:" if mixed_precision == "fp16" else " If you train in fp16:"
    return (f"The loss was NaN/inf for {steps} optimizer steps in a row (each was skipped, see "
            f"--max_nonfinite_steps).{precision} fp16 overflows on CogVideoX-5B/1.5 and HunyuanVideo, use "
            "--mixed_precision bf16. Otherwise try a lower --learning_rate. The last complete checkpoint in "
            "--output_dir is intact: resume from it with --resume_from_checkpoint latest.")


# ----------------------------------------------------------------------------------------------------------------
# Metrics: summed on the device, read once per --logging_steps


class MetricAccumulator:
    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.count += 1

    def pop_means(self) -> dict[str, float]:
        if not self.count:
            return {}
        keys = list(self.sums)
        means = (torch.stack([self.sums[k] for k in keys]) / self.count).tolist()  # one host sync for all
        self.sums, self.count = {}, 0
        return dict(zip(keys, means))


# ----------------------------------------------------------------------------------------------------------------
# Validation videos, model card, Hub


def trainable_parameters(*modules: nn.Module | None) -> list[nn.Parameter]:
    return [p for module in modules if module is not None for p in module.parameters() if p.requires_grad]


def updates_per_epoch(num_batches: int, gradient_accumulation_steps: int) -> int:
    return max(1, math.ceil(num_batches / gradient_accumulation_steps))


# ----------------------------------------------------------------------------------------------------------------
# Accelerator, the CREPA term of a step, and the loop


def make_accelerator(args: argparse.Namespace, default_mixed_precision: str | None = None):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    mixed_precision = args.mixed_precision or default_mixed_precision
    project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=Path(args.output_dir, args.logging_dir))
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=args.report_to,
        project_config=project,
        # Blocks after the CREPA block still get diffusion-loss gradients, but a "none" run never touches the
        # projector: tolerate unused parameters rather than fail.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def weight_dtype_of(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


class CrepaTerm:
    """The CREPA part of a training step: encoder features of the clean frames (computed before the transformer
    forward) and the block capture; the projector runs inside `TransformerWithProjector.forward`."""

    def __init__(self, config, transformer: nn.Module, projector: nn.Module, encoder) -> None:
        from .capture import HiddenStateCapture

        self.config, self.projector, self.encoder = config, projector, encoder
        self.capture = HiddenStateCapture(transformer, config.block_index)
        self._features: torch.Tensor | None = None
        self.cache: ConditionCache | None = None

    @property
    def cache_dtype(self) -> torch.dtype:
        """How --cache_conditions stores features: bf16 where the encoder runs in bf16 (half the disk and the read of
        fp32); the epoch that computes them uses the same rounded values as the epochs that read them."""
        return self.encoder.autocast_dtype or torch.float32

    def prepare(self, frames: torch.Tensor, token_grid: tuple[int, int], groups: list[list[int]],
                cache_keys: list[str] | None = None) -> None:
        """Encoder features of the clean frames (from the cache when given keys), then arm the block capture."""
        from .features import select_frames

        groups = select_frames(groups, self.config.frame_pooling)

        def compute() -> torch.Tensor:
            return self.encoder(frames, token_grid, groups)

        if self.cache is not None and cache_keys is not None:
            stored = self.cache.load_or_compute(cache_keys, lambda: compute().to(self.cache_dtype), frames.device)
            self._features = stored.float()
        else:
            self._features = compute()
        self.capture.arm(len(groups))

    def loss(self, projected: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        features, self._features = self._features, None
        return self.config.loss_and_stats(projected, features)


class TransformerWithProjector(nn.Module):
    """The transformer and the CREPA projector as one trained module, so that DDP, DeepSpeed (one model per
    engine) and FSDP wrap a single model whose forward runs both: forward(...) -> (transformer output, projected
    block tokens or None)."""

    def __init__(self, transformer: nn.Module, term: CrepaTerm | None = None) -> None:
        super().__init__()
        self.transformer = transformer
        self.projector = term.projector if term is not None else None
        self._capture = term.capture if term is not None else None

    def forward(self, *args, **kwargs):
        output = self.transformer(*args, **kwargs)
        if self.projector is None:
            return output, None
        return output, self.projector(self._capture.pop())


def train(
    *,
    accelerator,
    args: argparse.Namespace,
    models: list[nn.Module],
    optimizer,
    lr_scheduler,
    dataloader,
    sampler: EpochShuffleSampler,
    compute_loss: Callable[[dict, torch.Generator, int], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    validate: Callable[[str, int], None],
    max_train_steps: int,
    initial_global_step: int,
    on_step_end: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[int, bool]:
    """The optimisation loop shared by both scripts. Returns (global_step, interrupted)."""
    from tqdm.auto import tqdm

    params = trainable_parameters(*models)
    steps_per_epoch = updates_per_epoch(len(dataloader), args.gradient_accumulation_steps)
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    global_step = initial_global_step
    first_epoch = global_step // steps_per_epoch
    metrics = MetricAccumulator()
    stop = StopRequest()
    nonfinite_in_a_row = 0
    progress = tqdm(range(max_train_steps), initial=global_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    seed = args.seed if args.seed is not None else 0
    interrupted = False
    micro_batch = 0  # position inside the current gradient-accumulation window
    if global_step >= max_train_steps:  # resumed from a checkpoint of a finished run
        progress.close()
        stop.restore()
        return global_step, False
    try:
        for epoch in range(first_epoch, num_epochs):
            for model in models:
                model.train()
            sampler.use_epoch(epoch)
            loader = dataloader
            skip = (global_step - epoch * steps_per_epoch) * args.gradient_accumulation_steps
            if skip > 0:
                loader = accelerator.skip_first_batches(dataloader, skip)
            step_finite = torch.ones((), device=accelerator.device, dtype=torch.bool)
            for batch in loader:
                generator = step_generator(seed, global_step, accelerator.process_index, accelerator.device,
                                           micro_batch)
                if logger.isEnabledFor(logging.DEBUG):
                    logger.debug("rank %d step %d samples %s", accelerator.process_index, global_step + 1,
                                 batch["indices"].tolist())
                with accelerator.accumulate(*models):
                    loss, values = compute_loss(batch, generator, global_step)
                    finite = torch.isfinite(loss.detach())
                    step_finite = step_finite & finite
                    # Every rank runs backward (DDP needs it); a NaN/inf loss anywhere makes the whole optimizer
                    # step (all accumulated micro-batches) a skip, so its gradients never reach the weights.
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        all_finite = accelerator.reduce(step_finite.float(), reduction="sum") == accelerator.num_processes
                        if bool(all_finite):  # one host sync per optimizer step, needed to decide the skip
                            accelerator.clip_grad_norm_(params, args.max_grad_norm)
                            optimizer.step()
                            lr_scheduler.step()
                            nonfinite_in_a_row = 0
                        else:
                            nonfinite_in_a_row += 1
                            logger.warning("Step %d: non-finite loss, optimizer step skipped (%d in a row).",
                                           global_step + 1, nonfinite_in_a_row)
                        optimizer.zero_grad(set_to_none=True)
                        step_finite = torch.ones((), device=accelerator.device, dtype=torch.bool)
                    values = {"loss": loss.detach(), **values}
                    metrics.add(values)

                if not accelerator.sync_gradients:
                    micro_batch += 1
                    continue
                micro_batch = 0
                global_step += 1
                progress.update(1)
                if nonfinite_in_a_row:
                    accelerator.log({"skipped_nonfinite_steps": nonfinite_in_a_row}, step=global_step)
                if nonfinite_in_a_row >= args.max_nonfinite_steps:
                    raise NonFiniteLossError(nonfinite_message(nonfinite_in_a_row, accelerator.mixed_precision))

                if global_step % args.logging_steps == 0 or global_step == max_train_steps:
                    logs = metrics.pop_means()
                    logs["lr"] = lr_scheduler.get_last_lr()[0]
                    progress.set_postfix(**{k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "crepa_loss")})
                    accelerator.log(logs, step=global_step)
                    if on_step_end is not None:
                        on_step_end(global_step, logs)

                interrupted = stop.requested(accelerator)
                if global_step % args.checkpointing_steps == 0 or interrupted:
                    save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
                if interrupted:
                    logger.warning("Stopped at step %d after a signal; resume with --resume_from_checkpoint latest.",
                                   global_step)
                    return global_step, True
                if args.validation_steps and global_step % args.validation_steps == 0:
                    validate("validation", global_step)
                if global_step >= max_train_steps:
                    break
            if (epoch + 1) % args.validation_epochs == 0:
                validate("validation", global_step)
            if global_step >= max_train_steps:
                break
    finally:
        stop.restore()
        progress.close()
    return global_step, interrupted


# ----------------------------------------------------------------------------------------------------------------
# Set-up shared by both scripts


def load_checked_items(args: argparse.Namespace):
    """The run's (video, prompt) pairs; every missing, unreadable or too-short video reported at once (or skipped
    with --skip_invalid_videos). Runs before any model loads."""
    from .data import load_video_items, probe_videos

    items = load_video_items(args.instance_data_root, args.dataset_name, args.dataset_config_name,
                             args.caption_column, args.video_column, args.cache_dir, args.id_token)
    needed = args.max_num_frames + args.skip_frames_start + args.skip_frames_end
    problems = probe_videos(items, needed)
    if not problems:
        return items
    listing = "\n  ".join(message for _, message in problems)
    if not args.skip_invalid_videos:
        raise SystemExit(f"{len(problems)} of {len(items)} videos cannot be used:\n  {listing}\n"
                         "Fix or remove them, lower --max_num_frames / --skip_frames_*, or pass --skip_invalid_videos.")
    logger.warning("Skipping %d invalid videos (--skip_invalid_videos):\n  %s", len(problems), listing)
    bad = {index for index, _ in problems}
    items = [item for index, item in enumerate(items) if index not in bad]
    if not items:
        raise SystemExit("No usable videos left after --skip_invalid_videos.")
    return items


def add_lora(transformer: nn.Module, rank: int, alpha: float, target_modules) -> None:
    from peft import LoraConfig

    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=target_modules))
    for param in transformer.parameters():
        if param.requires_grad:  # LoRA weights train in fp32 over the frozen bf16/fp16 base weights
            param.data = param.data.float()


def build_crepa(crepa, transformer: nn.Module, device: torch.device, cache_dir: str | None = None) -> CrepaTerm | None:
    """The CREPA term (encoder, block hook, projector) of a CREPA/REPA run, None for --crepa_mode none. The encoder
    is frozen, in bf16 on GPUs (fp32 on CPU), and runs under bf16 autocast; the projector maps the transformer's
    width (heads x head dim) to the encoder's."""
    if not crepa.enabled:
        return None
    from .crepa import CrepaProjector
    from .features import DinoPatchFeatures

    on_cuda = device.type == "cuda"
    encoder = DinoPatchFeatures.from_pretrained(
        crepa.encoder, dtype=torch.bfloat16 if on_cuda else torch.float32, frames_per_chunk=crepa.encoder_frames_per_chunk,
        autocast_dtype=torch.bfloat16 if on_cuda else None, cache_dir=cache_dir).to(device)
    hidden_size = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    projector = CrepaProjector(hidden_size, encoder.hidden_size, crepa.projector_dim).to(device)
    return CrepaTerm(crepa, transformer, projector, encoder)


class Run:
    """Everything accelerate prepared for the loop."""

    def __init__(self, **kwargs) -> None:
        self.__dict__.update(kwargs)


def prepare_run(accelerator, args: argparse.Namespace, *, transformer: nn.Module, term: CrepaTerm | None, dataset,
                pipeline_cls, tracker_name: str, resume_path: Path | None) -> Run:
    from diffusers.optimization import get_scheduler

    from .data import collate_videos

    register_state_hooks(accelerator, pipeline_cls)
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    param_groups = [{"params": trainable_parameters(transformer), "lr": args.learning_rate}]
    if term is not None:
        param_groups.append({"params": list(term.projector.parameters()), "lr": args.learning_rate})
    optimizer = build_optimizer(args, param_groups)

    # Videos are decoded lazily by the DataLoader workers; accelerate gives each rank its own shard.
    sampler = EpochShuffleSampler(len(dataset), args.seed if args.seed is not None else 0)
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler,
                                             collate_fn=collate_videos, num_workers=args.dataloader_num_workers)
    steps_per_epoch = updates_per_epoch(math.ceil(len(dataloader) / accelerator.num_processes),
                                        args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes,
                                 num_cycles=args.lr_num_cycles, power=args.lr_power)
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(
        TransformerWithProjector(transformer, term), optimizer, dataloader, lr_scheduler)
    models = [model]
    args.num_train_epochs = math.ceil(args.max_train_steps / updates_per_epoch(len(dataloader), args.gradient_accumulation_steps))

    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_name or tracker_name,
                                  config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
    initial_step = 0
    if resume_path is not None:
        logger.info("Resuming from %s", resume_path)
        accelerator.load_state(str(resume_path))
        initial_step = checkpoint_step(resume_path)
    logger.info("***** Running training: %d videos, %d epochs, %d steps, %d processes (rank %d) *****",
                len(dataset), args.num_train_epochs, args.max_train_steps, accelerator.num_processes,
                accelerator.process_index)
    return Run(models=models, optimizer=optimizer, dataloader=dataloader, lr_scheduler=lr_scheduler, sampler=sampler,
               initial_step=initial_step)


def seed_and_output(accelerator, args: argparse.Namespace) -> str | None:
    """Seeds, creates the output folder, and (main process, --push_to_hub) the Hub repo, before training starts."""
    if args.seed is not None:
        from accelerate.utils import set_seed

        set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return create_hub_repo(args) if args.push_to_hub and accelerator.is_main_process else None


# ----------------------------------------------------------------------------------------------------------------
# Inside the step, validation, and the end of training


def add_crepa_term(diffusion_loss: torch.Tensor, term: CrepaTerm | None,
                   projected: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = L_diffusion + lambda * L_align, and the values to log (device tensors)."""
    values = {"diffusion_loss": diffusion_loss.detach()}
    if term is None:
        return diffusion_loss, values
    align_loss, stats = term.loss(projected)
    values.update(crepa_loss=align_loss.detach(), **stats)
    return diffusion_loss + term.config.lambda_ * align_loss, values


def validation_autocast(device: torch.device, dtype: torch.dtype):
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    if dtype != torch.float32:
        stack.enter_context(torch.autocast(device.type, dtype=dtype))
    return stack


def generate_validation_videos(accelerator, args: argparse.Namespace, pipe, prompts: list[str], phase: str, step: int,
                               pipeline_kwargs: dict) -> list[Path]:
    """--num_validation_videos per prompt, seeded, saved as mp4 and logged to the trackers."""
    pipe.set_progress_bar_config(disable=True)
    videos, names = [], []
    for prompt in prompts:
        for i in range(args.num_validation_videos):
            generator = torch.Generator(device=accelerator.device).manual_seed((args.seed or 0) + i)
            videos.append(pipe(prompt=prompt, height=args.height, width=args.width, num_frames=args.max_num_frames,
                               num_inference_steps=args.validation_num_inference_steps, generator=generator,
                               output_type="np", **pipeline_kwargs).frames[0])
            names.append(prompt)
    logger.info("Validation (%s, step %d): %d videos", phase, step, len(videos))
    return log_validation_videos(accelerator, videos, names, args.output_dir, phase, step, args.fps)


def train_and_finish(accelerator, args: argparse.Namespace, run: Run, *, compute_loss, validate, final_test,
                     pipeline_cls, unwrapped: nn.Module, crepa, model_variant: str, model_tags: list[str],
                     repo_id: str | None) -> int:
    """The loop, then (main process) the LoRA with its metadata, the loss plot, the final videos from a fresh
    pipeline with the saved LoRA loaded, the model card and the Hub upload."""
    history: list[dict] = []
    global_step, interrupted = train(
        accelerator=accelerator, args=args, models=run.models, optimizer=run.optimizer, lr_scheduler=run.lr_scheduler,
        dataloader=run.dataloader, sampler=run.sampler, compute_loss=compute_loss, validate=validate,
        max_train_steps=args.max_train_steps, initial_global_step=run.initial_step,
        on_step_end=lambda step, logs: history.append({"step": step, **logs}))
    check_ranks_agree(accelerator, run.models)
    accelerator.wait_for_everyone()
    if not interrupted and accelerator.is_main_process:
        save_lora(pipeline_cls, args.output_dir, unwrapped)
        write_loss_plot(history, args.output_dir)
        videos = final_test(global_step) if final_test is not None else []
        prompts = validation_prompts(args)
        write_model_card(
            args.output_dir, repo_id=repo_id or hub_repo_id(args), base_model=args.pretrained_model_name_or_path,
            model_tags=model_tags, pipeline_cls_name=pipeline_cls.__name__, crepa_settings=crepa_card_settings(crepa),
            training_settings=training_card_settings(args, global_step, model_variant),
            validation_prompts=prompts, video_files=videos,
            extra="\n## Training curves\n\n![losses](loss.png)\n" if history else "")
        if repo_id is not None:
            upload_output(args, repo_id)
    # Every rank waits here until the main one has written everything: a rank that exits early tears down its
    # process group while gloo's worker threads may still be releasing the last collective's tensors (a GIL
    # deadlock in ~ProcessGroupGloo), and the run must not look finished before its files exist.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return global_step


def check_ranks_agree(accelerator, models: list[nn.Module]) -> None:
    """With several processes, every rank must end with the same LoRA and projector (DDP keeps them in step; a
    rank that skipped a step alone would not): compare a checksum of the trained weights across ranks."""
    if accelerator.num_processes == 1:
        return
    params = trainable_parameters(*models)
    checksum = torch.stack([torch.stack([p.detach().double().sum() for p in params]).sum(),
                            torch.stack([p.detach().double().abs().sum() for p in params]).sum()])
    gathered = accelerator.gather(checksum.to(accelerator.device)[None]).cpu()
    if not torch.allclose(gathered, gathered[:1].expand_as(gathered), rtol=1e-9, atol=0):
        raise RuntimeError(f"The ranks ended with different trained weights: checksums {gathered.tolist()}")
    logger.info("Trained weights identical on all %d ranks (checksum %.9g).", accelerator.num_processes,
                gathered[0, 0].item())


def setup_logging() -> None:
    """INFO by default; CREPA_LOG_LEVEL=DEBUG also logs which samples each rank trains on at each step."""
    level = os.environ.get("CREPA_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logging.getLogger("crepa_diffusers").setLevel(level)


# ----------------------------------------------------------------------------------------------------------------
# Benchmark timing hooks and the on-disk condition cache


class PhaseTimer:
    """Accumulates wall time per named phase, synchronising the device at each boundary (benchmarks only: the
    training loop uses NO_TIMER, which adds no sync)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.totals = device, {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, name: str):
        import contextlib
        import time

        @contextlib.contextmanager
        def phase():
            self._sync()
            start = time.perf_counter()
            yield
            self._sync()
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

        return phase()


def NO_TIMER(name: str):
    import contextlib

    return contextlib.nullcontext()


