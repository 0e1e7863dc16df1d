"""What SD3's IP-Adapter costs through the relay, eager against graphs, one GPU (issue #18).

python benchmarks/lab/dit_ipadapter_bench.py --model sd3 --output DIR [--steps 6,3] [--repeats 2]

Random weights at the real sizes (nothing is downloaded): the family's transformer, and an SD3 IP-Adapter of
InstantX's published shapes (IPAdapterTimeImageProjection: SigLIP so400m's 1152 features in, 1280 hidden, 20
heads, 64 queries, 320 timestep channels; one image attention per transformer layer), built with diffusers' own
modules at the transformer's width and loaded through `load_sd3_ip_adapter`. The reference image is stood for by
random features of SigLIP so400m-patch14-384's shape (729 tokens): the encoder runs once per image, outside the
steps. Plan: native x S1 -> 2x native x S2. For each mode (eager, graphs) runs the plan without and with the
adapter (scale 0.7), same prompt and seed, and writes dit_ipadapter_<model>.json: per-segment medians, totals,
the adapter's per-step overhead per stage and the graphs-vs-eager latent difference with the adapter.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from megafusion.core.loading import load_model
from megafusion.core.plan import Stage, validate_plan
from megafusion.engine.flow_networks import FlowTorchNetworks
from megafusion.runtime.flow_ipadapter_sd3 import SD3IPAdapterNetworks, load_sd3_ip_adapter
from megafusion.runtime.flow_pipeline import FlowGenerationOptions, FlowMegaFusionPipeline

PROMPT = "a lighthouse on a rocky coast at dawn, highly detailed"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SIGLIP_TOKENS, SIGLIP_DIM = 729, 1152  # google/siglip-so400m-patch14-384, the encoder InstantX's adapter names


def real_size_sd3_ip_adapter(transformer, seed: int = 0, tiny: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """{"image_proj": ..., "ip_adapter": ...} of InstantX's shapes at this transformer's width, random weights
    (the norms near 1, everything else small), as `read_sd3_ip_adapter` returns a file's."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection

    cfg = transformer.config
    width = cfg.num_attention_heads * cfg.attention_head_dim
    hidden, heads, queries, t_in = (64, 1, 4, 32) if tiny else (1280, 20, 64, 320)
    embed = 32 if tiny else SIGLIP_DIM
    proj = IPAdapterTimeImageProjection(embed_dim=embed, output_dim=width, hidden_dim=hidden, heads=heads,
                                        num_queries=queries, timestep_in_dim=t_in)
    out = {"image_proj": dict(proj.state_dict()), "ip_adapter": {}}
    for i in range(len(transformer.attn_processors)):
        proc = SD3IPAdapterJointAttnProcessor2_0(hidden_size=width, ip_hidden_states_dim=width,
                                                 head_dim=cfg.attention_head_dim, timesteps_emb_dim=hidden)
        out["ip_adapter"].update({f"{i}.{k}": v for k, v in proc.state_dict().items()})
    g = torch.Generator().manual_seed(seed)
    for part in out.values():
        for k, v in part.items():
            module = k.split(".")[-2] if "." in k else ""
            base = 1.0 if k.endswith(".weight") and ("norm" in module or module.startswith("ln")) else 0.0
            part[k] = base + torch.randn(v.shape, generator=g) * 0.02
    return out


def timed(pipe, plan, opts, repeats: int) -> dict:
    pipe.generate(plan, opts)  # warm-up (and the graphs' capture)
    runs = [pipe.generate(plan, opts) for _ in range(repeats)]
    segs = {name: statistics.median(dict(r.timings)[name] for r in runs) for name, _ in runs[0].timings}
    return {"segments_s": segs, "total_s": statistics.median(sum(s for _, s in r.timings) for r in runs),
            "peak_gib": runs[-1].peak_memory_bytes / 2**30 if runs[-1].peak_memory_bytes else None,
            "latent": runs[-1].latent}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, choices=["sd3", "tiny-sd3"])
    p.add_argument("--output", required=True)
    p.add_argument("--steps", default="6,3", help="steps of the native and the 2x stage (default %(default)s)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    s1, s2 = (int(s) for s in args.steps.split(","))
    dev, dtype = torch.device(args.device), DTYPES[args.dtype]
    bundle = load_model(args.model, random_weights=True, device=dev, dtype=dtype)
    fam = bundle.family
    h, w = fam.native_height, fam.native_width
    plan = validate_plan(fam, [Stage(h, w, s1), Stage(2 * h, 2 * w, s2)])
    tiny = args.model.startswith("tiny")
    state = real_size_sd3_ip_adapter(bundle.transformer, tiny=tiny)
    params = sum(t.numel() for part in state.values() for t in part.values())
    load_sd3_ip_adapter(bundle.transformer, state, 0.7)
    g = torch.Generator().manual_seed(1)
    features = torch.randn((1, 16 if tiny else SIGLIP_TOKENS, 32 if tiny else SIGLIP_DIM), generator=g)
    opts = FlowGenerationOptions(PROMPT, guidance=fam.default_guidance, seed=1)
    report = {"model": args.model, "dtype": args.dtype, "plan": plan.describe(), "ip_adapter_params_m": params / 1e6,
              "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "modes": {}}
    latents = {}
    for mode in ("eager", "graphs") if dev.type == "cuda" else ("eager",):
        for label in ("plain", "ip_adapter"):
            nets = FlowTorchNetworks(bundle)  # without features the IP processors skip the image attention
            if label == "ip_adapter":
                nets = SD3IPAdapterNetworks(nets, features)
            r = timed(FlowMegaFusionPipeline(bundle, nets, dev, mode), plan, opts, args.repeats)
            latents[(mode, label)] = r.pop("latent")
            report["modes"][f"{mode}/{label}"] = r
            print(f"{mode:7} {label:10} total {r['total_s']:.2f} s  " +
                  "  ".join(f"{k} {v * 1000:.0f} ms" for k, v in r["segments_s"].items()), flush=True)
        per_step = {}
        for k, stage in enumerate(plan.stages):
            name = f"stage {k + 1} ({stage.width}x{stage.height}, {stage.steps} steps)"
            a = report["modes"][f"{mode}/plain"]["segments_s"][name]
            b = report["modes"][f"{mode}/ip_adapter"]["segments_s"][name]
            per_step[name] = {"plain_ms": 1000 * a / stage.steps, "ip_adapter_ms": 1000 * b / stage.steps,
                              "overhead": b / a - 1}
        report["modes"][f"{mode}/per_step"] = per_step
        print(json.dumps(per_step, indent=1), flush=True)
    a, b = latents[("eager", "ip_adapter")].float(), latents[("eager", "plain")].float()
    report["ip_vs_plain_rel"] = float((a - b).norm() / b.norm())  # the adapter acts
    if ("graphs", "ip_adapter") in latents:
        a, b = latents[("graphs", "ip_adapter")].float(), latents[("eager", "ip_adapter")].float()
        report["graphs_vs_eager_rel"] = float((a - b).norm() / b.norm())
        print(f"graphs vs eager (ip-adapter): {report['graphs_vs_eager_rel']:.2e} relative", flush=True)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"dit_ipadapter_{args.model}.json").write_text(json.dumps(report, indent=1))
    print(f"ip-adapter vs plain: {report['ip_vs_plain_rel']:.2e} relative; wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
