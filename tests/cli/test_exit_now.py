"""`exit_now` ends a console script without the interpreter's teardown, and loses none of its output: Python's
streams, logging and what native code printed through C stdio (buffered when stdout is a pipe)."""
from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
import ctypes, logging, sys
logging.basicConfig(stream=sys.stderr, level=logging.INFO)
ctypes.CDLL(None).printf(b"native line\\n")
print("python line", end="")
logging.getLogger("probe").info("logged line")
from megafusion.cli.common import exit_now
exit_now(3)
print("never")
"""


def test_exit_now_keeps_every_output_and_the_status():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # which makes C stdio unbuffered too
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 3
    assert "native line" in r.stdout and "python line" in r.stdout and "never" not in r.stdout
    assert "logged line" in r.stderr
