"""The memory estimate of core/memory.py for the transformer families (SD3, FLUX; docs/ALGORITHM.md §13, §18).

The family's architecture is built on the `meta` device (no weights, no arithmetic) and run through the calls the
stage loop makes (engine/flow_networks.py `FlowTorchNetworks`: the transformer's velocity, the VAE's decode and
encode, the text encoders), while core/memory.py's `LiveBytes` counts the tensors alive. Peak = the weights (the
transformer, the VAE and every text encoder, all on the device for the whole run, as mf-generate loads them) + the
largest transient of any segment.

Not counted: ControlNets, IP-Adapters, engines (a package holds its own copy of the weights), the allocator's
slack, cuDNN workspaces, CUDA-graph pools beyond the largest transient, compile-time autotuning. The layout is the
family's (SD3 Medium's, FLUX.1's): a local folder of a larger variant (SD3.5 Large) is counted at that layout, so
its estimate is low, never high.
"""
from __future__ import annotations

import torch

from ..core.dit_families import DiTFamily
from ..core.dit_specs import sd3_text_length
from ..core.memory import MemoryEstimate, module_bytes, peak_live_bytes
from ..core.plan import StagePlan


def meta_networks(family: DiTFamily, dtype: torch.dtype, vae_dtype: torch.dtype | None = None):
    """`family`'s architecture on the `meta` device as `FlowTorchNetworks`, cast as the estimate counts it (the
    transformer and text encoders in `dtype`, T5 as `dit_loading.to_device` casts it, the VAE in `vae_dtype`, None:
    `dtype`). Building it is most of an estimate's seconds: estimates of several plans can share one."""
    from ..core.dit_loading import T5_FP16_DTYPE, build_random_dit
    from ..engine.flow_networks import FlowTorchNetworks

    bundle = build_random_dit(family, device=torch.device("meta"))  # float32, no cast yet
    for m in bundle.modules():  # as dit_loading.to_device casts; torch's .to: diffusers' own warns on every cast
        t5 = m is bundle.text_encoders[-1] and dtype == torch.float16
        torch.nn.Module.to(m, dtype=T5_FP16_DTYPE if t5 else vae_dtype if m is bundle.vae and vae_dtype else dtype)
    return FlowTorchNetworks(bundle)


def estimate_flow_memory(family: DiTFamily, plan: StagePlan, dtype: torch.dtype, vae_dtype: torch.dtype | None = None,
                         cfg: bool = True, relay: str = "pixel", graph_pool: bool = False,
                         networks=None) -> MemoryEstimate:
    """The estimate for running `plan` with `family`'s architecture: the transformer and text encoders in `dtype`
    (T5 as `dit_loading.to_device` casts it), the VAE in `vae_dtype` (None: `dtype`). `cfg`: SD3's CFG batch of 2
    (FLUX has none). `graph_pool`: the stages run as CUDA graphs, whose pool keeps the largest transient captured so
    far under the later segments. `networks`: `meta_networks(family, dtype, vae_dtype)` built once for several
    estimates (None: built here)."""
    nets = networks if networks is not None else meta_networks(family, dtype, vae_dtype)
    nets.forget_position_ids()  # an earlier estimate's, which a fresh run would still have to make
    bundle, meta = nets.bundle, torch.device("meta")
    weights = sum(module_bytes(m) for m in bundle.modules())
    batch = 2 if cfg and family.cfg else 1
    t5_tokens = family.t5_max_length
    text = sd3_text_length(family) if family.kind == "sd3" else t5_tokens
    cfg_t = family.transformer
    channels, vs = family.latent_channels, family.vae_scale

    segments: list[tuple[str, int]] = []
    held: list[int] = []
    pool = 0

    def add(name: str, fn, holds: int) -> None:
        segments.append((name, peak_live_bytes(fn)))
        held.append(holds)

    def encode_prompt():  # one at a time, as the stage loop encodes: each output is small beside the transient
        for i in range(len(family.text_encoders)):
            nets.clip(i, torch.zeros(1, 77, dtype=torch.long, device=meta))
        nets.t5(torch.zeros(1, t5_tokens, dtype=torch.long, device=meta))

    add("text encoders", encode_prompt, 0)
    for k, s in enumerate(plan.stages):
        h, w = s.height // vs, s.width // vs
        if k > 0 and relay == "pixel":
            p = plan.stages[k - 1]
            lat = torch.zeros(1, channels, p.height // vs, p.width // vs, device=meta)
            add(f"relay {k}->{k + 1} decode {p.width}x{p.height}", lambda lat=lat: nets.vae_decode(lat), pool)
            img = torch.zeros(1, 3, s.height, s.width, device=meta)
            add(f"relay {k}->{k + 1} encode {s.width}x{s.height}", lambda img=img: nets.vae_encode(img), pool)
        z = torch.zeros(batch, channels, h, w, device=meta)
        t = torch.full([batch], 999.0, device=meta)
        states = torch.zeros(batch, text, cfg_t["joint_attention_dim"], device=meta)
        pooled = torch.zeros(batch, cfg_t["pooled_projection_dim"], device=meta)
        add(f"stage {k + 1} transformer {s.width}x{s.height}, batch {batch}",
            lambda z=z, t=t, states=states, pooled=pooled: nets.velocity(z, t, states, pooled, 3.5), 0)
        pool = max(pool, segments[-1][1]) if graph_pool else 0
    last = plan.stages[-1]
    lat = torch.zeros(1, channels, last.height // vs, last.width // vs, device=meta)
    add(f"final decode {last.width}x{last.height}", lambda: nets.vae_decode(lat), pool)
    return MemoryEstimate(weights, tuple(segments), tuple(held) if graph_pool else ())
