"""--cache_conditions: every clip encoded once before training (VAE latent distribution, text embeddings, DINOv2
features), the frozen encoders freed for the training steps, entries reused by later runs, never stale or damaged."""

import collections
import os
import re
import shutil

import pytest
import torch
from helpers import (
    COGVIDEOX_SCRIPT,
    HUNYUAN_SCRIPT,
    WAN_SCRIPT,
    import_script,
    launch,
    lora_state,
    run_main,
    run_two_ranks,
)
from test_train_cogvideox import base_args, dataset  # noqa: F401  (module fixture)

from crepa_diffusers import checkpoints
from crepa_diffusers.cache import ConditionCache
from crepa_diffusers.features import DinoPatchFeatures


def projector_state(path):
    from safetensors.torch import load_file

    return load_file(str(path / checkpoints.PROJECTOR_FILE))


class EncoderCalls:
    """Counts forwards of the frozen encoders (VAE encoder, text encoders, DINOv2), what each training step saw, and
    how many encoder forwards had run when the transformer was first moved (`.to`) to the training device."""

    def __init__(self, monkeypatch, script, encoder_classes, transformer_class=None):
        self.counts, self.at_steps, self.transformer_moves = collections.Counter(), [], []
        self.built, self.built_by_first_step = collections.Counter(), None  # from_pretrained calls: models loaded
        for cls in encoder_classes:
            original_load = cls.from_pretrained.__func__

            def counted_load(klass, *args, _original=original_load, _name=cls.__name__, **kwargs):
                self.built[_name] += 1
                return _original(klass, *args, **kwargs)

            monkeypatch.setattr(cls, "from_pretrained", classmethod(counted_load))
        if transformer_class is not None:
            original_to = transformer_class.to

            def recording_to(module, *args, **kwargs):
                self.transformer_moves.append(sum(self.counts.values()))
                return original_to(module, *args, **kwargs)

            monkeypatch.setattr(transformer_class, "to", recording_to)
        for cls in (*encoder_classes, DinoPatchFeatures):
            method = "encode" if hasattr(cls, "encode") and cls.__name__.startswith("Autoencoder") else "forward"
            original = getattr(cls, method)

            def counted(module, *args, _original=original, _name=cls.__name__, **kwargs):
                self.counts[_name] += 1
                return _original(module, *args, **kwargs)

            monkeypatch.setattr(cls, method, counted)
        original_loss = script.training_loss

        def recording_loss(batch, generator, parts, crepa=None, *args, **kwargs):
            self.at_steps.append((sum(self.counts.values()), parts, crepa))
            self.built_by_first_step = self.built_by_first_step or dict(self.built)
            return original_loss(batch, generator, parts, crepa, *args, **kwargs)

        monkeypatch.setattr(script, "training_loss", recording_loss)


