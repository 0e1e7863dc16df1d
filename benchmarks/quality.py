"""Image-quality measures for a precision check with real weights (issue #20's FP8 against fp16): CLIP score of
images against their prompts, Fréchet distance between two image sets in CLIP image-feature space (FD-CLIP), and
paired pixel differences. One local CLIP model folder (transformers `CLIPModel` with its tokenizer) serves all of
them; nothing is downloaded. `benchmarks/lab/precision_quality.py` runs the comparison; docs/ENGINES.md ("FP8 with
real weights") says how to read it.

Why CLIP features rather than Inception's for the distance: Inception-v3's weights cannot be fetched here, and
CLIP features rank generators more like people do (Kynkäänniemi et al. 2023, "The Role of ImageNet Classes in
Fréchet Inception Distance"). CLIP score follows torchmetrics' definition: 100 * max(cos(image, text), 0).
"""
from __future__ import annotations

import os

import numpy as np
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""CLIP's image normalization (the OpenAI CLIP preprocessing every released CLIP model was trained with)."""


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2) of Gaussians fitted to the rows of `a` (N, D)
    and `b` (M, D), in float64. tr((C_a C_b)^1/2) is computed as the sum of the square roots of the eigenvalues of the
    symmetric C_a^1/2 C_b C_a^1/2 (clamped at 0: rounding leaves tiny negatives on rank-deficient covariances)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features of shapes {tuple(a.shape)} and {tuple(b.shape)}: need (N, D) and (M, D)")
    if min(a.shape[0], b.shape[0]) < 2:
        raise ValueError("a covariance needs at least 2 images per set")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    c_a, c_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(c_a)
    root_a = (v * w.clamp(min=0).sqrt()) @ v.T
    inner = torch.linalg.eigvalsh(root_a @ c_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + c_a.trace() + c_b.trace() - 2 * inner)


def paired_differences(a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, float]:
    """Pixel differences of image pairs (uint8 HxWx3, same sizes): the largest, the mean, and PSNR in dB over all."""
    if len(a) != len(b) or not a:
        raise ValueError(f"{len(a)} and {len(b)} images: need the same number, at least one")
    diffs = [np.abs(x.astype(np.int16) - y.astype(np.int16)) for x, y in zip(a, b)]
    mse = float(np.mean([np.mean(d.astype(np.float64) ** 2) for d in diffs]))
    return {"max_levels": int(max(int(d.max()) for d in diffs)),
            "mean_levels": float(np.mean([d.mean() for d in diffs])),
            "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))}


def scores_of(image_features: torch.Tensor, text_features: torch.Tensor) -> list[float]:
    """CLIP score of each (image, text) row pair of unit-norm embeddings: 100 * max(cos, 0)."""
    return [float(100 * max(c, 0.0)) for c in (image_features * text_features).sum(-1)]


def _projected(out) -> torch.Tensor:
    """The projected embeddings: transformers 4 returns them, 5 an output whose pooler_output holds them."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipJudge:
    """A local CLIP model: image and text embeddings, CLIP score, FD-CLIP."""

    def __init__(self, folder: str | os.PathLike, device: torch.device | str = "cpu"):
        from transformers import CLIPModel, CLIPTokenizer

        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(self.device).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        self.size = self.model.config.vision_config.image_size

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """CLIP's preprocessing: shorter side resized to the model's size (bicubic), centre crop, normalized."""
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].double() / 255.0
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False,
                                            antialias=True).clamp(0, 1)
        top, left = (nh - self.size) // 2, (nw - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size]
        mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
        return ((x - mean) / std).float()

    @torch.inference_mode()
    def image_features(self, images: list[np.ndarray], batch: int = 16) -> torch.Tensor:
        """Unit-norm image embeddings (N, D), float32 on the CPU."""
        out = []
        for i in range(0, len(images), batch):
            x = torch.cat([self.preprocess(im) for im in images[i:i + batch]]).to(self.device)
            emb = _projected(self.model.get_image_features(pixel_values=x))
            out.append(torch.nn.functional.normalize(emb.float(), dim=-1))
        return torch.cat(out).cpu()

    @torch.inference_mode()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings (N, D), float32 on the CPU."""
        ids = self.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt",
                             max_length=self.model.config.text_config.max_position_embeddings)  # 77 for CLIP
        emb = _projected(self.model.get_text_features(input_ids=ids.input_ids.to(self.device),
                                                      attention_mask=ids.attention_mask.to(self.device)))
        return torch.nn.functional.normalize(emb.float(), dim=-1).cpu()

    def clip_scores(self, images: list[np.ndarray], prompts: list[str]) -> list[float]:
        """100 * max(cos(image, its prompt), 0) per image."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        return scores_of(self.image_features(images), self.text_features(prompts))
