#!/usr/bin/env python
"""LoRA fine-tuning of CogVideoX (2B, 5B, 1.5) with CREPA, in the form of diffusers' train_cogvideox_lora.py.

    accelerate launch examples/train_cogvideox_lora_crepa.py \
        --pretrained_model_name_or_path THUDM/CogVideoX-5b --instance_data_root data \
        --caption_column prompts.txt --video_column videos.txt --output_dir cogvideox-lora-crepa ...

Every flag of diffusers' script keeps its name and default; --crepa_* flags add the alignment term
(`--crepa_mode none` trains plain LoRA, `repa` is REPA*). Model-specific code (text encoding, noise schedule,
rotary embeddings, validation pipeline) lives here; the rest comes from `crepa_diffusers`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from crepa_diffusers import checkpoints, training
from crepa_diffusers.cache import ConditionCache, cached, make_condition_cache
from crepa_diffusers.crepa import CrepaConfig, add_crepa_args
from crepa_diffusers.data import VideoDataset
from crepa_diffusers.features import token_frame_groups

logger = logging.getLogger("train_cogvideox_lora_crepa")

VAE_SPATIAL, VAE_TEMPORAL = 8, 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="CogVideoX LoRA training with CREPA.")
    training.add_common_args(parser, output_dir="cogvideox-lora", height=480, width=720, guidance_scale=6.0)
    parser.add_argument("--use_dynamic_cfg", action="store_true", help="Dynamic CFG in validation (CogVideoX-5B).")
    add_crepa_args(parser, default_lambda=0.5,
                   block_index_help="CogVideoX-2B has 30 blocks (0..29), 5B and 1.5 have 42 (0..41).")
    args = parser.parse_args(argv)
    training.check_common_args(args, parser)
    return args


# ----------------------------------------------------------------------------------------------------------------
# CogVideoX specifics


def encode_prompts(tokenizer, text_encoder, prompts: list[str], max_length: int, device) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids.to(device))[0]


def rotary_embeddings(config, height: int, width: int, latent_frames: int, device):
    """As CogVideoXPipeline builds them at inference, for 1.0 (crop grid) and 1.5 (patch_size_t, slice grid)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    if not config.use_rotary_positional_embeddings:
        return None
    p, p_t = config.patch_size, config.patch_size_t
    grid = (height // (VAE_SPATIAL * p), width // (VAE_SPATIAL * p))
    base_w, base_h = config.sample_width // p, config.sample_height // p
    if p_t is None:
        crops = get_resize_crop_region_for_grid(grid, base_w, base_h)
        return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=crops, grid_size=grid,
                                       temporal_size=latent_frames, device=device)
    return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=None, grid_size=grid,
                                   temporal_size=(latent_frames + p_t - 1) // p_t, grid_type="slice",
                                   max_size=(base_h, base_w), device=device)


def pad_latent_frames(latents: torch.Tensor, patch_size_t: int | None) -> torch.Tensor:
    """[B, F, C, h, w] -> front-padded with copies of latent frame 0 to a multiple of patch_size_t (CogVideoX 1.5;
    the pipeline drops the same leading frames after sampling)."""
    if not patch_size_t or latents.shape[1] % patch_size_t == 0:
        return latents
    padding = patch_size_t - latents.shape[1] % patch_size_t
    return torch.cat([latents[:, :1].expand(-1, padding, -1, -1, -1), latents], dim=1)


@dataclass
class Parts:
    """What one CogVideoX training step needs (built by main(), or by the benchmark from configs)."""

    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    model: torch.nn.Module  # training.TransformerWithProjector, as prepared by accelerate (DDP/DeepSpeed-wrapped)
    config: object  # the transformer's config
    scheduler: object
    weight_dtype: torch.dtype
    device: torch.device
    height: int
    width: int
    random_flip: bool = False
    cache: ConditionCache | None = None
    video_paths: list[Path] | None = None  # dataset index -> video file, for cache keys


