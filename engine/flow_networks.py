"""The networks of a transformer family (SD3, FLUX) as the flow stage loop calls them; the torch modules.

Every call takes and returns float32 tensors on the runtime's device; the modules run in their own dtype.
Latents stay (B, C, h, w) outside: FLUX's 2x2 packing into tokens (and its position ids) happens here.
"""
from __future__ import annotations

import torch

from ..core.dit_loading import DiTBundle
from .precompiled import Precompiled, call_module, portable_guards, site_counters
from .torch_fast import FastOptions, compile_with

DIT_FAST = FastOptions(channels_last=False, fuse_qkv=False, compile_vae=False, cudnn_benchmark=False)
"""What the compiled path applies to a transformer: torch.compile alone (fullgraph, static shapes). No
channels_last or cuDNN timing (a transformer has no convolution but its patch embedding), no QKV fusion (SD3's
joint blocks and FLUX's single blocks carry added K/V projections that diffusers' fusion does not cover alike)."""


def pack(z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): FLUX's tokens, 2x2 latent cells each (diffusers `_pack_latents`)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack` for a latent of h x w cells."""
    b, _, d = x.shape
    return x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """(h/2 * w/2, 3) FLUX position ids of the image tokens: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FlowTorchNetworks:
    """The PyTorch modules of a `DiTBundle`."""

    def __init__(self, bundle: DiTBundle, vae_dtype: torch.dtype | None = None, compiled: bool = False,
                 options: FastOptions = DIT_FAST):
        """`compiled=True` runs the transformer through torch.compile (`options`), one compile per token grid and
        batch; the VAE and text encoders stay eager. `keep_compiled` then keeps the compiled transformer across
        processes."""
        self.bundle = bundle
        self.capturable = True  # plain torch ops on the current stream
        self.compiled, self.options = compiled, options
        self.kind = bundle.family.kind
        self.transformer_dtype = bundle.transformer.dtype
        if vae_dtype is not None and vae_dtype != bundle.vae.dtype:
            bundle.vae.to(dtype=vae_dtype)
        self.vae_dtype = bundle.vae.dtype
        self.guidance_embeds = bool(getattr(bundle.transformer.config, "guidance_embeds", False))
        self.transformer_fn = bundle.transformer
        if compiled:
            # One compiled entry per stage shape and CFG batch: a 3-stage plan with and without CFG passes the
            # default per-code limit (8), past which a fullgraph compile raises; process-wide, as IF sets it.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.transformer_fn = compile_with(bundle.transformer, options)
        self.precompiled: list[Precompiled] = []
        """The call sites whose compiled functions a compile cache keeps (`keep_compiled`): the transformer's."""
        self._ids: dict[tuple, torch.Tensor] = {}  # FLUX position ids per latent size: no host copy per step

    def keep_compiled(self, folder) -> None:
        """Keep the compiled transformer's functions in `folder` and reuse the ones there (engine/precompiled.py), so
        that a new process traces nothing: its call site becomes a `Precompiled` one, the module an argument of the
        compiled function (its weights graph inputs, no weight in a file). Only the transformer: the VAE runs eagerly
        here, and ControlNets (`controlnet_call`) compile in each process."""
        if not self.compiled:
            raise ValueError("keep_compiled: these networks are not compiled")
        if not self.precompiled:
            site = Precompiled("transformer", call_module, self.bundle.transformer,
                               lambda fn: compile_with(fn, self.options, portable_guards))
            self.precompiled.append(site)
            self.transformer_fn = site
        for site in self.precompiled:
            site.attach(folder)

    def precompile_counters(self) -> dict[str, int]:
        """traced / loaded / saved / rejected of the kept call sites."""
        return site_counters(self.precompiled)

    def compile_identity(self) -> tuple[dict[str, torch.nn.Module], str, str, str]:
        """What the compiled transformer's code depends on besides the plan (engine/compile_cache.py
        `compile_key`): the transformer's and VAE's configs, the dtypes, the options, and the kinds of the
        transformer's layers and attention processors. The saved functions' portable guards do not check module
        classes, and FP8 projections (engine/fp8_dit.py) or an IP-Adapter's processors trace other code under the
        same configs."""
        t = self.bundle.transformer
        kinds = {type(m).__name__ for m in t.modules()}
        kinds |= {type(m.processor).__name__ for m in t.modules() if hasattr(m, "processor")}
        return ({"transformer": t, "vae": self.bundle.vae}, str(self.transformer_dtype), str(self.vae_dtype),
                f"{self.options!r}; layers {','.join(sorted(kinds))}")

    def controlnet_call(self, model: torch.nn.Module):
        """What runs a ControlNet in the velocity step (runtime/flow_controlnet.py): compiled as the transformer is
        when `compiled` (one compile per token grid and batch; eager inside the compiled step otherwise), else the
        module."""
        return compile_with(model, self.options) if self.compiled else model

    @torch.inference_mode()
    def velocity(self, z: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor, pooled: torch.Tensor,
                 guidance: float | torch.Tensor, extra: dict | None = None) -> torch.Tensor:
        """v for the batch z (B, C, h, w) at `timestep` (B,) = 1000 sigma. SD3: the CFG batch as given; FLUX:
        `guidance` goes into the guidance embedding (where the model has one); a 0-dim float32 device tensor
        (the graphed step's) is read on the device, so a captured graph does not bake its value in. `extra`:
        more keyword arguments of the transformer (a ControlNet's block samples, runtime/flow_controlnet.py)."""
        dt = self.transformer_dtype
        extra = extra or {}
        if self.kind == "sd3":
            return self.transformer_fn(hidden_states=z.to(dt), timestep=timestep, encoder_hidden_states=states.to(dt),
                                       pooled_projections=pooled.to(dt), return_dict=False, **extra)[0].float()
        b, _, h, w = z.shape
        g = None
        if self.guidance_embeds:
            g = (guidance.expand(b) if isinstance(guidance, torch.Tensor)
                 else torch.full([b], guidance, device=z.device, dtype=torch.float32))
        out = self.transformer_fn(
            hidden_states=pack(z).to(dt), timestep=timestep.to(dt) / 1000, guidance=g,
            pooled_projections=pooled.to(dt), encoder_hidden_states=states.to(dt),
            txt_ids=self._cached_ids(("txt", states.shape[1]), lambda: torch.zeros(states.shape[1], 3), z.device),
            img_ids=self._cached_ids(("img", h, w), lambda: image_ids(h, w, "cpu", torch.float32), z.device),
            return_dict=False, **extra)[0]
        return unpack(out.float(), h, w)

    def flux_guidance(self, guidance: float | torch.Tensor, batch: int, device) -> torch.Tensor:
        """FLUX's guidance-embedding input (batch,) float32, as `velocity` builds it (a device tensor stays one)."""
        return (guidance.expand(batch) if isinstance(guidance, torch.Tensor)
                else torch.full([batch], guidance, device=device, dtype=torch.float32))

    def flux_ids(self, text_tokens: int, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(txt_ids, img_ids) that `velocity` gives FLUX's transformer for a latent of h x w cells (cached)."""
        return (self._cached_ids(("txt", text_tokens), lambda: torch.zeros(text_tokens, 3), device),
                self._cached_ids(("img", h, w), lambda: image_ids(h, w, "cpu", torch.float32), device))

    def forget_position_ids(self) -> None:
        """Drops the cached FLUX position ids: runtime/flow_memory.py counts them as a fresh run makes them when one
        meta model serves several estimates."""
        self._ids.clear()

    def _cached_ids(self, key: tuple, make, device) -> torch.Tensor:
        key = (*key, str(device), self.transformer_dtype)
        if key not in self._ids:
            self._ids[key] = make().to(device=device, dtype=self.transformer_dtype)
        return self._ids[key]

    @torch.inference_mode()
    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Image in about [-1, 1] from VAE-space latents (already unscaled and unshifted)."""
        return self.bundle.vae.decode(latents.to(self.vae_dtype), return_dict=False)[0].float()

    @torch.inference_mode()
    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        """Posterior mean (VAE space) of images (B, 3, H, W)."""
        return self.bundle.vae.encode(images.to(self.vae_dtype)).latent_dist.mean.float()

    @torch.inference_mode()
    def clip(self, index: int, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP encoder `index`: (penultimate hidden states, pooled embedding: the projection where the encoder
        has one, else the pooler output), as SD3's and FLUX's pipelines read them."""
        enc = self.bundle.text_encoders[index]
        out = enc(input_ids, output_hidden_states=True)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return out.hidden_states[-2].float(), pooled.float()

    @torch.inference_mode()
    def t5(self, input_ids: torch.Tensor) -> torch.Tensor:
        """T5's last hidden states."""
        return self.bundle.text_encoders[-1](input_ids)[0].float()
