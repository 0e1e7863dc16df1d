"""tests/background.py's queue: a job waits for the one it is `after`, a worker takes a job that can run before one
that would wait, and the summary gives each build's timeline (when it ran, when a test first asked for it, how long
tests waited), which says where CI's time went."""
from __future__ import annotations

import re

from tests.background import Builds, Job, python_cmd

LINE = r"(\w+): built in (\d+) s \(from (\d+) to (\d+) s\), first asked for at (\d+|-) s, tests waited (\d+) s"


def test_after_waits_and_the_summary_gives_the_timeline(tmp_path):
    mark = str(tmp_path / "first-done")
    first = python_cmd(f"import pathlib, time; time.sleep(2); pathlib.Path({mark!r}).touch()")
    second = python_cmd(f"import os, sys; sys.exit(0 if os.path.exists({mark!r}) else 3)")
    builds = Builds(workers=2)
    builds.factory = lambda b, name: Job(name, python_cmd("pass"))
    try:
        builds.start([Job("first", first), Job("second", second, after="first"), Job("third", python_cmd("pass"))])
        assert builds.get("second").returncode == 0  # it began only once "first" had ended
        builds.get("unqueued")  # not queued: built in the foreground
    finally:
        builds.stop()  # removes its folder (the builds' MEGAFUSION_CACHE)
    assert builds.root is not None and not builds.root.exists()
    got = {m[0]: m[1:] for m in (re.fullmatch(LINE, line).groups() for line in builds.summary())}
    assert sorted(got) == ["first", "second", "third", "unqueued"]
    assert int(got["third"][1]) == 0  # the other worker took it at once instead of waiting behind "first"
    assert got["first"][3:] == ("-", "0")  # no test asked for it
    assert int(got["second"][1]) >= int(got["first"][2]) - 1  # whole seconds, rounded
    assert int(got["second"][3]) <= 1 and int(got["second"][4]) >= 1  # asked at once, waited for "first"
    assert int(got["unqueued"][3]) >= 1  # asked for after "second" was done


def test_a_running_build_is_not_a_process_a_test_left_behind(monkeypatch):
    """The server tests check that nothing they started outlives them (tests/serve/conftest.py started_here); a
    session build running beside them is not theirs (CI once failed on one that outlived a server test)."""
    import os
    import time

    from tests import background
    from tests.serve.conftest import descendants, started_here

    builds = Builds(workers=1)
    try:
        builds.start([Job("sleeper", python_cmd("import time; time.sleep(60)"))])
        end = time.monotonic() + 30
        while not builds.pids() and time.monotonic() < end:
            time.sleep(0.05)
        (pid,) = builds.pids()
        assert pid in descendants(os.getpid())
        monkeypatch.setattr(background, "BUILDS", builds)
        assert pid not in started_here()
    finally:
        builds.stop()
