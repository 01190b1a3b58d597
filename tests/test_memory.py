"""Memory options (crepa_diffusers.memory): each trains the same LoRA as without it, and does what it says: activation
offloading frees the device copies of the checkpointed block inputs, block swap holds one block ahead and keeps the
LoRA in place, selective checkpointing does not recompute attention, encoders visit the device one at a time."""

import contextlib
import gc
import weakref

import pytest
import torch
from helpers import COGVIDEOX_SCRIPT, HUNYUAN_SCRIPT, WAN_SCRIPT, import_script, lora_state, run_main
from peft import LoraConfig
from safetensors.torch import load_file
from test_train_cogvideox import base_args as cogvideox_args
from test_train_hunyuan import base_args as hunyuan_args
from test_train_wan import base_args as wan_args
from torch.utils._python_dispatch import TorchDispatchMode

from crepa_diffusers import memory, testing
from crepa_diffusers.capture import transformer_blocks
from crepa_diffusers.checkpoints import PROJECTOR_FILE


def tiny_transformer(kind: str, checkpointing=None):
    """A tiny transformer with a random LoRA on its blocks' attention, gradient checkpointing on, and one input."""
    torch.manual_seed(0)
    pipe = testing.build_tiny_hunyuan_pipeline() if kind == "hunyuan" else testing.build_tiny_cogvideox_pipeline("5b")
    transformer = pipe.transformer.requires_grad_(False)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets))
    transformer.enable_gradient_checkpointing(checkpointing)
    generator, config = torch.Generator().manual_seed(1), transformer.config
    if kind == "hunyuan":
        inputs = {
            "hidden_states": torch.randn(1, config.in_channels, 3, 8, 8, generator=generator),
            "encoder_hidden_states": torch.randn(1, 6, config.text_embed_dim, generator=generator),
            "encoder_attention_mask": torch.ones(1, 6, dtype=torch.long),
            "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
            "guidance": torch.tensor([1000.0]),
        }
    else:
        inputs = {
            "hidden_states": torch.randn(1, 2, config.in_channels, 8, 12, generator=generator),
            "encoder_hidden_states": torch.randn(
                1, config.max_text_seq_length, config.text_embed_dim, generator=generator
            ),
        }
    return transformer, {**inputs, "timestep": torch.tensor([500]), "return_dict": False}


def lora_gradients(transformer, inputs, context=contextlib.nullcontext()):
    with context:
        output = transformer(**inputs)[0]
    output.float().pow(2).mean().backward()
    return {name: p.grad.clone() for name, p in transformer.named_parameters() if p.requires_grad}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


KINDS = ["hunyuan", "cogvideox"]


@pytest.mark.parametrize("kind", KINDS)
def test_activation_offload_same_gradients_and_frees_the_block_inputs(kind):
    expected = lora_gradients(*tiny_transformer(kind))
    for offload in (False, True):
        transformer, inputs = tiny_transformer(kind)
        block_inputs = []  # weak references to every block's hidden-states input on the device
        for block in transformer_blocks(transformer):
            block.register_forward_pre_hook(
                lambda module, args, kwargs: (
                    block_inputs.append(weakref.ref(kwargs.get("hidden_states", args[0])))
                    if not torch.is_grad_enabled() or torch._C._current_graph_task_id() == -1
                    else None
                ),
                with_kwargs=True,
            )
        context = memory.ActivationOffload("cpu", min_bytes=0) if offload else contextlib.nullcontext()
        with context:
            output = transformer(**inputs)[0]
        gc.collect()
        alive = [ref() is not None for ref in block_inputs]
        assert len(alive) == len(transformer_blocks(transformer))
        if offload:  # their host copies are what backward will read: the device tensors are gone
            assert not any(alive[1:]), alive
            assert context.host_bytes.current > 0 and len(context._order) >= len(alive)
        else:  # checkpointing keeps them for the recomputation
            assert all(alive[1:]), alive
        output.float().pow(2).mean().backward()
        gradients = {name: p.grad.clone() for name, p in transformer.named_parameters() if p.requires_grad}
        assert_same(gradients, expected)
        if offload:
            del output
            gc.collect()
            assert context.host_bytes.current == 0  # released with the graph


