"""Memory options a training loop switches on around its transformer: `ActivationOffload` (saved tensors to host
memory between forward and backward), `BlockSwap` (frozen block weights streamed from host memory one block ahead),
`selective_checkpointing` (keep attention outputs, recompute the rest) and `offload_models_in_turn` (one frozen
encoder on the device at a time). Copies to and from pinned host memory run on a side CUDA stream; without CUDA the
same code makes plain copies (no pinning, no streams) and gives the same results."""

from __future__ import annotations

import functools
import weakref

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary


# The fused attention kernels whose outputs selective checkpointing keeps (SDPA dispatches to one of them).
_KERNELS = "flash_attention efficient_attention cudnn_attention flash_attention_for_cpu".split()
ATTENTION_OPS = tuple(getattr(torch.ops.aten, f"_scaled_dot_product_{k}").default for k in _KERNELS)


class _HostBytes:
    """Bytes held in host memory by one mechanism, now and at most (for logs and the benchmark)."""

    def __init__(self) -> None:
        self.current = self.peak = 0

    def hold(self, tensor: torch.Tensor) -> torch.Tensor:
        nbytes = tensor.untyped_storage().nbytes()
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(tensor, self._release, nbytes)
        return tensor

    def _release(self, nbytes: int) -> None:
        self.current -= nbytes


