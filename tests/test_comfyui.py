"""The ComfyUI file of a HunyuanVideo or Wan LoRA: read with ComfyUI's own loader rules (written here from its source,
not from crepa_diffusers.comfyui), every tensor is used and each layer's weight change equals the diffusers LoRA fused
into the transformer."""

import copy
import re

import pytest
import torch
from safetensors.torch import load_file


LORA_ALPHA, RANK = 6.0, 4  # alpha != rank: a scale of 1.5 that a file without .alpha tensors would lose
# Double blocks: to_v and add_v have no LoRA (zero rows in the fused qkv); single blocks: to_v none, proj_mlp one.
TARGETS = (
    r"^(transformer_blocks\.\d+\.(attn\.(to_q|to_k|add_q_proj|add_k_proj|to_out\.0|to_add_out)|ff\.net\.(0\.proj|2)"
    r"|ff_context\.net\.(0\.proj|2)|norm1\.linear|norm1_context\.linear)"
    r"|single_transformer_blocks\.\d+\.(attn\.(to_q|to_k)|proj_mlp|proj_out|norm\.linear)|proj_out|norm_out\.linear)$"
)


def comfyui_model_weights(num_double: int, num_single: int) -> list[str]:
    """The LoRA-relevant weights of ComfyUI's HunyuanVideo (comfy/ldm/hunyuan_video/model.py, built from Flux's
    DoubleStreamBlock / SingleStreamBlock / LastLayer): its state-dict names."""
    names = []
    for i in range(num_double):
        for stream in ("img", "txt"):
            names += [f"double_blocks.{i}.{stream}_{part}" for part in ("mod.lin", "attn.qkv", "attn.proj")]
            names += [f"double_blocks.{i}.{stream}_mlp.{j}" for j in (0, 2)]
    for i in range(num_single):
        names += [f"single_blocks.{i}.{part}" for part in ("linear1", "linear2", "modulation.lin")]
    names += ["final_layer.linear", "final_layer.adaLN_modulation.1"]
    return [f"diffusion_model.{name}.weight" for name in names]


def generic_key_map(model_weights: list[str]) -> dict[str, str]:
    """comfy/lora.py model_lora_keys_unet, the generic keys of every model (the only ones Wan gets: no Wan branch)."""
    key_map = {}
    for k in model_weights:
        key_map["lora_unet_" + k[len("diffusion_model.") : -len(".weight")].replace(".", "_")] = k
        key_map[k[: -len(".weight")]] = k
    return key_map


def comfyui_key_map(model_weights: list[str]) -> dict[str, str]:
    """comfy/lora.py model_lora_keys_unet: the generic keys, then the HunyuanVideo branch (diffusion-pipe names)."""
    key_map = generic_key_map(model_weights)
    for k in model_weights:
        key = (
            k.replace("_mod.lin.", "_mod.linear.")
            .replace("_attn.qkv.", "_attn_qkv.")
            .replace("_attn.proj.", "_attn_proj.")
        )
        key = (
            key.replace("mlp.0.", "mlp.fc1.")
            .replace("mlp.2.", "mlp.fc2.")
            .replace(".modulation.lin.", ".modulation.linear.")
        )
        key = key[len("diffusion_model.") : -len(".weight")]
        key_map[f"transformer.{key}"] = k
        key_map[f"diffusion_model.{key}"] = k
    return key_map


def comfyui_weight_changes(lora: dict[str, torch.Tensor], key_map: dict[str, str]):
    """comfy/lora.py load_lora + comfy/weight_adapter/lora.py: per model weight, alpha / rank * up @ down (alpha
    from `<key>.alpha`, rank = down's rows; scale 1 without alpha); and the file's keys that were used."""
    changes, used = {}, set()
    for x, weight in key_map.items():
        alpha = lora[f"{x}.alpha"].item() if f"{x}.alpha" in lora else None
        if f"{x}.alpha" in lora:
            used.add(f"{x}.alpha")
        if f"{x}.lora_B.weight" in lora:  # the peft/diffusers spelling ("diffusers2" in ComfyUI)
            up, down = lora[f"{x}.lora_B.weight"].float(), lora[f"{x}.lora_A.weight"].float()
            used |= {f"{x}.lora_B.weight", f"{x}.lora_A.weight"}
            scale = alpha / down.shape[0] if alpha is not None else 1.0
            changes[weight] = scale * torch.mm(up, down)
    return changes, used


