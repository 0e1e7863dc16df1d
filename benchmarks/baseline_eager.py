"""MegaFusion written the way a diffusers user would write it: the modules called eagerly, no graphs.

Self-contained on purpose (it imports nothing from the runtime or engine): the diffusers modules, one
`DDIMScheduler` per stage whose `alphas_cumprod` is re-scheduled, `step()` for the update and its
`pred_original_sample` for the truncation x0, `add_noise` for the relay's re-noising, latents in the
UNet's dtype as diffusers' pipelines keep them. It computes the same function as the engine (docs/ALGORITHM.md §1-10),
which the tests check, so that timing one against the other is fair.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class EagerOutput:
    """One eager generation."""

    image: np.ndarray
    """(H, W, 3) uint8 at the plan's output size."""
    latent: torch.Tensor
    """The final latent, float32."""
    timings: list[tuple[str, float]] = field(default_factory=list)
    """(segment, seconds), named as the engine names them."""


def _encode_prompt(bundle, prompt: str, negative: str, cfg: bool, device):
    """(prompt embeds, pooled or None) with the CFG batch [uncond, cond], as diffusers' pipelines do."""
    xl = bundle.family.is_xl

    def run(text):
        states, pooled = [], None
        for tok, enc in zip(bundle.tokenizers, bundle.text_encoders):
            ids = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(device)
            if not xl:
                states.append(enc(ids)[0])
                continue
            out = enc(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0] if out[0].ndim == 2 else pooled
        return torch.cat(states, dim=-1), pooled

    embeds, pooled = run(prompt)
    if not cfg:
        return embeds, pooled
    if xl and negative == "":  # force_zeros_for_empty_prompt
        neg, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    else:
        neg, neg_pooled = run(negative)
    return torch.cat([neg, embeds]), (None if pooled is None else torch.cat([neg_pooled, pooled]))


def _stage_scheduler(config: dict, total_steps: int, gamma: float, device):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(config)
    sched.set_timesteps(total_steps, device=device)
    abar = sched.alphas_cumprod.double()
    # Noise re-scheduling: SNR / gamma on every coefficient, the final "previous" abar included.
    sched.alphas_cumprod = (abar / (gamma - (gamma - 1.0) * abar)).float()
    fin = torch.tensor(float(sched.final_alpha_cumprod), dtype=torch.float64)
    sched.final_alpha_cumprod = (fin / (gamma - (gamma - 1.0) * fin)).float()
    return sched


def _set_mid_dilation(unet, delta: int) -> None:
    for resnet in unet.mid_block.resnets:
        for conv in (resnet.conv1, resnet.conv2):
            conv.dilation, conv.padding = (delta, delta), (delta, delta)


@torch.inference_mode()
def megafusion_eager(bundle, plan, prompt: str, negative_prompt: str = "", guidance: float = 7.0,
                     seed: int = 0, reschedule: bool = True, dilation: int = 2) -> EagerOutput:
    """Runs `plan` (a StagePlan) with the bundle's modules, stage by stage, truncate and relay between."""
    unet, vae, fam = bundle.unet, bundle.vae, bundle.family
    device, dtype, vae_dtype = unet.device, unet.dtype, vae.dtype
    sf, vs = float(vae.config.scaling_factor), fam.vae_scale
    timings: list[tuple[str, float]] = []
    t0 = [time.perf_counter()]

    def mark(name):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        timings.append((name, now - t0[0]))
        t0[0] = now

    cfg = guidance > 1.0
    embeds, pooled = _encode_prompt(bundle, prompt, negative_prompt, cfg, device)
    embeds = embeds.to(dtype)
    generator = torch.Generator("cpu").manual_seed(seed)
    mark("text encoders")

    start, last = 0, len(plan.stages) - 1
    latents = x0 = None
    for k, st in enumerate(plan.stages):
        gamma = st.pixels / plan.stages[0].pixels if (reschedule and k > 0) else 1.0
        sched = _stage_scheduler(fam.scheduler, plan.total_steps, gamma, device)
        timesteps = sched.timesteps[start:start + st.steps]
        start += st.steps
        shape = (1, 4, st.height // vs, st.width // vs)
        noise = torch.randn(shape, generator=generator, dtype=dtype).to(device)
        if k == 0:
            latents = noise * sched.init_noise_sigma
        else:
            image = vae.decode(x0.to(vae_dtype) / sf).sample.clamp(-1, 1)
            image = F.interpolate(image.float(), size=(st.height, st.width), mode="bicubic",
                                  align_corners=False).clamp(-1, 1)
            x0_up = vae.encode(image.to(vae_dtype)).latent_dist.mean * sf
            latents = sched.add_noise(x0_up.to(dtype), noise, timesteps[:1])
            mark(f"relay {k}->{k + 1}")
        _set_mid_dilation(unet, 1 if k == 0 else dilation)
        added = None
        if pooled is not None:
            ids = torch.tensor([[st.height, st.width, 0, 0, st.height, st.width]], device=device, dtype=dtype)
            added = {"text_embeds": pooled.to(dtype), "time_ids": ids.repeat(embeds.shape[0], 1)}
        for i, t in enumerate(timesteps):
            model_in = torch.cat([latents] * 2) if cfg else latents
            model_in = sched.scale_model_input(model_in, t)
            eps = unet(model_in, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
            if cfg:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            out = sched.step(eps, t, latents, eta=0.0)
            if k < last and i == st.steps - 1:
                x0 = out.pred_original_sample  # truncate: x0 of the pre-update latent (paper Eq. 2)
                break
            latents = out.prev_sample
        mark(f"stage {k + 1} ({st.width}x{st.height}, {st.steps} steps)")
    _set_mid_dilation(unet, 1)

    image = vae.decode(latents.to(vae_dtype) / sf).sample
    pixels = ((image[0].float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
    top, left = (pixels.shape[0] - plan.output_height) // 2, (pixels.shape[1] - plan.output_width) // 2
    pixels = pixels[top:top + plan.output_height, left:left + plan.output_width].cpu().numpy()
    mark("decode")
    return EagerOutput(np.ascontiguousarray(pixels), latents.float(), timings)
