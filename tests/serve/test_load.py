"""The load generator (benchmarks/load.py) against a stand-in server on 127.0.0.1 (stdlib, no Ray): counts,
percentiles, statuses other than 200, the time budget, and the files it writes."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from megafusion.benchmarks.load import main, percentile, run


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(0.05)
        code = 429 if body["seed"] % 5 == 4 else 200
        self.send_response(code)
        self.send_header("Content-Length", "4")
        self.end_headers()
        self.wfile.write(b"\x89PNG")

    def do_GET(self):
        data = json.dumps({"model": "stand-in"}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()
    t.join(5)


def test_percentile_nearest_rank():
    v = [float(i) for i in range(1, 101)]
    assert (percentile(v, 50), percentile(v, 95), percentile(v, 99), percentile(v, 100)) == (50, 95, 99, 100)
    assert percentile([3.0], 99) == 3.0


def test_levels_counted_and_timed(stand_in):
    out = run(stand_in, {"prompt": "x"}, [1, 4], requests=10, max_seconds=30, request_timeout=10)
    assert out["server"] == {"model": "stand-in"} and out["provenance"]["commit"]
    for lv in out["levels"]:
        assert lv["sent"] == 10 and lv["statuses"] == {"200": 8, "429": 2} and lv["ok"] == 8
        assert 0.05 <= lv["p50_s"] <= lv["p95_s"] <= lv["p99_s"] <= lv["max_s"] < 5
        assert lv["throughput_rps"] > 0 and not lv["stopped_early"]
    one, four = out["levels"]
    assert four["wall_s"] < one["wall_s"]  # four clients overlap their requests


def test_time_budget_stops_a_level(stand_in):
    out = run(stand_in, {"prompt": "x"}, [1], requests=1000, max_seconds=0.5, request_timeout=10)
    lv = out["levels"][0]
    assert lv["stopped_early"] and 1 <= lv["sent"] < 1000 and lv["wall_s"] < 5


def test_refused_connection_counted_not_hung():
    out = run("http://127.0.0.1:9", {"prompt": "x"}, [2], requests=3, max_seconds=10, request_timeout=2)
    assert out["levels"][0]["statuses"] == {"error": 3} and out["levels"][0]["p50_s"] is None


def test_writes_json_and_markdown(stand_in, tmp_path, capsys):
    assert main(["--url", stand_in, "--requests", "5", "--concurrency", "1,2", "--output", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "load.json").read_text())
    assert [lv["concurrency"] for lv in data["levels"]] == [1, 2]
    table = (tmp_path / "load.md").read_text()
    assert "| concurrency | sent | 200 |" in table and "commit" in table and "429: 1" in table
    assert capsys.readouterr().out == table
    assert main(["--url", stand_in, "--body", "[1]"]) == 2
