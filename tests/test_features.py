import pytest
import torch

from crepa_diffusers.features import DinoPatchFeatures, pooling_matrix, token_frame_groups
from crepa_diffusers.testing import build_tiny_dinov2


def test_token_frame_groups_for_49_frames():
    groups = token_frame_groups(49)
    assert len(groups) == 13
    assert groups[0] == [0]
    assert groups[1] == [1, 2, 3, 4]
    assert groups[-1] == [45, 46, 47, 48]
    assert sum(groups, []) == list(range(49))


def test_token_frame_groups_patch_size_t_2():
    # 49 frames -> 13 latents (odd): one copy of latent 0 is prepended, then pairs.
    groups = token_frame_groups(49, patch_size_t=2)
    assert len(groups) == 7
    assert groups[0] == [0]
    assert groups[1] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert groups[-1] == list(range(41, 49))
    # 53 frames -> 14 latents (even): no padding, token frame 0 is latents 0 and 1.
    even = token_frame_groups(53, patch_size_t=2)
    assert len(even) == 7 and even[0] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("frames", [0, 2, 48])
def test_token_frame_groups_rejects_frame_counts_the_vae_cannot_take(frames):
    with pytest.raises(ValueError, match="4k\\+1"):
        token_frame_groups(frames)


def test_pooling_matrix_rows_average():
    matrix = pooling_matrix([[0], [1, 2, 3, 4]], 5)
    torch.testing.assert_close(matrix, torch.tensor([[1.0, 0, 0, 0, 0], [0, 0.25, 0.25, 0.25, 0.25]]))


def test_features_for_49x480x720_geometry():
    """CogVideoX at 49x480x720: 13 token frames x (30*45) tokens (a tiny encoder with DINOv2's patch size 14)."""
    extractor = DinoPatchFeatures(build_tiny_dinov2(), frames_per_chunk=7)
    frames = torch.rand(1, 49, 3, 480, 720) * 2 - 1
    groups = token_frame_groups(49)
    features = extractor(frames, token_grid=(480 // 16, 720 // 16), groups=groups)
    assert features.shape == (1, 13, 30 * 45, 32)
    assert not features.requires_grad


@pytest.mark.parametrize("registers", [False, True])
def test_features_are_pooled_patch_tokens_after_layernorm(registers):
    """Independent computation: per-frame resize + ImageNet normalisation + encoder, patch tokens only, mean."""
    torch.manual_seed(0)
    encoder = build_tiny_dinov2(registers=registers)
    extractor = DinoPatchFeatures(encoder, frames_per_chunk=2)
    frames = torch.rand(2, 5, 3, 40, 60) * 2 - 1
    groups = token_frame_groups(5)
    features = extractor(frames, token_grid=(2, 3), groups=groups)
    assert features.shape == (2, 2, 6, 32)

    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    skip = 1 + (4 if registers else 0)
    for b in range(2):
        per_frame = []
        for f in range(5):
            image = torch.nn.functional.interpolate(
                ((frames[b, f] + 1) / 2)[None], size=(28, 42), mode="bicubic", antialias=True
            )
            out = encoder(pixel_values=(image - mean) / std).last_hidden_state[0]
            assert out.shape[0] == skip + 6
            per_frame.append(out[skip:])
        torch.testing.assert_close(features[b, 0], per_frame[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(features[b, 1], torch.stack(per_frame[1:5]).mean(0), rtol=1e-4, atol=1e-5)


def test_patch_size_t_2_pools_two_latent_frames():
    extractor = DinoPatchFeatures(build_tiny_dinov2())
    frames = torch.rand(1, 9, 3, 28, 28) * 2 - 1
    per_frame = extractor(frames, (2, 2), [[i] for i in range(9)])
    pooled = extractor(frames, (2, 2), token_frame_groups(9, patch_size_t=2))
    # 9 frames -> 3 latents, padded to 4: token 0 = frame 0, token 1 = frames 1..8.
    assert pooled.shape[1] == 2
    torch.testing.assert_close(pooled[:, 0], per_frame[:, 0])
    torch.testing.assert_close(pooled[:, 1], per_frame[:, 1:].mean(1), rtol=1e-5, atol=1e-6)


def test_chunking_does_not_change_features():
    encoder = build_tiny_dinov2()
    frames = torch.rand(2, 9, 3, 28, 28) * 2 - 1
    groups = token_frame_groups(9)
    a = DinoPatchFeatures(encoder, frames_per_chunk=1)(frames, (2, 2), groups)
    b = DinoPatchFeatures(encoder, frames_per_chunk=64)(frames, (2, 2), groups)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_from_pretrained_loads_local_folder_and_rejects_other_models(tiny_models, tmp_path):
    extractor = DinoPatchFeatures.from_pretrained(tiny_models["dinov2-registers"])
    assert extractor.num_prefix_tokens == 5 and extractor.patch_size == 14 and extractor.hidden_size == 32
    assert all(not p.requires_grad for p in extractor.parameters())
    assert not extractor.encoder.training
    from transformers import ViTConfig, ViTModel

    ViTModel(
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="not DINOv2"):
        DinoPatchFeatures.from_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="could not be loaded"):
        DinoPatchFeatures.from_pretrained(tmp_path / "missing")


def test_center_pooling_encodes_one_frame_per_token_frame():
    from crepa_diffusers.features import select_frames

    groups = token_frame_groups(9)
    assert select_frames(groups, "center") == [[0], [3], [7]]
    assert select_frames(groups, "mean") is groups
    with pytest.raises(ValueError, match="--crepa_frame_pooling"):
        select_frames(groups, "max")
    encoder = build_tiny_dinov2()
    calls = []
    encoder.register_forward_hook(lambda module, args, kwargs_or_out: calls.append(1))
    extractor = DinoPatchFeatures(encoder, frames_per_chunk=1)
    frames = torch.rand(1, 9, 3, 28, 28) * 2 - 1
    centred = extractor(frames, (2, 2), select_frames(groups, "center"))
    assert len(calls) == 3  # only frames 0, 3 and 7 went through the encoder
    per_frame = extractor(frames, (2, 2), [[i] for i in range(9)])
    torch.testing.assert_close(centred, per_frame[:, [0, 3, 7]])
