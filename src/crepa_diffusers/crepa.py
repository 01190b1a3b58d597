"""CREPA: Cross-frame Representation Alignment (arXiv 2506.09229), the loss, the projector and the --crepa_* flags.

Per token frame f of a clip with T token frames, projected DiT states p_f = h_phi(h_t^f) and frozen encoder
features y_k of clean frame k (both [N, D_enc], N = tokens per frame):

    sim(f, k)  = mean_n cos(p_f[n], y_k[n])
    score(f)   = sim(f, f) + sum_{k in K(f)} exp(-|k - f| / tau) * sim(f, k)
    K(f)       = {f - d, f + d} ∩ [0, T)                 (paper, Eq. 6; cumulative: {f ± 1, ..., f ± d})
    L_align    = - mean_b( sum_f score(f) / T )          (/T on by default; off gives the paper's plain sum)

REPA* is d = 0 (self term only). The total loss is L_diffusion + lambda(step) * L_align, lambda(step) from
`CrepaConfig.lambda_at` (constant by default, as in the paper). The --crepa_* flags and their checks are here too.
"""

from __future__ import annotations

import argparse
import math
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .features import load_encoder_config


def neighbour_weights(
    num_frames: int, distance: int, tau: float, cumulative: bool = False, device: torch.device | None = None
) -> torch.Tensor:
    """[T, T] weights W[f, k] of sim(f, k) in score(f): 1 on the diagonal, exp(-|k-f|/tau) on the neighbours."""
    frame = torch.arange(num_frames, device=device)
    gap = (frame[None, :] - frame[:, None]).abs()
    is_neighbour = (gap >= 1) & (gap <= distance) if cumulative else (gap == distance) & (gap > 0)
    weights = torch.exp(-gap.float() / tau) * is_neighbour
    return weights + torch.eye(num_frames, device=device)