def expected_original_changes(deltas: dict[str, torch.Tensor], num_double: int, num_single: int):
    """diffusers weight changes -> ComfyUI's weights, by scripts/convert_hunyuan_video_to_diffusers.py read
    backwards: q, k, v stacked (single blocks: then proj_mlp); the final modulation's halves swapped back."""
    out = {}
    for i in range(num_double):
        d = lambda name: deltas[f"transformer_blocks.{i}.{name}"]  # noqa: E731
        for stream, q, k, v, proj, ff, norm in (
            ("img", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff", "norm1"),
            (
                "txt",
                "attn.add_q_proj",
                "attn.add_k_proj",
                "attn.add_v_proj",
                "attn.to_add_out",
                "ff_context",
                "norm1_context",
            ),
        ):
            out[f"double_blocks.{i}.{stream}_attn.qkv"] = torch.cat([d(q), d(k), d(v)])
            out[f"double_blocks.{i}.{stream}_attn.proj"] = d(proj)
            out[f"double_blocks.{i}.{stream}_mlp.0"] = d(f"{ff}.net.0.proj")
            out[f"double_blocks.{i}.{stream}_mlp.2"] = d(f"{ff}.net.2")
            out[f"double_blocks.{i}.{stream}_mod.lin"] = d(f"{norm}.linear")
    for i in range(num_single):
        d = lambda name: deltas[f"single_transformer_blocks.{i}.{name}"]  # noqa: E731
        out[f"single_blocks.{i}.linear1"] = torch.cat([d("attn.to_q"), d("attn.to_k"), d("attn.to_v"), d("proj_mlp")])
        out[f"single_blocks.{i}.linear2"] = d("proj_out")
        out[f"single_blocks.{i}.modulation.lin"] = d("norm.linear")
    out["final_layer.linear"] = deltas["proj_out"]
    scale, shift = deltas["norm_out.linear"].chunk(2)
    out["final_layer.adaLN_modulation.1"] = torch.cat([shift, scale])
    return {f"diffusion_model.{name}.weight": change for name, change in out.items()}


def fused_weight_changes(base: torch.nn.Module, lora_dir, pipeline_class=None) -> dict[str, torch.Tensor]:
    """The diffusers file loaded the way users load it (`load_lora_weights` of `pipeline_class`, HunyuanVideo's by
    default; scale from its metadata) and fused into the transformer: the weight change of every Linear."""
    from diffusers import HunyuanVideoPipeline

    pipeline_class = pipeline_class or HunyuanVideoPipeline
    transformer = copy.deepcopy(base)
    components, _ = pipeline_class._get_signature_keys(pipeline_class)  # all None but the transformer
    pipe = pipeline_class(**{**dict.fromkeys(components), "transformer": transformer})
    pipe.load_lora_weights(str(lora_dir), adapter_name="trained")
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
    before = dict(base.named_modules())
    return {
        name: (module.weight.detach() - before[name].weight.detach()).float()
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and name in before
    }


def assert_comfyui_file_exact(comfy_file, lora_dir, base: torch.nn.Module) -> int:
    """Every tensor of the ComfyUI file is used by ComfyUI's key map, and every ComfyUI weight changes exactly as the
    diffusers LoRA fused into `base` changes it (float32, relative error <= 1e-5). Returns the layers changed."""
    config = base.config
    weights = comfyui_model_weights(config.num_layers, config.num_single_layers)
    expected = expected_original_changes(
        fused_weight_changes(base, lora_dir), config.num_layers, config.num_single_layers
    )
    return assert_weight_changes_exact(load_file(str(comfy_file)), weights, comfyui_key_map(weights), expected)


def assert_weight_changes_exact(lora, weights: list[str], key_map: dict[str, str], expected) -> int:
    """ComfyUI's use of `lora` through `key_map` touches every tensor, and changes each of `weights` exactly as
    `expected` (unchanged ones not at all). Returns the weights changed."""
    computed, used = comfyui_weight_changes(lora, key_map)
    assert set(lora) == used, f"ComfyUI would ignore: {sorted(set(lora) - used)[:5]}"
    changed = 0
    for weight in weights:
        want = expected[weight]
        if not want.abs().max() > 0:
            assert weight not in computed, f"{weight}: patched although the LoRA does not touch it"
            continue
        got = computed[weight]
        assert got.shape == want.shape, weight
        error = ((got - want).norm() / want.norm()).item()
        assert error <= 1e-5, f"{weight}: relative error {error:.2e}"
        changed += 1
    return changed


@pytest.fixture(scope="module")
def tiny_transformer():
    from crepa_diffusers import testing

    return testing.build_tiny_hunyuan_pipeline().transformer.float().eval()


def random_lora_dir(base, tmp_path, targets=TARGETS, pipeline_class=None, **config):
    """A diffusers LoRA file (with adapter metadata) of random weights on `targets`, saved as the script saves (with
    `pipeline_class`, HunyuanVideo's by default)."""
    from diffusers import HunyuanVideoPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from crepa_diffusers import checkpoints

    transformer = copy.deepcopy(base)
    transformer.add_adapter(
        LoraConfig(r=RANK, lora_alpha=LORA_ALPHA, init_lora_weights=True, target_modules=targets, **config)
    )
    generator = torch.Generator().manual_seed(0)
    for name, param in transformer.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=generator)
    (pipeline_class or HunyuanVideoPipeline).save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        **checkpoints.lora_adapter_metadata(transformer),
    )
    return tmp_path


