"""The DDIM schedule with noise re-scheduling (docs/ALGORITHM.md §1, §4), computed once in float64 on the host.

Notation of docs/ALGORITHM.md: `abar[t]` is the cumulative product of alphas; a stage with factor gamma uses
`abar'_t = abar_t / (gamma - (gamma - 1) * abar_t)`, i.e. SNR' = SNR / gamma.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core.plan import StagePlan


def alphas_cumprod(config: dict[str, Any]) -> np.ndarray:
    """abar[t] for t = 0 .. T-1 (float64)."""
    t = config["num_train_timesteps"]
    if config["beta_schedule"] == "scaled_linear":
        betas = np.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, t, dtype=np.float64) ** 2
    elif config["beta_schedule"] == "linear":
        betas = np.linspace(config["beta_start"], config["beta_end"], t, dtype=np.float64)
    else:
        raise ValueError(f"unsupported beta_schedule {config['beta_schedule']!r}")
    return np.cumprod(1.0 - betas)


def ddim_timesteps(n: int, config: dict[str, Any]) -> np.ndarray:
    """The one global descending list of N timesteps ("leading" spacing): 981, 961, ..., 1 for N = 50."""
    t = config["num_train_timesteps"]
    if not 1 <= n <= t:
        raise ValueError(f"number of steps must be between 1 and {t}, got {n}")
    if config["timestep_spacing"] != "leading":
        raise ValueError(f"unsupported timestep_spacing {config['timestep_spacing']!r}")
    ratio = t // n
    return (np.arange(n, dtype=np.int64) * ratio)[::-1] + int(config["steps_offset"])


def final_abar(config: dict[str, Any], abar: np.ndarray) -> float:
    """The "previous" abar after the very last timestep (abar[0] because set_alpha_to_one is False)."""
    return 1.0 if config["set_alpha_to_one"] else float(abar[0])


def reschedule(abar: np.ndarray | float, gamma: float) -> np.ndarray:
    """abar' = abar / (gamma - (gamma - 1) abar)."""
    abar = np.asarray(abar, dtype=np.float64)
    return abar / (gamma - (gamma - 1.0) * abar)


@dataclass(frozen=True)
class StageSchedule:
    """The coefficients one stage needs, host side (float64)."""

    gamma: float
    """Re-scheduling factor of this stage (1 at stage 1 and wherever re-scheduling is off)."""
    timesteps: np.ndarray
    """This stage's consecutive slice of the global timestep list (int64), given to the UNet as is."""
    abar_t: np.ndarray
    """abar'_t at each of those timesteps."""
    abar_s: np.ndarray
    """abar'_s at the next timestep of the global list (or the final abar), same schedule as abar_t."""

    def coefficients(self, device: torch.device | str, dtype=torch.float32) -> StageCoefficients:
        return StageCoefficients(
            timesteps=torch.as_tensor(self.timesteps.copy(), dtype=torch.int64, device=device),
            sqrt_abar_t=torch.as_tensor(np.sqrt(self.abar_t), dtype=dtype, device=device),
            sqrt_one_minus_abar_t=torch.as_tensor(np.sqrt(1.0 - self.abar_t), dtype=dtype, device=device),
            sqrt_abar_s=torch.as_tensor(np.sqrt(self.abar_s), dtype=dtype, device=device),
            sqrt_one_minus_abar_s=torch.as_tensor(np.sqrt(1.0 - self.abar_s), dtype=dtype, device=device),
        )


@dataclass(frozen=True)
class StageCoefficients:
    """A stage's schedule as device tensors, indexed by step within the stage (no host sync in the loop)."""

    timesteps: torch.Tensor
    """(steps,) int64."""
    sqrt_abar_t: torch.Tensor
    """(steps,) sqrt(abar'_t)."""
    sqrt_one_minus_abar_t: torch.Tensor
    """(steps,) sqrt(1 - abar'_t)."""
    sqrt_abar_s: torch.Tensor
    """(steps,) sqrt(abar'_s)."""
    sqrt_one_minus_abar_s: torch.Tensor
    """(steps,) sqrt(1 - abar'_s)."""


def plan_schedule(plan: StagePlan, config: dict[str, Any], reschedule_noise: bool = True) -> list[StageSchedule]:
    """Slices the global timestep list by stage and applies each stage's gamma to every coefficient."""
    abar = alphas_cumprod(config)
    ts = ddim_timesteps(plan.total_steps, config)
    nxt = np.append(abar[ts[1:]], final_abar(config, abar))  # abar at the "previous" timestep s
    out = []
    for k, rng in enumerate(plan.step_ranges()):
        gamma = plan.gamma(k) if (reschedule_noise and k > 0) else 1.0
        sl = slice(rng.start, rng.stop)
        out.append(StageSchedule(gamma, ts[sl], reschedule(abar[ts[sl]], gamma), reschedule(nxt[sl], gamma)))
    return out
