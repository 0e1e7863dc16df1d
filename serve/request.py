"""What `POST /v1/generate` may ask for, checked by the rules `mf-generate` applies to its flags.

Plain functions, no Ray: the ingress checks a body before it queues anything, and the model replica reads
the same body back into the same plan and options. Every refusal is a `RequestError` whose text names the
field and the value (`seed 18446744073709551616: ...`); the server answers it as HTTP 400.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..core.dit_families import is_dit, no_dilation_why, no_negative_prompt_why
from ..core.families import ModelFamily
from ..core.plan import PlanError, StagePlan, default_plan, parse_size, parse_stages, validate_plan
from ..runtime.pipeline import MAX_DILATION, SEED_LIMIT, GenerationOptions

from .conditions import FIELDS as CONDITION_FIELDS
from .conditions import ConditionError, Conditions, Offered, parse_conditions

FIELDS = ("prompt", "negative_prompt", "size", "stages", "steps", "guidance", "seed", "dilation", "reschedule",
          "relay") + CONDITION_FIELDS
"""Every field a request may carry; `prompt` is the only one required (serve/conditions.py: the extra ones)."""

DEFAULTS = {"negative_prompt": "", "size": None, "stages": None, "steps": None, "guidance": 7.0, "seed": 0,
            "dilation": 2, "reschedule": True, "relay": "pixel"}
"""What an absent field means: `mf-generate`'s defaults (no --size: the paper's plan at 2x native per side)."""

MAX_PROMPT_CHARS = 10_000
"""Longest prompt accepted (the tokenizers keep 77 tokens; this bounds the work spent reading one)."""

RELAYS = ("pixel", "latent")


class RequestError(ValueError):
    """A field the server refuses; the text names the field and the value."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class GenerateRequest:
    """A checked request: the plan it runs and everything else `MegaFusionPipeline.generate` takes."""

    plan: StagePlan
    """The stage plan, validated for the model."""
    options: GenerationOptions
    """Prompt, negative prompt, guidance, seed, re-scheduling, dilation, relay (SD3 / FLUX: the flow runtime's
    FlowGenerationOptions, which have no dilation)."""
    conditions: Conditions = Conditions()
    """Image to image, ControlNet images, IP-Adapter image (serve/conditions.py); empty for text to image."""

    def batch_key(self) -> tuple:
        """What requests batched together share: the plan and every option but prompts and seed. A request with
        conditions runs alone (its key is its own): the batched loop takes no per-request photo, control image
        or IP-Adapter image."""
        o = self.options
        if not isinstance(o, GenerationOptions):
            return ("alone", id(self))  # SD3 / FLUX: the flow runtime has no batched loop (serve/flow_model.py)
        key = (self.plan, o.guidance, o.reschedule, o.dilation, o.relay)
        return key if self.conditions.empty else key + ("alone", id(self))


