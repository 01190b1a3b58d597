"""Issue 21: every --lora_layers name trains (or the run stops before weights load), the HunyuanVideo run writes and
uploads an exact ComfyUI file, and --hub_token lands in no file the run writes."""

import json
import re
from pathlib import Path

import pytest
from helpers import COGVIDEOX_SCRIPT, HUNYUAN_SCRIPT, WAN_SCRIPT, import_script, lora_state, run_main, tiny_train_args
from safetensors.torch import load_file
from test_comfyui import assert_comfyui_file_exact


TOKEN = "hf_FAKEtoken0123456789abcdefXYZ"


def assert_token_in_no_file(output_dir: Path, tracked_value: str) -> None:
    """No file under `output_dir` (text or binary) holds TOKEN, while the tracker's hparams do hold another string
    flag's value (so the scan covers what the trackers wrote)."""
    files = [path for path in Path(output_dir).rglob("*") if path.is_file()]
    assert any(path.match("events.out.tfevents.*") for path in files)
    assert not [path for path in files if TOKEN.encode() in path.read_bytes()]
    assert any(tracked_value.encode() in path.read_bytes() for path in files if "logs" in path.parts)


@pytest.fixture(scope="module")
def hunyuan():
    return import_script(HUNYUAN_SCRIPT)


@pytest.fixture(scope="module")
def cog():
    return import_script(COGVIDEOX_SCRIPT)


def test_hunyuan_mlp_layers_train_and_the_comfyui_file_is_exact(hunyuan, tiny_models, dataset, tmp_path, monkeypatch):
    import huggingface_hub
    from diffusers import HunyuanVideoTransformer3DModel

    uploads = {}

    class Repo:
        repo_id = "someone/tiny-hunyuan"

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda *args, **kwargs: Repo())
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kwargs: uploads.update(kwargs))
    model, out = tiny_models["hunyuan"], tmp_path / "out"
    layers = "to_q,to_k,add_q_proj,proj_mlp,ff.net.0.proj,ff_context.net.2,norm1.linear,proj_out,norm_out.linear"
    argv = tiny_train_args(
        model,
        dataset,
        out,
        extra=[
            *("--max_sequence_length", "16", "--crepa_mode", "none", "--lora_layers", layers),
            *("--report_to", "tensorboard", "--checkpointing_steps", "1", "--tracker_name", "tracked-run-name"),
            *("--push_to_hub", "--hub_model_id", "someone/tiny-hunyuan", "--hub_token", TOKEN),
        ],
    )
    run_main(hunyuan, argv)
    # rank 4, alpha 8 (tiny_train_args): every named layer holds a trained LoRA, the token refiner none.
    state = lora_state(out)
    trained = {re.sub(r"^transformer\.|\.lora_[AB]\.weight$", "", key) for key in state}
    for name in ("attn.to_q", "attn.add_q_proj", "proj_mlp", "ff.net.0.proj", "ff_context.net.2", "norm1.linear"):
        assert any(module.endswith(name) for module in trained), name
    assert {"proj_out", "norm_out.linear", "single_transformer_blocks.1.proj_out"} <= trained
    assert not any("context_embedder" in module for module in trained)
    assert all(state[key].abs().max() > 0 for key in state if "lora_B" in key)  # each one trained (B starts at 0)
    base = HunyuanVideoTransformer3DModel.from_pretrained(model, subfolder="transformer").float()
    assert assert_comfyui_file_exact(out / "pytorch_lora_weights_comfyui.safetensors", out, base) == 16
    card = (out / "README.md").read_text()
    assert "pytorch_lora_weights_comfyui.safetensors" in card and "LoraLoaderModelOnly" in card
    assert "pytorch_lora_weights_comfyui.safetensors" in uploads["allow_patterns"]
    assert uploads["token"] == TOKEN  # the upload gets it; no file does
    assert (out / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()
    assert_token_in_no_file(out, "tracked-run-name")


def test_cogvideox_named_layers_train_and_token_stays_out(cog, tiny_models, dataset, tmp_path):
    out = tmp_path / "out"
    extra = ["--crepa_mode", "none", "--lora_layers", "to_q,ff.net.0.proj,norm1.linear", "--report_to", "tensorboard"]
    extra += ["--hub_token", TOKEN, "--checkpointing_steps", "1", "--tracker_name", "tracked-run-name"]
    extra += ["--validation_prompt", "a bunny walks", "--num_validation_videos", "0"]  # 0: no videos, as in diffusers
    model = tiny_models["cogvideox-2b"]
    run_main(cog, tiny_train_args(model, dataset, out, steps=1, extra=extra))
    blocks = range(json.loads((Path(model) / "transformer" / "config.json").read_text())["num_layers"])
    state = lora_state(out)
    modules = {re.sub(r"^transformer\.|\.lora_[AB]\.weight$", "", key) for key in state}
    assert modules == {
        f"transformer_blocks.{i}.{n}" for i in blocks for n in ("attn1.to_q", "ff.net.0.proj", "norm1.linear")
    }
    assert all(state[key].abs().max() > 0 for key in state if "lora_B" in key)
    assert_token_in_no_file(out, "tracked-run-name")
    assert not list(out.glob("*.mp4"))


def test_wan_ffn_and_output_layers_train_upload_the_comfyui_file_and_token_stays_out(
    tiny_models, dataset, tmp_path, monkeypatch
):
    import huggingface_hub

    uploads = {}

    class Repo:
        repo_id = "someone/tiny-wan"

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda *args, **kwargs: Repo())
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kwargs: uploads.update(kwargs))
    out = tmp_path / "out"
    extra = ["--max_sequence_length", "16", "--lora_layers", "attn1.to_q,ffn.net.0.proj,ffn.net.2,proj_out"]
    extra += ["--report_to", "tensorboard", "--checkpointing_steps", "1", "--tracker_name", "tracked-run-name"]
    extra += ["--push_to_hub", "--hub_model_id", "someone/tiny-wan", "--hub_token", TOKEN]
    run_main(import_script(WAN_SCRIPT), tiny_train_args(tiny_models["wan-2.1"], dataset, out, steps=1, extra=extra))
    state = lora_state(out)
    modules = {re.sub(r"^transformer\.|\.lora_[AB]\.weight$", "", key) for key in state}
    names = ("attn1.to_q", "ffn.net.0.proj", "ffn.net.2")
    assert modules == {"proj_out"} | {f"blocks.{i}.{name}" for i in range(3) for name in names}
    assert all(state[key].abs().max() > 0 for key in state if "lora_B" in key)
    comfy = load_file(str(out / "pytorch_lora_weights_comfyui.safetensors"))
    assert {"diffusion_model.head.head.alpha", "diffusion_model.blocks.2.ffn.0.lora_A.weight"} <= set(comfy)
    assert "pytorch_lora_weights_comfyui.safetensors" in uploads["allow_patterns"] and uploads["token"] == TOKEN
    assert "LoraLoaderModelOnly" in (out / "README.md").read_text()
    assert_token_in_no_file(out, "tracked-run-name")


