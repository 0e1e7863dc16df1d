"""Entry points make importlib.metadata's distribution scan run once per process (diffusers and transformers each ask
for it at import), each caller getting its own copy of the one result (core/startup.py)."""
from __future__ import annotations

import importlib.metadata as md

from megafusion.core.startup import share_distribution_scan


def test_one_scan_per_process_each_caller_its_copy(monkeypatch):
    scans = []

    def scan():
        scans.append(1)
        return {"PIL": ["pillow"], "yaml": ["PyYAML"]}

    monkeypatch.setattr(md, "packages_distributions", scan)
    share_distribution_scan()
    share_distribution_scan()  # a second entry point in the same process does not wrap it again
    first = md.packages_distributions()
    first["PIL"].append("changed by a caller")
    second = md.packages_distributions()
    assert scans == [1]
    assert second == {"PIL": ["pillow"], "yaml": ["PyYAML"]}
