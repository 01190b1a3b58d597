"""Small mechanisms the training loops call explicitly, as diffusers' examples call `diffusers.training_utils`: video
checks, a reproducible data order and noise (exact resume), stop-on-signal, non-finite steps, clipping, fp8 weights."""

from __future__ import annotations

import logging
import os
import re
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import torch


logger = logging.getLogger(__name__)
if TYPE_CHECKING:  # for annotations only: `buckets` imports this module
    from .buckets import Bucket


def check_output_dir(output_dir: str) -> None:
    """--output_dir must be writable before any weights load: not found out at the first checkpoint, hours later."""
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=output_dir).close()
    except OSError as error:
        raise SystemExit(f"--output_dir {output_dir} cannot be written ({error.strerror}): choose a writable folder.")


def lora_target_regex(
    lora_layers: str, transformer: torch.nn.Module, blocks: tuple[str, ...], top_level: tuple[str, ...] = ()
) -> str:
    """--lora_layers (comma-separated names, each a module's whole name or dotted suffix, as in peft's lists) -> a
    full-match regex for peft over `transformer`'s Linear/Conv modules in `blocks` (`<block>.N.`) and `top_level`; a
    meta-device model will do. SystemExit when no name is given or one matches nothing, listing the names there are."""
    names = [name.strip() for name in lora_layers.split(",") if name.strip()]
    peft_layers = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)  # what peft's LoRA wraps
    layers = [n for n, m in transformer.named_modules() if isinstance(m, peft_layers)]
    block = rf"(?:{'|'.join(map(re.escape, blocks))})\.\d+\."
    scope = [n for n in layers if re.match(block, n) or n in top_level]
    matched = {name: [n for n in scope if n == name or n.endswith("." + name)] for name in names}
    unmatched = [name for name, found in matched.items() if not found]
    if not names or unmatched:
        existing = sorted({re.sub(f"^{block}", "", n) for n in scope})
        raise SystemExit(
            f"--lora_layers {lora_layers!r}: {unmatched or 'no name'} matched no module of the transformer's "
            f"{', '.join(blocks)} blocks{' or ' + ', '.join(top_level) if top_level else ''}. Names there: {existing}"
        )
    top = [n for n in top_level if any(n in found for found in matched.values())]
    alternatives = "|".join(map(re.escape, names))
    return rf"^(?:{block}(?:.*\.)?(?:{alternatives}){''.join('|' + re.escape(n) for n in top)})$"


