import argparse
import math
import tempfile
from pathlib import Path

import pytest
import torch

from crepa_diffusers.crepa import CrepaConfig, CrepaProjector, add_crepa_args, crepa_loss


def naive_crepa_loss(projected, features, distance, tau, cumulative, normalize_by_frames):
    """The paper's equation, term by term, with Python loops (an independent reference)."""
    batch, frames, tokens, _ = projected.shape

    def sim(b, f, k):
        total = 0.0
        for n in range(tokens):
            total += torch.nn.functional.cosine_similarity(projected[b, f, n], features[b, k, n], dim=0)
        return total / tokens

    per_clip = []
    for b in range(batch):
        clip = 0.0
        for f in range(frames):
            score = sim(b, f, f)
            gaps = range(1, distance + 1) if cumulative else ([distance] if distance > 0 else [])
            for gap in gaps:
                for k in (f - gap, f + gap):
                    if 0 <= k < frames:
                        score = score + math.exp(-abs(k - f) / tau) * sim(b, f, k)
            clip = clip + score
        per_clip.append(clip / frames if normalize_by_frames else clip)
    return -sum(per_clip) / batch


@pytest.mark.parametrize("frames", [1, 2, 5, 13])
@pytest.mark.parametrize("distance", [0, 1, 2])
@pytest.mark.parametrize("cumulative", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_loss_matches_naive_equation(frames, distance, cumulative, normalize):
    torch.manual_seed(frames * 100 + distance * 10 + cumulative * 2 + normalize)
    tau = 0.7 if distance != 1 else 1.5
    projected = torch.randn(2, frames, 3, 5, dtype=torch.float64)
    features = torch.randn(2, frames, 3, 5, dtype=torch.float64)
    expected = naive_crepa_loss(projected, features, distance, tau, cumulative, normalize)
    actual, _ = crepa_loss(projected, features, distance, tau, cumulative, normalize)
    assert actual.shape == ()
    torch.testing.assert_close(actual.double(), torch.as_tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_aligned_inputs_reach_the_analytic_optimum():
    torch.manual_seed(0)
    features = torch.randn(3, 5, 4, 8)
    projected = features * 2.5  # cosine is scale-invariant: every sim(f, k) with k == f is 1
    # With identical frames every sim(f, k) is 1: score(f) = 1 + e^{-1/tau} * (number of neighbours at distance 1).
    same_frames = features[:, :1].expand(-1, 5, -1, -1)
    tau = 1.0
    neighbours = 2 * 5 - 2  # interior frames have 2 neighbours, the two ends 1
    optimum = -(5 + math.exp(-1 / tau) * neighbours) / 5
    torch.testing.assert_close(crepa_loss(same_frames * 3, same_frames, 1, tau)[0], torch.tensor(optimum))
    torch.testing.assert_close(crepa_loss(projected, features, distance=0)[0], torch.tensor(-1.0))
    torch.testing.assert_close(crepa_loss(-projected, features, distance=0)[0], torch.tensor(1.0))
    # The plain paper sum is T times the normalised one.
    torch.testing.assert_close(
        crepa_loss(same_frames, same_frames, 1, tau, normalize_by_frames=False)[0], torch.tensor(optimum * 5)
    )


def test_gradients_reach_projected_not_features():
    projected = torch.randn(2, 4, 3, 6, requires_grad=True)
    features = torch.randn(2, 4, 3, 6, requires_grad=True)
    loss, stats = crepa_loss(projected, features.detach())
    loss.backward()
    assert projected.grad is not None and projected.grad.abs().sum() > 0
    assert features.grad is None
    assert not stats["similarity_self"].requires_grad


def test_stats_are_the_mean_self_and_neighbour_similarities():
    torch.manual_seed(1)
    projected, features = torch.randn(2, 4, 3, 6), torch.randn(2, 4, 3, 6)
    cos = torch.nn.functional.cosine_similarity(projected[:, :, None], features[:, None, :], dim=-1).mean(
        -1
    )  # [B,F,K]
    _, stats = crepa_loss(projected, features, distance=1)
    torch.testing.assert_close(stats["similarity_self"], cos.diagonal(dim1=1, dim2=2).mean())
    neighbour = torch.stack([cos[:, f, k] for f in range(4) for k in range(4) if abs(f - k) == 1], dim=1)
    torch.testing.assert_close(stats["similarity_neighbour"], neighbour.mean())
    _, repa_stats = crepa_loss(projected, features, distance=0)
    assert torch.isnan(repa_stats["similarity_neighbour"])


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\[B, T, N, D\]"):
        crepa_loss(torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4, 16))


def test_projector_shapes_and_precision():
    projector = CrepaProjector(hidden_size=12, encoder_dim=7, projector_dim=16)
    layers = [m for m in projector.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in layers] == [(12, 16), (16, 16), (16, 7)]
    assert sum(isinstance(m, torch.nn.SiLU) for m in projector.modules()) == 2
    out = projector(torch.randn(2, 3, 5, 12, dtype=torch.bfloat16))
    assert out.shape == (2, 3, 5, 7) and out.dtype == torch.float32


def make_parser(default_lambda=0.5):
    parser = argparse.ArgumentParser()
    add_crepa_args(parser, default_lambda=default_lambda)
    return parser


def test_args_defaults_and_config():
    args = make_parser(default_lambda=1.0).parse_args([])
    config = CrepaConfig.from_args(args)
    assert (config.mode, config.lambda_, config.block_index, config.distance, config.tau) == ("crepa", 1.0, 8, 1, 1.0)
    assert config.encoder == "facebook/dinov2-giant" and config.normalize_by_frames and not config.cumulative
    repa = CrepaConfig.from_args(make_parser().parse_args(["--crepa_mode", "repa", "--crepa_adjacent_distance", "2"]))
    assert repa.effective_distance == 0 and repa.enabled
    assert not CrepaConfig.from_args(make_parser().parse_args(["--crepa_mode", "none"])).enabled
    assert not CrepaConfig.from_args(make_parser().parse_args(["--no-crepa_normalize_by_frames"])).normalize_by_frames
    assert repa.card_settings()["crepa_adjacent_distance"] == 0 and config.card_settings()["crepa_lambda"] == 1.0


@pytest.mark.parametrize("mode", ["crepa", "repa"])
def test_term_loss_is_the_scheduled_lambda_times_l_align(mode):
    """CrepaTerm.loss, the loop's one entry point: lambda(step) of the schedule times crepa_loss at the config's
    distance; REPA* logs no neighbour similarity; the hook comes off with remove()."""
    from crepa_diffusers import build_crepa, testing
    from crepa_diffusers.capture import transformer_blocks

    transformer = testing.build_tiny_cogvideox_pipeline().transformer
    encoder_dir = testing.save_tiny_dinov2(Path(tempfile.mkdtemp()) / "dinov2")
    argv = ["--crepa_mode", mode, "--crepa_encoder", str(encoder_dir), "--crepa_scheduler", "linear"]
    config = CrepaConfig.from_args(make_parser().parse_args([*argv, "--crepa_block_index", "1"]))
    crepa = build_crepa(config, transformer, torch.device("cpu"))
    projected, features = torch.randn(2, 3, 4, 32), torch.randn(2, 3, 4, 32)
    for step, max_train_steps in ((0, 10), (6, 10)):
        crepa.prepare(features)
        term, logs = crepa.loss(projected, step, max_train_steps)
        expected, stats = crepa_loss(projected, features, distance=1 if mode == "crepa" else 0)
        lambda_ = 0.5 * (1 - step / max_train_steps)  # linear decay from --crepa_lambda 0.5 to 0
        torch.testing.assert_close(term, lambda_ * expected)
        assert logs["crepa_lambda"] == pytest.approx(lambda_) and logs["crepa_loss"] == expected
        assert set(logs) == {"crepa_loss", "crepa_lambda", *(stats if mode == "crepa" else ["similarity_self"])}
    block = transformer_blocks(transformer)[1]
    assert len(block._forward_hooks) == 1
    crepa.remove()
    assert len(block._forward_hooks) == 0


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--crepa_adjacent_tau", "0"], "--crepa_adjacent_tau"),
        (["--crepa_adjacent_tau", "-1"], "--crepa_adjacent_tau"),
        (["--crepa_adjacent_distance", "-1"], "--crepa_adjacent_distance"),
        (["--crepa_lambda", "-0.1"], "--crepa_lambda"),
        (["--crepa_mode", "vrepa"], "--crepa_mode"),
        (["--crepa_block_index", "x"], "--crepa_block_index"),
    ],
)
def test_invalid_values_name_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit):
        make_parser().parse_args(argv)
    assert flag in capsys.readouterr().err


def test_loss_and_stats_never_read_device_values():
    """No data-dependent op (boolean indexing -> nonzero, .item(), ...): on a GPU those are host syncs each step.
    The meta device has no data, so any such op fails there."""
    projected = torch.randn(2, 5, 3, 8, device="meta", requires_grad=True)
    features = torch.randn(2, 5, 3, 8, device="meta")
    for distance, cumulative in ((0, False), (1, False), (2, True)):
        loss, stats = crepa_loss(projected, features, distance=distance, cumulative=cumulative)
        loss.backward()
        assert loss.shape == () and all(value.shape == () for value in stats.values())
