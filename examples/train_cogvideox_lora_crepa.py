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
import math
import os
import sys
from pathlib import Path

import torch
from peft import LoraConfig

from crepa_diffusers import training
from crepa_diffusers.crepa import CrepaConfig, CrepaProjector, add_crepa_args
from crepa_diffusers.data import VideoDataset, collate_videos, load_video_items, probe_videos
from crepa_diffusers.features import DinoPatchFeatures, token_frame_groups

logger = logging.getLogger("train_cogvideox_lora_crepa")

VAE_SPATIAL, VAE_TEMPORAL = 8, 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="CogVideoX LoRA training with CREPA.")
    training.add_common_args(parser, output_dir="cogvideox-lora-crepa", height=480, width=720, guidance_scale=6.0)
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


def main(args: argparse.Namespace) -> Path:
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDPMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    from diffusers.optimization import get_scheduler
    from transformers import AutoTokenizer, T5EncoderModel

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    load = dict(revision=args.revision, cache_dir=args.cache_dir)

    # ---- Checks that need only configs and file headers: fail before any weights load.
    config = CogVideoXTransformer3DModel.load_config(args.pretrained_model_name_or_path, subfolder="transformer", **load)
    patch, patch_t = config["patch_size"], config.get("patch_size_t")
    is_large = config.get("use_rotary_positional_embeddings", False) or patch_t is not None  # 5B / 1.5
    multiple = VAE_SPATIAL * patch
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value % multiple:
            raise SystemExit(f"{flag} {value} is not a multiple of {multiple} (VAE x{VAE_SPATIAL} times patch size "
                             f"{patch}): use {max(multiple, round(value / multiple) * multiple)}.")
    crepa = CrepaConfig.from_args(args)
    if crepa.enabled and not 0 <= crepa.block_index < config["num_layers"]:
        raise SystemExit(f"--crepa_block_index {crepa.block_index} is out of range: this CogVideoX has "
                         f"{config['num_layers']} blocks (valid 0..{config['num_layers'] - 1}).")
    resume_path = training.resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    items = load_video_items(args.instance_data_root, args.dataset_name, args.dataset_config_name,
                             args.caption_column, args.video_column, args.cache_dir, args.id_token)
    problems = probe_videos(items, args.max_num_frames + args.skip_frames_start + args.skip_frames_end)
    if problems:
        listing = "\n  ".join(problems)
        if not args.skip_invalid_videos:
            raise SystemExit(f"{len(problems)} of {len(items)} videos cannot be used:\n  {listing}\n"
                             "Fix or remove them, lower --max_num_frames, or pass --skip_invalid_videos.")
        logger.warning("Skipping %d invalid videos (--skip_invalid_videos):\n  %s", len(problems), listing)
        bad = {p.split(": ")[0] for p in problems}
        items = [item for item in items if str(item.path) not in bad]
        if not items:
            raise SystemExit("No usable videos left after --skip_invalid_videos.")

    accelerator = training.make_accelerator(args, default_mixed_precision="bf16" if is_large and torch.cuda.is_available() else None)
    if accelerator.mixed_precision == "fp16" and is_large:
        logger.warning("fp16 gives NaN losses on CogVideoX-5B / 1.5 (trained in bf16): use --mixed_precision bf16.")
    if args.seed is not None:
        from accelerate.utils import set_seed

        set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    repo_id = training.create_hub_repo(args) if args.push_to_hub and accelerator.is_main_process else None
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    # ---- Models
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

    transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, init_lora_weights=True,
                                       target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    for param in transformer.parameters():
        if param.requires_grad:  # LoRA weights train in fp32 over the frozen bf16/fp16 base
            param.data = param.data.float()

    projector = term = None
    if crepa.enabled:
        on_cuda = device.type == "cuda"
        encoder = DinoPatchFeatures.from_pretrained(
            crepa.encoder, dtype=torch.bfloat16 if on_cuda else torch.float32,
            frames_per_chunk=crepa.encoder_frames_per_chunk, autocast_dtype=torch.bfloat16 if on_cuda else None,
            cache_dir=args.cache_dir).to(device)
        inner_dim = config["num_attention_heads"] * config["attention_head_dim"]
        projector = CrepaProjector(inner_dim, encoder.hidden_size, crepa.projector_dim).to(device)
        term = training.CrepaTerm(crepa, transformer, projector, encoder)

    training.register_state_hooks(accelerator, CogVideoXPipeline, transformer, projector)

    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    param_groups = [{"params": training.trainable_parameters(transformer), "lr": args.learning_rate}]
    if projector is not None:
        param_groups.append({"params": list(projector.parameters()), "lr": args.learning_rate})
    optimizer = training.build_optimizer(args, param_groups)

    # ---- Data: decoded lazily by the DataLoader workers; accelerate gives each rank its own shard.
    dataset = VideoDataset(items, args.height, args.width, args.max_num_frames, args.skip_frames_start,
                           args.skip_frames_end, args.video_reshape_mode, VAE_TEMPORAL)
    sampler = training.EpochShuffleSampler(len(dataset), args.seed if args.seed is not None else 0)
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler,
                                             collate_fn=collate_videos, num_workers=args.dataloader_num_workers)

    steps_per_epoch = training.updates_per_epoch(math.ceil(len(dataloader) / accelerator.num_processes),
                                                 args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes,
                                 num_cycles=args.lr_num_cycles, power=args.lr_power)
    models = [transformer] + ([projector] if projector is not None else [])
    prepared = accelerator.prepare(*models, optimizer, dataloader, lr_scheduler)
    models, (optimizer, dataloader, lr_scheduler) = list(prepared[: len(models)]), prepared[len(models):]
    transformer = models[0]
    if term is not None:
        term.projector = models[1]  # the DDP-wrapped projector, so its gradients are all-reduced
    args.num_train_epochs = math.ceil(args.max_train_steps / training.updates_per_epoch(len(dataloader), args.gradient_accumulation_steps))

    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_name or "cogvideox-lora-crepa",
                                  config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})

    initial_step = 0
    if resume_path is not None:
        logger.info("Resuming from %s", resume_path)
        accelerator.load_state(str(resume_path))
        initial_step = training.checkpoint_step(resume_path)

    logger.info("***** Running training: %d videos, %d epochs, %d steps, %d processes; CREPA %s (lambda %s) *****",
                len(dataset), args.num_train_epochs, args.max_train_steps, accelerator.num_processes, crepa.mode,
                crepa.lambda_)

    unwrapped = accelerator.unwrap_model(transformer)
    token_grid = (args.height // (VAE_SPATIAL * patch), args.width // (VAE_SPATIAL * patch))
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    max_text_len = unwrapped.config.max_text_seq_length

    def compute_loss(batch, generator, step):
        frames = batch["frames"].to(device)
        if args.random_flip:
            frames = training.random_flip(frames, generator)
        with torch.no_grad():
            latent_dist = vae.encode(frames.permute(0, 2, 1, 3, 4).to(weight_dtype)).latent_dist
            latents = latent_dist.sample(generator=generator) * vae.config.scaling_factor
        latents = pad_latent_frames(latents.permute(0, 2, 1, 3, 4).to(weight_dtype), patch_t)  # [B, F, C, h, w]
        prompt_embeds = encode_prompts(tokenizer, text_encoder, batch["prompts"], max_text_len, device)
        batch_size = latents.shape[0]
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), device=device,
                                  generator=generator)
        noise = torch.randn(latents.shape, device=device, dtype=latents.dtype, generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        rotary = rotary_embeddings(unwrapped.config, args.height, args.width, latents.shape[1], device)
        if term is not None:
            term.prepare(frames, token_grid, token_frame_groups(frames.shape[1], VAE_TEMPORAL, patch_t or 1))
        model_output = transformer(hidden_states=noisy, encoder_hidden_states=prompt_embeds.to(weight_dtype),
                                   timestep=timesteps, image_rotary_emb=rotary, return_dict=False)[0]
        # v-prediction, as diffusers' example: compare x0 predictions weighted by 1/(1 - alpha_bar_t) (= MSE on v).
        model_pred = scheduler.get_velocity(model_output.float(), noisy.float(), timesteps)
        weights = (1 / (1 - alphas_cumprod[timesteps])).view(-1, 1, 1, 1, 1)
        diffusion_loss = (weights * (model_pred - latents.float()) ** 2).reshape(batch_size, -1).mean(1).mean()
        values = {"diffusion_loss": diffusion_loss.detach()}
        loss = diffusion_loss
        if term is not None:
            crepa_loss, stats = term.loss()
            loss = loss + crepa.lambda_ * crepa_loss
            values.update(crepa_loss=crepa_loss.detach(), **stats)
        return loss, values

    prompts = training.validation_prompts(args)
    video_files: list[Path] = []

    def run_pipeline(pipe, phase: str, step: int) -> list[Path]:
        pipe.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        videos, names = [], []
        for prompt in prompts:
            for i in range(args.num_validation_videos):
                generator = torch.Generator(device=device).manual_seed((args.seed or 0) + i)
                videos.append(pipe(prompt=prompt, guidance_scale=args.guidance_scale, use_dynamic_cfg=args.use_dynamic_cfg,
                                   height=args.height, width=args.width, num_frames=args.max_num_frames,
                                   num_inference_steps=args.validation_num_inference_steps, max_sequence_length=max_text_len,
                                   generator=generator, output_type="np").frames[0])
                names.append(prompt)
        return training.log_validation_videos(accelerator, videos, names, args.output_dir, phase, step, args.fps)

    def validate(phase: str, step: int) -> None:
        if not prompts or not accelerator.is_main_process:
            return
        logger.info("Running validation at step %d: %s", step, prompts)
        pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=unwrapped,
                                 scheduler=scheduler)
        with torch.no_grad(), torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32):
            run_pipeline(pipe, phase, step)
        del pipe

    loss_history: list[dict] = []
    global_step, interrupted = training.train(
        accelerator=accelerator, args=args, models=models, optimizer=optimizer, lr_scheduler=lr_scheduler,
        dataloader=dataloader, sampler=sampler, compute_loss=compute_loss, validate=validate,
        max_train_steps=args.max_train_steps, initial_global_step=initial_step,
        on_step_end=lambda step, logs: loss_history.append({"step": step, **logs}))
    if interrupted:
        accelerator.end_training()
        return Path(args.output_dir)

    # ---- Final LoRA (with its adapter metadata), a check that it reloads, the model card, the Hub.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        training.save_lora(CogVideoXPipeline, args.output_dir, unwrapped)
        training.write_loss_plot(loss_history, args.output_dir)
        if prompts:
            pipe = CogVideoXPipeline.from_pretrained(args.pretrained_model_name_or_path, torch_dtype=weight_dtype, **load)
            pipe.load_lora_weights(args.output_dir, adapter_name="cogvideox-lora-crepa")
            pipe.to(device)
            video_files = run_pipeline(pipe, "test", global_step)
            del pipe
        variant = "CogVideoX 1.5" if patch_t else ("CogVideoX-5B" if is_large else "CogVideoX-2B")
        training.write_model_card(
            args.output_dir, repo_id=args.hub_model_id or Path(args.output_dir).name,
            base_model=args.pretrained_model_name_or_path, model_tags=["cogvideox", "cogvideox-diffusers"],
            pipeline_cls_name="CogVideoXPipeline", crepa_settings=training.crepa_card_settings(crepa),
            training_settings=training.training_card_settings(args, global_step, variant),
            validation_prompts=prompts, video_files=video_files)
        if repo_id is not None:
            training.upload_output(args, repo_id)
    accelerator.end_training()
    return Path(args.output_dir)


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
