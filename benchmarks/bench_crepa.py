#!/usr/bin/env python
"""What CREPA costs over plain LoRA training, measured on the scripts' own training step.

    python benchmarks/bench_crepa.py --preset tiny                   # seconds, CPU (CI smoke test)
    python benchmarks/bench_crepa.py --preset cpu-mid                # a few minutes, CPU
    python benchmarks/bench_crepa.py --preset cogvideox-5b --encoder dinov2-g   # GPU, full size, random weights
    python benchmarks/bench_crepa.py --preset cogvideox-5b --count   # any machine: FLOPs and peak memory, counted
    python benchmarks/bench_crepa.py --preset wan --count            # Wan 2.1 T2V 1.3B, 81x480x832, counted

Each mode runs `training_loss` from examples/train_*_lora_crepa.py (VAE + text encoding, encoder features, the
transformer with the block hook and the projector (one module, as trained), the loss), then backward, gradient clipping and the optimizer step, with
the data already on the device. Modes are interleaved after warm-up:
- none: plain LoRA; repa: REPA* (self term); crepa: this project's CREPA (grid-exact features of the batch's frames,
  mean over the 4 frames of each latent frame); crepa-center: the same with --crepa_frame_pooling center (one frame);
- none-precomputed, crepa-precomputed: --cache_conditions as the scripts run it: the batch holds the VAE latent
  distribution, text embeddings and DINOv2 features encoded once before training (moved to the device each step, as
  the DataLoader gives them), and the memory holds no text encoder, VAE encoder or DINOv2;
- none-precomputed-fp8, crepa-precomputed-fp8: the same with --layerwise_upcasting (frozen transformer weights in
  float8_e4m3fn, computed in bf16; run last, as they change the shared transformer);
- crepa-precomputed-selective, crepa-precomputed-fp8-selective (--selective_checkpointing), crepa-precomputed-fp8-offload
  (--offload_activations), crepa-precomputed-fp8-offload-swap (and --blocks_to_swap, the preset's N): the memory
  options of crepa_diffusers.memory; what they hold in host memory is reported as host_peak_gib;
- crepa-decode: the decode-based anchor (SimpleTuner's approach): VAE-decode the clean latents, DINOv2 on every
  pixel frame at 518x518, linspace subsampling to the token frames and bilinear token interpolation.
Reported: median step time (unsynchronised steps, one sync per step boundary), the phase split (a second pass with a
device sync at each phase boundary), peak memory (CUDA), and the ratios to `none`. Full-size presets use the real
model configs with random weights (nothing is downloaded), bf16 and gradient checkpointing.
With --count the same step runs on PyTorch's meta device (shapes only, no GPU, no memory for the weights): FLOPs
per phase (torch.utils.flop_counter) and the peak of live tensor bytes, the weights, optimizer state and batch
included, with attention routed to the fused kernels a GPU runs; and the device peak of the one-off --cache_conditions
pass (cache_pass_peak_gib: one encoder on the device at a time, VAE tiling). --modes picks modes; --trace (GPU)
profiles one step per mode and reports how much of the copies' time overlapped compute. The count is of tensors, not of the CUDA caching
allocator (fragmentation, cuBLAS/attention workspaces and the CUDA context add to a GPU's figure).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.util
import json
import platform
import statistics
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from crepa_diffusers import memory, training_utils  # noqa: E402
from crepa_diffusers.capture import transformer_blocks  # noqa: E402
from crepa_diffusers.crepa import CrepaConfig, CrepaProjector  # noqa: E402
from crepa_diffusers.features import DinoPatchFeatures  # noqa: E402
from crepa_diffusers.term import CrepaTerm, TransformerWithProjector  # noqa: E402
from crepa_diffusers.training_utils import step_generator  # noqa: E402


@dataclass
class Preset:
    model: str  # cogvideox | hunyuan | wan: the training script (examples/train_{model}_lora_crepa.py)
    frames: int
    height: int
    width: int
    block_index: int
    dtype: torch.dtype
    gradient_checkpointing: bool
    encoders: tuple[str, ...]
    rank: int = 16  # LoRA rank: the README recipes' at full size (CogVideoX 64, HunyuanVideo 32, Wan 32)
    blocks_to_swap: int = 1  # the *-swap modes' --blocks_to_swap
    full_size: bool = True  # released configs (a GPU to time them); False: small models that run on the CPU


PRESETS = {
    "tiny": Preset("cogvideox", 9, 32, 48, 1, torch.float32, False, ("tiny",), full_size=False),
    "cpu-mid": Preset(
        "cogvideox", 17, 96, 144, 2, torch.float32, True, ("dinov2-s",), blocks_to_swap=2, full_size=False
    ),
    "wan-tiny": Preset("wan", 9, 32, 48, 1, torch.float32, False, ("tiny",), full_size=False),  # the tiny WanPipeline
    "cogvideox-2b": Preset("cogvideox", 49, 480, 720, 8, torch.bfloat16, True, ("dinov2-g", "dinov2-b"), 64, 10),
    "cogvideox-5b": Preset("cogvideox", 49, 480, 720, 8, torch.bfloat16, True, ("dinov2-g", "dinov2-b"), 64, 20),
    "hunyuan": Preset("hunyuan", 49, 512, 768, 8, torch.bfloat16, True, ("dinov2-g", "dinov2-b"), 32, 30),
    "hunyuan-544p": Preset("hunyuan", 129, 544, 960, 8, torch.bfloat16, True, ("dinov2-g",), 32, 40),
    # Wan 2.1 T2V 1.3B at its 480p size (81x480x832: 21 x 30 x 52 = 32,760 tokens); CREPA on block 8, the script's
    # default; LoRA rank 32, the rank of the README's Wan recipe (to be written with 32); 10 of its 30 blocks swapped
    # in the -swap modes.
    "wan": Preset("wan", 81, 480, 832, 8, torch.bfloat16, True, ("dinov2-g", "dinov2-b"), 32, 10),
    # Wan 2.1 T2V 14B at the same 480p size (40 blocks, 5120 wide; also the size of each Wan 2.2 A14B expert); 30 of
    # its 40 blocks swapped in the -swap modes (the README's 24 GB recipe).
    "wan-14b": Preset("wan", 81, 480, 832, 8, torch.bfloat16, True, ("dinov2-g",), 32, 30),
    # Wan 2.2 TI2V-5B as text-to-video at its 720p size (121x704x1280: 31 x 22 x 40 = 27,280 tokens; its VAE
    # compresses 16x), 30 blocks 3072 wide, Wan 2.2's 48-channel VAE; 10 of 30 blocks swapped in the -swap modes.
    "wan-5b": Preset("wan", 121, 704, 1280, 8, torch.bfloat16, True, ("dinov2-g",), 32, 10),
}
# Memory options on top of precomputed conditions (README, "Fitting a 12-24 GB card"): --selective_checkpointing,
# --offload_activations, --blocks_to_swap (the preset's number). The bf16 one runs before fp8 casts the transformer.
MEMORY_MODES = (
    "none-precomputed-selective",  # the like-for-like baseline of the selective modes
    "crepa-precomputed-selective",
    "none-precomputed-fp8-selective",
    "crepa-precomputed-fp8-selective",
    "crepa-precomputed-fp8-offload",
    "crepa-precomputed-fp8-offload-swap",
)


def load_script(name: str):
    path = ROOT / "examples" / f"train_{name}_lora_crepa.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------------------------
# Models from configs (random weights)


def build_encoder(name: str):
    from transformers import Dinov2Config, Dinov2Model

    from crepa_diffusers.testing import build_tiny_dinov2

    if name == "tiny":
        return build_tiny_dinov2(registers=True)
    configs = {  # the released facebook/dinov2-* configs
        "dinov2-s": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6},
        "dinov2-b": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
        "dinov2-g": {"hidden_size": 1536, "num_hidden_layers": 40, "num_attention_heads": 24, "use_swiglu_ffn": True},
    }
    return Dinov2Model(Dinov2Config(patch_size=14, image_size=518, mlp_ratio=4, **configs[name])).eval()


def build_cogvideox(preset_name: str):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    from crepa_diffusers.testing import build_tiny_cogvideox_pipeline

    if preset_name == "tiny":
        pipe = build_tiny_cogvideox_pipeline("5b")
        return pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.transformer, pipe.scheduler
    tiny = build_tiny_cogvideox_pipeline("5b")
    if preset_name == "cpu-mid":
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=4,
            attention_head_dim=64,
            in_channels=16,
            out_channels=16,
            time_embed_dim=128,
            text_embed_dim=256,
            num_layers=6,
            sample_width=18,
            sample_height=12,
            sample_frames=17,
            patch_size=2,
            max_text_seq_length=32,
            use_rotary_positional_embeddings=True,
        )
        vae = AutoencoderKLCogVideoX(
            block_out_channels=(32, 32, 64, 64), latent_channels=16, layers_per_block=1, norm_num_groups=8
        )
        text_encoder = T5EncoderModel(
            T5Config(vocab_size=len(tiny.tokenizer), d_model=256, d_ff=512, d_kv=32, num_layers=2, num_heads=8)
        )
    else:  # the released CogVideoX-2B / 5B configs
        large = preset_name == "cogvideox-5b"
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=48 if large else 30,
            attention_head_dim=64,
            in_channels=16,
            out_channels=16,
            time_embed_dim=512,
            text_embed_dim=4096,
            num_layers=42 if large else 30,
            sample_width=90,
            sample_height=60,
            sample_frames=49,
            patch_size=2,
            max_text_seq_length=226,
            use_rotary_positional_embeddings=large,
        )
        vae = AutoencoderKLCogVideoX()  # the default config is the released one
        text_encoder = T5EncoderModel(
            T5Config(
                vocab_size=32128,
                d_model=4096,
                d_ff=10240,
                d_kv=64,
                num_layers=24,
                num_heads=64,
                feed_forward_proj="gated-gelu",
            )
        )
    scheduler = CogVideoXDDIMScheduler(**tiny.scheduler.config)
    return tiny.tokenizer, text_encoder, vae, transformer, scheduler


def build_hunyuan():
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    from crepa_diffusers.testing import build_tiny_hunyuan_pipeline

    tiny = build_tiny_hunyuan_pipeline()
    text_encoder = LlamaModel(
        LlamaConfig(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128320,
        )
    )
    text_encoder_2 = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            projection_dim=768,
            vocab_size=49408,
        )
    )
    return HunyuanVideoPipeline(
        text_encoder=text_encoder,
        tokenizer=tiny.tokenizer,
        transformer=HunyuanVideoTransformer3DModel(),
        vae=AutoencoderKLHunyuanVideo(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tiny.tokenizer_2,
    )


def build_wan(preset_name: str):
    """A WanPipeline: the tiny one of the tests for `wan-tiny`; else Wan 2.1 T2V 1.3B's (`wan`) or 14B's (`wan-14b`)
    released configs (transformer, Wan 2.1's VAE, umt5-xxl's encoder), with the tiny pipeline's tokenizer (nothing is
    downloaded). Its scheduler is the training one, as the script builds it: FlowMatchEulerDiscreteScheduler(shift=
    3.0; the 14B folder's 5.0 changes no FLOP or byte)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from crepa_diffusers.testing import build_tiny_wan_pipeline

    with torch.device("cpu"):  # its VAE config reads tensor values (latents_mean): not on the meta device
        tiny = build_tiny_wan_pipeline("2.1")
    if preset_name == "wan-tiny":  # moved to the device with the other frozen models
        transformer, vae, text_encoder = tiny.transformer, tiny.vae, tiny.text_encoder
    else:
        # (heads, FFN width, blocks, latent channels) of the 1.3B, the 14B and the TI2V-5B.
        heads, ffn_dim, num_layers, channels = {"wan-14b": (40, 13824, 40, 16), "wan-5b": (24, 14336, 30, 48)}.get(
            preset_name, (12, 8960, 30, 16)
        )
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=heads,
            attention_head_dim=128,
            in_channels=channels,
            out_channels=channels,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            rope_max_seq_len=1024,
        )
        vae = AutoencoderKLWan()  # the default config is Wan 2.1's (base_dim 96, z_dim 16)
        if preset_name == "wan-5b":  # Wan 2.2's VAE (Wan2.2-TI2V-5B-Diffusers vae/config.json; statistics: no FLOP)
            vae = AutoencoderKLWan(
                base_dim=160,
                decoder_base_dim=256,
                z_dim=48,
                dim_mult=[1, 2, 4, 4],
                num_res_blocks=2,
                temperal_downsample=[False, True, True],
                is_residual=True,
                in_channels=12,
                out_channels=12,
                patch_size=2,
                scale_factor_spatial=16,
                scale_factor_temporal=4,
                latents_mean=[0.0] * 48,
                latents_std=[1.0] * 48,
            )
        text_encoder = UMT5EncoderModel(  # umt5-xxl
            UMT5Config(
                vocab_size=256384,
                d_model=4096,
                d_ff=10240,
                d_kv=64,
                num_heads=64,
                num_layers=24,
                feed_forward_proj="gated-gelu",
                relative_attention_num_buckets=32,
            )
        )
    return WanPipeline(
        tokenizer=tiny.tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        expand_timesteps=preset_name == "wan-5b",
    )


