"""The tiny benchmark presets run (a smoke test: it asserts what ran, never a time): `tiny` (CogVideoX's training
script) and `wan-tiny` (Wan's, the tiny WanPipeline)."""

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, import_script


TINY_PRESETS = ["tiny", "wan-tiny"]


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_tiny_benchmark_runs_every_mode(tmp_path, preset):
    bench = import_script(ROOT / "benchmarks" / "bench_crepa.py")
    results = bench.main(["--preset", preset, "--steps", "1", "--warmup", "1", "--output", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(results))
    (result,) = results
    precomputed = {"none-precomputed", "crepa-precomputed", "none-precomputed-fp8", "crepa-precomputed-fp8"}
    precomputed |= set(bench.MEMORY_MODES)
    modes = {"none", "repa", "crepa", "crepa-center", "crepa-decode", *precomputed}
    assert set(result["median_step_s"]) == modes == set(result["phase_split_s"])
    assert result["ratio_to_none"]["none"] == 1.0
    assert all(seconds > 0 for seconds in result["median_step_s"].values())
    # Only the CREPA modes compute encoder features, and only without precomputed conditions (which encode nothing);
    # every mode runs the transformer and the optimizer.
    assert all("encoder_features" not in result["phase_split_s"][m] for m in {"none", *precomputed})
    assert all("text_vae_encoding" not in result["phase_split_s"][m] for m in precomputed)
    assert all("encoder_features" in result["phase_split_s"][m] for m in modes - {"none", *precomputed})
    assert all({"transformer_forward", "backward", "optimizer"} <= set(result["phase_split_s"][m]) for m in modes)
    assert "| crepa-decode |" in bench.markdown(result)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_timed_bf16_fp8_modes_run_under_accelerate_style_autocast(monkeypatch, preset):
    """The full-size presets time in bf16: with fp8 storage the LoRA's fp32 weights meet bf16 inputs, which only
    autocast around the model's forward (what accelerate.prepare adds in the scripts) makes one dtype. The tiny preset
    in bf16 on the CPU runs the fp8 modes as a GPU would (without the autocast: "expected m1 and m2 to have the same
    dtype")."""
    import dataclasses

    bench = import_script(ROOT / "benchmarks" / "bench_crepa.py")
    monkeypatch.setitem(bench.PRESETS, preset, dataclasses.replace(bench.PRESETS[preset], dtype=torch.bfloat16))
    result = bench.run(preset, "tiny", 1, 1, 1, torch.device("cpu"), ["crepa-precomputed-fp8", "crepa"])
    assert set(result["median_step_s"]) == {"none", "crepa", "crepa-precomputed-fp8"}


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_flop_and_memory_count_of_the_training_step_on_the_meta_device(preset):
    """The whole CogVideoX (Wan) training step runs on the meta device: no data-dependent op (.item(), .cpu(),
    boolean indexing) in the step, i.e. no per-step host sync; the encoder phase is counted and center pooling
    shrinks it; the CREPA modes hold at least the encoder's weights more than plain LoRA."""
    bench = import_script(ROOT / "benchmarks" / "bench_crepa.py")
    (result,) = bench.main(["--preset", preset, "--count"])
    tflops = result["tflops"]
    precomputed = {"none-precomputed", "crepa-precomputed", "none-precomputed-fp8", "crepa-precomputed-fp8"}
    precomputed |= set(bench.MEMORY_MODES)
    modes = {"none", "repa", "crepa", "crepa-center", "crepa-decode"}
    assert set(tflops) == modes | precomputed == set(result["peak_tensor_memory_gib"]) == set(result["peak_phase"])
    # Precomputed conditions: no encoder runs and none is held.
    peak = result["peak_tensor_memory_gib"]
    assert all(tflops[m].get("text_vae_encoding", 0) == tflops[m].get("encoder_features", 0) == 0 for m in precomputed)
    assert tflops["crepa-precomputed"]["total"] < tflops["none"]["total"] < tflops["crepa"]["total"]
    assert peak["crepa-precomputed"] < peak["none"] and peak["none-precomputed"] < peak["none"]
    # fp8 storage changes no FLOP (its weight savings show at full size, RESULTS.md; a tiny model's are nil)
    assert tflops["crepa-precomputed-fp8"]["total"] == tflops["crepa-precomputed"]["total"]
    # Activation offload and block swap change no FLOP either; what they move off the device is host memory, counted
    # (the tiny preset offloads every saved tensor; the swap mode adds its block's weights).
    fp8, host = "crepa-precomputed-fp8", result["host_peak_gib"]
    assert tflops[f"{fp8}-offload"]["total"] == tflops[f"{fp8}-offload-swap"]["total"] == tflops[fp8]["total"]
    phase_peak = result["phase_peak_gib"]  # (the tiny preset's step peaks in the optimizer, where nothing moved)
    assert phase_peak[f"{fp8}-offload"]["transformer_forward"] < phase_peak[fp8]["transformer_forward"]
    before = "before the step"  # the swapped block's weights are on the host until the forward
    assert phase_peak[f"{fp8}-offload-swap"][before] < phase_peak[f"{fp8}-offload"][before] == phase_peak[fp8][before]
    assert 0 < host[f"{fp8}-offload"] < host[f"{fp8}-offload-swap"]
    assert all(host[m] == 0 for m in host if "offload" not in m)
    # The precompute pass with one encoder on the device at a time and VAE tiling peaks lower than with all of them.
    assert 0 < result["cache_pass_peak_gib"] < result["cache_pass"]["default"]["peak_gib"]
    assert tflops["none"].get("encoder_features", 0) == 0
    assert 0 < tflops["crepa-center"]["encoder_features"] < tflops["crepa"]["encoder_features"]
    assert tflops["crepa-decode"]["encoder_features"] > tflops["crepa"]["encoder_features"]
    assert all(result["ratio_to_none"][m] > 1 for m in modes - {"none"})
    assert all(split["total"] > 0 and split["backward"] > 0 for split in tflops.values())
    assert result["memory_overhead_gib"]["none"] == 0 and result["encoder_weights_gib"] > 0
    assert all(result["memory_overhead_gib"][m] >= result["encoder_weights_gib"] for m in modes - {"none"})
    assert set(result["peak_phase"].values()) <= {
        "text_vae_encoding",
        "encoder_features",
        "transformer_forward",
        "loss",
        "backward",
        "optimizer",
    }
    assert "| crepa-decode |" in bench.counted_markdown(result)


def test_a_swap_mode_counts_the_same_alone_as_after_another_fp8_mode():
    """--modes picks modes: the swapped blocks hold fp8 weights on the host whether or not an fp8 mode ran before
    (the fp8 cast comes before the block swap, as in the scripts)."""
    bench = import_script(ROOT / "benchmarks" / "bench_crepa.py")
    swap = "crepa-precomputed-fp8-offload-swap"
    alone = bench.count_on_meta("tiny", "tiny", 1, [swap])
    after = bench.count_on_meta("tiny", "tiny", 1, ["crepa-precomputed-fp8", swap])
    for figure in ("host_peak_gib", "peak_tensor_memory_gib", "phase_peak_gib"):
        assert alone[figure][swap] == after[figure][swap]


def test_live_tensor_bytes_counts_each_storage_once_until_it_is_freed():
    bench = import_script(ROOT / "benchmarks" / "bench_crepa.py")
    existing = torch.zeros(100)  # 400 bytes
    with bench.LiveTensorBytes([existing, existing[:10]]) as memory:
        a = torch.ones(1000)  # 4000 bytes
        view = a[:10].view(2, 5)  # same storage: nothing more
        b = a * 2  # 4000
        del b
        c = torch.ones(250, dtype=torch.float64)  # 2000
    assert view.untyped_storage().nbytes() == 4000 and c.nbytes == 2000
    assert memory.current == 400 + 4000 + 2000
    assert memory.peak == 400 + 4000 + 4000
    # A forward and backward counts the same on the CPU (allocated) and the meta device (shapes only).
    counts = []
    for device in ("cpu", "meta"):
        torch.manual_seed(0)
        layer = torch.nn.Linear(64, 32, device=device)
        x = torch.randn(16, 64, device=device)
        with bench.LiveTensorBytes([x, *layer.parameters()]) as memory:
            layer(x).relu().sum().backward()
        counts.append((memory.current, memory.peak))
    assert counts[0] == counts[1]
    assert counts[0][0] == (16 * 64 + 2 * (64 * 32 + 32)) * 4  # the input, the weights and their gradients


def test_attention_on_meta_runs_as_on_a_gpu():
    """On the meta device SDPA would materialise the [N, N] matrix in fp32; routed to the fused kernels it keeps the
    output and log-sum-exp only, with the same output shape and the forward FLOPs 4 N^2 d per head."""
    from torch.utils.flop_counter import FlopCounterMode

    bench = import_script(ROOT / "benchmarks" / "bench_crepa.py")
    batch, heads, tokens, dim = 1, 2, 1024, 16
    matrix_bytes = batch * heads * tokens * tokens * 4
    for mask in (None, torch.ones(batch, 1, 1, tokens, dtype=torch.bool, device="meta")):
        peaks = []
        for patched in (False, True):
            q = torch.randn(batch, heads, tokens, dim, device="meta", dtype=torch.bfloat16, requires_grad=True)
            context = bench.gpu_attention_on_meta() if patched else contextlib.nullcontext()
            with context, bench.LiveTensorBytes([q]) as memory, FlopCounterMode(display=False) as counter:
                out = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
                forward_flops = counter.get_total_flops()
                out.float().sum().backward()
            assert out.shape == q.shape and out.dtype == q.dtype
            peaks.append(memory.peak)
        assert peaks[0] >= matrix_bytes > 8 * peaks[1]
        assert forward_flops == 4 * batch * heads * tokens * tokens * dim
    assert F.scaled_dot_product_attention is not bench.fused_attention_on_meta  # restored
    # Anywhere but the meta device it is the original function.
    q, mask = torch.randn(1, 2, 8, 16), torch.rand(1, 1, 8, 8) > 0.3
    mask[..., 0] = True
    with bench.gpu_attention_on_meta():
        routed = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    torch.testing.assert_close(routed, F.scaled_dot_product_attention(q, q, q, attn_mask=mask), rtol=0, atol=0)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_memory_counted_on_the_meta_device_equals_the_same_step_on_real_tensors(preset):
    """The meta-device count stands in for a real run: the tiny training step (with gradient checkpointing, so the
    backward recomputes blocks) holds exactly as many bytes in every phase on real CPU tensors as on the meta device.
    Attention takes the math path on both (the CPU's fused kernel and a GPU's differ in what they save). Wan's UMT5
    runs without its padding mask on both, as the count runs it on the meta device."""
    import dataclasses

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from crepa_diffusers.term import TransformerWithProjector
    from crepa_diffusers.training_utils import step_generator

    bench = import_script(ROOT / "benchmarks" / "bench_crepa.py")
    counts = {}
    for device in ("cpu", "meta"):
        setup = bench.build_step_setup(preset, "tiny", torch.device(device), torch.float32, 1)
        setup.transformer.enable_gradient_checkpointing()
        if setup.model == "wan":
            bench.umt5_without_padding_mask(setup.texts["umt5"])
        # The scheduler's tables reach the device at the script's first step (diffusers' add_noise moves them; on the
        # CPU: no copy). Moved before counting, wherever they were built: after a script ran in this process, a
        # CogVideoX scheduler built under the meta device keeps its alphas_cumprod on the CPU.
        scheduler = setup.parts.scheduler
        for name, table in vars(scheduler).items():
            if isinstance(table, torch.Tensor):
                setattr(scheduler, name, table.to(device))
        for mode in ("none", "crepa"):
            term = setup.terms[mode]
            parts = dataclasses.replace(setup.parts, model=TransformerWithProjector(setup.transformer, term))
            held = [setup.transformer, *setup.texts.values(), setup.vae, setup.batch]
            held += [setup.encoder.encoder, setup.projector] if term is not None else []
            generator = step_generator(0, 0, 0, torch.device(device)) if device == "cpu" else None
            with sdpa_kernel(SDPBackend.MATH), bench.LiveTensorBytes(bench._tensors(*held)) as memory:
                with bench.script_step_phases(setup, parts.model, term, memory.phases):
                    loss, _ = setup.script.training_loss(setup.batch, generator, parts, term, 0, 1)
                with memory.phases("backward"):
                    loss.backward()
            counts[device, mode] = memory.phase_peaks
    for mode in ("none", "crepa"):
        cpu, meta = dict(counts["cpu", mode]), dict(counts["meta", mode])
        if preset == "wan-tiny":  # WanPipeline moves the token ids and mask (int64, 512 each) to the text encoder's
            # device: new storage on a device, none on the CPU, where they already are
            assert meta.pop("text_vae_encoding") - cpu.pop("text_vae_encoding") == 2 * 8 * 512
        assert cpu == meta
        assert {"text_vae_encoding", "transformer_forward", "backward"} <= set(counts["cpu", mode])
    assert "encoder_features" in counts["cpu", "crepa"] and "encoder_features" not in counts["cpu", "none"]
    assert counts["cpu", "crepa"]["backward"] > counts["cpu", "none"]["backward"]


def test_copy_compute_overlap_of_a_profile():
    """The GPU trace's overlap figure: the share of the copies' time during which a compute kernel ran."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    bench = import_script(ROOT / "benchmarks" / "bench_crepa.py")

    def kernel(name, start, end, device=DeviceType.CUDA):
        return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end))

    events = [
        kernel("gemm", 0, 100),
        kernel("gemm", 50, 150),  # overlapping compute counts once: [0, 150]
        kernel("Memcpy HtoD (Pinned -> Device)", 120, 220),  # 30 of 100 us under compute
        kernel("softmax", 200, 210),  # 10 more
        kernel("Memcpy DtoH (Device -> Pinned)", 300, 400),  # none
        kernel("Memcpy HtoD (Pinned -> Device)", 0, 1000, DeviceType.CPU),  # a CPU-side event: ignored
    ]
    overlap = bench.copy_compute_overlap(events)
    assert overlap == {"copy_ms": 0.2, "overlapped_fraction": 40 / 200}
    assert bench.copy_compute_overlap([kernel("gemm", 0, 1)]) == {"copy_ms": 0.0, "overlapped_fraction": None}
