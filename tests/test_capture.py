import pytest
import torch
from peft import LoraConfig

from crepa_diffusers.capture import HiddenStateCapture, transformer_blocks
from crepa_diffusers.crepa import CrepaProjector, crepa_loss
from crepa_diffusers.features import DinoPatchFeatures, token_frame_groups
from crepa_diffusers.testing import build_tiny_cogvideox_pipeline, build_tiny_dinov2, build_tiny_hunyuan_pipeline


HEIGHT, WIDTH = 32, 48  # 4x6 latents, 2x3 tokens per frame
TARGETS = r".*(transformer_blocks|single_transformer_blocks)\.\d+\.(attn|attn1)\.(to_q|to_k|to_v|to_out\.0)"


def cogvideox_case(variant):
    pipe = build_tiny_cogvideox_pipeline(variant)
    transformer = pipe.transformer
    latent_frames = 4 if variant == "1.5" else 3  # 1.5 needs an even number of latent frames
    token_frames = latent_frames // (transformer.config.patch_size_t or 1)
    latents = torch.randn(2, latent_frames, 4, HEIGHT // 8, WIDTH // 8)
    rotary = None
    if transformer.config.use_rotary_positional_embeddings:
        rotary = pipe._prepare_rotary_positional_embeddings(HEIGHT, WIDTH, latent_frames, torch.device("cpu"))
    kwargs = {
        "hidden_states": latents,
        "encoder_hidden_states": torch.randn(2, 16, 32),
        "timestep": torch.tensor([10, 500]),
        "image_rotary_emb": rotary,
        "return_dict": False,
    }
    return transformer, kwargs, token_frames


def hunyuan_case():
    transformer = build_tiny_hunyuan_pipeline().transformer
    kwargs = {
        "hidden_states": torch.randn(2, 4, 3, HEIGHT // 8, WIDTH // 8),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(2, 7, 16),
        "encoder_attention_mask": torch.ones(2, 7),
        "pooled_projections": torch.randn(2, 8),
        "guidance": torch.tensor([1000.0, 1000.0]),
        "return_dict": False,
    }
    return transformer, kwargs, 3


CASES = [
    ("cogvideox", "2b", 1),
    ("cogvideox", "5b", 1),
    ("cogvideox", "1.5", 1),
    ("hunyuan", None, 1),
    ("hunyuan", None, 2),
]


def build(model, variant):
    torch.manual_seed(0)
    transformer, kwargs, token_frames = cogvideox_case(variant) if model == "cogvideox" else hunyuan_case()
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
    # A LoRA mid-training: with lora_B at its zero init, lora_A would get exactly zero gradient.
    for name, param in transformer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return transformer, kwargs, token_frames


def alignment_loss(transformer, kwargs, token_frames, block_index, projector, features):
    with HiddenStateCapture(transformer, block_index) as capture:
        capture.arm(token_frames)
        transformer(**kwargs)
        hidden = capture.pop()
        loss, _ = crepa_loss(projector(hidden), features)
        loss.backward()
    return hidden, loss


@pytest.mark.parametrize("model, variant, block_index", CASES)
def test_hook_shape_gradients_and_checkpointing(model, variant, block_index):
    transformer, kwargs, token_frames = build(model, variant)
    blocks = transformer_blocks(transformer)
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    tokens_per_frame = (HEIGHT // 16) * (WIDTH // 16)
    encoder = build_tiny_dinov2()
    frames = torch.rand(2, 4 * (token_frames * (2 if variant == "1.5" else 1) - 1) + 1, 3, HEIGHT, WIDTH) * 2 - 1
    groups = token_frame_groups(frames.shape[1], patch_size_t=2 if variant == "1.5" else 1)
    features = DinoPatchFeatures(encoder)(frames, (HEIGHT // 16, WIDTH // 16), groups)
    projector = CrepaProjector(width, 32, projector_dim=16)

    hidden, loss = alignment_loss(transformer, kwargs, token_frames, block_index, projector, features)
    assert hidden.shape == (2, token_frames, tokens_per_frame, width) == features.shape[:3] + (width,)

    lora = {name: p for name, p in transformer.named_parameters() if "lora_" in name}
    assert lora and all(p.requires_grad for p in lora.values())
    for name, param in transformer.named_parameters():
        if "lora_" not in name:
            assert param.grad is None, f"frozen weight {name} got a gradient"
    assert all(p.grad is None for p in encoder.parameters())
    for index, block in enumerate(blocks):
        grads = [p.grad for n, p in block.named_parameters() if "lora_" in n]
        assert grads, f"block {index} has no LoRA"
        if index <= block_index:
            assert all(g is not None and g.abs().sum() > 0 for g in grads), f"block {index} got no gradient"
        else:
            assert all(g is None for g in grads), f"block {index} after the hooked one got a gradient"
    reference = {name: p.grad.clone() for name, p in lora.items() if p.grad is not None}

    transformer.zero_grad(set_to_none=True)
    transformer.enable_gradient_checkpointing()
    hidden_ckpt, loss_ckpt = alignment_loss(transformer, kwargs, token_frames, block_index, projector, features)
    torch.testing.assert_close(loss_ckpt, loss)
    torch.testing.assert_close(hidden_ckpt, hidden)
    checkpointed = {name: p.grad for name, p in lora.items() if p.grad is not None}
    assert checkpointed.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(checkpointed[name], reference[name], rtol=1e-4, atol=1e-6)


def test_hook_keeps_first_capture_and_does_not_change_outputs():
    transformer, kwargs, token_frames = build("cogvideox", "2b")
    with torch.no_grad():
        plain = transformer(**kwargs)[0]
    calls = []
    with HiddenStateCapture(transformer, 0) as capture:
        transformer.transformer_blocks[0].register_forward_hook(lambda *a: calls.append(1))
        capture.arm(token_frames)
        with torch.no_grad():
            hooked = transformer(**kwargs)[0]
            first = capture._captured
            transformer(**kwargs)  # a second run of the block (as under checkpoint recomputation) is ignored
        assert capture.pop() is first
        with pytest.raises(RuntimeError, match="did not run"):
            capture.pop()
    torch.testing.assert_close(hooked, plain)
    # Removed: the hook no longer fires.
    capture.arm(token_frames)
    with torch.no_grad():
        transformer(**kwargs)
    assert capture._captured is None


@pytest.mark.parametrize("model, variant, blocks", [("cogvideox", "2b", 3), ("hunyuan", None, 4)])
def test_block_index_out_of_range_names_the_block_count(model, variant, blocks):
    transformer = build(model, variant)[0]
    assert len(transformer_blocks(transformer)) == blocks
    with pytest.raises(ValueError, match=rf"--crepa_block_index {blocks}.*{blocks} blocks"):
        HiddenStateCapture(transformer, blocks)


def test_hunyuan_global_index_reaches_single_stream_blocks():
    transformer = build("hunyuan", None)[0]
    blocks = transformer_blocks(transformer)
    assert blocks[:2] == list(transformer.transformer_blocks)
    assert blocks[2:] == list(transformer.single_transformer_blocks)
