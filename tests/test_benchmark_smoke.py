"""The tiny benchmark preset runs (a smoke test: it asserts what ran, never a time)."""

import json

from helpers import ROOT, import_script


def test_tiny_benchmark_runs_every_mode(tmp_path):
    bench = import_script(ROOT / "benchmarks" / "bench_crepa.py")
    results = bench.main(["--preset", "tiny", "--steps", "1", "--warmup", "1", "--output", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(results))
    (result,) = results
    modes = {"none", "repa", "crepa", "crepa-center", "crepa-decode"}
    assert set(result["median_step_s"]) == modes == set(result["phase_split_s"])
    assert result["ratio_to_none"]["none"] == 1.0
    assert all(seconds > 0 for seconds in result["median_step_s"].values())
    # Only the CREPA modes compute encoder features; every mode runs the transformer and the optimizer.
    assert "encoder_features" not in result["phase_split_s"]["none"]
    assert all("encoder_features" in result["phase_split_s"][m] for m in modes - {"none"})
    assert all({"transformer_forward", "backward", "optimizer"} <= set(result["phase_split_s"][m]) for m in modes)
    assert "| crepa-decode |" in bench.markdown(result)


def test_flop_count_of_the_training_step_on_the_meta_device():
    """The whole CogVideoX training step runs on the meta device: no data-dependent op (.item(), .cpu(), boolean
    indexing) in the step, i.e. no per-step host sync; the encoder phase is counted and center pooling shrinks it."""
    bench = import_script(ROOT / "benchmarks" / "bench_crepa.py")
    (result,) = bench.main(["--preset", "tiny", "--count_flops"])
    tflops = result["tflops"]
    assert set(tflops) == {"none", "repa", "crepa", "crepa-center", "crepa-decode"}
    assert tflops["none"].get("encoder_features", 0) == 0
    assert 0 < tflops["crepa-center"]["encoder_features"] < tflops["crepa"]["encoder_features"]
    assert tflops["crepa-decode"]["encoder_features"] > tflops["crepa"]["encoder_features"]
    assert all(result["ratio_to_none"][m] > 1 for m in tflops if m != "none")
    assert all(split["total"] > 0 and split["backward"] > 0 for split in tflops.values())
