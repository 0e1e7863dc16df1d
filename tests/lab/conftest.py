"""The lab (benchmarks/lab) is scripts outside the installed package: its modules import each other as
top-level modules, as they do when run as `python benchmarks/lab/NAME.py`."""
from __future__ import annotations

import sys
from pathlib import Path

LAB = str(Path(__file__).resolve().parents[2] / "benchmarks" / "lab")
if LAB not in sys.path:
    sys.path.insert(0, LAB)