def crepa_loss(
    projected: torch.Tensor,
    features: torch.Tensor,
    distance: int = 1,
    tau: float = 1.0,
    cumulative: bool = False,
    normalize_by_frames: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_align of the module docstring (a scalar to minimise; `distance=0` gives REPA*), and detached statistics to
    log (device tensors: reading them is the caller's only host sync): `similarity_self`, the mean of sim(f, f), and
    `similarity_neighbour`, that of sim(f, k) over the neighbour pairs (NaN without any: REPA*, or one token frame).
    """
    if distance < 0 or tau <= 0:
        raise ValueError(f"CREPA: need distance >= 0 and tau > 0, got distance={distance}, tau={tau}.")
    if projected.shape != features.shape:
        raise ValueError(
            f"CREPA: projected hidden states {tuple(projected.shape)} and encoder features {tuple(features.shape)} "
            "must both be [B, T, N, D] with the same token frames T, tokens per frame N and width D."
        )
    # sim(f, k) for every pair of token frames, [B, T, T] in fp32: the per-patch cosine averaged over patches.
    projected, features = F.normalize(projected.float(), dim=-1), F.normalize(features.float(), dim=-1)
    sim = torch.einsum("bfnd,bknd->bfk", projected, features) / projected.shape[2]
    num_frames = sim.shape[-1]
    weights = neighbour_weights(num_frames, distance, tau, cumulative, device=sim.device)
    score = (sim * weights).sum(dim=-1)  # [B, T]
    loss = -(score.sum(dim=-1) / (num_frames if normalize_by_frames else 1)).mean()
    with torch.no_grad():
        is_neighbour = (weights > 0) & ~torch.eye(num_frames, dtype=torch.bool, device=sim.device)
        # A masked mean, not sim[:, mask]: boolean indexing calls nonzero(), a device-to-host sync every step.
        similarity_self = sim.diagonal(dim1=-2, dim2=-1).mean()
        similarity_neighbour = (sim * is_neighbour).sum(dim=(-2, -1)).mean() / is_neighbour.sum()
    return loss, {"similarity_self": similarity_self, "similarity_neighbour": similarity_neighbour}


class CrepaProjector(nn.Module):
    """h_phi, REPA's MLP: Linear(D_dit, hidden) -> SiLU -> Linear(hidden, hidden) -> SiLU -> Linear(hidden, D_enc)."""

    def __init__(self, hidden_size: int, encoder_dim: int, projector_dim: int = 2048) -> None:
        super().__init__()
        self.hidden_size, self.encoder_dim = hidden_size, encoder_dim
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, encoder_dim),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # fp32, also inside a bf16/fp16 autocast region (accelerate's mixed precision): the projector is small and
        # trained from scratch, and the cosine similarities it feeds are sensitive to rounding.
        device_type = hidden_states.device.type
        can_autocast = torch.amp.is_autocast_available(device_type)
        with torch.autocast(device_type, enabled=False) if can_autocast else nullcontext():
            return self.mlp(hidden_states.to(self.mlp[0].weight.dtype))


@dataclass(frozen=True)
class CrepaConfig:
    """Every CREPA setting as a value (a loop without the scripts' flags builds one directly)."""

    mode: str = "crepa"
    lambda_: float = 0.5
    block_index: int = 8
    distance: int = 1
    tau: float = 1.0
    cumulative: bool = False
    normalize_by_frames: bool = True
    encoder: str = "facebook/dinov2-giant"
    projector_dim: int = 2048
    encoder_frames_per_chunk: int = 16
    frame_pooling: str = "mean"
    scheduler: str = "constant"
    warmup_steps: int = 0
    decay_steps: int | None = None  # None: until max_train_steps
    lambda_end: float = 0.0
    power: float = 1.0
    cutoff_step: int | None = None

    @property
    def enabled(self) -> bool:
        return self.mode != "none" and self.lambda_ > 0

    def lambda_at(self, step: int, max_train_steps: int) -> float:
        """lambda for the optimizer step after `step` completed ones: a pure function of the step (exact on resume).
        A linear ramp from 0 over the warm-up, then lambda to lambda_end over the decay steps; 0 from the cutoff."""
        if self.cutoff_step is not None and step >= self.cutoff_step:
            return 0.0
        if step < self.warmup_steps:
            return self.lambda_ * step / self.warmup_steps
        if self.scheduler == "constant":
            return self.lambda_
        decay_steps = self.decay_steps if self.decay_steps is not None else max_train_steps - self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, decay_steps))
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        shape = {"linear": 1 - progress, "cosine": cosine, "polynomial": (1 - progress) ** self.power}[self.scheduler]
        return self.lambda_end + (self.lambda_ - self.lambda_end) * shape

    @property
    def may_skip_steps(self) -> bool:
        """Whether lambda can be 0 at some step (the projector then goes unused: DDP must allow unused parameters)."""
        decays_to_zero = self.scheduler != "constant" and self.lambda_end == 0
        return self.enabled and (self.cutoff_step is not None or self.warmup_steps > 0 or decays_to_zero)

    @property
    def effective_distance(self) -> int:
        """REPA* is CREPA with no neighbours."""
        return 0 if self.mode == "repa" else self.distance

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "CrepaConfig":
        """From the --crepa_* flags of `add_crepa_args`."""
        return cls(**{field: getattr(args, flag) for flag, field in FLAG_FIELDS.items()})

    def card_settings(self) -> dict:
        """Every setting by flag name, for the model card (REPA* shows distance 0: it has no neighbours)."""
        settings = {flag: getattr(self, field) for flag, field in FLAG_FIELDS.items()}
        return {**settings, "crepa_adjacent_distance": self.effective_distance}

    def check(self, num_blocks: int, model_name: str, cache_dir: str | None = None) -> None:
        """Before any weights load: the hooked block exists and the encoder is a DINOv2 (from its config alone)."""
        if not self.enabled:
            return
        if not 0 <= self.block_index < num_blocks:
            raise SystemExit(
                f"--crepa_block_index {self.block_index} is out of range: this {model_name} has "
                f"{num_blocks} blocks (valid indices 0..{num_blocks - 1})."
            )
        try:
            load_encoder_config(self.encoder, cache_dir=cache_dir)
        except ValueError as error:
            raise SystemExit(str(error)) from None


# --crepa_* flag -> CrepaConfig field, in the fields' order: the one place that ties the flags to the values the helper
# takes. A flag is crepa_<field> (lambda_ without its "_"), but for three named as SimpleTuner names them.
_RENAMED = {"distance": "adjacent_distance", "tau": "adjacent_tau", "cumulative": "cumulative_neighbors"}
FLAG_FIELDS = {"crepa_" + _RENAMED.get(f.name, f.name.rstrip("_")): f.name for f in fields(CrepaConfig)}