@pytest.mark.parametrize(
    "script_path, model, transformer_class, encoders, extra",
    [
        (
            COGVIDEOX_SCRIPT,
            "cogvideox-5b",
            "CogVideoXTransformer3DModel",
            ("AutoencoderKLCogVideoX", "T5EncoderModel"),
            [],
        ),
        (
            HUNYUAN_SCRIPT,
            "hunyuan",
            "HunyuanVideoTransformer3DModel",
            ("AutoencoderKLHunyuanVideo", "LlamaModel", "CLIPTextModel"),
            ["--max_sequence_length", "16"],
        ),
        (
            WAN_SCRIPT,
            "wan-2.1",
            "WanTransformer3DModel",
            ("AutoencoderKLWan", "UMT5EncoderModel"),
            ["--max_sequence_length", "16"],
        ),
    ],
)
def test_precomputed_run_equals_uncached_run_and_encodes_nothing_in_training(
    tiny_models, dataset, tmp_path, monkeypatch, script_path, model, transformer_class, encoders, extra
):
    """Same seed, 2 epochs: the LoRA and the projector equal the uncached run's; every clip is encoded once, before
    the first step; the transformer reaches the device only after that pass; no encoder runs during the steps and
    none is held by them; a second run encodes no clip, a third loads no text encoder."""
    import diffusers
    import transformers

    script = import_script(script_path)
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    argv = [*extra, "--checkpointing_steps", "6"]
    run_main(script, base_args(tiny_models[model], dataset, plain, steps=6, extra=argv))
    classes = [getattr(diffusers, name, None) or getattr(transformers, name) for name in encoders]
    calls = EncoderCalls(monkeypatch, script, classes, getattr(diffusers, transformer_class))
    run_main(script, base_args(tiny_models[model], dataset, cached, steps=6, extra=[*argv, "--cache_conditions"]))
    assert len(list((cached / "condition_cache").glob("*.safetensors"))) == 3
    # 3 clips x (VAE, each text encoder, DINOv2) in the pass, then nothing during the 6 steps
    assert dict(calls.counts) == dict.fromkeys([*encoders, "DinoPatchFeatures"], 3), calls.counts
    # The transformer is not on the device beside the encoders: it is first moved after the pass's last forward.
    assert calls.transformer_moves and calls.transformer_moves[0] == sum(calls.counts.values()), (
        calls.transformer_moves
    )
    assert {count for count, _, _ in calls.at_steps} == {sum(calls.counts.values())}
    _, parts, crepa = calls.at_steps[0]
    vae = parts.vae if hasattr(parts, "vae") else parts.pipe.vae
    held = [
        getattr(parts, "text_encoder", None),
        getattr(getattr(parts, "pipe", None), "text_encoder", None),
        getattr(getattr(parts, "pipe", None), "text_encoder_2", None),
        vae.encoder,
        crepa.encoder,
    ]
    assert held == [None] * 5
    for a, b in (
        (lora_state(plain), lora_state(cached)),
        (projector_state(plain / "checkpoint-6"), projector_state(cached / "checkpoint-6")),
    ):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)

    # A second run reuses every clip entry and stores the validation prompt's embeddings (then the text encoders
    # are freed; validation samples from them); a third run encodes nothing at all before its first step.
    # CogVideoX and Wan also encode the "" negative prompt (classifier-free guidance); HunyuanVideo is guidance-distilled
    text_calls = {"T5EncoderModel": 2, "UMT5EncoderModel": 2, "LlamaModel": 1, "CLIPTextModel": 1}
    for run in ("again", "third"):
        calls.counts.clear()
        calls.at_steps.clear()
        calls.built.clear()
        calls.built_by_first_step = None
        run_main(
            script,
            base_args(
                tiny_models[model],
                dataset,
                tmp_path / run,
                steps=1,
                extra=[
                    *argv,
                    "--cache_conditions",
                    "--condition_cache_dir",
                    str(cached / "condition_cache"),
                    "--validation_prompt",
                    "a cat",
                    "--validation_epochs",
                    "1",
                    "--validation_num_inference_steps",
                    "1",
                ],
            ),
        )
        assert calls.counts[encoders[0]] == calls.counts["DinoPatchFeatures"] == 0, calls.counts
        expected = sum(text_calls[name] for name in encoders[1:]) if run == "again" else 0
        assert calls.at_steps[0][0] == expected, (run, calls.counts)
        # The third run finds every entry: it trains without loading its text encoders (the VAE is, for its decoder).
        loaded = calls.built_by_first_step
        assert [loaded.get(name, 0) for name in encoders] == [1] + [int(run == "again")] * (len(encoders) - 1), loaded
        assert len(list((tmp_path / run).glob("validation_video_0_*.mp4"))) == 1


def test_resumed_run_reuses_entries_and_a_damaged_one_is_recomputed(
    cog, tiny_models, dataset, tmp_path, monkeypatch, caplog
):
    from diffusers import AutoencoderKLCogVideoX

    out = tmp_path / "out"
    argv = base_args(
        tiny_models["cogvideox-2b"], dataset, out, steps=2, extra=["--cache_conditions", "--checkpointing_steps", "1"]
    )
    run_main(cog, argv)
    entries = sorted((out / "condition_cache").glob("*.safetensors"))
    assert len(entries) == 3
    damaged = entries[1]
    damaged.write_bytes(damaged.read_bytes()[:-64])  # a copy or a write cut short
    calls = EncoderCalls(monkeypatch, cog, [AutoencoderKLCogVideoX])
    run_main(
        cog,
        base_args(
            tiny_models["cogvideox-2b"],
            dataset,
            out,
            steps=4,
            extra=["--cache_conditions", "--checkpointing_steps", "1", "--resume_from_checkpoint", "latest"],
        ),
    )
    assert calls.counts["AutoencoderKLCogVideoX"] == 1  # only the damaged entry
    assert re.search(rf"{re.escape(str(damaged))} is damaged .*computing it again", caplog.text)
    from safetensors.torch import load_file

    assert set(load_file(str(damaged))) == {"latent_dist", "prompt_embeds", "features"}