class _HostCopies:
    """Copies between `device` and host memory (counted in `host_bytes`); with CUDA pinned, on a side stream."""

    def __init__(self, device: torch.device | str, host_device: str) -> None:
        self.device, self.host_device = torch.device(device), torch.device(host_device)
        self.pin = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.pin else None
        self.host_bytes = _HostBytes()

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        host = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.host_device, pin_memory=self.pin)
        return self.host_bytes.hold(host.copy_(tensor, non_blocking=self.pin))

    def _to_device(self, hosts: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
        """Starts copying `hosts` to the device: the copies, and with CUDA the event recorded after them."""
        if self.stream is None:
            return [host.to(self.device, copy=True) for host in hosts], None
        with torch.cuda.stream(self.stream):
            copies = [host.to(self.device, non_blocking=True) for host in hosts]
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return copies, ready

    def _wait_for(self, copies: list[torch.Tensor], ready: torch.cuda.Event | None) -> None:
        """The current stream waits for `_to_device`'s copies, which keep their memory until it is done with them."""
        if ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            for copy in copies:
                copy.record_stream(current)


class _Packed:
    """One saved tensor in host memory; `device_copy` is set when it was prefetched."""

    __slots__ = ("host", "index", "device_copy", "ready", "__weakref__")

    def __init__(self, host, index) -> None:
        self.host, self.index, self.device_copy, self.ready = host, index, None, None


class ActivationOffload(_HostCopies, torch.autograd.graph.saved_tensors_hooks):
    """`with ActivationOffload(device): output = transformer(...)`: tensors of at least `min_bytes` that autograd saves
    in this forward go to host memory and come back when backward needs them, each prefetched while the one unpacked
    before it is used. Under gradient checkpointing that is the blocks' inputs (torch's non-reentrant checkpoint saves
    them as ordinary saved tensors; inside a block its own hooks take precedence). Parameters stay. Reusable."""

    def __init__(self, device: torch.device | str, min_bytes: int = 1 << 20, host_device: str = "cpu") -> None:
        _HostCopies.__init__(self, device, host_device)
        torch.autograd.graph.saved_tensors_hooks.__init__(self, self._pack, self._unpack)
        self.min_bytes = min_bytes
        # This forward's packs in order (weakly: autograd holds them until backward used them), unpacked in reverse.
        self._order: list[weakref.ref] = []
        self._seen = WeakIdKeyDictionary()  # tensor -> (version, packed): one host copy per tensor

    def __enter__(self):
        self._order = []
        self._seen = WeakIdKeyDictionary()
        return super().__enter__()

    def _pack(self, tensor: torch.Tensor):
        small = tensor.untyped_storage().nbytes() < self.min_bytes
        if small or isinstance(tensor, nn.Parameter) or tensor.device.type != self.device.type:
            return tensor
        seen = self._seen.get(tensor)
        if seen is not None and seen[0] == tensor._version:
            return seen[1]  # e.g. the rotary embedding every block takes: copied once
        key, tensor = tensor, tensor.detach()
        if self.stream is not None:  # the copy waits for the tensor, and its memory for the copy
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                host = self._to_host(tensor)
            tensor.record_stream(self.stream)
        else:
            host = self._to_host(tensor)
        packed = _Packed(host, len(self._order))
        self._order.append(weakref.ref(packed))
        self._seen[key] = (key._version, packed)
        return packed

    def _fetch(self, packed: _Packed) -> None:
        """Starts the copy of `packed` back to the device (on the side stream: after its copy to the host)."""
        if packed.device_copy is None:
            (packed.device_copy,), packed.ready = self._to_device([packed.host])

    def _unpack(self, packed):
        if not isinstance(packed, _Packed):
            return packed
        self._fetch(packed)
        tensor, packed.device_copy = packed.device_copy, None
        self._wait_for([tensor], packed.ready)
        packed.ready = None
        previous = self._order[packed.index - 1]() if 0 < packed.index < len(self._order) else None
        if previous is not None:  # prefetched: backward needs the one packed before it next
            self._fetch(previous)
        return tensor


def _swapped_tensors(block: nn.Module) -> list[nn.Parameter]:
    """The frozen weights and biases of a block's Linear layers (LoRA's base layers included, its own A/B not)."""
    return [
        param
        for module in block.modules()
        if isinstance(module, nn.Linear)
        for param in module.parameters(recurse=False)
        if not param.requires_grad
    ]


class BlockSwap(_HostCopies):
    """The frozen Linear weights of the last `num_blocks` blocks wait in host memory and reach `device` one block ahead
    of use: in forward, and in backward, where checkpointing recomputes each block just before its backward (needed:
    without it autograd keeps every block's weights). Only Linear weights move (autograd saves views of them, never
    the parameter); LoRA, norms and the rest stay. Between uses a weight holds an empty tensor, so `model.to(device)`
    moves nothing of it. Build it after fp8 casting. Not diffusers' group offloading: that moves the LoRA too, and
    with `use_stream` restores it from the host copy taken when applied (undoing its training)."""

    def __init__(
        self, blocks: list[nn.Module], num_blocks: int, device: torch.device | str, host_device: str = "cpu"
    ) -> None:
        if not 0 < num_blocks <= len(blocks):
            raise ValueError(f"--blocks_to_swap {num_blocks}: choose 1..{len(blocks)} (the model has {len(blocks)}).")
        super().__init__(device, host_device)
        self.swapped = list(range(len(blocks)))[-num_blocks:]
        self.params = {i: _swapped_tensors(blocks[i]) for i in self.swapped}
        self.host = {i: [self._to_host(p.data) for p in params] for i, params in self.params.items()}
        for i in self.swapped:
            self._offload(i)
        self.resident: set[int] = set()  # swapped blocks whose weights are on the device now
        self._loading: dict[int, tuple[list[torch.Tensor], object]] = {}  # started copies, their event
        self._end_of_backward_queued = False
        self._handles = []
        for i, block in enumerate(blocks):
            self._handles.append(block.register_forward_pre_hook(functools.partial(self._before, i)))
            self._handles.append(block.register_forward_hook(functools.partial(self._after, i)))

    def _offload(self, index: int) -> None:
        # What autograd saved for this block's backward (views of the weights) keeps the device copy until then.
        for param in self.params[index]:
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)

    def _start_load(self, index: int) -> None:
        if index in self.resident or index in self._loading:
            return
        if self.stream is not None:  # the memory it reuses is free
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self._loading[index] = self._to_device(self.host[index])

    def _before(self, index: int, module, args) -> None:
        # A checkpointed block recomputed inside backward. Private calls, with no public equivalent: FSDP2 tells
        # backward this way, and it and DDP run end-of-backward work with the engine's queue_callback below.
        backward = torch._C._current_graph_task_id() != -1
        if backward:
            # A recomputation stops after the block's last saved tensor, before the forward hooks: the blocks
            # recomputed before this one are done with their weights (what their backward saved keeps its copy).
            for done in self.resident - {index}:
                self._offload(done)
            self.resident &= {index}
            if not self._end_of_backward_queued:
                torch.autograd.Variable._execution_engine.queue_callback(self._offload_all)
                self._end_of_backward_queued = True
        if index in self.params:
            self._start_load(index)
            copies, ready = self._loading.pop(index, (None, None))
            if copies is not None:
                self._wait_for(copies, ready)
                for param, copy in zip(self.params[index], copies):
                    param.data = copy
                self.resident.add(index)
        upcoming = [i for i in self.swapped if (i < index if backward else i > index)]
        if upcoming:
            self._start_load(max(upcoming) if backward else min(upcoming))

    def _offload_all(self) -> None:
        for index in self.resident:
            self._offload(index)
        self.resident.clear()
        self._end_of_backward_queued = False

    def _after(self, index: int, module, args, output) -> None:
        if index in self.params:
            self._offload(index)
            self.resident.discard(index)

    def remove(self) -> None:
        """Hooks off, every weight back on the device."""
        for handle in self._handles:
            handle.remove()
        for i in self.swapped:
            for param, host in zip(self.params[i], self.host[i]):
                param.data = host.to(self.device)