@pytest.mark.parametrize("kind", KINDS)
def test_block_swap_same_gradients_streams_one_block_ahead_and_keeps_lora_in_place(kind):
    expected = lora_gradients(*tiny_transformer(kind))
    transformer, inputs = tiny_transformer(kind)
    blocks = transformer_blocks(transformer)
    originals = {id(p): p.detach().clone() for b in blocks for p in memory._swapped_tensors(b)}
    lora = {name: (p, p.data_ptr()) for name, p in transformer.named_parameters() if p.requires_grad}
    swap = memory.BlockSwap(blocks, 2, "cpu")
    swapped = swap.swapped
    assert swapped == [len(blocks) - 2, len(blocks) - 1]
    assert swap.host_bytes.current == sum(p.nbytes for i in swapped for p in originals_of(blocks[i], originals))
    seen = []  # (block, in backward, swapped blocks whose weights are on the device)

    def record(index, module, args):
        loaded = [i for i in swapped if all(p.numel() > 0 for p in swap.params[i])]
        seen.append((index, torch._C._current_graph_task_id() != -1, loaded, set(swap._loading)))
        if index in swapped:  # its own weights are the originals, on the "device"
            for p in swap.params[index]:
                torch.testing.assert_close(p, originals[id(p)], rtol=0, atol=0)

    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: record(i, m, a))  # runs after the swap's own hook
    assert all(p.numel() == 0 for i in swapped for p in swap.params[i])  # in host memory only
    assert_same(lora_gradients(transformer, inputs), expected)
    first, last = swapped
    forward = [(i, loaded, loading) for i, back, loaded, loading in seen if not back]
    backward = [(i, loaded, loading) for i, back, loaded, loading in seen if back]
    # Forward: the block before the first swapped one prefetches it; each runs with its own weights only.
    assert forward[first - 1] == (first - 1, [], {first}) and forward[first] == (first, [first], {last})
    assert forward[last] == (last, [last], set())
    # Backward (the recomputed forwards, last block first): the last swapped block prefetches the one before it.
    assert backward[0] == (last, [last], {first}) and backward[1] == (first, [first], set())
    assert all(p.numel() == 0 for i in swapped for p in swap.params[i])
    # LoRA parameters never moved (the optimizer's references stay valid) and got their gradients.
    assert all(p.data_ptr() == ptr and p.grad is not None for p, ptr in lora.values())
    swap.remove()
    for i in swapped:
        for p in swap.params[i]:
            torch.testing.assert_close(p, originals[id(p)], rtol=0, atol=0)


def originals_of(block, originals):
    return [originals[id(p)] for p in memory._swapped_tensors(block)]


class CountOps(TorchDispatchMode):
    def __init__(self, ops):
        super().__init__()
        self.ops, self.count = set(ops), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.ops
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", KINDS)
def test_selective_checkpointing_same_gradients_without_recomputing_attention(kind):
    expected, recomputed = None, {}
    for name, func in (("full", None), ("selective", memory.selective_checkpointing())):
        transformer, inputs = tiny_transformer(kind, func)
        output = transformer(**inputs)[0]
        with CountOps(memory.ATTENTION_OPS) as attention:
            output.float().pow(2).mean().backward()
        recomputed[name] = attention.count
        gradients = {n: p.grad.clone() for n, p in transformer.named_parameters() if p.requires_grad}
        expected = expected or gradients
        assert_same(gradients, expected)
    # Full checkpointing runs every block's attention again in backward; the selective policy reuses the outputs.
    assert recomputed["full"] >= len(transformer_blocks(transformer)) and recomputed["selective"] == 0, recomputed


def test_offload_models_in_turn_chains_the_models_in_a_ring():
    """accelerate's CpuOffload moves a model to the device at its forward after sending `prev_module_hook`'s model
    back (a no-op on this CPU-only machine, so the ring itself is checked): each model sends back the one before it,
    the first the last, so one model at a time is on the device whatever the order of the calls."""
    from accelerate.hooks import CpuOffload

    models = [torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)]
    hooks = memory.offload_models_in_turn([models[0], None, models[1], models[2]], "cpu")
    assert [hook.model for hook in hooks] == models
    for n, (model, hook) in enumerate(zip(models, hooks)):
        assert isinstance(model._hf_hook, CpuOffload) and model._hf_hook is hook.hook
        assert hook.hook.execution_device == torch.device("cpu")
        assert hook.hook.prev_module_hook is hooks[n - 1]  # the first one's is the last one's
    torch.testing.assert_close(models[0](torch.ones(1, 2)), models[0].weight.sum(1)[None] + models[0].bias)
    # The ring holds the models weakly: a dropped model is freed, and the next model's turn moves nothing of it.
    dropped = weakref.ref(models.pop(1))
    gc.collect()
    assert dropped() is None
    assert next(hooks[1].model.parameters()).device == torch.device("cpu")
    models[1](torch.ones(1, 2))


