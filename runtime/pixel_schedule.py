"""The DDPM schedule of DeepFloyd IF with noise re-scheduling (docs/ALGORITHM.md §20): abar' on the host in float64,
the step coefficients in float32 as DDPMScheduler computes them.

Notation of docs/ALGORITHM.md: abar'_t at this step's timestep t, abar'_s at the next timestep s of the
global list (1 after the very last, as diffusers' DDPMScheduler takes it), both re-scheduled with the
stage's gamma; beta'_t = 1 - abar'_t / abar'_s is the step's own beta.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core.plan import StagePlan
from .schedule import reschedule


def ddpm_alphas_cumprod(config: dict[str, Any]) -> np.ndarray:
    """abar[t] for t = 0 .. T-1, computed as diffusers' DDPMScheduler computes it (float32 betas and float32
    cumulative product), returned in float64."""
    n = config["num_train_timesteps"]
    kind = config["beta_schedule"]
    if kind == "squaredcos_cap_v2":
        def abar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.array([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=np.float32)
    elif kind == "linear":
        betas = np.linspace(config["beta_start"], config["beta_end"], n, dtype=np.float32)
    else:
        raise ValueError(f"unsupported beta_schedule {kind!r} for a pixel-space model")
    return torch.cumprod(torch.from_numpy(1.0 - betas), dim=0).double().numpy()


def ddpm_timesteps(n: int, config: dict[str, Any]) -> np.ndarray:
    """The global descending list of N timesteps, "leading": 990, 980, ..., 0 for N = 100."""
    t = config["num_train_timesteps"]
    if not 1 <= n <= t:
        raise ValueError(f"number of steps must be between 1 and {t}, got {n}")
    spacing = config.get("timestep_spacing", "leading")
    if spacing != "leading":
        raise ValueError(f"unsupported timestep_spacing {spacing!r}")
    return (np.arange(n, dtype=np.int64) * (t // n))[::-1] + int(config.get("steps_offset", 0))


@dataclass(frozen=True)
class DDPMCoefficients:
    """One stage's DDPM step as device tensors indexed by step (float32)."""

    timesteps: torch.Tensor
    """(steps,) int64, given to the UNet unchanged."""
    sqrt_abar_t: torch.Tensor
    """sqrt(abar'_t): x0 = (x - sqrt(1 - abar'_t) eps) / sqrt(abar'_t)."""
    sqrt_one_minus_abar_t: torch.Tensor
    coef_x0: torch.Tensor
    """sqrt(abar'_s) beta'_t / (1 - abar'_t): weight of x0 in the posterior mean."""
    coef_xt: torch.Tensor
    """sqrt(abar'_t / abar'_s) (1 - abar'_s) / (1 - abar'_t): weight of x_t in the posterior mean."""
    log_beta: torch.Tensor
    """log beta'_t: the learned log variance at v = +1."""
    log_beta_tilde: torch.Tensor
    """log max(beta~'_t, 1e-20), beta~'_t = (1 - abar'_s) / (1 - abar'_t) beta'_t: at v = -1."""
    add_noise: tuple[bool, ...]
    """Whether the step adds variance noise (every step but the one at t = 0); host side, it decides a draw."""


@dataclass(frozen=True)
class DDPMStageSchedule:
    """A stage's slice of the global list and its re-scheduled abar', host side (float64)."""

    gamma: float
    timesteps: np.ndarray
    abar_t: np.ndarray
    abar_s: np.ndarray

    def coefficients(self, device) -> DDPMCoefficients:
        """The step's coefficients in float32 arithmetic, in DDPMScheduler's order of operations, so a one-stage
        plan reproduces IFPipeline bit for bit. (Computed in float64 instead, the final sample moves by about
        3e-5 relative: beta'_t = 1 - abar'_t / abar'_s loses digits in float32 where beta is small, and the
        learned log variance reads it.)"""
        a_t = torch.as_tensor(self.abar_t, dtype=torch.float32)
        a_s = torch.as_tensor(self.abar_s, dtype=torch.float32)
        b_t, b_s = 1 - a_t, 1 - a_s
        alpha = a_t / a_s
        beta = 1 - alpha
        beta_tilde = torch.clamp(b_s / b_t * beta, min=1e-20)
        return DDPMCoefficients(
            timesteps=torch.as_tensor(self.timesteps.copy(), dtype=torch.int64, device=device),
            sqrt_abar_t=(a_t ** 0.5).to(device),
            sqrt_one_minus_abar_t=(b_t ** 0.5).to(device),
            coef_x0=(a_s ** 0.5 * beta / b_t).to(device),
            coef_xt=(alpha ** 0.5 * b_s / b_t).to(device),
            log_beta=torch.log(beta).to(device),
            log_beta_tilde=torch.log(beta_tilde).to(device),
            add_noise=tuple(bool(t > 0) for t in self.timesteps),
        )


def plan_ddpm_schedule(plan: StagePlan, config: dict[str, Any], reschedule_noise: bool = True
                       ) -> list[DDPMStageSchedule]:
    """Slices the global timestep list by stage; stage k's abar' uses gamma_k (1 at stage 1)."""
    abar = ddpm_alphas_cumprod(config)
    ts = ddpm_timesteps(plan.total_steps, config)
    nxt = np.append(abar[ts[1:]], 1.0)  # DDPMScheduler: abar at t - T/N, 1 past the end
    out = []
    for k, rng in enumerate(plan.step_ranges()):
        gamma = plan.gamma(k) if (reschedule_noise and k > 0) else 1.0
        sl = slice(rng.start, rng.stop)
        out.append(DDPMStageSchedule(gamma, ts[sl], reschedule(abar[ts[sl]], gamma), reschedule(nxt[sl], gamma)))
    return out