class PhaseTimer:
    """Accumulates wall time per named phase, synchronising the device at each boundary (timed runs only: the
    scripts' training step knows nothing of it; `script_step_phases` names its phases from outside)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.totals = device, {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start


@contextlib.contextmanager
def script_step_phases(setup: "StepSetup", model: torch.nn.Module, term, phases):
    """Names the phases of the script's `training_loss` from outside it (the scripts take no timer): while this is
    open, the calls into the frozen text encoders and VAE are "text_vae_encoding", DINOv2 (`term.encode`) is
    "encoder_features", the trained module's forward is "transformer_forward", and what follows it is "loss".
    `phases(name)` is a context manager (PhaseTimer, CountedPhases, LiveTensorBytes.phases)."""
    pipe, wrapped = setup.pipe, []
    loss_phase = []

    def wrap(owner, attr: str, name: str, then: str | None = None) -> None:
        original = owner.__dict__.get(attr)
        call = getattr(owner, attr)

        def in_phase(*args, **kwargs):
            with phases(name):
                result = call(*args, **kwargs)
            if then is not None:
                loss_phase.append(phases(then))
                loss_phase[-1].__enter__()
            return result

        setattr(owner, attr, in_phase)
        wrapped.append((owner, attr, original))

    if pipe is None:  # CogVideoX: the script's T5 helper
        wrap(setup.script, "encode_prompts", "text_vae_encoding")
    else:  # HunyuanVideo (Llama + CLIP), Wan (UMT5): the pipeline's encode_prompt
        wrap(pipe, "encode_prompt", "text_vae_encoding")
    wrap(setup.vae, "encode", "text_vae_encoding")
    if term is not None:
        wrap(term, "encode", "encoder_features")
    wrap(model, "forward", "transformer_forward", then="loss")
    try:
        yield
    finally:
        for phase in loss_phase:
            phase.__exit__(None, None, None)
        for owner, attr, original in reversed(wrapped):
            if original is None:
                delattr(owner, attr)  # back to the class's method
            else:
                setattr(owner, attr, original)


# ----------------------------------------------------------------------------------------------------------------
# The decode-based anchor


class DecodeAnchorTerm(CrepaTerm):
    """Features from VAE-decoded clean latents at 518x518, linspace in time, tokens interpolated to the DiT grid."""

    def __init__(
        self, config, transformer, projector, encoder: DinoPatchFeatures, vae, stash: dict, latent_layout: str
    ):
        super().__init__(config, transformer, projector, encoder)
        self.vae, self.stash, self.latent_layout = vae, stash, latent_layout

    @torch.no_grad()
    def encode(self, frames, token_grid, groups):
        latents = self.stash["latent_dist"].mode()  # [B, C, F, h, w], as SimpleTuner decodes the clean latents
        pixels = self.vae.decode(latents).sample.clamp(-1, 1)  # [B, 3, F, H, W]
        batch, _, num_frames = pixels.shape[:3]
        pixels = pixels.permute(0, 2, 1, 3, 4).flatten(0, 1)
        encoder, size = self.encoder, 518
        grid = size // encoder.patch_size
        features = []
        for chunk in pixels.split(encoder.frames_per_chunk):
            chunk = F.interpolate((chunk.float() + 1) / 2, size=(size, size), mode="bilinear", align_corners=False)
            chunk = (chunk - encoder.mean) / encoder.std
            with encoder._autocast(chunk.device):
                out = encoder.encoder(pixel_values=chunk.to(encoder.encoder.dtype)).last_hidden_state
            features.append(out[:, encoder.num_prefix_tokens :].float())
        features = torch.cat(features).unflatten(0, (batch, num_frames))  # [B, F, grid^2, D]
        index = torch.linspace(0, num_frames - 1, len(groups)).long().to(features.device)
        features = features[:, index].flatten(0, 1).transpose(1, 2).unflatten(2, (grid, grid))
        features = F.interpolate(features, size=token_grid, mode="bilinear", align_corners=False)
        return features.flatten(2).transpose(1, 2).unflatten(0, (batch, len(groups)))


# ----------------------------------------------------------------------------------------------------------------


@dataclass
class StepSetup:
    script: object  # the training script's module: training_loss, Parts
    parts: object
    terms: dict  # mode -> CrepaTerm (None for plain LoRA)
    transformer: torch.nn.Module
    projector: torch.nn.Module
    encoder: DinoPatchFeatures
    batch: dict
    pipe: object = None  # HunyuanVideoPipeline (its encode_prompt is the text path)
    precomputed: dict = None  # the batch of the *-precomputed modes: its conditions encoded once, on the CPU
    device: torch.device = None
    crepa: CrepaTerm = None  # the default CREPA term (precompute encodes its features whichever modes run)
    model: str = None  # the preset's model: cogvideox | hunyuan | wan
    texts: dict = None  # the text encoders, by the names the count reports (t5; llama, clip; umt5)
    vae: torch.nn.Module = None


def build_step_setup(
    preset_name: str, encoder_name: str, device: torch.device, dtype: torch.dtype, batch_size: int
) -> StepSetup:
    """Models from configs (random weights), built directly in `dtype` on `device` (a GPU, the CPU, or the meta
    device for FLOP counting), with LoRA, the encoder, the projector and one CREPA term per mode."""
    preset = PRESETS[preset_name]
    script = load_script(preset.model)
    torch.manual_seed(0)
    pipe = None
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build full-size models directly in bf16 on the GPU (fp32 would not fit)
    try:
        with torch.device(device):
            if preset.model == "cogvideox":
                tokenizer, text_encoder, vae, transformer, scheduler = build_cogvideox(preset_name)
                texts = {"t5": text_encoder}
            elif preset.model == "hunyuan":
                pipe = build_hunyuan()
                texts = {"llama": pipe.text_encoder, "clip": pipe.text_encoder_2}
            else:
                pipe = build_wan(preset_name)
                texts = {"umt5": pipe.text_encoder}
            if pipe is not None:
                vae, transformer = pipe.vae, pipe.transformer
            encoder_model = build_encoder(encoder_name)
    finally:
        torch.set_default_dtype(default_dtype)
    for module in (vae, transformer, *texts.values()):
        to_loaded_dtype(module.requires_grad_(False), device, dtype)
    if preset.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    with torch.device(device):
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        # As the scripts add it: LoRA on the blocks' attention projections (HunyuanVideo's token refiner has none),
        # its weights in fp32.
        targets = (
            ["to_k", "to_q", "to_v", "to_out.0"]
            if preset.model == "cogvideox"
            else script.lora_target_regex(script.DEFAULT_LORA_LAYERS, transformer)
        )
        transformer.add_adapter(
            LoraConfig(r=preset.rank, lora_alpha=preset.rank, init_lora_weights=True, target_modules=targets)
        )
        cast_training_params(transformer, dtype=torch.float32)
        encoder = DinoPatchFeatures(
            encoder_model.to(device, dtype=dtype),
            frames_per_chunk=16,
            autocast_dtype=torch.bfloat16 if device.type == "cuda" else None,
        )
        hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        projector = CrepaProjector(hidden, encoder.hidden_size, 2048 if preset.full_size else 256)
    stash: dict = {}
    original_encode = vae.encode

    def encode_and_stash(x, *args, **kwargs):  # the decode anchor decodes the step's clean latents
        out = original_encode(x, *args, **kwargs)
        stash["latent_dist"] = out.latent_dist
        return out

    vae.encode = encode_and_stash
    terms = {"none": None}
    for mode, crepa_mode, pooling in (
        ("repa", "repa", "mean"),
        ("crepa", "crepa", "mean"),
        ("crepa-center", "crepa", "center"),
    ):
        config = CrepaConfig(mode=crepa_mode, lambda_=0.5, block_index=preset.block_index, frame_pooling=pooling)
        terms[mode] = CrepaTerm(config, transformer, projector, encoder)
    terms["crepa-decode"] = DecodeAnchorTerm(
        CrepaConfig(mode="crepa", lambda_=0.5, block_index=preset.block_index),
        transformer,
        projector,
        encoder,
        vae,
        stash,
        preset.model,
    )
    if preset.model == "cogvideox":
        parts = script.Parts(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            model=transformer,
            config=transformer.config,
            scheduler=scheduler,
            weight_dtype=dtype,
            device=device,
        )
    else:
        args = argparse.Namespace(  # the scripts' defaults
            random_flip=False,
            max_sequence_length=256 if preset.model == "hunyuan" else 512,
            guidance_scale=1.0,
            flow_weighting_scheme="logit_normal" if preset.model == "wan" else "none",
            flow_logit_mean=0.0,
            flow_logit_std=1.0,
            flow_mode_scale=1.29,
        )
        if preset.model == "hunyuan":
            size = {"patch_size": transformer.config.patch_size}
        else:  # pixels per token side: the VAE's spatial factor (8 for Wan 2.1) x the patch size; the latent statistics
            size = {
                "token_pixels": pipe.vae_scale_factor_spatial * transformer.config.patch_size[1],
                **{
                    name: torch.tensor(getattr(pipe.vae.config, name), device=device).view(1, -1, 1, 1, 1)
                    for name in ("latents_mean", "latents_std")
                },
            }
        parts = script.Parts(
            pipe=pipe,
            model=transformer,
            scheduler=pipe.scheduler,
            weight_dtype=dtype,
            device=device,
            args=args,
            **size,
        )
    batch = {
        "frames": torch.rand(batch_size, preset.frames, 3, preset.height, preset.width, device=device) * 2 - 1,
        "prompts": ["a panda playing a guitar in a bamboo forest, cinematic"] * batch_size,
        "indices": torch.arange(batch_size),
    }
    # In the order the count runs them: the fp8 ones last, since fp8 casts the shared transformer for good.
    bf16_memory_modes = [m for m in MEMORY_MODES if "fp8" not in m]
    fp8_memory_modes = [m for m in MEMORY_MODES if "fp8" in m]
    for mode in (
        "none-precomputed",
        "crepa-precomputed",
        *bf16_memory_modes,
        "none-precomputed-fp8",
        "crepa-precomputed-fp8",
        *fp8_memory_modes,
    ):
        terms[mode] = None if mode.startswith("none") else terms["crepa"]
    return StepSetup(
        script,
        parts,
        terms,
        transformer,
        projector,
        encoder,
        batch,
        pipe,
        device=device,
        crepa=terms["crepa"],
        model=preset.model,
        texts=texts,
        vae=vae,
    )


def to_loaded_dtype(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """`module.to(device, dtype)` as the scripts' `from_pretrained(..., dtype=dtype)` loads it: a diffusers model's
    `_keep_in_fp32_modules` stay in float32 (Wan's transformer: rope, time_embedder, scale_shift_table, norm1-3; the
    CogVideoX and HunyuanVideo models name none). transformers keeps its list (T5's `wo`) only for float16."""
    from diffusers import ModelMixin

    keep = set(getattr(module, "_keep_in_fp32_modules", None) or []) if isinstance(module, ModelMixin) else set()
    done = {}  # a tensor shared by two modules (tied weights) stays shared
    for owner_name, owner in module.named_modules(remove_duplicate=False):
        for tensors in (owner._parameters, owner._buffers):
            for name, tensor in tensors.items():
                if tensor is None:
                    continue
                if id(tensor) not in done:
                    full_name = f"{owner_name}.{name}".split(".")
                    target = torch.float32 if keep.intersection(full_name) else dtype
                    moved = tensor.detach().to(device, dtype=target if tensor.is_floating_point() else None)
                    if isinstance(tensor, torch.nn.Parameter):
                        moved = torch.nn.Parameter(moved, requires_grad=tensor.requires_grad)
                    done[id(tensor)] = (tensor, moved)  # the old tensor kept alive: ids stay unique
                tensors[name] = done[id(tensor)][1]


def precompute(setup: StepSetup) -> None:
    """--cache_conditions: the batch's conditions encoded once before training (CREPA's features included; `none`
    reads only the latent distribution and the text embeddings), kept on the CPU as the DataLoader hands them over."""
    batch, crepa = setup.batch, setup.crepa
    conditions = setup.script.encode_conditions(batch["frames"], batch["prompts"], setup.parts, crepa)
    conditions["features"] = conditions["features"].to(crepa.cache_dtype)
    device = batch["frames"].device
    setup.precomputed = {
        **batch,
        "conditions": {name: t.to("cpu" if device.type != "meta" else device) for name, t in conditions.items()},
    }


def mode_groups(modes: list[str]) -> list[list[str]]:
    """Interleaved groups, in the order they can run: fp8 casts the shared transformer for good; each memory mode on
    its own (its options are set around the group)."""
    groups = [
        [m for m in modes if "precomputed" not in m],
        [m for m in modes if m.endswith("-precomputed")],
        *[[m] for m in modes if m in MEMORY_MODES and "fp8" not in m],
        [m for m in modes if m.endswith("-fp8")],
        *[[m] for m in modes if m in MEMORY_MODES and "fp8" in m],
    ]
    return [group for group in groups if group]


class CountedActivationOffload(memory.ActivationOffload):
    """On the meta device the host copies are meta tensors too: made outside the memory count (they are counted as
    host memory by the offload itself), as a GPU's device memory would not hold them."""

    def _to_host(self, tensor):
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            return super()._to_host(tensor)


@contextlib.contextmanager
def memory_options(mode: str, setup: StepSetup, preset: Preset):
    """The memory flags a mode names, around its steps: yields the forward context (--offload_activations) and the
    BlockSwap (--blocks_to_swap) or None. Host copies live on the CPU, or on the meta device when counting."""
    transformer, device = setup.transformer, setup.device
    host = "meta" if device.type == "meta" else "cpu"
    selective = mode.endswith("-selective")
    if selective:
        transformer.enable_gradient_checkpointing(memory.selective_checkpointing())
    offload = None
    if "-offload" in mode:
        offload = (CountedActivationOffload if device.type == "meta" else memory.ActivationOffload)(
            device,
            min_bytes=1 << 20 if preset.dtype == torch.bfloat16 else 0,  # full size: the scripts'; tiny: every tensor
            host_device=host,
        )
    swap = None
    if mode.endswith("-swap"):
        swap = memory.BlockSwap(transformer_blocks(transformer), preset.blocks_to_swap, device, host_device=host)
    try:
        yield offload or contextlib.nullcontext(), swap
    finally:
        if swap is not None:
            swap.remove()
        if selective and preset.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        elif selective:
            transformer.disable_gradient_checkpointing()


def frozen_encoders(setup: StepSetup) -> list[torch.nn.Module]:
    """What --cache_conditions frees after its pass: the text encoders, the VAE encoder and DINOv2."""
    return [*setup.texts.values(), setup.vae.encoder, setup.encoder.encoder]


def host_bytes(forward_context, swap) -> int:
    """What the memory options hold in host memory at most: the swapped weights, the offloaded activations' peak."""
    offloaded = forward_context.host_bytes.peak if isinstance(forward_context, memory.ActivationOffload) else 0
    return offloaded + (swap.host_bytes.peak if swap is not None else 0)


def batch_of(setup: StepSetup, mode: str) -> dict:
    return setup.precomputed if "precomputed" in mode else setup.batch


def layerwise_casting_from(mode: str, setup: StepSetup, dtype: torch.dtype) -> None:
    """Before the first -fp8 mode (they run last): the frozen transformer weights stored in fp8, as
    --layerwise_upcasting does (CogVideoX: diffusers' enable_layerwise_casting; HunyuanVideo and Wan:
    enable_fp8_weights, which for Wan casts what diffusers' does: its blocks' modulation is a parameter, no Linear)."""
    if "-fp8" in mode and not getattr(setup.transformer, "_crepa_bench_fp8", False):
        if setup.model == "cogvideox":
            setup.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
        else:
            training_utils.enable_fp8_weights(setup.transformer, compute_dtype=dtype)
        setup.transformer._crepa_bench_fp8 = True


def copy_compute_overlap(events) -> dict:
    """From a CUDA profile of one step: the time of host<->device copies, and the fraction of it during which a compute
    kernel ran (copies on the side stream hidden behind the blocks' work: 1.0 is a perfect overlap)."""
    import bisect

    from torch.autograd import DeviceType

    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    copies = [(e.time_range.start, e.time_range.end) for e in kernels if "Memcpy" in e.name]
    merged = []  # the union of the compute kernels' intervals
    for start, end in sorted((e.time_range.start, e.time_range.end) for e in kernels if "Mem" not in e.name):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    starts, hidden = [m[0] for m in merged], 0.0
    for start, end in copies:
        for m_start, m_end in merged[max(bisect.bisect_right(starts, start) - 1, 0) :]:
            if m_start >= end:
                break
            hidden += max(0.0, min(end, m_end) - max(start, m_start))
    total = sum(end - start for start, end in copies)
    return {"copy_ms": total / 1e3, "overlapped_fraction": hidden / total if total else None}


def select_modes(setup: StepSetup, modes: list[str] | None) -> None:
    """--modes: only these (and `none`, the baseline of every ratio)."""
    if modes:
        unknown = set(modes) - set(setup.terms)
        if unknown:
            raise SystemExit(f"--modes: unknown {sorted(unknown)}; choose from {list(setup.terms)}.")
        setup.terms = {m: t for m, t in setup.terms.items() if m == "none" or m in modes}


def run(
    preset_name: str,
    encoder_name: str,
    steps: int,
    warmup: int,
    batch_size: int,
    device: torch.device,
    modes: list[str] | None = None,
    trace_dir: str | None = None,
) -> dict:
    preset = PRESETS[preset_name]
    dtype = preset.dtype  # the full-size presets bf16 (as the scripts on GPUs), the tiny ones fp32
    setup = build_step_setup(preset_name, encoder_name, device, dtype, batch_size)
    select_modes(setup, modes)
    precompute(setup)
    script, parts, terms, transformer, projector, encoder = (
        setup.script,
        setup.parts,
        setup.terms,
        setup.transformer,
        setup.projector,
        setup.encoder,
    )

    lora_params = [p for p in transformer.parameters() if p.requires_grad]
    params = lora_params + list(projector.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # One TransformerWithProjector per mode (as the scripts train), sharing the transformer and the projector; its
    # forward under autocast in the training dtype with fp32 outputs, as accelerate.prepare wraps the scripts' model
    # with --mixed_precision bf16 (with fp8 storage the LoRA's fp32 weights meet bf16 inputs: autocast serves both).
    models = {mode: TransformerWithProjector(transformer, term) for mode, term in terms.items()}
    if dtype != torch.float32:
        from accelerate.utils import convert_outputs_to_fp32

        for model in models.values():
            model.forward = convert_outputs_to_fp32(torch.autocast(device.type, dtype=dtype)(model.forward))

    def step(mode: str, timer=contextlib.nullcontext):
        generator = step_generator(0, 0, 0, device)
        mode_parts = dataclasses.replace(parts, model=models[mode], forward_context=forward_context)
        with script_step_phases(setup, models[mode], terms[mode], timer):
            loss, _ = script.training_loss(batch_of(setup, mode), generator, mode_parts, terms[mode], 0, 1)
        with timer("backward"):
            loss.backward()
        with timer("optimizer"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    modes = list(terms)
    times = {mode: [] for mode in modes}
    peaks = dict.fromkeys(modes, 0)
    host_peaks = dict.fromkeys(modes, 0)
    splits, overlaps = {}, {}
    # Interleaved within a group; the precomputed modes run after the encoders left the GPU, the fp8 ones last.
    for group in mode_groups(modes):
        if "precomputed" in group[0]:
            for module in frozen_encoders(setup):
                module.to("cpu")
            torch.cuda.empty_cache() if device.type == "cuda" else None
        layerwise_casting_from(group[0], setup, dtype)
        with memory_options(group[0], setup, preset) as (forward_context, swap):
            for _ in range(warmup):
                for mode in group:
                    step(mode)
            for _ in range(steps):
                for mode in group:
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    sync()
                    start = time.perf_counter()
                    step(mode)
                    sync()
                    times[mode].append(time.perf_counter() - start)
                    if device.type == "cuda":
                        peaks[mode] = max(peaks[mode], torch.cuda.max_memory_allocated(device))
            for mode in group:
                timer = PhaseTimer(device)
                for _ in range(steps):
                    step(mode, timer)
                splits[mode] = {name: total / steps for name, total in timer.totals.items()}
                host_peaks[mode] = host_bytes(forward_context, swap)
                if trace_dir and device.type == "cuda":  # one more step, profiled: a Chrome trace and the overlap
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
                        step(mode)
                        sync()
                    profile.export_chrome_trace(str(Path(trace_dir, f"{preset_name}-{encoder_name}-{mode}.json")))
                    overlaps[mode] = copy_compute_overlap(profile.events())

    median = {mode: statistics.median(values) for mode, values in times.items()}
    encoder_bytes = sum(p.numel() * p.element_size() for p in encoder.parameters())
    return {
        "preset": preset_name,
        "encoder": encoder_name,
        "clip": f"{preset.frames}x{preset.height}x{preset.width}",
        "batch_size": batch_size,
        "dtype": str(dtype).replace("torch.", ""),
        "gradient_checkpointing": preset.gradient_checkpointing,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "date": datetime.date.today().isoformat(),
        "steps_timed": steps,
        "median_step_s": median,
        "ratio_to_none": {mode: median[mode] / median["none"] for mode in modes},
        "phase_split_s": splits,
        "peak_memory_gib": {m: peaks[m] / 2**30 for m in modes} if device.type == "cuda" else None,
        "host_peak_gib": {m: host_peaks[m] / 2**30 for m in modes},
        "copy_overlap": overlaps,
        "encoder_weights_gib": encoder_bytes / 2**30,
        "lora_rank": preset.rank,
        "blocks_to_swap": preset.blocks_to_swap,
    }


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage alive, and their peak, over the ops run under it (on any device, the meta device
    included, where nothing is allocated): each op output's storage is counted once, until it is freed. Tensors that
    exist before (weights, optimizer state, the batch) are passed in `existing`. `phase` names the running phase,
    so the peak is attributed to one."""

    def __init__(self, existing=(), elsewhere=()) -> None:
        super().__init__()
        self.sizes = WeakIdKeyDictionary()  # storage -> bytes; a storage is counted once however many views
        self.current = self.peak = 0
        self.phase = self.peak_phase = "before the step"
        self.phase_peaks: dict[str, int] = {}  # the most bytes alive while each phase ran
        for tensor in elsewhere:  # known, not counted here (e.g. weights counted by ModelsInTurn), nor their views
            self.sizes[tensor.untyped_storage()] = 0
        for tensor in existing:
            self._track(tensor)

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self.sizes:
            return
        nbytes = storage.nbytes()
        self.sizes[storage] = nbytes
        weakref.finalize(storage, self._free, nbytes)
        self.current += nbytes
        self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), self.current)
        if self.current > self.peak:
            self.peak, self.peak_phase = self.current, self.phase

    def phases(self, name: str):
        """Stands in for the phase timer: names the phase that allocations (and the peak) belong to."""

        @contextlib.contextmanager
        def phase():
            self.phase = name
            self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), self.current)
            yield

        return phase()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor):
                self._track(value)
        return out


def fused_attention_on_meta(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    *,
    _sdpa=F.scaled_dot_product_attention,
):
    """`scaled_dot_product_attention` as a GPU runs it, for the meta device. There SDPA takes the math path, which
    materialises the [N, N] attention matrix (in fp32): a GPU never does. The fused kernels' meta versions (flash
    attention in bf16/fp16, memory-efficient attention with a mask or in fp32) give the GPU's shapes: the output and
    the log-sum-exp saved for backward, and the backward's recomputation counted as FLOPs."""
    if query.device.type != "meta" or enable_gqa or query.shape[-1] > 256:
        return _sdpa(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )
    if attn_mask is None and query.dtype in (torch.bfloat16, torch.float16):
        return torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, False, scale=scale
        )[0]
    bias = attn_mask
    if bias is not None and bias.dtype == torch.bool:  # what SDPA does with a boolean mask: an additive bias
        bias = torch.zeros(bias.shape, dtype=query.dtype, device=bias.device).masked_fill(~bias, float("-inf"))
    if bias is not None:
        bias = bias.to(query.dtype).expand(*query.shape[:-1], key.shape[-2])
    need_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, bias, need_lse, dropout_p, is_causal, scale=scale
    )[0]


