"""ctypes binding of libmegafusion's C API for the SD3 / FLUX tests (tests/cpp/test_libmegafusion_flow.py,
test_libmegafusion_flow_img2img.py): the context, the params, the token setters, the photo and ControlNet setters;
IP-Adapter embeddings or image, and an image's embeddings; the progress callback; one generation into an RGB array,
or (status, message); the CUDA graph switch and counters."""
from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path

import numpy as np


class Options(ctypes.Structure):
    _fields_ = [("engine_dir", ctypes.c_char_p), ("model", ctypes.c_char_p), ("device", ctypes.c_char_p),
                ("verify_hashes", ctypes.c_int)]


class Params(ctypes.Structure):
    _fields_ = [("prompt_ids", ctypes.POINTER(ctypes.c_int32) * 2), ("negative_ids", ctypes.POINTER(ctypes.c_int32) * 2),
                ("width", ctypes.c_int), ("height", ctypes.c_int), ("stages", ctypes.c_char_p),
                ("total_steps", ctypes.c_int), ("seed", ctypes.c_uint64), ("guidance", ctypes.c_float),
                ("reschedule", ctypes.c_int), ("dilation", ctypes.c_int), ("relay", ctypes.c_char_p)]


PROGRESS_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int)
"""mf_progress_fn: (user, step, total) -> nonzero to stop."""


def ids_text(tokens: dict[str, list[int]], negative: dict[str, list[int]] | None = None) -> str:
    """The ids file cpp/tests/flow_run.c reads: one line per encoder, "prompt|negative ENCODER id id ..."."""
    return "".join(f"{which} {enc} {' '.join(map(str, ids))}\n"
                   for which, given in (("prompt", tokens), ("negative", negative or {})) for enc, ids in given.items())


def _pixels(image: np.ndarray) -> tuple:
    """(pointer, width, height) of an (H, W, 3) uint8 image; the pointer keeps the array alive."""
    px = np.ascontiguousarray(image, dtype=np.uint8)
    return px.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), px.shape[1], px.shape[0]