def test_comfyui_file_has_the_fused_weight_changes(tiny_transformer, tmp_path):
    from crepa_diffusers import comfyui

    lora_dir = random_lora_dir(tiny_transformer, tmp_path)
    comfy_file = comfyui.convert_file(lora_dir)
    assert comfy_file == tmp_path / "pytorch_lora_weights_comfyui.safetensors"
    # 2 double blocks x 10 layers (qkv, proj, mlp x 2, mod, per stream) + 2 single x 3 + the final 2: all trained.
    assert assert_comfyui_file_exact(comfy_file, lora_dir, tiny_transformer) == 28
    lora = load_file(str(comfy_file))
    hidden = tiny_transformer.config.num_attention_heads * tiny_transformer.config.attention_head_dim
    qkv = "diffusion_model.double_blocks.0.img_attn_qkv"
    assert lora[f"{qkv}.lora_A.weight"].shape == (2 * RANK, hidden)  # to_q, to_k stacked; to_v has none
    assert lora[f"{qkv}.lora_B.weight"].shape == (3 * hidden, 2 * RANK)
    assert not lora[f"{qkv}.lora_B.weight"][2 * hidden :].any()  # to_v: zero rows
    assert lora[f"{qkv}.alpha"].item() == LORA_ALPHA * 2  # alpha / (2 rank) = lora_alpha / rank
    linear1 = "diffusion_model.single_blocks.1.linear1"
    assert lora[f"{linear1}.lora_B.weight"].shape == (3 * hidden + 4 * hidden, 3 * RANK)  # q, k, proj_mlp
    assert not lora[f"{linear1}.lora_B.weight"][2 * hidden : 3 * hidden].any()  # to_v: zero rows
    assert lora["diffusion_model.final_layer.linear.alpha"].item() == LORA_ALPHA
    assert all(t.dtype == torch.float32 for t in lora.values())