def test_two_ranks_encode_each_clip_once(tiny_models, dataset, tmp_path):
    """A 2-rank gloo pass: each rank encodes its own share (rank r: clips r, r + 2, ...), every clip exactly once,
    and the main process the validation prompt. A second 2-rank run finds every entry: no rank loads T5."""
    cache = tmp_path / "cache"
    validation = ["--validation_prompt", "a cat", "--validation_steps", "1", "--validation_num_inference_steps", "1"]
    logs = []
    for run in ("first", "second"):
        argv = base_args(
            tiny_models["cogvideox-2b"],
            dataset,
            tmp_path / run,
            steps=1,
            extra=["--cache_conditions", "--condition_cache_dir", str(cache), *validation],
        )
        logs.append(run_two_ranks(COGVIDEOX_SCRIPT, argv, tmp_path, timeout=600))
    encoded = re.findall(r"rank (\d) encoded clip (\d)", logs[0])
    assert sorted(encoded) == [("0", "0"), ("0", "2"), ("1", "1")], encoded
    assert len(list(cache.glob("*.safetensors"))) == 4  # 3 clips + the validation prompt's embeddings
    assert "no text encoder loaded" not in logs[0]
    assert not re.findall(r"encoded clip", logs[1])
    assert sorted(re.findall(r"rank (\d) has every entry it needs; no text encoder loaded", logs[1])) == ["0", "1"]
    assert list((tmp_path / "second").glob("validation_video_0_*.mp4"))


def test_layerwise_upcasting_stores_fp8_and_trains_the_lora(cog, tiny_models, dataset, tmp_path, monkeypatch):
    seen = {}
    original = cog.training_loss

    def recording_loss(batch, generator, parts, *args, **kwargs):
        loss, logs = original(batch, generator, parts, *args, **kwargs)
        transformer = parts.model.transformer
        seen.setdefault("dtypes", {name: p.dtype for name, p in transformer.named_parameters()})
        seen.setdefault("losses", []).append(loss.item())
        return loss, logs

    monkeypatch.setattr(cog, "training_loss", recording_loss)
    out = tmp_path / "out"
    run_main(cog, base_args(tiny_models["cogvideox-2b"], dataset, out, steps=3, extra=["--layerwise_upcasting"]))
    dtypes = seen["dtypes"]
    assert dtypes["transformer_blocks.0.attn1.to_q.base_layer.weight"] == torch.float8_e4m3fn
    assert dtypes["transformer_blocks.0.ff.net.0.proj.weight"] == torch.float8_e4m3fn
    # diffusers' default skips, as finetrainers uses them for CogVideoX: norms with their modulation linears, the
    # patch embedder, the LoRA.
    kept = ("lora_", "norm1.", "norm2.", "norm_out.", "patch_embed.")
    assert all(dtype == torch.float32 for name, dtype in dtypes.items() if any(part in name for part in kept))
    assert all(torch.isfinite(torch.tensor(seen["losses"])))
    assert any(value.abs().sum() > 0 for key, value in lora_state(out).items() if "lora_B" in key)
    assert "| `layerwise_upcasting` | `True` |" in (out / "README.md").read_text()  # the card says the base was fp8


def test_fp8_weights_cast_every_block_linear_and_compute_with_the_rounded_weights():
    """HunyuanVideo's enable_fp8_weights on a tiny model with LoRA: the parameters stored in fp8 are exactly those
    diffusers' own layerwise casting stores in fp8 plus the weight and bias of every frozen nn.Linear inside the
    blocks (the AdaLN modulation ones included), and the forward equals a hook-free copy whose same weights were
    rounded to fp8 and back."""
    from peft import LoraConfig

    from crepa_diffusers.testing import build_tiny_hunyuan_pipeline
    from crepa_diffusers.training_utils import enable_fp8_weights

    def tiny_with_lora():
        transformer = build_tiny_hunyuan_pipeline().transformer
        transformer.add_adapter(
            LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_v"])
        )
        return transformer.eval()

    transformer, diffusers_default, reference = tiny_with_lora(), tiny_with_lora(), tiny_with_lora()
    enable_fp8_weights(transformer, compute_dtype=torch.float32)
    diffusers_default.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)

    def fp8_names(model):
        return {name for name, param in model.named_parameters() if param.dtype == torch.float8_e4m3fn}

    in_blocks = re.compile(r"(single_)?transformer_blocks\.\d+\..*")
    block_linears = {
        f"{name}.{kind}"
        for name, module in reference.named_modules()
        if type(module) is torch.nn.Linear and in_blocks.fullmatch(name) and "lora_" not in name
        for kind, _ in module.named_parameters()
    }
    assert {
        "transformer_blocks.0.norm1.linear.weight",
        "single_transformer_blocks.0.norm.linear.bias",
    } <= block_linears
    assert not fp8_names(diffusers_default) >= block_linears  # diffusers alone keeps the modulation linears
    expected = fp8_names(diffusers_default) | block_linears
    assert fp8_names(transformer) == expected
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name in expected:
                param.copy_(param.to(torch.float8_e4m3fn).to(torch.float32))
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 4, 3, 8, 8, generator=generator),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 5, 16, generator=generator),
        "encoder_attention_mask": torch.ones(1, 5, dtype=torch.long),
        "pooled_projections": torch.randn(1, 8, generator=generator),
        "guidance": torch.tensor([6000.0]),
    }
    with torch.no_grad():
        expected_output, output = reference(**inputs).sample, transformer(**inputs).sample
    assert torch.equal(output, expected_output)


