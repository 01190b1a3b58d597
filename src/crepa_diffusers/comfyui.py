"""HunyuanVideo or Wan LoRA in diffusers names (the family read from the keys: Wan's are `transformer.blocks.N.*`) ->
a file ComfyUI's native loader reads whole, with the exact weight changes. It ignores safetensors metadata and reads
`diffusion_model.<original name>.lora_A/lora_B.weight` with the scale `alpha / rank` from a `.alpha` tensor, 1
without one (comfy/weight_adapter/lora.py: `alpha / mat2.shape[0]`, weight change `up @ down`).

HunyuanVideo (comfy/lora.py `model_lora_keys_unet`): the original names (HunyuanVideo's code's, diffusion-pipe's:
`img_attn_qkv`, `img_mod.linear`, `img_mlp.fc1`), q, k and v fused (`double_blocks.N.img_attn.qkv`, `txt_attn.qkv`;
the single blocks' q, k, v and MLP input in `single_blocks.N.linear1`). A fused target stacks its parts' `lora_A`
(rank: their sum) and puts their `lora_B` on the block diagonal, so up @ down stacks the parts' exact weight changes
(a part without LoRA: zero rows). The names invert diffusers' (loaders/lora_conversion_utils.py
`_convert_hunyuan_video_lora_to_diffusers`, scripts/convert_hunyuan_video_to_diffusers.py), shift/scale swap of the
final modulation included.

Wan: no branch there; the generic keys take Wan's own names (comfy/ldm/wan/model.py), which diffusers'
scripts/convert_wan_to_diffusers.py maps one to one (`attn1.to_q` <-> `self_attn.q`, `ffn.net.0.proj` <-> `ffn.0`,
`proj_out` <-> `head.head`): nothing fused, each layer keeps its lora_A / lora_B and gets its `.alpha`.

    python -m crepa_diffusers.comfyui OUTPUT_DIR_OR_LORA_FILE [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch


COMFYUI_FILE = "pytorch_lora_weights_comfyui.safetensors"
_CARD_SECTION = """
## Files

- `pytorch_lora_weights.safetensors`: diffusers names, for `pipe.load_lora_weights` (above).
- `{file}`: the same LoRA for ComfyUI's native {family} ({names}, an
  `.alpha` per layer): put it in `ComfyUI/models/loras` and load it with **LoraLoaderModelOnly** at strength
  **1.0** (the trained alpha / rank is inside the file).
"""
CARD_SECTION = _CARD_SECTION.format(
    file=COMFYUI_FILE, family="HunyuanVideo", names="original module names, q/k/v fused"
)
WAN_CARD_SECTION = _CARD_SECTION.format(file=COMFYUI_FILE, family="Wan", names="Wan's original module names")

# Fused original targets: diffusers parts in the order of the fused weight's rows.
_FUSED = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
}
_DOUBLE_RENAMES = {
    "attn.to_out.0": "img_attn_proj",
    "attn.to_add_out": "txt_attn_proj",
    "ff.net.0.proj": "img_mlp.fc1",
    "ff.net.2": "img_mlp.fc2",
    "ff_context.net.0.proj": "txt_mlp.fc1",
    "ff_context.net.2": "txt_mlp.fc2",
    "norm1.linear": "img_mod.linear",
    "norm1_context.linear": "txt_mod.linear",
}
_SINGLE_RENAMES = {"proj_out": "linear2", "norm.linear": "modulation.linear"}
_TOP_RENAMES = {"proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}
_SWAP_HALVES = {"final_layer.adaLN_modulation.1"}  # diffusers keeps [scale, shift], the original [shift, scale]
# Wan's block modules (diffusers -> original); the top-level proj_out is head.head.
_WAN_RENAMES = {
    f"attn{i}.{diffusers}": f"{attention}.{original}"
    for i, attention in ((1, "self_attn"), (2, "cross_attn"))
    for diffusers, original in zip(("to_q", "to_k", "to_v", "to_out.0"), "qkvo")
} | {
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}


def model_family(modules) -> str:
    """The family of a LoRA's diffusers module names: Wan for `blocks.N.*`, else HunyuanVideo."""
    return "Wan" if any(re.match(r"blocks\.\d+\.", module) for module in modules) else "HunyuanVideo"