def _show(value) -> str:
    """A value as the client wrote it (JSON), shortened."""
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_body(raw: bytes) -> dict:
    """The request body: one JSON object (UTF-8)."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError("body", f"body: not JSON ({e})") from None
    if not isinstance(body, dict):
        raise RequestError("body", f"body: expected a JSON object, got {_show(body)}")
    return body


def size_text(width: int, height: int) -> str:
    return f"{width}x{height}"


def stages_text(plan: StagePlan) -> str:
    """The plan as the `stages` field writes it (`128x128:40,256x256:10`): a request can send it back."""
    return ",".join(str(s) for s in plan.stages)


def plan_for(family: ModelFamily, size: str | None, stages: str | None, steps: int | None) -> StagePlan:
    """`size`, `stages` and `steps` as `mf-generate` reads --size, --stages and --steps (`plan_from_args`)."""
    if steps is not None and steps <= 0:
        raise RequestError("steps", f"steps {steps}: needs at least 1 step")
    try:
        w, h = parse_size(size) if size is not None else (None, None)
    except PlanError as e:
        raise RequestError("size", f"size: {e}") from None
    if stages is not None:
        if steps is not None:
            raise RequestError("steps", "steps and stages exclude each other (give steps per stage in stages)")
        try:
            return validate_plan(family, parse_stages(stages), w, h)
        except PlanError as e:
            raise RequestError("stages", f"stages {_show(stages)}: {e}") from None
    try:
        return default_plan(family, w, h, steps)
    except PlanError as e:
        field = "size" if size is not None else "steps"
        raise RequestError(field, f"{field}: {e}") from None


def _string(body: dict, field: str, limit: int | None = None) -> str | None:
    value = body.get(field, DEFAULTS.get(field))
    if value is None:
        return None
    if not isinstance(value, str):
        raise RequestError(field, f"{field} {_show(value)}: expected a string")
    if limit is not None and len(value) > limit:
        raise RequestError(field, f"{field}: {len(value)} characters; at most {limit}")
    return value


def parse_request(body: dict, family: ModelFamily, sizes: Sequence[tuple[int, int]] | None = None,
                  offered: Offered = Offered()) -> GenerateRequest:
    """A request body (a decoded JSON object) checked into a plan, options and conditions.

    `sizes`: the output sizes the server serves (width, height); None serves every size the model accepts.
    `offered`: the ControlNets and IP-Adapter the server has (none: requests asking for them are refused)."""
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise RequestError(unknown[0], f"unknown field {unknown[0]!r}; fields are {', '.join(FIELDS)}")
    if "prompt" not in body:
        raise RequestError("prompt", "prompt: missing (a string)")
    prompt = _string(body, "prompt", MAX_PROMPT_CHARS)
    if prompt is None:
        raise RequestError("prompt", "prompt null: expected a string")
    negative = _string(body, "negative_prompt", MAX_PROMPT_CHARS) or ""
    size, stages = _string(body, "size"), _string(body, "stages")

    steps = body.get("steps")
    if steps is not None and not _is_int(steps):
        raise RequestError("steps", f"steps {_show(steps)}: expected a whole number >= 1")

    dit = is_dit(family)
    if dit:  # mf-generate's refusals for the transformer families (cli/generate_flow.py), as request fields
        _refuse_for_dit(body, family, negative)
    value = body.get("guidance", family.default_guidance if dit else DEFAULTS["guidance"])
    try:
        guidance = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an integer beyond any float
        guidance = math.inf
    if not math.isfinite(guidance) or guidance < 0:
        raise RequestError("guidance", f"guidance {_show(value)}: expected a finite number >= 0")

    seed = body.get("seed", DEFAULTS["seed"])
    if not _is_int(seed) or not 0 <= seed < SEED_LIMIT:
        raise RequestError("seed", f"seed {_show(seed)}: expected an integer with 0 <= seed < 2^64")

    dilation = body.get("dilation", DEFAULTS["dilation"])
    if not _is_int(dilation) or not 1 <= dilation <= MAX_DILATION:
        raise RequestError("dilation", f"dilation {_show(dilation)}: expected an integer from 1 (off) to "
                                       f"{MAX_DILATION}")

    reschedule = body.get("reschedule", DEFAULTS["reschedule"])
    if not isinstance(reschedule, bool):
        raise RequestError("reschedule", f"reschedule {_show(reschedule)}: expected true or false")

    relay = body.get("relay", DEFAULTS["relay"])
    if relay not in RELAYS or not isinstance(relay, str):
        raise RequestError("relay", f"relay {_show(relay)}: expected one of {', '.join(RELAYS)}")

    plan = plan_for(family, size, stages, steps)
    if sizes is not None and (plan.output_width, plan.output_height) not in set(sizes):
        served = ", ".join(size_text(w, h) for w, h in sizes)
        given = "" if size is not None or stages is not None else " (the default)"
        raise RequestError("size", f"size {size_text(plan.output_width, plan.output_height)}{given} is not served "
                                   f"here; this server serves {served}")
    try:
        if dit:
            from ..runtime.flow_pipeline import FlowGenerationOptions

            opts = FlowGenerationOptions(prompt, negative, guidance, seed, reschedule, relay)
        else:
            opts = GenerationOptions(prompt, negative, guidance, seed, reschedule, dilation, relay)
    except ValueError as e:  # the runtime's own rules, should they ever be stricter than the ones above
        raise RequestError("options", str(e)) from None
    entry_rule = None
    if dit:  # a photo enters the flow plan by diffusers' flow rule (runtime/flow_img2img.py)
        from ..runtime.flow_img2img import flow_entry_point as entry_rule
    try:
        conditions = parse_conditions(body, plan, offered, entry_rule)
    except ConditionError as e:
        raise RequestError(e.field, str(e)) from None
    return GenerateRequest(plan, opts, conditions)


def _refuse_for_dit(body: dict, family: ModelFamily, negative: str) -> None:
    """`dilation` for SD3 / FLUX and a negative prompt for FLUX, refused as mf-generate refuses the flags."""
    if body.get("dilation") is not None:
        raise RequestError("dilation", f"dilation {_show(body['dilation'])}: {no_dilation_why(family)} (leave "
                                       "dilation out)")
    if family.kind == "flux" and negative:
        raise RequestError("negative_prompt", f"negative_prompt {_show(negative)}: {no_negative_prompt_why(family)}; "
                                              "guidance sets its guidance embedding")


def wants_json(accept: str | None) -> bool:
    """True when the Accept header names application/json (then the image comes base64 in a JSON object)."""
    if not accept:
        return False
    types = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    return "application/json" in types
