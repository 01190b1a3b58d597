"""Test-only launcher shim: `python tests/cpu_ranks.py SCRIPT ARGS...` runs an example script with what its runs on
several CPU ranks of this machine (no GPU: gloo) need and no user's GPU run does. The tests' launch helpers start
the scripts through it, so the scripts carry no code for this machine."""

import os
import runpy
import sys

import torch


def cpu_rank_workarounds() -> None:
    if torch.cuda.is_available():
        return
    import accelerate
    from accelerate.utils import InitProcessGroupKwargs

    # DeepSpeed without GPUs (its CPU accelerator): accelerate leaves its backend unset and counts one process
    # although DeepSpeed started gloo on every rank (accelerate/state.py, PartialState.__init__, "if self.backend is
    # None: ... num_processes = 1"): every rank would act as the main one. Naming gloo fixes it.
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        accelerator_init = accelerate.Accelerator.__init__

        def init_with_gloo(self, *args, kwargs_handlers=None, **kwargs):
            handlers = [*(kwargs_handlers or []), InitProcessGroupKwargs(backend="gloo")]
            accelerator_init(self, *args, kwargs_handlers=handlers, **kwargs)

        accelerate.Accelerator.__init__ = init_with_gloo

    # gloo cannot broadcast fp8 tensors, and DDP broadcasts every parameter from rank 0 when it wraps a model: the
    # frozen fp8 base of --layerwise_upcasting would fail. Every rank loaded the same files; DDP syncs what trains.
    # (NCCL on GPUs sends fp8.) torch has no public switch for this that accelerate passes through.
    ddp = torch.nn.parallel.DistributedDataParallel
    ddp_init = ddp.__init__

    def init_ignoring_frozen(self, module, *args, **kwargs):
        frozen = [name for name, param in module.named_parameters() if not param.requires_grad]
        ddp._set_params_and_buffers_to_ignore_for_model(module, frozen)
        ddp_init(self, module, *args, **kwargs)

    ddp.__init__ = init_ignoring_frozen


if __name__ == "__main__":
    cpu_rank_workarounds()
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
