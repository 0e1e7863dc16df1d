"""`mf-generate --model sd3 | flux | tiny-sd3 | tiny-flux`: the flow-matching stage loop (docs/ALGORITHM.md §18).

`generate.run` hands these families here after resolving the family. Every check of the user's input comes
before the model load, as for the UNet families.
"""
from __future__ import annotations

import argparse

from .common import UsageError, finish_generation
from .warm_start import check_compile_cache_flags, finish_compiled, keep_compiled_kernels, warm_start


def _refuse_unsupported(args: argparse.Namespace, family) -> None:
    from ..core.dit_families import no_dilation_why, no_negative_prompt_why

    name = family.name
    if args.dilation is not None:
        raise UsageError(f"--dilation {args.dilation}: {no_dilation_why(family)}, and its attention already spans "
                         "the whole image")
    if family.kind == "flux" and args.negative_prompt:
        raise UsageError(f"--negative-prompt: {no_negative_prompt_why(family)}; --guidance sets its guidance "
                         "embedding")
    if args.inductor is not None:
        raise UsageError(f"--inductor {args.inductor}: not available for {name} yet (its compiled transformer takes "
                         "Inductor's default settings)")
    if args.max_memory is not None:
        beside = [f for f, v in (("--engines", args.engines), ("--controlnet", args.controlnet),
                                 ("--ip-adapter", args.ip_adapter)) if v]
        if beside:
            raise UsageError(f"--max-memory with {beside[0]}: for {name} the memory estimate counts the torch "
                             "transformer, VAE and text encoders only; leave out one or the other")
    if args.engines is not None and args.ip_adapter:
        raise UsageError(f"--ip-adapter with --engines: for {name} the IP-Adapter runs in torch only (the transformer "
                         "packages have no image attention); leave out --engines")
    if args.engines is not None:
        from pathlib import Path

        if not Path(args.engines).is_dir():
            raise UsageError(f"--engines {args.engines!r}: no such folder; build one with mf-build-engines --model "
                             f"{name} --backend aoti|onnxruntime --output DIR")
        if args.mode == "compiled":
            raise UsageError("--mode compiled compiles the torch modules; with --engines use --mode graphs or eager")


def _check_flow_memory(args: argparse.Namespace, family, plan, opts, device, dtype, mode: str,
                       dry_run: bool = False) -> None:
    """The plan's estimated peak (runtime/flow_memory.py) against --max-memory or the device's memory, before the
    load: one line when it does not fit; with --dry-run the estimate is printed instead. Under --max-memory on CUDA
    the allocator and cuDNN's workspaces are capped as for the UNet families."""
    from ..core.memory import GiB
    from ..runtime.flow_memory import estimate_flow_memory
    from .common import DTYPES, apply_memory_cap, memory_budget

    limit, what = memory_budget(args.max_memory, device)
    vae = DTYPES[args.vae_dtype] if args.vae_dtype else None
    estimate = estimate_flow_memory(family, plan, dtype, vae, opts.guidance > 1.0, opts.relay,
                                    graph_pool=mode != "eager")
    if dry_run:
        print("\n".join(estimate.describe()))
        print(f"  limit: {what}, {limit / GiB:.2f} GiB; the estimate leaves out allocator slack, cuDNN workspaces "
              "and compile-time autotuning")
        return
    if estimate.peak_bytes > limit:
        parts = estimate.describe()[0].split(": ", 1)[1]
        raise UsageError(f"plan {plan.describe()} needs an estimated {estimate.peak_bytes / GiB:.1f} GiB ({parts}), "
                         f"more than {what} ({limit / GiB:.2f} GiB); ask for a smaller --size or --relay latent")
    apply_memory_cap(args.max_memory, device)


def _controls_from_args(args: argparse.Namespace, family) -> list[tuple]:
    """cli/conditions.py's checks of --controlnet / --control-* (images read), then each folder's ControlNet class
    against the family: all before the model load."""
    from ..runtime.controlnet import ControlInputError
    from ..runtime.flow_controlnet import check_flow_controlnet_folder
    from .conditions import controls_from_args

    controls = controls_from_args(args)
    try:
        for c in controls:
            check_flow_controlnet_folder(c[0], family)
    except ControlInputError as e:
        raise UsageError(str(e)) from None
    return controls


