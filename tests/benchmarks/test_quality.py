"""benchmarks/quality.py: the Fréchet distance against its closed form and scipy's matrix square root, paired pixel
differences, and the CLIP judge on a tiny random CLIPModel saved to a folder (its CLIP score against the model's
own logits, CLIP's normalization on a flat image)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megafusion.benchmarks.quality import CLIP_MEAN, CLIP_STD, ClipJudge, frechet_distance, paired_differences


def test_frechet_distance_of_diagonal_gaussians_has_its_closed_form():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4000, 3, generator=g, dtype=torch.float64), torch.randn(5000, 3, generator=g, dtype=torch.float64)
    a = a * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64) + torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64)
    b = b * torch.tensor([1.5, 1.0, 0.5], dtype=torch.float64)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    ma, mb = a.mean(0), b.mean(0)
    # the sample covariances are nearly diagonal; the closed form is computed on their exact values via scipy
    scipy_linalg = pytest.importorskip("scipy.linalg")
    root = scipy_linalg.sqrtm(ca.numpy() @ cb.numpy()).real
    want = float((ma - mb).square().sum() + ca.trace() + cb.trace() - 2 * np.trace(root))
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-9, abs=1e-9)
    diag = float((ma - mb).square().sum() + sum(float(x + y - 2 * (x * y).sqrt()) for x, y in zip(ca.diag(), cb.diag())))
    assert frechet_distance(a, b) == pytest.approx(diag, rel=0.02)  # off-diagonals are sampling noise
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_refusals():
    with pytest.raises(ValueError, match="need \\(N, D\\) and \\(M, D\\)"):
        frechet_distance(torch.zeros(3, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="at least 2 images"):
        frechet_distance(torch.zeros(1, 2), torch.zeros(3, 2))


def test_paired_differences():
    a = [np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 10, np.uint8)]
    b = [np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 13, np.uint8)]
    got = paired_differences(a, b)
    assert got["max_levels"] == 3 and got["mean_levels"] == pytest.approx(1.5)
    assert got["psnr_db"] == pytest.approx(10 * np.log10(255 ** 2 / 4.5))
    assert paired_differences(a, a)["psnr_db"] == float("inf")


def save_tiny_clip(folder) -> None:
    """A random CLIPModel of a few thousand parameters per layer, with the package's tiny CLIP tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    from megafusion.core.loading import builtin_tokenizer

    tok = builtin_tokenizer(77)
    torch.manual_seed(0)
    ids = tok.convert_tokens_to_ids([tok.bos_token, tok.eos_token])  # the text model pools at the end token
    cfg = CLIPConfig(text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64,
                                  "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77,
                                  "bos_token_id": ids[0], "eos_token_id": ids[1], "pad_token_id": ids[1]},
                     vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                    "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                     projection_dim=16)
    CLIPModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    save_tiny_clip(folder)
    return ClipJudge(folder)


def test_preprocess_normalizes_as_clip(judge):
    x = judge.preprocess(np.full((48, 64, 3), 128, np.uint8))
    assert x.shape == (1, 3, 32, 32)
    want = (128 / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(x[0, :, 5, 7], want.float(), rtol=1e-5, atol=1e-5)


def test_clip_score_is_the_models_own_cosine(judge):
    g = np.random.default_rng(1)
    images = [g.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(3)]
    prompts = ["a red cube", "a blue sphere", "a green cone"]
    got = judge.clip_scores(images, prompts)
    pixels = torch.cat([judge.preprocess(im) for im in images])
    ids = judge.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt", max_length=77)
    with torch.inference_mode():
        out = judge.model(input_ids=ids.input_ids, attention_mask=ids.attention_mask, pixel_values=pixels)
    cos = out.logits_per_image.diag() / judge.model.logit_scale.exp()
    assert got == pytest.approx([float(100 * max(c, 0.0)) for c in cos], rel=1e-4, abs=1e-4)
    with pytest.raises(ValueError, match="3 images for 2 prompts"):
        judge.clip_scores(images, prompts[:2])
