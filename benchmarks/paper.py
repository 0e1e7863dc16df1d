"""The paper's Table 1 cost rows, reproduced with the meta-device counter (docs/ALGORITHM.md §11)."""
from __future__ import annotations

from dataclasses import dataclass

from ..core.families import SD15, SDXL
from ..core.plan import Stage, default_plan, validate_plan

from .flops import PAPER_TABLE1_GMACS, MetaCostCounter, paper_scaled_gmacs, plan_cost


@dataclass(frozen=True)
class PaperRow:
    """One Table 1 cost figure beside ours."""

    label: str
    """Model, size and plan."""
    convention: str
    """How `ours_gmacs` was counted."""
    ours_gmacs: float
    """Our G-MACs (conv + linear, UNet, CFG as batch 2)."""
    paper_gmacs: float | None
    """Table 1's figure, where it prints one for exactly this."""
    true_tflop: float | None
    """True TFLOP of the same plan (UNet + VAE relays + decode), where it applies."""

    @property
    def relative_diff(self) -> float | None:
        return None if self.paper_gmacs is None else self.ours_gmacs / self.paper_gmacs - 1.0


def _plans(family):
    mf = default_plan(family)
    last = mf.stages[-1]
    return validate_plan(family, [Stage(last.height, last.width, mf.total_steps)]), mf


def table1_rows(sd15: MetaCostCounter, sdxl: MetaCostCounter | None = None) -> list[PaperRow]:
    """SD1.5 at 1024 (and, given an SDXL counter, SDXL at 2048): the paper's figures and ours."""
    rows = []
    unet = "conv/linear MACs of this model's UNet"
    direct, mf = _plans(SD15)
    for plan, what, key in ((direct, "direct", "sd15 1024 direct"), (mf, "MegaFusion", "sd15 1024 megafusion")):
        c = plan_cost(sd15, plan)
        rows.append(PaperRow(f"SD1.5 {what}: {plan.describe()}", unet, c.paper_gmacs,
                             PAPER_TABLE1_GMACS[key], c.true_tflop))
    if sdxl is None:
        return rows
    direct, mf = _plans(SDXL)
    for plan, what, key in ((direct, "direct", "sdxl 2048 direct"), (mf, "MegaFusion", "sdxl 2048 megafusion")):
        rows.append(PaperRow(f"SDXL {what}: {plan.describe()}", "the paper's: SD1.5 at 1024 scaled by pixels",
                             paper_scaled_gmacs(sd15, plan), PAPER_TABLE1_GMACS[key], None))
        c = plan_cost(sdxl, plan)
        rows.append(PaperRow(f"SDXL {what}: {plan.describe()}", unet + " (true SDXL)", c.paper_gmacs,
                             None, c.true_tflop))
    return rows