def check_memory_flags(blocks_to_swap: int, num_blocks: int, gradient_checkpointing: bool) -> None:
    """Before any weights load: --blocks_to_swap names a number of blocks this model has, under checkpointing."""
    if not 0 <= blocks_to_swap <= num_blocks:
        raise SystemExit(f"--blocks_to_swap {blocks_to_swap}: this model has {num_blocks} blocks (0..{num_blocks}).")
    if blocks_to_swap and not gradient_checkpointing:
        raise SystemExit(
            "--blocks_to_swap needs --gradient_checkpointing (or --selective_checkpointing): without it autograd "
            "keeps every block's weights on the device for backward."
        )


def selective_checkpointing(ops=ATTENTION_OPS):
    """A `gradient_checkpointing_func` for diffusers' `enable_gradient_checkpointing`: torch's non-reentrant
    checkpoint whose recomputation reuses the saved outputs of `ops` (the attention kernels) instead of running
    them again. Fewer FLOPs in backward; the attention outputs of every block stay in memory."""
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    saved = set(ops)

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    context_fn = functools.partial(create_selective_checkpoint_contexts, policy)

    def checkpointing_func(function, *args, **kwargs):
        return checkpoint(function, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

    return checkpointing_func


def offload_models_in_turn(models: list[nn.Module | None], device: torch.device | str) -> list:
    """Each model waits in host memory and moves to `device` when its forward (or a diffusers VAE's encode/decode)
    starts, sending the model that ran before it back to the host: one model on the device at a time (accelerate's
    `cpu_offload_with_hook`, chained in a ring as diffusers' `enable_model_cpu_offload` chains a pipeline). The ring
    holds the models weakly: a model the loop drops (the encoders after the --cache_conditions pass) is freed."""
    from accelerate import cpu_offload_with_hook
    from accelerate.hooks import UserCpuOffloadHook

    class WeakModelHook(UserCpuOffloadHook):
        def __init__(self, model, hook) -> None:
            self._model, self.hook = weakref.ref(model), hook

        @property
        def model(self):  # a dropped model: one weight in host memory, so that nothing is moved
            return self._model() or nn.Linear(1, 1)

    hooks = [WeakModelHook(m, cpu_offload_with_hook(m, torch.device(device))[1].hook) for m in models if m is not None]
    if len(hooks) > 1:  # a ring: each model's turn sends the one before it back, the first model's the last one
        for previous, hook in zip([hooks[-1], *hooks], hooks):
            hook.hook.prev_module_hook = previous
    return hooks