def comfyui_target(module: str, family: str = "HunyuanVideo") -> tuple[str, int | None] | None:
    """A diffusers transformer module name -> (original name, index of the part in a fused target or None); None
    for one without a ComfyUI counterpart here (Wan: the blocks' Linears and proj_out, no condition embedder)."""
    if family == "Wan":
        found = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
        if found is None:
            return ("head.head", None) if module == "proj_out" else None
        return (f"blocks.{found[1]}.{_WAN_RENAMES[found[2]]}", None) if found[2] in _WAN_RENAMES else None
    found = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", module)
    if found is None:
        return (_TOP_RENAMES[module], None) if module in _TOP_RENAMES else None
    kind, index, rest = found.groups()
    double = kind == "transformer_blocks"
    prefix = f"{'double' if double else 'single'}_blocks.{index}."
    for target in ("img_attn_qkv", "txt_attn_qkv") if double else ("linear1",):
        if rest in _FUSED[target]:
            return prefix + target, _FUSED[target].index(rest)
    renames = _DOUBLE_RENAMES if double else _SINGLE_RENAMES
    return (prefix + renames[rest], None) if rest in renames else None


def _unsupported(modules, family: str) -> str:
    """What makes these diffusers module names unconvertible ("" if nothing): those without a ComfyUI `family` name."""
    if unsupported := sorted(module for module in modules if comfyui_target(module, family) is None):
        return f"modules this converter has no ComfyUI {family} name for: {', '.join(unsupported[:5])}"
    return ""


