"""Request rules of `POST /v1/generate` (serve/request.py), without Ray: mf-generate's plan and defaults, and
one error per bad field that names the field and the value."""
from __future__ import annotations

import json
import re

import pytest

from megafusion.core.families import get_family
from megafusion.core.plan import default_plan, parse_stages, validate_plan
from megafusion.runtime.pipeline import GenerationOptions
from megafusion.serve.request import (RequestError, parse_body, parse_request, plan_for, stages_text,
                                      wants_json)

SD15 = get_family("tiny-sd15")


def test_defaults_are_mf_generates():
    req = parse_request({"prompt": "a cube"}, SD15)
    assert req.plan == default_plan(SD15)
    assert req.options == GenerationOptions("a cube")  # guidance 7, seed 0, reschedule, dilation 2, pixel relay


def test_every_field_read():
    body = {"prompt": "p", "negative_prompt": "n", "size": "250x250", "stages": "128x128:3,256x256:2",
            "guidance": 5, "seed": 2 ** 64 - 1, "dilation": 1, "reschedule": False, "relay": "latent"}
    req = parse_request(body, SD15)
    assert req.plan == validate_plan(SD15, parse_stages("128x128:3,256x256:2"), 250, 250)
    assert req.options == GenerationOptions("p", "n", 5.0, 2 ** 64 - 1, False, 1, "latent")
    assert stages_text(req.plan) == "128x128:3,256x256:2"
    assert parse_request({"prompt": "p", "size": "256x256", "steps": 10}, SD15).plan == default_plan(SD15, 256, 256, 10)


@pytest.mark.parametrize("body,field,needle", [
    ({}, "prompt", "prompt: missing"),
    ({"prompt": 3}, "prompt", "prompt 3: expected a string"),
    ({"prompt": None}, "prompt", "prompt null"),
    ({"prompt": "x" * 10_001}, "prompt", "at most 10000"),
    ({"prompt": "p", "negative_prompt": ["a"]}, "negative_prompt", 'negative_prompt ["a"]'),
    ({"prompt": "p", "size": "19x20x"}, "size", "malformed size '19x20x'"),
    ({"prompt": "p", "size": "64x64"}, "size", "64x64 is smaller than"),
    ({"prompt": "p", "size": 256}, "size", "size 256: expected a string"),
    ({"prompt": "p", "stages": "256x256:5,128x128:5"}, "stages", "smaller than stage 1"),
    ({"prompt": "p", "stages": "128x128:0"}, "stages", "0 steps"),
    ({"prompt": "p", "stages": "128x128:2", "steps": 4}, "steps", "exclude each other"),
    ({"prompt": "p", "steps": 0}, "steps", "steps 0: needs at least 1"),
    ({"prompt": "p", "steps": 2.5}, "steps", "steps 2.5"),
    ({"prompt": "p", "steps": 1000}, "steps", "at most 999"),
    ({"prompt": "p", "guidance": -1}, "guidance", "guidance -1: expected a finite number >= 0"),
    ({"prompt": "p", "guidance": float("nan")}, "guidance", "guidance NaN"),
    ({"prompt": "p", "guidance": float("inf")}, "guidance", "guidance Infinity"),
    ({"prompt": "p", "guidance": 10 ** 400}, "guidance", "expected a finite number"),
    ({"prompt": "p", "guidance": "7"}, "guidance", 'guidance "7"'),
    ({"prompt": "p", "guidance": True}, "guidance", "guidance true"),
    ({"prompt": "p", "seed": -1}, "seed", "seed -1: expected an integer with 0 <= seed < 2^64"),
    ({"prompt": "p", "seed": 2 ** 64}, "seed", "seed 18446744073709551616"),
    ({"prompt": "p", "seed": 1.0}, "seed", "seed 1.0"),
    ({"prompt": "p", "seed": True}, "seed", "seed true"),
    ({"prompt": "p", "dilation": 0}, "dilation", "dilation 0: expected an integer from 1 (off) to 8"),
    ({"prompt": "p", "dilation": 9}, "dilation", "dilation 9"),
    ({"prompt": "p", "reschedule": "yes"}, "reschedule", 'reschedule "yes": expected true or false'),
    ({"prompt": "p", "relay": "bicubic"}, "relay", 'relay "bicubic": expected one of pixel, latent'),
    ({"prompt": "p", "relay": ["pixel"]}, "relay", 'relay ["pixel"]'),
    ({"prompt": "p", "sampler": "ddim"}, "sampler", "unknown field 'sampler'"),
])
def test_bad_field_named_with_its_value(body, field, needle):
    with pytest.raises(RequestError) as e:
        parse_request(body, SD15)
    assert e.value.field == field
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_served_sizes_only():
    sizes = [(256, 256)]
    assert parse_request({"prompt": "p"}, SD15, sizes).plan.output_width == 256
    assert parse_request({"prompt": "p", "stages": "128x128:1,256x256:1"}, SD15, sizes)
    with pytest.raises(RequestError, match=r"size 192x192 is not served here; this server serves 256x256"):
        parse_request({"prompt": "p", "size": "192x192"}, SD15, sizes)
    with pytest.raises(RequestError, match=r"size 256x256 \(the default\) is not served.*serves 128x128"):
        parse_request({"prompt": "p"}, SD15, [(128, 128)])


def test_body_is_one_json_object():
    assert parse_body(b'{"prompt": "x"}') == {"prompt": "x"}
    for raw, needle in ((b"{", "body: not JSON"), (b"[1]", "body: expected a JSON object, got [1]"),
                        (b"\xff", "body: not JSON")):
        with pytest.raises(RequestError, match=re.escape(needle)):
            parse_body(raw)
    # NaN arrives through Python's JSON reader and is refused by the guidance rule
    with pytest.raises(RequestError, match="guidance NaN"):
        parse_request(parse_body(b'{"prompt": "x", "guidance": NaN}'), SD15)


def test_plan_for_is_plan_from_args():
    from megafusion.cli.common import UsageError, plan_from_args
    from megafusion.core.plan import PlanError

    for size, stages, steps in [(None, None, None), ("320x180", None, 6), (None, "128x128:2,256x256:2", None),
                                ("250x250", "128x128:2,256x256:2", None), ("1920x1080", None, None)]:
        assert plan_for(SD15, size, stages, steps) == plan_from_args(SD15, size, stages, steps)
    for size, stages, steps in [("64x64", None, None), (None, "128x128:0", None), (None, None, 0),
                                (None, "128x128:1", 3), ("9x", None, None)]:
        with pytest.raises((UsageError, PlanError)):
            plan_from_args(SD15, size, stages, steps)
        with pytest.raises(RequestError):
            plan_for(SD15, size, stages, steps)


def test_accept():
    assert wants_json("application/json") and wants_json("image/png, application/json;q=0.5")
    assert not wants_json(None) and not wants_json("image/png") and not wants_json("*/*")


def test_errors_are_one_json_line():
    with pytest.raises(RequestError) as e:
        parse_request({"prompt": "p", "seed": -1}, SD15)
    line = json.dumps({"error": str(e.value)})
    assert "\n" not in line
