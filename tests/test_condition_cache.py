"""--cache_conditions: DINOv2 features and text embeddings computed once, reused, never stale."""

import os
import time

import pytest
import torch
from helpers import COGVIDEOX_SCRIPT, launch, lora_state, run_main
from test_train_cogvideox import base_args, dataset  # noqa: F401  (module fixture)

from crepa_diffusers.cache import ConditionCache


def test_cached_run_equals_uncached_run(cog, tiny_models, dataset, tmp_path):  # noqa: F811
    model = tiny_models["cogvideox-5b"]
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    run_main(cog, base_args(model, dataset, plain, steps=6))
    run_main(cog, base_args(model, dataset, cached, steps=6, extra=["--cache_conditions"]))
    files = sorted(p.name.split("-")[0] for p in (cached / "condition_cache").iterdir())
    assert files == ["dino"] * 3 + ["t5"] * 3, files  # 3 clips, 3 prompts: computed once over 2 epochs
    a, b = lora_state(plain), lora_state(cached)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_cache_refuses_changing_clips(tiny_models, dataset, tmp_path):  # noqa: F811
    result = launch(COGVIDEOX_SCRIPT, base_args(tiny_models["cogvideox-2b"], dataset, tmp_path / "o", extra=[
        "--cache_conditions", "--random_flip"]), tmp_path, check=False)
    assert result.returncode != 0 and "--cache_conditions reuses each clip's features" in result.stderr


def test_keys_depend_on_flags_and_video_file(tmp_path):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"x" * 10)
    one = ConditionCache(tmp_path / "c", {"height": 480})
    other = ConditionCache(tmp_path / "c", {"height": 512})
    assert one.video_key("dino", video) != other.video_key("dino", video)
    assert one.key("t5", "a cat") != one.key("t5", "a dog") and one.key("t5", "a cat") == one.key("t5", "a cat")
    before = one.video_key("dino", video)
    time.sleep(0.01)
    video.write_bytes(b"y" * 11)
    os.utime(video, None)
    assert one.video_key("dino", video) != before


def test_load_or_compute_hits_after_first_call(tmp_path):
    cache = ConditionCache(tmp_path / "c", {})
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(6.0).view(2, 3), torch.ones(2, 1, dtype=torch.long)

    first = cache.load_or_compute(["a", "b"], compute, torch.device("cpu"))
    second = cache.load_or_compute(["a", "b"], compute, torch.device("cpu"))
    assert len(calls) == 1 and (cache.hits, cache.misses) == (2, 2)
    for x, y in zip(first, second):
        assert torch.equal(x, y) and x.dtype == y.dtype
    swapped = cache.load_or_compute(["b", "a"], compute, torch.device("cpu"))
    assert torch.equal(swapped[0], first[0].flip(0))
    with pytest.raises(RuntimeError):
        cache.load_or_compute(["c"], lambda: (_ for _ in ()).throw(RuntimeError("computed")), torch.device("cpu"))


def test_cached_features_are_stored_in_the_encoder_dtype_and_read_back_identically(tmp_path):
    """Where the encoder runs in bf16 (GPUs) features are cached in bf16: the file holds bf16, and the epoch that
    computes them trains on the same rounded values (as fp32) as the epochs that read them."""
    from safetensors import safe_open

    from crepa_diffusers import testing
    from crepa_diffusers.crepa import CrepaConfig, CrepaProjector
    from crepa_diffusers.features import DinoPatchFeatures, token_frame_groups
    from crepa_diffusers.term import CrepaTerm

    transformer = testing.build_tiny_cogvideox_pipeline("2b").transformer
    encoder = DinoPatchFeatures(testing.build_tiny_dinov2(), autocast_dtype=torch.bfloat16)
    term = CrepaTerm(CrepaConfig(block_index=1), transformer, CrepaProjector(32, encoder.hidden_size, 16), encoder)
    term.cache = ConditionCache(tmp_path / "c", {})
    assert term.cache_dtype == torch.bfloat16
    frames = torch.rand(2, 9, 3, 32, 48) * 2 - 1
    groups, grid = token_frame_groups(9, 4, 1), (2, 3)
    exact = encoder(frames, grid, groups)

    prepared = []
    for _ in range(2):  # computes, then reads
        term.prepare(frames, grid, groups, ["clip-a", "clip-b"])
        prepared.append(term._features)
    assert (term.cache.misses, term.cache.hits) == (2, 2)
    for features in prepared:
        assert features.dtype == torch.float32 and features.shape == exact.shape
        assert torch.equal(features, exact.to(torch.bfloat16).float())
    torch.testing.assert_close(prepared[0], exact, rtol=2**-8, atol=0)
    with safe_open(str(tmp_path / "c" / "clip-a.safetensors"), "pt") as stored:
        assert stored.get_tensor("0").dtype == torch.bfloat16


def test_cache_checks_the_disk_after_its_first_entry(tmp_path, monkeypatch):
    """A dataset whose cache cannot fit fails at the first entry, naming the sizes and the flag to change."""
    import collections

    from crepa_diffusers import cache as cache_module

    features = torch.zeros(2, 1000)  # 4000 bytes of data per sample (+ the safetensors header)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: usage(10**9, 0, 400_000))
    roomy = ConditionCache(tmp_path / "roomy", {}, num_samples=90)  # 90 x ~4.1 kB fits in 400 kB
    roomy.load_or_compute(["dino-a", "dino-b"], lambda: features, torch.device("cpu"))
    full = ConditionCache(tmp_path / "full", {}, num_samples=100)  # 100 x ~4.1 kB does not
    with pytest.raises(RuntimeError, match=r"dino entries take 0\.0 MB each.*--condition_cache_dir"):
        full.load_or_compute(["dino-a", "dino-b"], lambda: features, torch.device("cpu"))
    entry = (tmp_path / "full" / "dino-a.safetensors").stat().st_size
    assert 4000 < entry and 90 * entry <= 400_000 < 100 * entry
    unsized = ConditionCache(tmp_path / "unsized", {})  # without the dataset's size there is nothing to check
    unsized.load_or_compute(["dino-a"], lambda: features[:1], torch.device("cpu"))