def test_converter_command_and_its_errors(tiny_transformer, tmp_path, capsys):
    from crepa_diffusers import comfyui

    lora_dir = random_lora_dir(tiny_transformer, tmp_path / "run", targets=r"^transformer_blocks\.0\.attn\.to_q$")
    out = tmp_path / "for_comfy.safetensors"
    comfyui.main([str(lora_dir / "pytorch_lora_weights.safetensors"), "--output", str(out)])
    assert capsys.readouterr().out.strip() == str(out)
    assert assert_comfyui_file_exact(out, lora_dir, tiny_transformer) == 1
    # A CogVideoX (or any non-HunyuanVideo) LoRA is refused with the file named.
    from safetensors.torch import save_file

    foreign = tmp_path / "cog.safetensors"
    save_file(
        {
            "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 8),
            "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(8, 4),
        },
        str(foreign),
    )
    with pytest.raises(SystemExit, match=re.escape(f"{foreign}: not a HunyuanVideo LoRA in diffusers names")):
        comfyui.main([str(foreign)])
    with pytest.raises(SystemExit, match="no such file"):
        comfyui.main([str(tmp_path / "missing")])


def test_rslora_scale_is_kept(tiny_transformer, tmp_path):
    from crepa_diffusers import comfyui

    # peft's rsLoRA scales by alpha / sqrt(rank): the file's .alpha must reproduce that, not alpha / rank.
    lora_dir = random_lora_dir(
        tiny_transformer, tmp_path, targets=r"^transformer_blocks\.1\.ff\.net\.2$", use_rslora=True
    )
    assert assert_comfyui_file_exact(comfyui.convert_file(lora_dir), lora_dir, tiny_transformer) == 1


def test_per_module_alpha_and_rank_patterns_on_a_fused_target(tiny_transformer, tmp_path):
    """peft's alpha_pattern / rank_pattern (kept in the adapter metadata) give the parts of one fused qkv different
    scales and ranks: each part's weight change stays exact in the stacked file."""
    from crepa_diffusers import comfyui

    lora_dir = random_lora_dir(
        tiny_transformer,
        tmp_path,
        targets=r"^transformer_blocks\.0\.attn\.(to_q|to_k|to_v)$",
        alpha_pattern={"to_k": 2.0},
        rank_pattern={"to_v": 2},
    )
    assert assert_comfyui_file_exact(comfyui.convert_file(lora_dir), lora_dir, tiny_transformer) == 1


# Wan: diffusers module -> original Wan module (block modules without their `blocks.N.`), written out from diffusers'
# scripts/convert_wan_to_diffusers.py TRANSFORMER_KEYS_RENAME_DICT read backwards; every Linear of the 2.1 T2V model.
WAN_ORIGINAL_NAMES = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
    "proj_out": "head.head",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
}
WAN_TARGETS = r"^(blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|blocks\.\d+\.ffn\.net\.(0\.proj|2)|proj_out)$"


def wan_original_name(module: str) -> str:
    block = re.fullmatch(r"(blocks\.\d+\.)(.+)", module)
    return block[1] + WAN_ORIGINAL_NAMES[block[2]] if block else WAN_ORIGINAL_NAMES[module]


@pytest.fixture(scope="module")
def tiny_wan_transformer():
    from crepa_diffusers import testing

    return testing.build_tiny_wan_pipeline("2.1").transformer.float().eval()


def wan_lora_dir(base, tmp_path, targets=WAN_TARGETS, **config):
    from diffusers import WanPipeline

    return random_lora_dir(base, tmp_path, targets=targets, pipeline_class=WanPipeline, **config)