def test_memory_flags_are_checked_with_the_flag_named():
    memory.check_memory_flags(0, 4, False)
    memory.check_memory_flags(4, 4, True)
    with pytest.raises(SystemExit, match="--blocks_to_swap 5: this model has 4 blocks"):
        memory.check_memory_flags(5, 4, True)
    with pytest.raises(SystemExit, match="--blocks_to_swap needs --gradient_checkpointing"):
        memory.check_memory_flags(2, 4, False)


@pytest.mark.parametrize(
    "script_path, model, make_args, options",
    [
        (HUNYUAN_SCRIPT, "hunyuan", hunyuan_args, ["--offload_activations", "--blocks_to_swap", "2"]),
        (COGVIDEOX_SCRIPT, "cogvideox-5b", cogvideox_args, ["--selective_checkpointing", "--offload_encoders"]),
        (WAN_SCRIPT, "wan-2.1", wan_args, ["--offload_activations", "--blocks_to_swap", "2", "--offload_encoders"]),
    ],
)
def test_memory_options_train_the_same_lora(
    tiny_models, dataset, tmp_path, monkeypatch, script_path, model, make_args, options
):
    """The scripts with the memory options on train the LoRA and the projector of the run without them."""
    script = import_script(script_path)
    offloads = []  # the tiny model's saved tensors are all under the default 1 MiB: offload every one

    def offload_everything(device, _offload=memory.ActivationOffload):
        offloads.append(_offload(device, min_bytes=0))
        return offloads[-1]

    monkeypatch.setattr(script.memory, "ActivationOffload", offload_everything)
    # Adam's default epsilon (1e-8) divides a gradient near 0 by its own size, so a last-bit difference of such a
    # gradient becomes a difference of a whole step; epsilon 1 (with learning rate 1) makes the update about the
    # gradient itself, so the weights differ by what the gradients differ by.
    extra = ["--gradient_checkpointing", "--checkpointing_steps", "2", "--adam_epsilon", "1", "--learning_rate", "1"]
    run_main(script, make_args(tiny_models[model], dataset, tmp_path / "plain", extra=extra))
    run_main(script, make_args(tiny_models[model], dataset, tmp_path / "options", extra=[*extra, *options]))
    if "--offload_activations" in options:
        assert len(offloads) == 1 and len(offloads[0]._order) >= 4  # at least the 4 blocks' inputs went to the host
    # Block swap computes with copies of the weights at other addresses, which can change the last bit of a CPU
    # matmul (its alignment picks the kernel path); everything else is exact on the CPU.
    a, b = lora_state(tmp_path / "plain"), lora_state(tmp_path / "options")
    assert a.keys() == b.keys() and a
    lora_b_moved = max(float(value.abs().max()) for key, value in b.items() if "lora_B" in key)  # lora_B starts at 0
    assert lora_b_moved > 100 * 1e-5  # the tolerance below is far under what training changed
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)
    pa, pb = (load_file(str(tmp_path / run / "checkpoint-2" / PROJECTOR_FILE)) for run in ("plain", "options"))
    assert pa.keys() == pb.keys() and pa
    for key in pa:
        torch.testing.assert_close(pa[key], pb[key], rtol=1e-5, atol=1e-5)


def test_blocks_to_swap_without_checkpointing_fails_before_weights_load(tiny_models, dataset, tmp_path, monkeypatch):
    import diffusers

    script = import_script(HUNYUAN_SCRIPT)
    monkeypatch.setattr(diffusers.HunyuanVideoTransformer3DModel, "from_pretrained", None)  # never reached
    with pytest.raises(SystemExit, match="--blocks_to_swap needs --gradient_checkpointing"):
        run_main(
            script, hunyuan_args(tiny_models["hunyuan"], dataset, tmp_path / "out", extra=["--blocks_to_swap", "2"])
        )