class Library:
    def __init__(self, path: Path):
        self.lib = lib = ctypes.CDLL(str(path))
        lib.mf_last_error.restype = ctypes.c_char_p
        lib.mf_context_create.argtypes = [ctypes.POINTER(Options), ctypes.POINTER(ctypes.c_void_p)]
        lib.mf_context_destroy.argtypes = [ctypes.c_void_p]
        lib.mf_num_text_encoders.argtypes = [ctypes.c_void_p]
        lib.mf_generate_params_init.argtypes = [ctypes.POINTER(Params)]
        lib.mf_inputs_create.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        lib.mf_inputs_destroy.argtypes = [ctypes.c_void_p]
        for f in (lib.mf_inputs_set_tokens, lib.mf_inputs_set_negative_tokens):
            f.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int32), ctypes.c_size_t]
        lib.mf_inputs_set_init_image.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint8), ctypes.c_int,
                                                 ctypes.c_int, ctypes.c_float, ctypes.c_int]
        lib.mf_inputs_add_control.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint8),
                                              ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_float,
                                              ctypes.c_float]
        lib.mf_inputs_set_ip_adapter_embeds.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_float),
                                                        ctypes.c_size_t]
        lib.mf_inputs_set_ip_adapter_image.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint8), ctypes.c_int,
                                                       ctypes.c_int]
        lib.mf_ip_adapter_image_embeds.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint8), ctypes.c_int,
                                                   ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t]
        lib.mf_inputs_set_progress.argtypes = [ctypes.c_void_p, PROGRESS_FN, ctypes.c_void_p]
        lib.mf_generate_with.argtypes = [ctypes.c_void_p, ctypes.POINTER(Params), ctypes.c_void_p,
                                         ctypes.POINTER(ctypes.c_uint8), ctypes.c_size_t]
        lib.mf_output_size.argtypes = [ctypes.c_void_p, ctypes.POINTER(Params), ctypes.POINTER(ctypes.c_int),
                                       ctypes.POINTER(ctypes.c_int)]
        lib.mf_set_cuda_graphs.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.mf_graph_counters.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64),
                                          ctypes.POINTER(ctypes.c_uint64)]

    def error(self) -> str:
        return self.lib.mf_last_error().decode()

    def set_graphs(self, ctx, on: bool) -> None:
        assert self.lib.mf_set_cuda_graphs(ctx, int(on)) == 0, self.error()

    def counters(self, ctx) -> tuple[int, int]:
        """(graphs captured, replays) since the context was created."""
        captures, replays = ctypes.c_uint64(), ctypes.c_uint64()
        assert self.lib.mf_graph_counters(ctx, ctypes.byref(captures), ctypes.byref(replays)) == 0, self.error()
        return captures.value, replays.value

    def image_embeds(self, ctx, image: np.ndarray, n: int) -> tuple[int, np.ndarray | str]:
        """mf_ip_adapter_image_embeds: (0, n float32 embeddings) or (status, message)."""
        out = np.zeros(n, dtype=np.float32)
        ptr = out.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        rc = self.lib.mf_ip_adapter_image_embeds(ctx, *_pixels(image), ptr, n)
        return rc, (out if rc == 0 else self.error())

    def open(self, engines: Path, model: str, device: str = "cpu") -> tuple[int, ctypes.c_void_p]:
        ctx = ctypes.c_void_p()
        opts = Options(str(engines).encode(), model.encode(), device.encode(), 0)
        return self.lib.mf_context_create(ctypes.byref(opts), ctypes.byref(ctx)), ctx

    def generate(self, ctx, stages: str, seed: int, guidance: float, tokens: dict[str, list[int]],
                 negative: dict[str, list[int]] | None = None, relay: str = "pixel",
                 init: tuple[np.ndarray, float, int] | None = None,
                 controls: tuple[tuple[str, np.ndarray, float, float, float], ...] = (),
                 ip_embeds: np.ndarray | None = None, ip_image: np.ndarray | None = None,
                 progress: Callable[[int, int], int] | None = None, **fields) -> tuple[int, np.ndarray | str]:
        """`init`: (photo (H, W, 3) uint8, strength, start_stage); `controls`: (name, image, scale, start, end);
        `ip_embeds`: IP-Adapter image embeddings (float32); `ip_image`: the IP-Adapter image, (H, W, 3) uint8;
        `progress(step, total)`: the progress callback (nonzero stops the generation)."""
        p = Params()
        self.lib.mf_generate_params_init(ctypes.byref(p))
        p.stages, p.seed, p.guidance, p.relay = stages.encode(), seed, guidance, relay.encode()
        for k, v in fields.items():
            setattr(p, k, v)
        inputs = ctypes.c_void_p()
        assert self.lib.mf_inputs_create(ctypes.byref(inputs)) == 0
        try:
            for setter, given in ((self.lib.mf_inputs_set_tokens, tokens),
                                  (self.lib.mf_inputs_set_negative_tokens, negative or {})):
                for enc, ids in given.items():
                    arr = (ctypes.c_int32 * len(ids))(*ids)
                    rc = setter(inputs, enc.encode(), arr, len(ids))
                    if rc != 0:
                        return rc, self.error()
            if init is not None:
                rc = self.lib.mf_inputs_set_init_image(inputs, *_pixels(init[0]), init[1], init[2])
                if rc != 0:
                    return rc, self.error()
            for name, image, scale, start, end in controls:
                rc = self.lib.mf_inputs_add_control(inputs, name.encode(), *_pixels(image), scale, start, end)
                if rc != 0:
                    return rc, self.error()
            if ip_embeds is not None:
                e = np.ascontiguousarray(ip_embeds, dtype=np.float32)
                rc = self.lib.mf_inputs_set_ip_adapter_embeds(inputs, e.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                                              e.size)
                if rc != 0:
                    return rc, self.error()
            if ip_image is not None:
                rc = self.lib.mf_inputs_set_ip_adapter_image(inputs, *_pixels(ip_image))
                if rc != 0:
                    return rc, self.error()
            callback = PROGRESS_FN(lambda user, step, total: progress(step, total)) if progress else None
            if callback is not None:
                rc = self.lib.mf_inputs_set_progress(inputs, callback, None)
                if rc != 0:
                    return rc, self.error()
            w, h = ctypes.c_int(), ctypes.c_int()
            rc = self.lib.mf_output_size(ctx, ctypes.byref(p), ctypes.byref(w), ctypes.byref(h))
            if rc != 0:
                return rc, self.error()
            out = np.zeros((h.value, w.value, 3), dtype=np.uint8)
            rc = self.lib.mf_generate_with(ctx, ctypes.byref(p), inputs,
                                           out.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), out.nbytes)
            return rc, (out if rc == 0 else self.error())
        finally:
            self.lib.mf_inputs_destroy(inputs)