def convert_to_comfyui(
    state_dict: dict[str, torch.Tensor],
    lora_alpha: float,
    rank: int,
    alpha_pattern: dict | None = None,
    rank_pattern: dict | None = None,
    mlp_ratio: float = 4.0,
    use_rslora: bool = False,
) -> dict[str, torch.Tensor]:
    """diffusers/peft LoRA tensors (`[transformer.]<module>.lora_A.weight` / `lora_B.weight`) -> ComfyUI's
    `diffusion_model.<original>.lora_A.weight` / `.lora_B.weight` / `.alpha` (float32). `lora_alpha` / `rank` (and
    peft's per-module patterns) give each module's scale; `mlp_ratio` sizes a missing `proj_mlp`'s zero rows."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        found = re.fullmatch(r"(?:transformer\.)?(.+)\.(lora_A|lora_B)\.weight", key)
        if found is None:
            raise ValueError(f"{key}: not a LoRA tensor of the transformer (lora_A/lora_B weight)")
        modules.setdefault(found.group(1), {})[found.group(2)] = tensor.float()
    if missing := [module for module, pair in modules.items() if len(pair) != 2]:
        raise ValueError(f"lora_A or lora_B missing for {missing[:3]}")
    family = model_family(modules)
    if unsupported := _unsupported(modules, family):
        raise ValueError(unsupported)

    def scale(module: str) -> float:  # peft: a pattern key matches a module name by its suffix
        def lookup(pattern, default):
            return next((v for k, v in (pattern or {}).items() if re.search(rf"(^|\.){k}$", module)), default)

        r = lookup(rank_pattern, rank)
        return lookup(alpha_pattern, lora_alpha) / (r**0.5 if use_rslora else r)  # peft's scaling

    targets: dict[str, dict[int | None, str]] = {}
    for module in modules:
        target, part = comfyui_target(module, family)
        targets.setdefault(target, {})[part] = module
    out = {}
    for target, parts in sorted(targets.items()):
        names = _FUSED.get(target.rsplit(".", 1)[-1], (None,)) if None not in parts else (None,)
        hidden = next(modules[m]["lora_A"].shape[1] for m in parts.values())  # every part reads the hidden states
        base = scale(parts[None] if None in parts else parts[min(parts)])  # the first part's module
        downs, ups = [], []
        for index, name in enumerate(names):
            part = None if name is None else index
            if part in parts:
                downs.append(modules[parts[part]]["lora_A"])
                ups.append(modules[parts[part]]["lora_B"] * (scale(parts[part]) / base))  # 1 unless patterns differ
            else:  # no LoRA on this part: zero rows
                ups.append(torch.zeros(round(hidden * mlp_ratio) if name == "proj_mlp" else hidden, 0))
        down, up = torch.cat(downs), torch.block_diag(*ups)  # part i's lora_B meets only part i's lora_A rows
        if target in _SWAP_HALVES:
            up = torch.cat(up.chunk(2, dim=0)[::-1])
        key = f"diffusion_model.{target}"
        out[f"{key}.lora_A.weight"] = down.contiguous()
        out[f"{key}.lora_B.weight"] = up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(base * down.shape[0], dtype=torch.float32)  # alpha / rank = scale
    return out


def convert_file(
    path: str | Path, output: str | Path | None = None, lora_alpha: float | None = None, mlp_ratio: float = 4.0
) -> Path:
    """Write the ComfyUI file of a diffusers LoRA file (or of the folder's pytorch_lora_weights.safetensors), alpha and
    rank from its adapter metadata (or `lora_alpha`); by default beside it as COMFYUI_FILE."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    file = Path(path) / "pytorch_lora_weights.safetensors" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise SystemExit(f"{file}: no such file (give a diffusers LoRA .safetensors or the folder holding it).")
    with safe_open(str(file), "pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    stored = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    adapter = {k[len("transformer.") :]: v for k, v in stored.items() if k.startswith("transformer.")}
    if adapter.get("use_dora"):  # before the names: its lora_magnitude_vector tensors are no module of ComfyUI's
        raise SystemExit(f"{file}: a DoRA adapter; ComfyUI's lora_A/lora_B + alpha format cannot hold it.")
    modules = {re.sub(r"\.lora_[AB]\.weight$", "", key[len("transformer.") :]) for key in tensors}
    family = model_family(modules)
    prefixed = tensors and all(key.startswith("transformer.") for key in tensors)
    problem = _unsupported(modules, family) if prefixed else "its tensors are not all `transformer.*` LoRA weights"
    if problem:
        raise SystemExit(f"{file}: not a {family} LoRA in diffusers names ({problem}).")
    rank = adapter.get("r") or next(t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight"))
    alpha = lora_alpha if lora_alpha is not None else adapter.get("lora_alpha")
    if alpha is None:
        raise SystemExit(
            f"{file}: no adapter metadata (lora_alpha): pass --lora_alpha, the value the LoRA was trained with."
        )
    patterns = (adapter.get("alpha_pattern"), adapter.get("rank_pattern"))
    converted = convert_to_comfyui(tensors, alpha, rank, *patterns, mlp_ratio, adapter.get("use_rslora"))
    output = Path(output) if output else file.with_name(COMFYUI_FILE)
    save_file(converted, str(output), metadata={"format": "pt"})
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m crepa_diffusers.comfyui",
        description="Write the ComfyUI file (native LoraLoaderModelOnly, strength 1.0) of a HunyuanVideo or Wan "
        "LoRA saved in diffusers names (the family is read from its keys).",
    )
    parser.add_argument("path", help="pytorch_lora_weights.safetensors, or the output folder holding it")
    parser.add_argument("--output", default=None, help=f"default: {COMFYUI_FILE} beside the input")
    parser.add_argument("--lora_alpha", type=float, default=None, help="only for a file without adapter metadata")
    parser.add_argument("--mlp_ratio", type=float, default=4.0, help="HunyuanVideo's (4.0) unless yours differs")
    args = parser.parse_args(argv)
    print(convert_file(args.path, args.output, args.lora_alpha, args.mlp_ratio))


if __name__ == "__main__":
    main()