def check_videos(
    items: list, skip_frames: int, video_buckets: list[Bucket], image_buckets: list[Bucket], skip_invalid: bool = False
) -> list:
    """Each sample (dataclasses with `.path`, `.bucket`; an image path is a still) read as training reads it (upright,
    a video's first frame decoded) and given its bucket (`skip_frames`: what --skip_frames_start/end leave out). All
    missing, undecodable or too-short files are reported at once (SystemExit), or dropped when `skip_invalid`."""
    from dataclasses import replace

    from .buckets import choose_bucket
    from .media import is_image, probe

    problems, kept, fit_none = [], [], 0
    for item in items:
        path = Path(item.path)
        if not path.is_file():
            problems.append(f"{path}: file not found")
            continue
        try:
            num_frames, height, width = probe(path)
        except Exception as error:  # PyAV's and PIL's own errors, or too few decodable frames
            reason = (str(error).splitlines() or [type(error).__name__])[0][:120]
            problems.append(f"{path}: cannot be decoded ({reason})")
            continue
        buckets, skip = (image_buckets, 0) if is_image(path) else (video_buckets, skip_frames)
        bucket = choose_bucket(num_frames - skip, height, width, buckets)
        if bucket is None:
            need = min(frames for frames, _, _ in buckets) + skip_frames
            problems.append(f"{path}: {num_frames} frames, fewer than the {need} needed")
            fit_none += 1
        else:
            kept.append(replace(item, bucket=bucket))
    counts = Counter(item.bucket for item in kept)
    sizes = ", ".join(f"{f}x{h}x{w}: {counts[(f, h, w)]}" for f, h, w in sorted(counts))
    logger.info("Buckets (frames x height x width: samples): %s; %d fit none", sizes, fit_none)
    listing = "\n  ".join(problems)
    if problems and not skip_invalid:
        raise SystemExit(
            f"{len(problems)} of {len(items)} videos cannot be used:\n  {listing}\n"
            "Fix or remove them, lower --max_num_frames / --skip_frames_* (or add shorter "
            "--video_resolution_buckets), or pass --skip_invalid_videos."
        )
    if problems:
        logger.warning("Skipping %d invalid videos (--skip_invalid_videos):\n  %s", len(problems), listing)
    if problems and not kept:
        raise SystemExit("No usable videos left after --skip_invalid_videos.")
    return kept


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A permutation that depends only on (seed, epoch): a resumed run sees the same order. Not `set_epoch`: accelerate
    calls `set_epoch(iteration_count)` on each new iterator, which would restart the order at epoch 0 on resume."""

    def __init__(self, length: int, seed: int) -> None:
        self.length, self.seed, self.epoch = length, seed, 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed((self.seed * 100_003 + self.epoch) % 2**63)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


def step_generator(
    seed: int, step: int, process_index: int, device: torch.device | str, micro_batch: int = 0
) -> torch.Generator:
    """The random stream of one micro-batch of one optimizer step on one rank: noise, timesteps and VAE samples are a
    function of (seed, step, micro-batch, rank), so resuming from a checkpoint reproduces them exactly."""
    generator = torch.Generator(device=device)
    return generator.manual_seed((((seed * 1_000_003 + step) * 1_009 + process_index) * 101 + micro_batch) % 2**63)


class StopRequest:
    """Context manager: SIGTERM / SIGINT / SIGUSR1 set a flag; the loop finishes its step, saves a checkpoint and exits
    with `exit_status`; a SIGTERM / SIGINT over a second after the first stops at once. The kernel sends SIGUSR1 when
    a launcher parent dies (`docker stop` and some schedulers signal only it): save and stop, not train on orphaned."""

    def __init__(self) -> None:
        self.signal, self._first_at, self._previous = None, 0.0, {}  # the signal received, when; handlers to restore

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)
        self._signal_on_launcher_death(signal.SIGUSR1)
        return self

    def __exit__(self, *exc) -> None:
        self._signal_on_launcher_death(0)  # after the loop, an orphaned trainer finishes saving (SIGUSR1 would kill)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _signal_on_launcher_death(self, signum: int) -> None:
        parent = os.getppid()
        try:
            command = Path(f"/proc/{parent}/cmdline").read_bytes().decode(errors="replace")
        except OSError:  # not Linux
            return
        if any(name in command for name in ("accelerate", "torchrun", "torch.distributed.run", "deepspeed")):
            import ctypes

            ctypes.CDLL(None).prctl(1, signum, 0, 0, 0)  # PR_SET_PDEATHSIG: this signal when the parent dies
            if signum and os.getppid() != parent:  # it died before the request: no signal will come
                os.kill(os.getpid(), signum)

    def _handle(self, signum, frame) -> None:
        # A process-group kill delivers the trainer's SIGTERM and the launcher's death (SIGUSR1) together, handled in
        # signal-number order; a scheduler may signal every process and torchrun forward it: one request, not two.
        repeated = self.signal not in (None, signal.SIGUSR1) and signum != signal.SIGUSR1
        if repeated and time.monotonic() - self._first_at > 1.0:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        if self.signal is None:
            self._first_at = time.monotonic()
            logger.warning(
                "Received %s: finishing this step, saving a checkpoint, then exiting.", signal.Signals(signum).name
            )
        if self.signal in (None, signal.SIGUSR1):
            self.signal = signum  # a SIGTERM / SIGINT names the exit status rather than the launcher's death

    @property
    def exit_status(self) -> int:
        """128 + the signal, as a shell reports it: `train && upload` does not upload an unfinished LoRA."""
        return 128 + (self.signal or signal.SIGTERM)

    def requested(self, accelerator) -> bool:
        """True on every rank if any rank was signalled (a collective: call it on all ranks at the same step)."""
        if accelerator.num_processes == 1:
            return self.signal is not None
        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


class NonFiniteLossError(RuntimeError): ...


class NonFiniteSteps:
    """The decision to apply or skip an optimizer step: skipped on every rank when any rank's loss was NaN/inf in
    any micro-batch of it (its gradients never reach the weights); after `max_in_a_row` skips in a row, stop."""

    def __init__(self, max_in_a_row: int) -> None:
        self.max_in_a_row, self.in_a_row = max_in_a_row, 0
        self._finite: torch.Tensor | None = None  # this optimizer step's micro-batches so far, on the device
        self._decision: bool | None = None  # this optimizer step's decision, once taken
        self._step_done = False  # whether the step of `_finite` ended (the next add starts a new one)

    def add(self, loss: torch.Tensor) -> None:
        """Each micro-batch's loss, on every rank (no host sync)."""
        finite = torch.isfinite(loss.detach())
        new_step = self._finite is None or self._step_done
        self._finite = finite if new_step else self._finite & finite
        self._step_done, self._decision = False, None

    def step_is_finite(self, accelerator) -> bool:
        """Whether this step's losses were finite on every rank: call on every rank at its last micro-batch (one host
        sync; a second call reuses it). Under DeepSpeed, whose engine steps inside backward(), call it before each
        backward too: with accumulation the engine holds the earlier micro-batches, so NaN/inf there stops the run."""
        if self._decision is None:
            self._decision = self._all_ranks_finite(accelerator)
        self._step_done = accelerator.sync_gradients
        return self._decision

    def _all_ranks_finite(self, accelerator) -> bool:
        finite_ranks = accelerator.reduce(self._finite.float(), reduction="sum")
        if bool(finite_ranks == accelerator.num_processes):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        logger.warning("Non-finite loss: optimizer step skipped (%d in a row).", self.in_a_row)
        unskippable = accelerator.distributed_type == "DEEPSPEED" and accelerator.gradient_accumulation_steps > 1
        if self.in_a_row >= self.max_in_a_row or unskippable:
            text = nonfinite_message(self.in_a_row, accelerator.mixed_precision)
            if unskippable:
                text = "Under DeepSpeed with --gradient_accumulation_steps > 1 a step cannot be skipped. " + text
            raise NonFiniteLossError(text)
        return False