def assert_wan_comfyui_file_exact(comfy_file, lora_dir, base: torch.nn.Module) -> int:
    """The Wan counterpart of assert_comfyui_file_exact: ComfyUI's Wan weights are the original names of every Linear
    of `base`, reached only through the generic keys; each changes as the fused diffusers LoRA, renamed."""
    from diffusers import WanPipeline

    deltas = fused_weight_changes(base, lora_dir, WanPipeline)
    expected = {f"diffusion_model.{wan_original_name(name)}.weight": delta for name, delta in deltas.items()}
    weights = sorted(expected)
    assert len(weights) == len(deltas)  # the renaming is one to one
    return assert_weight_changes_exact(load_file(str(comfy_file)), weights, generic_key_map(weights), expected)


def test_wan_comfyui_file_has_the_fused_weight_changes(tiny_wan_transformer, tmp_path):
    from crepa_diffusers import comfyui

    lora_dir = wan_lora_dir(tiny_wan_transformer, tmp_path)
    comfy_file = comfyui.convert_file(lora_dir)
    assert comfy_file == tmp_path / comfyui.COMFYUI_FILE
    # 3 blocks x 10 Linears (self and cross attention q, k, v, o; ffn.0, ffn.2) + head.head: all trained.
    assert assert_wan_comfyui_file_exact(comfy_file, lora_dir, tiny_wan_transformer) == 31
    lora = load_file(str(comfy_file))
    assert len(lora) == 3 * 31
    hidden = tiny_wan_transformer.config.num_attention_heads * tiny_wan_transformer.config.attention_head_dim
    assert lora["diffusion_model.blocks.2.cross_attn.o.alpha"].item() == LORA_ALPHA  # alpha / rank = 1.5
    assert lora["diffusion_model.head.head.lora_A.weight"].shape == (RANK, hidden)
    assert all(t.dtype == torch.float32 for t in lora.values())


def test_wan_rslora_and_per_module_patterns(tiny_wan_transformer, tmp_path):
    from crepa_diffusers import comfyui

    lora_dir = wan_lora_dir(
        tiny_wan_transformer,
        tmp_path,
        use_rslora=True,
        alpha_pattern={"attn2.to_k": 2.0, "blocks.1.ffn.net.2": 10.0},
        rank_pattern={"attn1.to_v": 2, "proj_out": 3},
    )
    assert assert_wan_comfyui_file_exact(comfyui.convert_file(lora_dir), lora_dir, tiny_wan_transformer) == 31


def test_wan_converter_command_and_its_errors(tiny_wan_transformer, tmp_path, capsys):
    from crepa_diffusers import comfyui

    lora_dir = wan_lora_dir(tiny_wan_transformer, tmp_path / "run", targets=r"^blocks\.1\.attn2\.to_out\.0$")
    comfyui.main([str(lora_dir)])
    out = lora_dir / comfyui.COMFYUI_FILE
    assert capsys.readouterr().out.strip() == str(out)
    assert set(load_file(str(out))) == {
        f"diffusion_model.blocks.1.cross_attn.o.{name}" for name in ("lora_A.weight", "lora_B.weight", "alpha")
    }
    assert assert_wan_comfyui_file_exact(out, lora_dir, tiny_wan_transformer) == 1
    # A module the converter takes no LoRA of (the condition embedder, outside the Wan script's targets, although
    # ComfyUI's Wan has it as time_projection.1) stops the conversion, named.
    bad = wan_lora_dir(
        tiny_wan_transformer, tmp_path / "bad", targets=r"^(blocks\.0\.attn1\.to_q|condition_embedder\.time_proj)$"
    )
    with pytest.raises(SystemExit, match=r"not a Wan LoRA .*name for: condition_embedder\.time_proj\)"):
        comfyui.main([str(bad)])
    assert not (bad / comfyui.COMFYUI_FILE).exists()
    # DoRA is refused as for HunyuanVideo.
    dora = wan_lora_dir(tiny_wan_transformer, tmp_path / "dora", targets=r"^blocks\.0\.attn1\.to_q$", use_dora=True)
    with pytest.raises(SystemExit, match="a DoRA adapter"):
        comfyui.convert_file(dora)