def test_missing_gives_each_rank_its_share_of_absent_damaged_or_incomplete_entries(tmp_path):
    from types import SimpleNamespace

    cache = ConditionCache(tmp_path / "cache", {"flag": 1})
    items = []
    for i in range(5):
        (tmp_path / f"clip{i}.mp4").write_bytes(b"x" * (i + 1))
        items.append(SimpleNamespace(path=tmp_path / f"clip{i}.mp4", prompt=f"prompt {i}"))
    whole = {"latent_dist": torch.zeros(2), "prompt_embeds": torch.zeros(3)}
    for i in (0, 1, 3):
        cache.save(cache.video_key(items[i].path, items[i].prompt), whole)
    cache.save(cache.video_key(items[4].path, items[4].prompt), {"latent_dist": torch.zeros(2)})  # no embeddings
    damaged = cache.path(cache.video_key(items[3].path, items[3].prompt))
    damaged.write_bytes(damaged.read_bytes()[:-8])
    required = {"latent_dist", "prompt_embeds"}
    assert cache.missing(items, required) == [2, 3, 4]
    assert cache.missing(items, required, rank=0, world_size=2) == [2, 4]  # clips 0, 2, 4
    assert cache.missing(items, required, rank=1, world_size=2) == [3]  # clips 1, 3
    assert cache.missing(items, {"latent_dist"}, rank=1, world_size=2) == [3]


def test_disk_check_fails_after_the_first_entry_with_the_sizes(cog, tiny_models, dataset, tmp_path, monkeypatch):
    from crepa_diffusers import cache as cache_module

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(
        SystemExit,
        match=r"entries take [\d.]+ MB each, [\d.]+ GB for the 2 still to write; .* has "
        r"0\.00 GB free\. Point --condition_cache_dir at a larger disk",
    ):
        run_main(cog, base_args(tiny_models["cogvideox-2b"], dataset, tmp_path / "o", extra=["--cache_conditions"]))


def test_cache_refuses_changing_clips(tiny_models, dataset, tmp_path):
    result = launch(
        COGVIDEOX_SCRIPT,
        base_args(tiny_models["cogvideox-2b"], dataset, tmp_path / "o", extra=["--cache_conditions", "--random_flip"]),
        tmp_path,
        check=False,
    )
    assert result.returncode != 0 and "--cache_conditions reuses each clip's features" in result.stderr


def test_keys_depend_on_flags_and_video_file(tmp_path):
    video = tmp_path / "a.mp4"
    video.write_bytes(b"x" * 10)
    cache = ConditionCache(tmp_path / "c", {"height": 480})
    key = cache.video_key(video, "a prompt")
    assert key == cache.video_key(video, "a prompt")
    assert key != cache.video_key(video, "another prompt")
    assert key != ConditionCache(tmp_path / "c", {"height": 240}).video_key(video, "a prompt")
    os.utime(video, ns=(1, 1))  # the video file changed
    assert key != cache.video_key(video, "a prompt")


def test_entries_without_crepa_features_are_recomputed_for_a_crepa_run(cog, tiny_models, dataset, tmp_path):
    """A --crepa_lambda 0 run stores no DINOv2 features under the same keys; a CREPA run on that cache must not
    reuse those entries (it would fail at its first step): it encodes them again, with features."""
    from safetensors import safe_open

    cache_dir = tmp_path / "cache"
    for lambda_ in ("0", "0.5"):
        run_main(
            cog,
            base_args(
                tiny_models["cogvideox-2b"],
                dataset,
                tmp_path / f"out{lambda_}",
                steps=1,
                extra=["--cache_conditions", "--condition_cache_dir", str(cache_dir), "--crepa_lambda", lambda_],
            ),
        )
        entries = sorted(cache_dir.glob("*.safetensors"))
        assert len(entries) == 3
        for entry in entries:
            with safe_open(str(entry), "pt") as handle:
                assert ("features" in handle.keys()) == (lambda_ == "0.5")