@pytest.mark.parametrize("script_name", ["hunyuan", "cog"])
def test_id_token_joins_as_diffusers_does_with_its_usual_trailing_space(hunyuan, cog, dataset, tmp_path, script_name):
    script = {"hunyuan": hunyuan, "cog": cog}[script_name]
    plain = script.load_video_items(script.parse_args(tiny_train_args(tmp_path, dataset, tmp_path)))
    for token in ("TOK ", "TOK"):  # diffusers: "TOK " + prompt; "TOK" alone would glue to the first word there
        argv = tiny_train_args(tmp_path, dataset, tmp_path, extra=["--id_token", token])
        items = script.load_video_items(script.parse_args(argv))
        assert [item.prompt for item in items] == [f"TOK {item.prompt}" for item in plain]
    with pytest.raises(SystemExit):
        script.parse_args(tiny_train_args(tmp_path, dataset, tmp_path, extra=["--num_validation_videos", "-1"]))


@pytest.mark.parametrize(
    "script_name, model, layers, missing",
    [
        ("hunyuan", "hunyuan", "to_q,proj_mlpp", ["proj_mlpp"]),
        ("hunyuan", "hunyuan", "to_q,proj_in", ["proj_in"]),  # the token refiner's: never a target
        ("cog", "cogvideox-2b", "to_q,to_qq,ff.net.9", ["to_qq", "ff.net.9"]),
    ],
)
def test_unknown_lora_layer_stops_before_weights_load(
    hunyuan, cog, tiny_models, dataset, tmp_path, monkeypatch, script_name, model, layers, missing
):
    import diffusers

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before --lora_layers was checked")

    for cls in ("HunyuanVideoTransformer3DModel", "CogVideoXTransformer3DModel"):
        monkeypatch.setattr(getattr(diffusers, cls), "from_pretrained", no_weights)
    script = {"hunyuan": hunyuan, "cog": cog}[script_name]
    extra = ["--lora_layers", layers] + (["--max_sequence_length", "16"] if script_name == "hunyuan" else [])
    with pytest.raises(SystemExit) as error:
        run_main(script, tiny_train_args(tiny_models[model], dataset, tmp_path / "o", extra=extra))
    message = str(error.value)
    assert f"{missing} matched no module" in message
    assert "'attn.to_q'" in message or "'attn1.to_q'" in message  # the names that exist are listed
    if script_name == "hunyuan":
        assert "'proj_mlp'" in message and "'ff.net.0.proj'" in message and "token_refiner" not in message


@pytest.mark.parametrize("script_name", ["hunyuan", "cog"])
def test_deepspeed_config_with_optimizer_block_is_refused_before_weights_load(
    hunyuan, cog, tiny_models, dataset, tmp_path, monkeypatch, script_name
):
    # diffusers' script hands such blocks to DeepSpeed; here the flags build both. An accelerator as accelerate
    # builds it from such a config (DeepSpeed itself needs no GPU for this check).
    import types

    import accelerate
    from accelerate.utils import DistributedType

    class DeepSpeedAccelerator:
        def __init__(self, **kwargs):
            self.distributed_type = DistributedType.DEEPSPEED
            config = {"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}
            self.state = types.SimpleNamespace(deepspeed_plugin=types.SimpleNamespace(deepspeed_config=config))

    monkeypatch.setattr(accelerate, "Accelerator", DeepSpeedAccelerator)
    script = {"hunyuan": hunyuan, "cog": cog}[script_name]
    model = tiny_models["hunyuan" if script_name == "hunyuan" else "cogvideox-2b"]
    with pytest.raises(SystemExit, match="The DeepSpeed config has an optimizer/scheduler block: delete it"):
        script.main(script.parse_args(tiny_train_args(model, dataset, tmp_path / "o")))