def nonfinite_message(steps: int, mixed_precision: str) -> str:
    precision = f" You train in {mixed_precision}:" if mixed_precision == "fp16" else " If you train in fp16:"
    return (
        f"The loss was NaN/inf for {steps} optimizer steps in a row (each was skipped, see --max_nonfinite_steps)."
        f"{precision} fp16 overflows on CogVideoX-5B/1.5 and HunyuanVideo, use --mixed_precision bf16. Otherwise "
        "try a lower --learning_rate. The last complete checkpoint is intact: --resume_from_checkpoint latest."
    )


def clip_grad_norms(accelerator, parts: list[list[torch.nn.Parameter]], max_norm: float) -> list[torch.Tensor]:
    """Clip each part's gradients (the LoRA; the CREPA projector) to `max_norm` on its own, so the LoRA's update rule
    is the same with and without CREPA. Returns the norms before clipping (none under DeepSpeed: it clips itself)."""
    if accelerator.distributed_type == "DEEPSPEED":
        return []
    accelerator.unscale_gradients()  # once per step: a second unscale_ of an fp16 GradScaler step raises
    return [torch.nn.utils.clip_grad_norm_(params, max_norm) for params in parts if params]


def enable_fp8_weights(transformer: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """--layerwise_upcasting: diffusers' layerwise casting (frozen Linear, Conv and Embedding weights stored in
    float8_e4m3fn, upcast to `compute_dtype` per layer, minus the model's skip list), plus the AdaLayerNorm modulation
    Linears its "norm" pattern spares: 3.4 B of HunyuanVideo's 12.8 B parameters, which HunyuanVideo's fp8 trainers
    store in fp8 too (musubi-tuner --fp8_base; diffusion-pipe, whose exclusions miss img_mod/txt_mod/modulation)."""
    from diffusers.hooks import apply_layerwise_casting_hook

    fp8 = torch.float8_e4m3fn
    transformer.enable_layerwise_casting(storage_dtype=fp8, compute_dtype=compute_dtype)
    modulation = re.compile(r"(single_)?transformer_blocks\.\d+\.norm\w*\.linear")
    for name, module in transformer.named_modules():  # a LoRA-wrapped projection is not an nn.Linear: left alone
        if modulation.fullmatch(name) and isinstance(module, torch.nn.Linear) and module.weight.dtype != fp8:
            apply_layerwise_casting_hook(module, fp8, compute_dtype, non_blocking=False)  # unless diffusers cast it


def check_ranks_agree(accelerator, params: list[torch.nn.Parameter]) -> None:
    """With several processes every rank must end with the same trained weights (DDP keeps them in step; a rank that
    skipped a step alone would not): compare checksums across ranks."""
    ranks = accelerator.num_processes
    if ranks == 1:
        return
    signed = torch.stack([p.detach().double().sum() for p in params]).sum()  # float64 sums over all parameters
    absolute = torch.stack([p.detach().double().abs().sum() for p in params]).sum()
    gathered = accelerator.gather(torch.stack([signed, absolute]).to(accelerator.device)[None]).cpu()
    if not torch.allclose(gathered, gathered[:1].expand_as(gathered), rtol=1e-9, atol=0):
        raise RuntimeError(f"The ranks ended with different trained weights: checksums {gathered.tolist()}")
    logger.info("Trained weights identical on all %d ranks (checksum %.9g).", ranks, gathered[0, 0].item())
