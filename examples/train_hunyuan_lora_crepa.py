#!/usr/bin/env python
"""LoRA fine-tuning of HunyuanVideo with CREPA, with the flags and outputs of diffusers' CogVideoX LoRA example.

    accelerate launch examples/train_hunyuan_lora_crepa.py \
        --pretrained_model_name_or_path hunyuanvideo-community/HunyuanVideo --instance_data_root data \
        --caption_column prompts.txt --video_column videos.txt --output_dir hunyuan-lora-crepa ...

Flow matching (x_t = (1 - s) x0 + s noise, target noise - x0) with sigmas from the scheduler and --flow_shift
applied; text from HunyuanVideoPipeline.encode_prompt (Llama with the default prompt template, 3rd-from-last hidden
state, plus CLIP pooled projections); LoRA on the double- and single-stream blocks only, never the token refiner.
--crepa_block_index counts the 20 double-stream blocks then the 40 single-stream blocks (0..59).
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from crepa_diffusers import checkpoints, training
from crepa_diffusers.cache import ConditionCache, cached, make_condition_cache
from crepa_diffusers.crepa import CrepaConfig, add_crepa_args
from crepa_diffusers.data import VideoDataset
from crepa_diffusers.features import token_frame_groups

logger = logging.getLogger("train_hunyuan_lora_crepa")

VAE_SPATIAL, VAE_TEMPORAL = 8, 4
DEFAULT_LORA_LAYERS = "to_q,to_k,to_v,to_out.0"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="HunyuanVideo LoRA training with CREPA.")
    training.add_common_args(parser, output_dir="hunyuan-lora-crepa", height=512, width=768, guidance_scale=1.0)
    hunyuan = parser.add_argument_group("HunyuanVideo")
    hunyuan.add_argument("--max_sequence_length", type=int, default=256, help="Llama prompt tokens (after the template).")
    hunyuan.add_argument("--flow_shift", type=float, default=None,
                         help="Shift of the flow-matching sigmas (default: the scheduler's, 7.0 for HunyuanVideo).")
    hunyuan.add_argument("--flow_weighting_scheme", choices=["none", "logit_normal", "mode"], default="none",
                         help="Density of the training sigmas (uniform, logit-normal, or SD3's mode).")
    hunyuan.add_argument("--flow_logit_mean", type=float, default=0.0)
    hunyuan.add_argument("--flow_logit_std", type=float, default=1.0)
    hunyuan.add_argument("--flow_mode_scale", type=float, default=1.29)
    hunyuan.add_argument("--validation_guidance_scale", type=float, default=6.0,
                         help="Embedded guidance for validation videos (--guidance_scale is the training one).")
    hunyuan.add_argument("--lora_layers", type=str, default=DEFAULT_LORA_LAYERS,
                         help="Comma-separated attention projections to adapt inside the transformer blocks, e.g. "
                         "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out.")
    add_crepa_args(parser, default_lambda=1.0,
                   block_index_help="Global over the 20 double-stream then the 40 single-stream blocks (0..59).")
    args = parser.parse_args(argv)
    training.check_common_args(args, parser)
    if args.flow_shift is not None and args.flow_shift <= 0:
        parser.error(f"--flow_shift must be > 0, got {args.flow_shift}.")
    return args


# ----------------------------------------------------------------------------------------------------------------
# HunyuanVideo specifics


def lora_target_regex(lora_layers: str) -> str:
    """Full-match regex over module names: the listed projections inside transformer_blocks.N and
    single_transformer_blocks.N only (a plain list would also wrap the token refiner's attention)."""
    names = [name.strip() for name in lora_layers.split(",") if name.strip()]
    if not names:
        raise SystemExit("--lora_layers is empty: name at least one projection, e.g. to_q,to_k,to_v,to_out.0")
    alternatives = "|".join(re.escape(name) for name in names)
    return rf"^(transformer_blocks|single_transformer_blocks)\.\d+\.attn\.({alternatives})$"


def sample_flow_sigmas(args, scheduler, batch_size: int, generator: torch.Generator, device):
    """u from the weighting density, then the scheduler's (shifted) sigma and timestep at that position."""
    if args.flow_weighting_scheme == "logit_normal":
        u = torch.sigmoid(torch.randn(batch_size, generator=generator, device=device) * args.flow_logit_std
                          + args.flow_logit_mean)
    else:
        u = torch.rand(batch_size, generator=generator, device=device)
        if args.flow_weighting_scheme == "mode":
            u = 1 - u - args.flow_mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if scheduler.sigmas.device != u.device:  # once: indexing CPU tables with a device index would sync every step
        scheduler.sigmas, scheduler.timesteps = scheduler.sigmas.to(u.device), scheduler.timesteps.to(u.device)
    index = (u * scheduler.config.num_train_timesteps).long().clamp(0, len(scheduler.sigmas) - 1)
    return scheduler.sigmas[index], scheduler.timesteps[index]


@dataclass
class Parts:
    """What one HunyuanVideo training step needs (built by main(), or by the benchmark from configs)."""

    pipe: object  # HunyuanVideoPipeline: encode_prompt is the text path; vae for the latents
    model: torch.nn.Module  # training.TransformerWithProjector, as prepared by accelerate (DDP/DeepSpeed-wrapped)
    scheduler: object  # the training scheduler (its shifted sigmas)
    weight_dtype: torch.dtype
    device: torch.device
    height: int
    width: int
    patch_size: int
    args: argparse.Namespace  # flow_*, guidance_scale, max_sequence_length, random_flip
    cache: ConditionCache | None = None
    video_paths: list[Path] | None = None


def training_loss(batch: dict, generator: torch.Generator, parts: Parts, term: training.CrepaTerm | None = None,
                  timer=training.NO_TIMER) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One step's loss: flow matching (target noise - x0) (+ lambda * L_align), and the values to log."""
    args, device, dtype, vae = parts.args, parts.device, parts.weight_dtype, parts.pipe.vae
    frames = batch["frames"].to(device)  # [B, F, 3, H, W] in [-1, 1]: the VAE's and the encoder's input
    if args.random_flip:
        frames = training.random_flip(frames, generator)
    videos = [parts.video_paths[i] for i in batch["indices"].tolist()] if parts.cache is not None else None
    with timer("text_vae_encoding"), torch.no_grad():
        latent_dist = vae.encode(frames.permute(0, 2, 1, 3, 4).to(dtype)).latent_dist
        latents = (latent_dist.sample(generator=generator) * vae.config.scaling_factor).float()  # [B, C, F, h, w]
        prompt_embeds, pooled, attention_mask = cached(parts.cache, "llama_clip", batch["prompts"], lambda: (
            parts.pipe.encode_prompt(batch["prompts"], device=device, dtype=dtype,
                                     max_sequence_length=args.max_sequence_length)), device)
    batch_size = latents.shape[0]
    sigmas, timesteps = sample_flow_sigmas(args, parts.scheduler, batch_size, generator, device)
    noise = torch.randn(latents.shape, device=device, dtype=latents.dtype, generator=generator)
    sigma = sigmas.view(-1, 1, 1, 1, 1)
    noisy = (1 - sigma) * latents + sigma * noise
    guidance = torch.full((batch_size,), args.guidance_scale * 1000.0, device=device, dtype=dtype)
    if term is not None:
        with timer("encoder_features"):
            grid = (parts.height // (VAE_SPATIAL * parts.patch_size), parts.width // (VAE_SPATIAL * parts.patch_size))
            keys = [parts.cache.video_key("dino", path) for path in videos] if videos else None
            term.prepare(frames, grid, token_frame_groups(frames.shape[1], VAE_TEMPORAL), keys)
    with timer("transformer_forward"):
        output, projected = parts.model(hidden_states=noisy.to(dtype), timestep=timesteps,
                                        encoder_hidden_states=prompt_embeds, encoder_attention_mask=attention_mask,
                                        pooled_projections=pooled, guidance=guidance, return_dict=False)
        model_pred = output[0]
    with timer("loss"):
        diffusion_loss = ((model_pred.float() - (noise - latents)) ** 2).reshape(batch_size, -1).mean(1).mean()
        return training.add_crepa_term(diffusion_loss, term, projected)


def main(args: argparse.Namespace) -> Path:
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, LlamaModel

    training.setup_logging()
    base = args.pretrained_model_name_or_path
    load = dict(revision=args.revision, cache_dir=args.cache_dir)

    # ---- Checks that need only configs and file headers: fail before any weights load.
    config = HunyuanVideoTransformer3DModel.load_config(base, subfolder="transformer", **load)
    patch = config["patch_size"]
    training.check_spatial_size(args, VAE_SPATIAL * patch, f"VAE x{VAE_SPATIAL} times patch size {patch}")
    if config.get("patch_size_t", 1) != 1:
        raise SystemExit(f"patch_size_t={config['patch_size_t']} is not supported (HunyuanVideo uses 1).")
    crepa = CrepaConfig.from_args(args)
    training.check_block_index(crepa, config["num_layers"] + config["num_single_layers"],
                               f"HunyuanVideo ({config['num_layers']} double- + {config['num_single_layers']} single-stream)")
    training.check_encoder(crepa, args.cache_dir)
    resume_path = checkpoints.resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    items = training.load_checked_items(args)

    accelerator = training.make_accelerator(args, default_mixed_precision="bf16" if torch.cuda.is_available() else None)
    if accelerator.mixed_precision == "fp16":
        logger.warning("fp16 gives NaN losses on HunyuanVideo (trained in bf16): use --mixed_precision bf16.")
    repo_id = training.seed_and_output(accelerator, args)

    # ---- Models
    weight_dtype = training.weight_dtype_of(accelerator)
    device = accelerator.device
    tokenizer = AutoTokenizer.from_pretrained(base, subfolder="tokenizer", **load)
    tokenizer_2 = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer_2", **load)
    text_encoder = LlamaModel.from_pretrained(base, subfolder="text_encoder", **load)
    text_encoder_2 = CLIPTextModel.from_pretrained(base, subfolder="text_encoder_2", **load)
    transformer = HunyuanVideoTransformer3DModel.from_pretrained(base, subfolder="transformer", torch_dtype=weight_dtype,
                                                                 variant=args.variant, **load)
    vae = AutoencoderKLHunyuanVideo.from_pretrained(base, subfolder="vae", variant=args.variant, **load)
    shift = {} if args.flow_shift is None else {"shift": args.flow_shift}
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler", **shift, **load)
    if args.enable_slicing:
        vae.enable_slicing()
    if args.enable_tiling:
        vae.enable_tiling()
    for module in (text_encoder, text_encoder_2, transformer, vae):
        module.requires_grad_(False)
        module.to(device, dtype=weight_dtype)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    training.add_lora(transformer, args.rank, args.lora_alpha, lora_target_regex(args.lora_layers))
    term = training.build_crepa(crepa, transformer, device, args.cache_dir)

    dataset = VideoDataset(items, args.height, args.width, args.max_num_frames, args.skip_frames_start,
                           args.skip_frames_end, args.video_reshape_mode, VAE_TEMPORAL)
    run = training.prepare_run(accelerator, args, transformer=transformer, term=term,
                               dataset=dataset, pipeline_cls=HunyuanVideoPipeline, tracker_name="hunyuan-lora-crepa",
                               resume_path=resume_path)
    unwrapped = accelerator.unwrap_model(run.models[0]).transformer
    # One pipeline object: its encode_prompt is the text path of training, and it renders the validation videos
    # (with its own scheduler: set_timesteps would rewrite the training sigmas).
    pipe = HunyuanVideoPipeline(text_encoder=text_encoder, tokenizer=tokenizer, transformer=unwrapped, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler.config),
                                text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    parts = Parts(pipe=pipe, model=run.models[0], scheduler=scheduler, weight_dtype=weight_dtype, device=device,
                  height=args.height, width=args.width, patch_size=patch, args=args,
                  cache=make_condition_cache(args, term, len(items)), video_paths=[item.path for item in items])

    def compute_loss(batch, generator, step):
        return training_loss(batch, generator, parts, term)

    prompts = training.validation_prompts(args)

    def run_pipeline(pipeline, phase: str, step: int) -> list[Path]:
        return training.generate_validation_videos(
            accelerator, args, pipeline, prompts, phase, step,
            dict(guidance_scale=args.validation_guidance_scale, max_sequence_length=args.max_sequence_length))

    def validate(phase: str, step: int) -> None:
        if prompts and accelerator.is_main_process:
            with training.validation_autocast(device, weight_dtype):
                run_pipeline(pipe, phase, step)

    def final_test(step: int) -> list[Path]:
        fresh = HunyuanVideoPipeline.from_pretrained(base, torch_dtype=weight_dtype, **load)
        fresh.load_lora_weights(args.output_dir, adapter_name="hunyuan-lora-crepa")  # scale from the metadata
        return run_pipeline(fresh.to(device), "test", step)

    training.train_and_finish(
        accelerator, args, run, compute_loss=compute_loss, validate=validate, final_test=final_test if prompts else None,
        pipeline_cls=HunyuanVideoPipeline, unwrapped=unwrapped, crepa=crepa, model_variant="HunyuanVideo",
        model_tags=["hunyuan-video", "hunyuanvideo"], repo_id=repo_id)
    return Path(args.output_dir)


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
