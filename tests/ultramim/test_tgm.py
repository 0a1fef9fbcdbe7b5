"""Texture-guided masking: hand-computed scores, exact counts, uniform at strength 0, and masking
that follows texture on synthetic and real (BUSI) images."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from ultrafed.data.io import read_gray
from ultrafed.ultramim import texture_scores, tgm_mask, tgm_noise


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_texture_scores_single_pixel_by_hand():
    # Laplacian of a unit impulse: -4 at the pixel, +1 at its 4 neighbours -> sum |.| = 8.
    img = torch.zeros(1, 1, 8, 8)
    img[0, 0, 2, 2] = 1.0  # all five taps inside patch 0 (rows 0-3, cols 0-3)
    assert torch.allclose(texture_scores(img, 4), torch.tensor([[8 / 16, 0.0, 0.0, 0.0]]))
    img = torch.zeros(1, 1, 8, 8)
    img[0, 0, 3, 3] = 1.0  # neighbours (3,4) -> patch 1 (top right), (4,3) -> patch 2 (bottom left)
    expected = torch.tensor([[6 / 16, 1 / 16, 1 / 16, 0.0]])  # row-major patch order, as MAE patchify
    assert torch.allclose(texture_scores(img, 4), expected)


def test_texture_scores_flat_image_and_frame_edge_score_zero():
    # replicate padding: a constant frame has no texture, not even at its border
    assert torch.count_nonzero(texture_scores(torch.full((2, 1, 32, 32), 0.7), 16)) == 0


def test_texture_scores_rejects_bad_shapes():
    with pytest.raises(ValueError, match="expected images"):
        texture_scores(torch.zeros(1, 32, 32), 16)
    with pytest.raises(ValueError, match="not divisible"):
        texture_scores(torch.zeros(1, 1, 30, 32), 16)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_exact_mask_count_per_row(ratio):
    scores = torch.rand(6, 49, generator=_gen(1))
    mask = tgm_mask(scores, ratio, strength=2.0, generator=_gen(2))
    assert mask.dtype == torch.bool and mask.shape == (6, 49)
    assert (mask.sum(dim=1) == int(49 * ratio)).all()


def test_strength_zero_is_mae_random_masking_exactly():
    scores = torch.rand(8, 36, generator=_gen(3)) * 10  # texture must not matter at strength 0
    mask = tgm_mask(scores, 0.75, strength=0.0, generator=_gen(7))
    # MAE's random_masking with the same generator state: keep the 9 smallest uniform draws
    noise = torch.rand(8, 36, generator=_gen(7))
    ref = torch.ones(8, 36, dtype=torch.bool)
    ref.scatter_(1, torch.argsort(noise, dim=1)[:, :9], False)
    assert torch.equal(mask, ref)


def test_strength_zero_masking_frequency_is_flat():
    # One textured image drawn 4000 times: every patch masked with frequency 0.75 (sd ~0.007).
    scores = torch.linspace(0, 5, 16).repeat(4000, 1)
    freq = tgm_mask(scores, 0.75, strength=0.0, generator=_gen(0)).float().mean(dim=0)
    assert (freq - 0.75).abs().max() < 0.03


def _half_textured() -> torch.Tensor:
    img = torch.full((1, 1, 32, 32), 0.5)
    img[..., :, :16] += 0.3 * torch.rand(1, 1, 32, 16, generator=_gen(5))  # left half: noise
    return img


def test_textured_half_is_masked_more_and_more_with_strength():
    scores = texture_scores(_half_textured(), 8)             # [1, 16]; columns 0-1 textured
    textured = torch.tensor([c < 2 for r in range(4) for c in range(4)])
    gaps = []
    for strength in (0.0, 1.0, 3.0):
        freq = tgm_mask(scores.repeat(3000, 1), 0.5, strength, _gen(11)).float().mean(dim=0)
        gaps.append((freq[textured].mean() - freq[~textured].mean()).item())
    assert abs(gaps[0]) < 0.03           # uniform
    assert gaps[1] > 0.15                 # textured half masked clearly more often
    assert gaps[2] > gaps[1]              # strength is a temperature


def test_seeded_generator_is_deterministic():
    scores = torch.rand(4, 64, generator=_gen(0))
    a = tgm_mask(scores, 0.75, 1.0, _gen(42))
    assert torch.equal(a, tgm_mask(scores, 0.75, 1.0, _gen(42)))
    assert not torch.equal(a, tgm_mask(scores, 0.75, 1.0, _gen(43)))


def test_noise_orders_kept_patches_first():
    scores = torch.rand(3, 16, generator=_gen(0))
    noise = tgm_noise(scores, 1.0, _gen(9))
    mask = tgm_mask(scores, 0.75, 1.0, _gen(9))
    kept = torch.argsort(noise, dim=1)[:, :4]
    assert not mask.gather(1, kept).any()


@pytest.mark.parametrize("kwargs, match", [
    ({"mask_ratio": 1.0}, "mask_ratio"), ({"mask_ratio": -0.1}, "mask_ratio"),
    ({"strength": -1.0}, "strength"), ({"strength": float("nan")}, "strength"),
])
def test_bad_arguments_raise(kwargs, match):
    args = {"mask_ratio": 0.75, "strength": 1.0} | kwargs
    with pytest.raises(ValueError, match=match):
        tgm_mask(torch.rand(2, 16), **args)


def test_bad_scores_raise():
    with pytest.raises(ValueError, match="NaN"):
        tgm_mask(torch.tensor([[0.0, float("nan"), 1.0, 2.0]]), 0.5)
    with pytest.raises(ValueError, match=r"\[N, L\]"):
        tgm_mask(torch.rand(16), 0.5)


def test_masking_follows_texture_on_real_busi(shared_data):
    # Per image: Spearman(masking frequency over 2000 draws, texture score) >= 0.5.
    import cv2

    paths = sorted((shared_data / "busi" / "images").glob("*.png"))[::97][:8]
    imgs = [cv2.resize(read_gray(p), (96, 96), interpolation=cv2.INTER_AREA) for p in paths]
    batch = torch.from_numpy(np.stack(imgs)).float().div(255).unsqueeze(1)   # [8, 1, 96, 96]
    scores = texture_scores(batch, 16)                                         # [8, 36]
    gen = _gen(0)
    rhos = []
    for s in scores:
        freq = tgm_mask(s.repeat(2000, 1), 0.75, 1.0, gen).float().mean(dim=0)
        rhos.append(spearmanr(freq.numpy(), s.numpy()).statistic)
    assert len(rhos) == 8 and min(rhos) >= 0.5, rhos
