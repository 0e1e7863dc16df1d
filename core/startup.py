"""What a megafusion process does once at its start, before the model's imports (entry points only: these are
process-wide)."""
from __future__ import annotations

import functools


def share_distribution_scan() -> None:
    """Makes `importlib.metadata.packages_distributions()` scan the environment once per process. diffusers and
    transformers each call it when imported; on the H200's environment (150 distributions) the two scans took 5.0 s
    of a 38.6 s warm start of mf-generate --mode compiled (benchmarks/RESULTS.md, fourteenth session). Each caller
    gets its own copy of the one result. Process-wide: entry points only."""
    import importlib.metadata as md

    if getattr(md.packages_distributions, "shared_by_megafusion", False):
        return
    scan = functools.cache(md.packages_distributions)

    def packages_distributions() -> dict[str, list[str]]:
        return {k: list(v) for k, v in scan().items()}

    packages_distributions.shared_by_megafusion = True
    md.packages_distributions = packages_distributions
