"""--cache_conditions: DINOv2 features and text embeddings computed once, reused, never stale."""

import os
import time

import pytest
import torch
from helpers import COGVIDEOX_SCRIPT, launch, lora_state
from test_train_cogvideox import base_args, dataset  # noqa: F401  (module fixture)

from crepa_diffusers.cache import ConditionCache


def test_cached_run_equals_uncached_run(tiny_models, dataset, tmp_path):  # noqa: F811
    model = tiny_models["cogvideox-5b"]
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    launch(COGVIDEOX_SCRIPT, base_args(model, dataset, plain, steps=6), tmp_path)
    result = launch(COGVIDEOX_SCRIPT, base_args(model, dataset, cached, steps=6, extra=["--cache_conditions"]), tmp_path)
    files = sorted(p.name.split("-")[0] for p in (cached / "condition_cache").iterdir())
    assert files == ["dino"] * 3 + ["t5"] * 3, files  # 3 clips, 3 prompts: computed once over 2 epochs
    a, b = lora_state(plain), lora_state(cached)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert result.returncode == 0


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