def _controlled(nets, bundle, controls: list[tuple], device, dtype):
    """`nets` with the ControlNets on their velocity (torch modules, in the transformer's dtype)."""
    from ..runtime.controlnet import Control, ControlInputError
    from ..runtime.flow_controlnet import ControlledFlowNetworks, load_flow_controlnet

    try:
        made = [Control(load_flow_controlnet(path, bundle.transformer, bundle.family, device, dtype), image, scale,
                        start, end) for path, image, scale, start, end in controls]
        return ControlledFlowNetworks(nets, made, device)
    except ControlInputError as e:
        raise UsageError(str(e)) from None


def _ip_adapter_embeds(args: argparse.Namespace, bundle, ip_image, device, dtype):
    """FLUX's IP-Adapter put into the transformer (checked against it first) and the reference image's
    embeddings; one line naming a bad file."""
    from ..runtime.flow_ipadapter import load_flux_ip_adapter, read_flux_ip_adapter
    from ..runtime.ipadapter import IPAdapterError, encode_ip_image, load_image_encoder

    if bundle.family.kind == "sd3":
        return _sd3_ip_adapter_embeds(args, bundle, ip_image, device, dtype)
    try:
        state = read_flux_ip_adapter(args.ip_adapter, bundle.transformer)
        encoder, processor = load_image_encoder(args.ip_adapter_encoder, device, dtype)
    except IPAdapterError as e:
        raise UsageError(str(e)) from None
    load_flux_ip_adapter(bundle.transformer, state, args.ip_adapter_scale)
    embeds = encode_ip_image(encoder, processor, ip_image, device)
    encoder.to(device="meta")  # done with it
    return embeds


def _sd3_ip_adapter_embeds(args: argparse.Namespace, bundle, ip_image, device, dtype):
    """SD3's IP-Adapter put into the transformer and the reference image's SigLIP features (runtime/
    flow_ipadapter_sd3.py); the transformer projects them at each step's timestep."""
    from ..runtime.flow_ipadapter_sd3 import (encode_sd3_ip_image, load_sd3_ip_adapter, load_siglip_encoder,
                                              read_sd3_ip_adapter)
    from ..runtime.ipadapter import IPAdapterError

    try:
        state = read_sd3_ip_adapter(args.ip_adapter, bundle.transformer)
        encoder, processor = load_siglip_encoder(args.ip_adapter_encoder, device, dtype)
        load_sd3_ip_adapter(bundle.transformer, state, args.ip_adapter_scale, f"--ip-adapter {args.ip_adapter!r}")
    except IPAdapterError as e:
        raise UsageError(str(e)) from None
    embeds = encode_sd3_ip_image(encoder, processor, ip_image, device)
    encoder.to(device="meta")  # done with it
    return embeds


def _check_sd3_ip_adapter(args: argparse.Namespace) -> None:
    """An SD3 IP-Adapter file and a SigLIP encoder folder, by their names and config only: before the model load."""
    from ..runtime.flow_ipadapter_sd3 import check_sd3_ip_adapter_file, check_siglip_folder
    from ..runtime.ipadapter import IPAdapterError

    try:
        check_sd3_ip_adapter_file(args.ip_adapter)
        check_siglip_folder(args.ip_adapter_encoder)
    except IPAdapterError as e:
        raise UsageError(str(e)) from None


