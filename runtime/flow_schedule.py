"""The flow-matching schedule with per-stage timestep shift (docs/ALGORITHM.md §18), float64 on the host.

Notation of docs/ALGORITHM.md §18: z_s = (1 - s) x0 + s noise; `s` is the unshifted sigma of the one global list,
`sigma = shift(s)` the sigma a stage denoises at. SD3 shifts by a factor a, sigma = a s / (1 + (a - 1) s); FLUX
by mu from the image's token count, sigma = e^mu / (e^mu + 1/s - 1), i.e. a = e^mu. Each stage takes its own a.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core.dit_families import DiTFamily
from ..core.plan import StagePlan

_UNSUPPORTED = ("invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                "stochastic_sampling")
"""FlowMatchEulerDiscreteScheduler options no supported model sets; refused rather than ignored."""


def check_config(config: dict[str, Any]) -> None:
    on = [k for k in _UNSUPPORTED if config.get(k)]
    if on:
        raise ValueError(f"scheduler option(s) {', '.join(on)} are not supported by the flow relay")
    if config.get("time_shift_type", "exponential") not in ("exponential", "linear"):
        raise ValueError(f"unknown time_shift_type {config['time_shift_type']!r}")


def shift_sigmas(s: np.ndarray, a: float) -> np.ndarray:
    """sigma = a s / (1 + (a - 1) s): SNR divided by a^2 (docs/ALGORITHM.md §18)."""
    return a * s / (1.0 + (a - 1.0) * s)


def calculate_mu(tokens: int, config: dict[str, Any]) -> float:
    """FLUX's mu: linear in the image's token count, base_shift at base_image_seq_len, max_shift at max."""
    lo, hi = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    b0, b1 = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    return b0 + (b1 - b0) * (tokens - lo) / (hi - lo)


def base_sigmas(n: int, family: DiTFamily) -> np.ndarray:
    """The global unshifted list s_0 > ... > s_{N-1}, as each diffusers pipeline builds it: FLUX passes
    linspace(1, 1/N, N); SD3 lets the scheduler space N points between its training sigmas' ends (which the
    scheduler has already shifted by its fixed `shift` when shifting is not dynamic)."""
    if n < 1:
        raise ValueError(f"number of steps must be at least 1, got {n}")
    config = family.scheduler
    if family.kind == "flux":
        return np.linspace(1.0, 1.0 / n, n)
    ends = np.array([1.0, 1.0 / config["num_train_timesteps"]])
    if not config.get("use_dynamic_shifting"):
        ends = shift_sigmas(ends, config.get("shift", 1.0))
    return np.linspace(ends[0], ends[1], n)


def stage_shift(family: DiTFamily, tokens: int, gamma: float) -> float:
    """The shift factor a of a stage with `tokens` image tokens and pixel ratio `gamma` to stage 1.

    Dynamic (FLUX): a = e^mu(tokens), the model's own rule. Fixed (SD3): a = shift sqrt(gamma), SD3's
    resolution-dependent shift (SD3 paper Eq. 23), which divides the SNR by gamma exactly as §4 does."""
    config = family.scheduler
    if config.get("use_dynamic_shifting"):
        mu = calculate_mu(tokens, config)
        return math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu
    return config.get("shift", 1.0) * math.sqrt(gamma)


@dataclass(frozen=True)
class FlowStageSchedule:
    """One stage's sigmas, host side (float64)."""

    shift: float
    """The stage's shift factor a (FLUX: e^mu)."""
    sigma_t: np.ndarray
    """sigma at each step of the stage."""
    sigma_s: np.ndarray
    """sigma after each step: the next base sigma shifted with this stage's a, or 0 after the plan's last step."""

    def tensors(self, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sigma_t, sigma_s - sigma_t, timestep = 1000 sigma_t) as device tensors, rounded to float32 as the
        diffusers scheduler rounds its sigmas before using them."""
        t32 = torch.as_tensor(self.sigma_t, dtype=torch.float32)
        s32 = torch.as_tensor(self.sigma_s, dtype=torch.float32)
        return t32.to(device, dtype), (s32 - t32).to(device, dtype), (t32 * 1000).to(device, dtype)


def plan_flow_schedule(plan: StagePlan, family: DiTFamily, reschedule: bool = True) -> list[FlowStageSchedule]:
    """Slices the global list by stage and shifts each slice with its stage's a (stage 1's a everywhere when
    re-scheduling is off)."""
    check_config(family.scheduler)
    s = base_sigmas(plan.total_steps, family)
    per_token = (family.vae_scale * family.patch) ** 2
    out = []
    for k, rng in enumerate(plan.step_ranges()):
        kk = k if reschedule else 0
        a = stage_shift(family, plan.stages[kk].pixels // per_token, plan.gamma(kk))
        nxt = s[rng.start + 1:rng.stop + 1]
        sigma_s = shift_sigmas(nxt, a)
        if rng.stop == len(s):  # the plan's last step ends at sigma 0
            sigma_s = np.append(sigma_s, 0.0)
        out.append(FlowStageSchedule(a, shift_sigmas(s[rng.start:rng.stop], a), sigma_s))
    return out