def _checked(kind: type, test, requirement: str):
    """An argparse type: a `kind` value passing `test`, else argparse's error naming the flag and `requirement`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not test(value):
            raise argparse.ArgumentTypeError(f"must be {kind.__name__} {requirement}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def add_crepa_args(
    parser: argparse.ArgumentParser,
    *,
    default_lambda: float,
    default_block_index: int = 8,
    default_encoder: str = "facebook/dinov2-giant",
    block_index_help: str = "",
    defaults_source: str = "the paper's, 0.5 at block 8 for CogVideoX and 1.0 at block 10 for HunyuanVideo, as "
    "SimpleTuner's OPTIONS.md reports them (second-hand), 0-based as SimpleTuner reads it; REPA's own code counts "
    "depth from 1, so the paper's block may be one shallower",
) -> argparse._ArgumentGroup:
    """Adds the --crepa_* flags. Invalid values fail at parse time with a message naming the flag."""
    group = parser.add_argument_group("CREPA (cross-frame representation alignment, arXiv 2506.09229)")
    add = group.add_argument
    int_ge0, int_gt0 = _checked(int, lambda v: v >= 0, ">= 0"), _checked(int, lambda v: v > 0, "> 0")
    float_ge0, float_gt0 = _checked(float, lambda v: v >= 0, ">= 0"), _checked(float, lambda v: v > 0, "> 0")
    add(
        "--crepa_mode",
        choices=("crepa", "repa", "none"),
        default="crepa",
        help="crepa: align with the frame and its neighbours; repa: REPA* (same frame only); none: plain LoRA.",
    )
    add(
        "--crepa_lambda",
        type=float_ge0,
        default=default_lambda,
        help=f"Weight lambda of the alignment loss (default {default_lambda}: {defaults_source}).",
    )
    add(
        "--crepa_block_index",
        type=int_ge0,
        default=default_block_index,
        help=f"0-based index of the block whose output video tokens are aligned (default {default_block_index}: "
        f"{defaults_source}). {block_index_help}",
    )
    add(
        "--crepa_adjacent_distance",
        type=int_ge0,
        default=1,
        help="d: align frame f also with frames f-d and f+d (paper Eq. 6; default 1 as SimpleTuner reads the paper).",
    )
    add(
        "--crepa_adjacent_tau",
        type=float_gt0,
        default=1.0,
        help="tau: a neighbour at distance |k-f| is weighted exp(-|k-f|/tau) (default 1.0, SimpleTuner's).",
    )
    add("--crepa_cumulative_neighbors", action="store_true", help="Neighbours at 1..d, not only at d (not the paper).")
    add(
        "--crepa_normalize_by_frames",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Divide the per-clip sum over frames by T (clip-length independent); --no-... gives the paper's sum.",
    )
    add(
        "--crepa_encoder",
        default=default_encoder,
        help="DINOv2 encoder (transformers Dinov2Model / Dinov2WithRegistersModel): a Hub id or a local folder. "
        "facebook/dinov2-giant is the paper's; facebook/dinov2-base fits small GPUs.",
    )
    add("--crepa_projector_dim", type=int_gt0, default=2048, help="Hidden width of the projector MLP (REPA's 2048).")
    add(
        "--crepa_frame_pooling",
        choices=("mean", "center"),
        default="mean",
        help="mean: the features of a token frame are the mean over its pixel frames (4 per latent frame); center: "
        "only its middle frame is encoded (4x less encoder compute).",
    )
    add("--crepa_encoder_frames_per_chunk", type=int_gt0, default=16, help="Frames per encoder call (bounds memory).")
    # lambda over training (SimpleTuner's names, so settings carry over); constant is the paper.
    add(
        "--crepa_scheduler",
        choices=("constant", "linear", "cosine", "polynomial"),
        default="constant",
        help="How lambda moves from --crepa_lambda to --crepa_lambda_end after the warm-up (constant: never).",
    )
    add("--crepa_warmup_steps", type=int_ge0, default=0, help="Optimizer steps of a linear ramp of lambda from 0.")
    add("--crepa_decay_steps", type=int_gt0, default=None, help="Decay steps (default: until --max_train_steps).")
    add("--crepa_lambda_end", type=float_ge0, default=0.0, help="lambda at the end of the decay.")
    add("--crepa_power", type=float_gt0, default=1.0, help="Exponent of the polynomial decay (1: linear).")
    add("--crepa_cutoff_step", type=int_ge0, default=None, help="lambda is 0 from this step on (CREPA skipped).")
    return group