@contextlib.contextmanager
def gpu_attention_on_meta():
    """Every caller (diffusers, transformers) looks SDPA up on torch.nn.functional at call time, so patching it there
    also covers gradient checkpointing's recomputation inside backward."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = fused_attention_on_meta
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


class CountedPhases:
    """Stands in for the phase timer: FLOPs counted per phase (torch.utils.flop_counter) instead of seconds."""

    def __init__(self, counter) -> None:
        self.counter, self.totals = counter, {}

    def __call__(self, name: str):
        @contextlib.contextmanager
        def phase():
            before = self.counter.get_total_flops()
            yield
            self.totals[name] = self.totals.get(name, 0) + self.counter.get_total_flops() - before

        return phase()


def _tensors(*objects) -> list[torch.Tensor]:
    """Parameters and buffers of modules, states of optimizers, and tensors in dicts."""
    found = []
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            found += [*obj.parameters(), *obj.buffers()]
        elif isinstance(obj, torch.optim.Optimizer):
            found += [v for state in obj.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
        elif isinstance(obj, dict):
            found += [v for v in obj.values() if isinstance(v, torch.Tensor)]
            found += _tensors(*[v for v in obj.values() if isinstance(v, dict)])  # a batch's conditions
    return found


class ModelsInTurn:
    """The memory count of --offload_encoders: a model's weights are on the device from its first forward (the VAE:
    its encoder's) until another model's forward starts; none before the first. Each model's turn is a phase of
    the count (its peak: `phase_peaks`)."""

    def __init__(self, memory_count: LiveTensorBytes, models: dict[str, torch.nn.Module], entry_points: dict) -> None:
        self.memory, self.active = memory_count, None
        self.sizes = {name: sum(t.nbytes for t in _tensors(model)) for name, model in models.items()}
        self.handles = [
            module.register_forward_pre_hook(lambda *_, name=name: self.visit(name))
            for name, module in entry_points.items()
        ]

    def visit(self, name: str) -> None:
        if name == self.active:
            return
        self.memory.current += self.sizes[name] - (self.sizes[self.active] if self.active else 0)
        self.memory.phase, self.active = name, name
        self.memory.phase_peaks[name] = max(self.memory.phase_peaks.get(name, 0), self.memory.current)
        if self.memory.current > self.memory.peak:
            self.memory.peak, self.memory.peak_phase = self.memory.current, name

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def count_cache_pass(setup: StepSetup, offload_and_tiling: bool) -> dict:
    """The device peak of the --cache_conditions pass on one clip (the transformer is not on the device then; the
    scripts move it after the pass). With `offload_and_tiling` (--offload_encoders --enable_tiling): one model on
    the device at a time and VAE tiling; without, every encoder on the device and no tiling (the scripts' default).
    Returns the peak in GiB and, with offloading, the peak while each model ran."""
    crepa, vae, texts = setup.crepa, setup.vae, setup.texts
    models = {**texts, "vae": vae, "dinov2": crepa.encoder.encoder}
    existing = [setup.batch["frames"]] + ([] if offload_and_tiling else _tensors(*models.values()))
    if offload_and_tiling:
        vae.enable_tiling()
    elsewhere = _tensors(*models.values()) if offload_and_tiling else []
    with gpu_attention_on_meta(), LiveTensorBytes(existing, elsewhere) as memory_count:
        turns = (
            ModelsInTurn(memory_count, models, {**texts, "vae": vae.encoder, "dinov2": crepa.encoder.encoder})
            if offload_and_tiling
            else None
        )
        try:
            batch = setup.batch
            setup.script.encode_conditions(batch["frames"], batch["prompts"], setup.parts, crepa)
        finally:
            if turns is not None:
                turns.remove()
            vae.disable_tiling()
    gib = 2**30
    return {
        "peak_gib": memory_count.peak / gib,
        "model_peaks_gib": {n: memory_count.phase_peaks.get(n, 0) / gib for n in models} if turns else None,
        "peak_during": memory_count.peak_phase,
        "weights_gib": {name: sum(t.nbytes for t in _tensors(m)) / gib for name, m in models.items()},
    }


def umt5_without_padding_mask(text_encoder: torch.nn.Module):
    """For the meta device: WanPipeline's encode_prompt runs as the script calls it, but transformers' mask builder
    asks whether the padding mask is all ones (.all()), which the meta device cannot answer. UMT5 then runs on the
    same max_sequence_length tokens without the mask: the same matmuls; all it leaves out is the [B, 1, 512, 512]
    additive mask (1 MiB in bf16). The pipeline still zeroes the embeddings after the prompt's tokens. Returns the
    hook's handle."""

    def no_padding_mask(module, args, kwargs):
        return args[:1], {**kwargs, "attention_mask": None}

    return text_encoder.register_forward_pre_hook(no_padding_mask, with_kwargs=True)


def count_on_meta(preset_name: str, encoder_name: str, batch_size: int = 1, modes: list[str] | None = None) -> dict:
    """FLOPs and peak tensor memory of one training step per mode at full size, on the meta device (shapes only:
    nothing is allocated, no GPU needed). Each mode has its own optimizer (LoRA, plus the projector for CREPA) and
    is counted on its second step, when the AdamW state exists; the memory of a mode counts only the models it
    needs (plain LoRA holds no encoder and no projector). The model weights are in the preset's dtype (bf16)."""
    preset = PRESETS[preset_name]
    setup = build_step_setup(preset_name, encoder_name, torch.device("meta"), preset.dtype, batch_size)
    select_modes(setup, modes)
    terms, transformer, pipe = setup.terms, setup.transformer, setup.pipe
    if setup.model == "hunyuan":

        def encode_prompt_on_meta(prompts, device=None, dtype=None, max_sequence_length=256):
            # diffusers' encode_prompt reads token values (.item()), which the meta device cannot: run the same two
            # encoders on inputs of the same length (template crop 95 + max_sequence_length; CLIP 77 tokens).
            crop, size = 95, len(prompts)
            ids = torch.zeros(size, max_sequence_length + crop, dtype=torch.long, device="meta")
            states = pipe.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states[-3][:, crop:]
            pooled = pipe.text_encoder_2(torch.zeros(size, 77, dtype=torch.long, device="meta")).pooler_output
            return states, pooled, torch.ones(size, max_sequence_length, dtype=torch.long, device="meta")

        pipe.encode_prompt = encode_prompt_on_meta
    elif setup.model == "wan":
        umt5_without_padding_mask(pipe.text_encoder)
    precompute(setup)
    cache_pass = {"default": count_cache_pass(setup, False), "offload_encoders": count_cache_pass(setup, True)}
    frozen = [*setup.texts.values(), setup.vae]
    lora = [p for p in transformer.parameters() if p.requires_grad]
    flops, peaks, peak_phases, phase_peaks, host_peaks = {}, {}, {}, {}, {}
    for mode, term in terms.items():
        layerwise_casting_from(mode, setup, preset.dtype)  # before memory_options: block swap holds the fp8 weights
        with memory_options(mode, setup, preset) as (forward_context, swap):
            count_mode(
                mode, term, setup, preset, frozen, lora, forward_context, flops, peaks, peak_phases, phase_peaks
            )
            host_peaks[mode] = host_bytes(forward_context, swap)
    gib = 2**30
    encoder_bytes = sum(t.nbytes for t in _tensors(setup.encoder.encoder))
    return {
        "preset": preset_name,
        "encoder": encoder_name,
        "clip": f"{preset.frames}x{preset.height}x{preset.width}",
        "batch_size": batch_size,
        "gradient_checkpointing": preset.gradient_checkpointing,
        "dtype": str(preset.dtype).replace("torch.", ""),
        "date": datetime.date.today().isoformat(),
        "tflops": {m: {k: v / 1e12 for k, v in f.items()} for m, f in flops.items()},
        "ratio_to_none": {m: f["total"] / flops["none"]["total"] for m, f in flops.items()},
        "peak_tensor_memory_gib": {m: peaks[m] / gib for m in peaks},
        "peak_phase": peak_phases,
        "phase_peak_gib": {m: {phase: n / gib for phase, n in p.items()} for m, p in phase_peaks.items()},
        "memory_overhead_gib": {m: (peaks[m] - peaks["none"]) / gib for m in peaks},
        "encoder_weights_gib": encoder_bytes / gib,
        "host_peak_gib": {m: n / gib for m, n in host_peaks.items()},
        "cache_pass_peak_gib": cache_pass["offload_encoders"]["peak_gib"],
        "cache_pass": cache_pass,
        "lora_rank": preset.rank,
        "blocks_to_swap": preset.blocks_to_swap,
    }


def count_mode(mode, term, setup, preset, frozen, lora, forward_context, flops, peaks, peak_phases, phase_peaks):
    """One mode's FLOPs (its second step, when the AdamW state exists) and peak tensor memory (a pass of its own)."""
    from torch.utils.flop_counter import FlopCounterMode

    parts, transformer = setup.parts, setup.transformer
    crepa_modules = [setup.encoder.encoder, setup.projector] if term is not None else []
    if "precomputed" in mode:  # after the pass: no text encoder, VAE encoder or DINOv2 (the VAE decoder stays)
        crepa_modules = crepa_modules[1:]
        frozen = [setup.vae.decoder]
    optimizer = torch.optim.AdamW(lora + (list(setup.projector.parameters()) if term is not None else []), lr=1e-5)
    model = TransformerWithProjector(transformer, term)
    mode_parts = dataclasses.replace(parts, model=model, forward_context=forward_context)

    def step(phases):
        with script_step_phases(setup, model, term, phases):
            loss, _ = setup.script.training_loss(batch_of(setup, mode), None, mode_parts, term, 0, 1)
        with phases("backward"):
            loss.backward()
        with phases("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    with gpu_attention_on_meta():
        step(contextlib.nullcontext)  # creates the AdamW state
        with FlopCounterMode(display=False) as counter:
            phases = CountedPhases(counter)
            step(phases)
        # Memory in a pass of its own: the FLOP counter's module tracker keeps tensors recomputed in backward alive.
        # Swapped weights wait on the host (their parameters hold empty tensors); offloaded activations are made
        # outside this count (CountedActivationOffload).
        with LiveTensorBytes(
            _tensors(transformer, *frozen, *crepa_modules, optimizer, batch_of(setup, mode))
        ) as memory_count:
            step(memory_count.phases)
    flops[mode] = {"total": counter.get_total_flops(), **phases.totals}
    peaks[mode], peak_phases[mode] = memory_count.peak, memory_count.peak_phase
    phase_peaks[mode] = memory_count.phase_peaks


def counted_markdown(result: dict) -> str:
    phases = ["text_vae_encoding", "encoder_features", "transformer_forward", "loss", "backward"]
    lines = [
        f"**{result['preset']}** ({result['clip']}, batch {result['batch_size']}, {result['dtype']}, encoder "
        f"{result['encoder']} ({result['encoder_weights_gib']:.2f} GiB), gradient checkpointing "
        f"{'on' if result['gradient_checkpointing'] else 'off'}): TFLOP and peak tensor memory per training "
        f"step, counted on the meta device, {result['date']}",
        "",
        "| mode | TFLOP | ratio to none | "
        + " | ".join(phases)
        + " | peak memory (GiB) | over none (GiB) | peak during | host (GiB) |",
        "|---" * (7 + len(phases)) + "|",
    ]
    for mode, split in result["tflops"].items():
        lines.append(
            f"| {mode} | {split['total']:.1f} | {result['ratio_to_none'][mode]:.3f} | "
            + " | ".join(f"{split.get(p, 0.0):.1f}" for p in phases)
            + f" | {result['peak_tensor_memory_gib'][mode]:.2f} | {result['memory_overhead_gib'][mode]:+.2f}"
            + f" | {result['peak_phase'][mode]} | {result.get('host_peak_gib', {}).get(mode, 0.0):.2f} |"
        )
    if "cache_pass" in result:
        passes = result["cache_pass"]
        lines += [
            "",
            f"LoRA rank {result['lora_rank']}; swap modes: --blocks_to_swap {result['blocks_to_swap']}. The "
            f"--cache_conditions pass (one clip, transformer off the device): {passes['default']['peak_gib']:.2f} GiB "
            f"with every encoder on the device, no VAE tiling; **{result['cache_pass_peak_gib']:.2f} GiB** with "
            "--offload_encoders --enable_tiling (peak while each model ran: "
            + ", ".join(f"{n} {v:.2f}" for n, v in passes["offload_encoders"]["model_peaks_gib"].items())
            + ").",
        ]
    return "\n".join(lines)


def markdown(result: dict) -> str:
    phases = ["text_vae_encoding", "encoder_features", "transformer_forward", "loss", "backward", "optimizer"]
    lines = [
        f"**{result['preset']}** ({result['clip']}, batch {result['batch_size']}, {result['dtype']}, "
        f"encoder {result['encoder']}, gradient checkpointing {'on' if result['gradient_checkpointing'] else 'off'}) "
        f"on {result['device']}, {result['date']}, median of {result['steps_timed']} steps",
        "",
        "| mode | step (s) | ratio to none | "
        + " | ".join(phases)
        + " | peak memory (GiB) | host (GiB) | copies (ms, overlapped) |",
        "|---" * (6 + len(phases)) + "|",
    ]
    for mode, seconds in result["median_step_s"].items():
        split = result["phase_split_s"][mode]
        peak = f"{result['peak_memory_gib'][mode]:.2f}" if result["peak_memory_gib"] else "n/a (CPU)"
        lines.append(
            f"| {mode} | {seconds:.4f} | {result['ratio_to_none'][mode]:.3f} | "
            + " | ".join(f"{split.get(p, 0.0):.4f}" for p in phases)
            + f" | {peak} | {result.get('host_peak_gib', {}).get(mode, 0.0):.2f} | "
            + (
                f"{overlap['copy_ms']:.1f}, {overlap['overlapped_fraction'] or 0:.0%}"
                if (overlap := result.get("copy_overlap", {}).get(mode))
                else "n/a"
            )
            + " |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument(
        "--encoder", action="append", help="dinov2-g, dinov2-b, dinov2-s or tiny (default: the preset's)"
    )
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per mode.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps per mode first (at least 1).")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--output", type=str, default=None, help="Write the results as JSON here.")
    parser.add_argument(
        "--modes", type=lambda s: s.split(","), default=None, help="Comma-separated modes to run (none always runs)."
    )
    parser.add_argument(
        "--trace", type=str, default=None, help="GPU: profile one more step per mode, Chrome traces in this folder."
    )
    parser.add_argument(
        "--count",
        action="store_true",
        help="Count the FLOPs and the peak tensor memory of one step per mode on the meta device "
        "instead of timing (any preset; needs no GPU and no memory for the weights).",
    )
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error(f"--warmup and --steps must be at least 1, got --warmup {args.warmup} --steps {args.steps}.")
    if args.count:
        results = [
            count_on_meta(args.preset, name, args.batch_size, args.modes)
            for name in args.encoder or PRESETS[args.preset].encoders
        ]
        for result in results:
            print(counted_markdown(result), "\n", flush=True)
        if args.output:
            Path(args.output).write_text(json.dumps(results, indent=2))
        return results
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if PRESETS[args.preset].full_size and device.type != "cuda":
        parser.error(f"--preset {args.preset} is full size: it needs a GPU.")
    results = []
    for encoder_name in args.encoder or PRESETS[args.preset].encoders:
        if args.trace:
            Path(args.trace).mkdir(parents=True, exist_ok=True)
        result = run(
            args.preset, encoder_name, args.steps, args.warmup, args.batch_size, device, args.modes, args.trace
        )
        print(markdown(result), "\n", flush=True)
        results.append(result)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