def run_flow(args: argparse.Namespace, family) -> int:
    import torch

    from ..core.loading import load_model
    from ..runtime.flow_pipeline import FlowGenerationOptions, FlowMegaFusionPipeline
    from .common import (DTYPES, generate_with_progress, mode_from_args, output_file_from_args, parse_guidance,
                         parse_seed, plan_from_args, resolve_device, warn_truncated_prompts, weights_seed_from_args)

    _refuse_unsupported(args, family)
    check_compile_cache_flags(args)
    controls = _controls_from_args(args, family)
    from .conditions import ip_adapter_from_args

    ip_image = ip_adapter_from_args(args)  # files checked before the load
    if ip_image is not None and family.kind == "sd3":
        _check_sd3_ip_adapter(args)
    weights_seed = weights_seed_from_args("mf-generate", family, args)
    guidance = parse_guidance(args.guidance if args.guidance is not None else str(family.default_guidance))
    seed = parse_seed(args.seed)
    plan = plan_from_args(family, args.size, args.stages, args.steps)
    from ..runtime.flow_img2img import flow_entry_point
    from .conditions import image_start_from_args, loras_from_args

    image_start = image_start_from_args(args, plan, flow_entry_point)  # reads the photo, before the load
    loras = loras_from_args(args.lora)
    if loras:  # another family's LoRA is refused before the load; layers and shapes once the model is there
        from ..core.dit_lora import check_dit_lora_file
        from ..core.lora import LoraError

        try:
            for spec in loras:
                check_dit_lora_file(spec, family)
        except LoraError as e:
            raise UsageError(str(e)) from None
    try:
        opts = FlowGenerationOptions(args.prompt, args.negative_prompt, guidance, seed, not args.no_reschedule,
                                     args.relay)
    except ValueError as e:
        raise UsageError(str(e)) from None
    out = output_file_from_args("--output", args.output)
    device = resolve_device(args.device)
    mode = mode_from_args(args.mode, device)
    # bf16 on CUDA: SD3.5 and FLUX ship in bf16, and T5 overflows fp16's range (T5 v1.1 was trained in bf16).
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.precision == "fp8":
        from .common import fp8_dtype_from_args

        dtype = fp8_dtype_from_args(device, args.dtype, args.engines)
    keep_compiled_kernels(args, mode)  # before the memory estimate's and the load's imports fix Inductor's cache folder
    kind = None
    if args.engines and controls:  # ControlNet packages (aoti) for every stage shape, before the model load
        from .flow_controlnet_engines import check_controlled_engines

        check_controlled_engines(args, family, plan, device, next(k for k, v in DTYPES.items() if v == dtype),
                                 2 if family.cfg and guidance > 1.0 else 1, weights_seed, loras)
    elif args.engines:  # the folder serves every stage shape, before the model load
        from ..engine.backend import get_backend
        from ..engine.cache import EngineError
        from ..engine.dit_engines import choose_dit_engines

        try:
            kind, why = choose_dit_engines(args.engines, family, plan, device,
                                           next(k for k, v in DTYPES.items() if v == dtype),
                                           2 if family.cfg and guidance > 1.0 else 1, mode == "graphs")
        except EngineError as e:
            raise UsageError(str(e)) from None
        if why:
            print(why)
        if loras and not kind.takes_lora:
            raise UsageError(f"--lora with --engines: {kind.backend} transformer engines take no LoRA yet; build aoti "
                             f"packages (mf-build-engines --model {family.name} --backend aoti ...) and use those")
        note = get_backend(kind.backend).capture_note  # declared by the backend, never assumed
        if mode == "graphs" and note:
            why = f"{kind.backend} engines cannot run inside the runtime's CUDA graphs: {note}"
            if args.mode:
                raise UsageError(f"--mode {mode}: {why}; use --mode eager")
            print(f"{why}; running the stages eagerly")
            mode = "eager"
    counted = not (args.engines or controls or ip_image is not None)  # what the memory estimate covers
    if args.dry_run:
        print(f"plan: {plan.describe()}")
        if counted:
            _check_flow_memory(args, family, plan, opts, device, dtype, mode, dry_run=True)
        from ..benchmarks.dit_flops import DiTCostCounter, dit_plan_cost

        cost = dit_plan_cost(DiTCostCounter(family), plan, opts.guidance > 1.0 and family.cfg, opts.relay)
        print(f"cost: {cost.true_tflop:,.1f} TFLOP (transformer {cost.unet_tflop:,.1f}), text encoders apart")
        return 0
    if counted:
        _check_flow_memory(args, family, plan, opts, device, dtype, mode)
    bundle = load_model(args.model, args.model_path, args.random_weights, args.allow_pickle, device, dtype,
                        seed=weights_seed)
    if loras:
        from ..core.lora import LoraError, check_loras, fuse_loras

        try:  # checked against the model before anything runs; with --engines, engine_networks fuses or swaps them
            check_loras(bundle, loras) if args.engines and not controls else fuse_loras(bundle, loras)
        except LoraError as e:
            raise UsageError(str(e)) from None
        print("lora: " + ", ".join(f"{spec.path} x{spec.scale:g}" for spec in loras))
    warn_truncated_prompts("mf-generate", bundle.tokenizers[:-1], {"--prompt": args.prompt,
                                                                   "--negative-prompt": args.negative_prompt})
    from ..engine.flow_networks import FlowTorchNetworks

    if args.precision == "fp8":  # after a LoRA's fuse (which reads float weights), before compile or capture
        from ..engine.fp8_dit import quantize_transformer

        n = len(quantize_transformer(bundle.transformer))
        print(f"precision fp8: {n} transformer projections as FP8 (e4m3) GEMMs, the rest bf16")
    ip_embeds = None if ip_image is None else _ip_adapter_embeds(args, bundle, ip_image, device, dtype)
    vae_dtype = DTYPES[args.vae_dtype] if args.vae_dtype else None
    if kind is not None:
        from ..engine.cache import EngineError

        precision = next(k for k, v in DTYPES.items() if v == dtype)
        try:  # the engines' precision is the model's dtype (they were built from it, as loaded here)
            nets = kind.networks(bundle, args.engines, device, precision, vae_dtype, loras)
        except EngineError as e:
            raise UsageError(str(e)) from None
        print(f"transformer from the {kind.backend} {kind.what} in {args.engines} ({precision})")
    else:
        nets = FlowTorchNetworks(bundle, vae_dtype, compiled=mode == "compiled")
    compiled_nets, compile_cache = nets, None  # before conditions wrap them: their call sites and counters
    if mode == "compiled":
        compile_cache = warm_start(args, nets, device, plan, opts.relay, family.cfg and guidance > 1.0)
    if ip_embeds is not None and family.kind == "sd3":
        from ..runtime.flow_ipadapter_sd3 import SD3IPAdapterNetworks

        nets = SD3IPAdapterNetworks(nets, ip_embeds)
        print(f"ip-adapter: {args.ip_adapter} (scale {args.ip_adapter_scale:g}) in torch")
    elif ip_embeds is not None:
        from ..runtime.flow_ipadapter import FlowIPAdapterNetworks

        nets = FlowIPAdapterNetworks(nets, ip_embeds)
        print(f"ip-adapter: {args.ip_adapter} (scale {args.ip_adapter_scale:g}) in torch")
    if controls and args.engines:  # ControlNets and the controlled transformer from the aoti packages
        from .flow_controlnet_engines import controlled_engine_networks

        precision = next(k for k, v in DTYPES.items() if v == dtype)
        nets = controlled_engine_networks(args, nets, bundle, controls, plan, device, dtype, precision,
                                          2 if family.cfg and guidance > 1.0 else 1)
        print(f"controlnet: {len(controls)} from the aoti packages in {args.engines} ({precision}), "
              f"{', '.join(c[0] for c in controls)}")
    elif controls:
        nets = _controlled(nets, bundle, controls, device, nets.transformer_dtype)
        print(f"controlnet: {len(controls)} in torch, {', '.join(c[0] for c in controls)}")
    pipe = FlowMegaFusionPipeline(bundle, nets, device, mode)
    print(f"mode {mode}" + (" (the first run compiles: minutes on real-size models)" if mode == "compiled" else ""))
    print(f"model {family.name} ({bundle.source}) on {device}, transformer "
          f"{str(nets.transformer_dtype).removeprefix('torch.')}, VAE {str(nets.vae_dtype).removeprefix('torch.')}")
    print(f"plan: {plan.describe()}")
    skipped = flow_entry_point(plan, image_start.strength, image_start.start_stage).global_step if image_start else 0
    result = generate_with_progress(pipe, plan, opts, plan.total_steps - skipped, image_start, not args.no_progress)
    if mode == "compiled":
        finish_compiled(compiled_nets, compile_cache)
    finish_generation(result, out, segments_printed=not args.no_progress)
    return 0