def training_loss(batch: dict, generator: torch.Generator, parts: Parts, term: training.CrepaTerm | None = None,
                  timer=training.NO_TIMER) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One step's loss: diffusers' v-prediction loss (+ lambda * L_align), and the values to log."""
    device, dtype, config = parts.device, parts.weight_dtype, parts.config
    patch_t = config.patch_size_t
    frames = batch["frames"].to(device)  # [B, F, 3, H, W] in [-1, 1]: the VAE's and the encoder's input
    if parts.random_flip:
        frames = training.random_flip(frames, generator)
    videos = [parts.video_paths[i] for i in batch["indices"].tolist()] if parts.cache is not None else None
    with timer("text_vae_encoding"), torch.no_grad():
        latent_dist = parts.vae.encode(frames.permute(0, 2, 1, 3, 4).to(dtype)).latent_dist
        latents = latent_dist.sample(generator=generator) * parts.vae.config.scaling_factor
        latents = pad_latent_frames(latents.permute(0, 2, 1, 3, 4).to(dtype), patch_t)  # [B, F, C, h, w]
        prompt_embeds = cached(parts.cache, "t5", batch["prompts"], lambda: encode_prompts(
            parts.tokenizer, parts.text_encoder, batch["prompts"], config.max_text_seq_length, device), device)
    batch_size = latents.shape[0]
    timesteps = torch.randint(0, parts.scheduler.config.num_train_timesteps, (batch_size,), device=device,
                              generator=generator)
    noise = torch.randn(latents.shape, device=device, dtype=latents.dtype, generator=generator)
    noisy = parts.scheduler.add_noise(latents, noise, timesteps)
    rotary = rotary_embeddings(config, parts.height, parts.width, latents.shape[1], device)
    if term is not None:
        with timer("encoder_features"):
            groups = token_frame_groups(frames.shape[1], VAE_TEMPORAL, patch_t or 1)
            grid = (parts.height // (VAE_SPATIAL * config.patch_size), parts.width // (VAE_SPATIAL * config.patch_size))
            keys = [parts.cache.video_key("dino", path) for path in videos] if videos else None
            term.prepare(frames, grid, groups, keys)
    with timer("transformer_forward"):
        output, projected = parts.model(hidden_states=noisy, encoder_hidden_states=prompt_embeds.to(dtype),
                                        timestep=timesteps, image_rotary_emb=rotary, return_dict=False)
        model_output = output[0]
    with timer("loss"):
        # v-prediction, as diffusers' example: x0 predictions weighted by 1/(1 - alpha_bar_t) (= MSE on v).
        model_pred = parts.scheduler.get_velocity(model_output.float(), noisy.float(), timesteps)
        alphas_cumprod = parts.scheduler.alphas_cumprod.to(device)
        weights = (1 / (1 - alphas_cumprod[timesteps])).view(-1, 1, 1, 1, 1)
        diffusion_loss = (weights * (model_pred - latents.float()) ** 2).reshape(batch_size, -1).mean(1).mean()
        return training.add_crepa_term(diffusion_loss, term, projected)


def main(args: argparse.Namespace) -> Path:
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
    from transformers import AutoTokenizer, T5EncoderModel

    training.setup_logging()
    load = dict(revision=args.revision, cache_dir=args.cache_dir)

    # ---- Checks that need only configs and file headers: fail before any weights load.
    config = CogVideoXTransformer3DModel.load_config(args.pretrained_model_name_or_path, subfolder="transformer", **load)
    patch, patch_t = config["patch_size"], config.get("patch_size_t")
    is_large = config.get("use_rotary_positional_embeddings", False) or patch_t is not None  # 5B / 1.5
    training.check_spatial_size(args, VAE_SPATIAL * patch, f"VAE x{VAE_SPATIAL} times patch size {patch}")
    crepa = CrepaConfig.from_args(args)
    training.check_block_index(crepa, config["num_layers"], "CogVideoX")
    training.check_encoder(crepa, args.cache_dir)
    resume_path = checkpoints.resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    items = training.load_checked_items(args)

    accelerator = training.make_accelerator(args, default_mixed_precision="bf16" if is_large and torch.cuda.is_available() else None)
    if accelerator.mixed_precision == "fp16" and is_large:
        logger.warning("fp16 gives NaN losses on CogVideoX-5B / 1.5 (trained in bf16): use --mixed_precision bf16.")
    repo_id = training.seed_and_output(accelerator, args)

    # ---- Models: frozen base in the training dtype, LoRA (fp32) on the attention projections.
    weight_dtype = training.weight_dtype_of(accelerator)
    device = accelerator.device
    tokenizer = AutoTokenizer.from_pretrained(args.pretrained_model_name_or_path, subfolder="tokenizer", **load)
    text_encoder = T5EncoderModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="text_encoder", **load)
    transformer = CogVideoXTransformer3DModel.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="transformer", torch_dtype=weight_dtype, variant=args.variant, **load)
    vae = AutoencoderKLCogVideoX.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae", variant=args.variant, **load)
    scheduler = CogVideoXDPMScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler", **load)
    if args.enable_slicing:
        vae.enable_slicing()
    if args.enable_tiling:
        vae.enable_tiling()
    for module in (text_encoder, transformer, vae):
        module.requires_grad_(False)
        module.to(device, dtype=weight_dtype)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    training.add_lora(transformer, args.rank, args.lora_alpha, ["to_k", "to_q", "to_v", "to_out.0"])
    term = training.build_crepa(crepa, transformer, device, args.cache_dir)

    dataset = VideoDataset(items, args.height, args.width, args.max_num_frames, args.skip_frames_start,
                           args.skip_frames_end, args.video_reshape_mode, VAE_TEMPORAL)
    run = training.prepare_run(accelerator, args, transformer=transformer, term=term,
                               dataset=dataset, pipeline_cls=CogVideoXPipeline, tracker_name="cogvideox-lora-crepa",
                               resume_path=resume_path)
    unwrapped = accelerator.unwrap_model(run.models[0]).transformer
    max_text_len = unwrapped.config.max_text_seq_length
    parts = Parts(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, model=run.models[0],
                  config=unwrapped.config, scheduler=scheduler, weight_dtype=weight_dtype, device=device,
                  height=args.height, width=args.width, random_flip=args.random_flip,
                  cache=make_condition_cache(args, term, len(items)), video_paths=[item.path for item in items])

    def compute_loss(batch, generator, step):
        return training_loss(batch, generator, parts, term)

    prompts = training.validation_prompts(args)

    def run_pipeline(pipe, phase: str, step: int) -> list[Path]:
        pipe.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config)
        return training.generate_validation_videos(
            accelerator, args, pipe, prompts, phase, step,
            dict(guidance_scale=args.guidance_scale, use_dynamic_cfg=args.use_dynamic_cfg,
                 max_sequence_length=max_text_len))

    def validate(phase: str, step: int) -> None:
        if prompts and accelerator.is_main_process:
            pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=unwrapped,
                                     scheduler=scheduler)
            with training.validation_autocast(device, weight_dtype):
                run_pipeline(pipe, phase, step)

    def final_test(step: int) -> list[Path]:
        pipe = CogVideoXPipeline.from_pretrained(args.pretrained_model_name_or_path, torch_dtype=weight_dtype, **load)
        pipe.load_lora_weights(args.output_dir, adapter_name="cogvideox-lora-crepa")  # scale from the metadata
        return run_pipeline(pipe.to(device), "test", step)

    variant = ("CogVideoX 1.5 (patch_size_t=2)" if patch_t else
               "CogVideoX 5B-style (rotary positions)" if is_large else "CogVideoX 2B-style (sin-cos positions)")
    training.train_and_finish(
        accelerator, args, run, compute_loss=compute_loss, validate=validate, final_test=final_test if prompts else None,
        pipeline_cls=CogVideoXPipeline, unwrapped=unwrapped, crepa=crepa, model_variant=variant,
        model_tags=["cogvideox", "cogvideox-diffusers"], repo_id=repo_id)
    return Path(args.output_dir)


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
