"""Task heads and from-scratch baselines: shapes, gradient flow, bad configurations, feature maths."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ultrafed.models.baselines import (
    UNet,
    build_resnet18,
    glcm_features,
    handcrafted_features,
    lbp_histogram,
    orientation_histograms,
)
from ultrafed.models.heads import ClassificationModel, SegmentationModel, adapt_encoder
from ultrafed.models.mae import build_encoder


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return build_encoder("tiny", img_size=64)


def test_classification_head_shapes(encoder):
    m = ClassificationModel(encoder, 3)
    x = torch.rand(2, 1, 64, 64)
    assert m(x).shape == (2, 3)
    assert m.features(x).shape == (2, encoder.embed_dim)
    with pytest.raises(ValueError, match="num_classes"):
        ClassificationModel(encoder, 1)


def test_segmentation_head_full_resolution_and_gradients_reach_the_encoder(encoder):
    m = SegmentationModel(encoder)
    x = torch.rand(2, 1, 64, 64)
    out = m(x)
    assert out.shape == (2, 1, 64, 64)
    out.mean().backward()
    assert encoder.patch_embed.proj.weight.grad is not None
    assert encoder.blocks[2].attn.qkv.weight.grad.abs().sum() > 0  # the shallowest skip is used
    encoder.zero_grad(set_to_none=True)


def test_segmentation_head_with_fewer_levels(encoder):
    m = SegmentationModel(encoder, num_classes=2, feature_layers=(11,))
    assert m(torch.rand(1, 1, 64, 64)).shape == (1, 2, 64, 64)


@pytest.mark.parametrize("layers, match", [
    ((2, 5, 8, 12), "block indices"),       # past the last block
    ((8, 5, 2, 11), "block indices"),       # not shallow to deep
    ((1, 2, 3, 4, 5), "decoder stages"),    # more skips than x2 stages for patch 16
])
def test_segmentation_head_rejects_bad_feature_layers(encoder, layers, match):
    with pytest.raises(ValueError, match=match):
        SegmentationModel(encoder, feature_layers=layers)


def test_adapt_encoder_copies_weights_to_a_new_size(encoder):
    big = adapt_encoder(encoder, 96)
    assert big.grid == 6 and big(torch.rand(1, 1, 96, 96)).shape == (1, 37, encoder.embed_dim)
    for (n, a), (_, b) in zip(encoder.state_dict().items(), big.state_dict().items()):
        assert torch.equal(a, b), n
    same = adapt_encoder(encoder, 64)
    assert same is not encoder
    with torch.no_grad():
        same.norm.weight.add_(1.0)  # training the copy must not touch the caller's encoder
    assert not torch.equal(same.norm.weight, encoder.norm.weight)
    with pytest.raises(ValueError, match="multiple"):
        adapt_encoder(encoder, 70)


def test_resnet18_takes_gray_and_is_randomly_initialised():
    m = build_resnet18(3)
    assert m.conv1.in_channels == 1
    assert m(torch.rand(2, 1, 64, 64)).shape == (2, 3)


def test_unet_shapes_and_size_check():
    u = UNet(1, 1, base=8, depth=3)
    assert u(torch.rand(2, 1, 32, 32)).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="divisible by 8"):
        u(torch.rand(1, 1, 36, 36))


def test_texture_features_on_hand_computed_images():
    flat = np.full((16, 16), 100, np.uint8)
    # constant image: one co-occurring pair (i, i): contrast 0, homogeneity 1, energy 1, correlation 0, entropy 0
    np.testing.assert_allclose(glcm_features(flat).reshape(4, 5), np.tile([0, 1, 1, 0, 0], (4, 1)), atol=1e-12)
    # every neighbour >= centre: 8 ones, no transitions -> riu2 code 8
    assert lbp_histogram(flat).tolist() == [0] * 8 + [1.0, 0.0]
    # a vertical edge has a purely horizontal gradient: orientation bin 0 in every cell that sees it
    edge = np.zeros((32, 32), np.uint8)
    edge[:, 16:] = 255
    h = orientation_histograms(edge).reshape(16, 9)
    seen = h.sum(axis=1) > 0
    assert seen.any() and np.all(h[seen].argmax(axis=1) == 0)


def test_handcrafted_features_fixed_length_and_finite():
    rng = np.random.default_rng(0)
    a = handcrafted_features(rng.integers(0, 256, (90, 130), dtype=np.uint8))
    b = handcrafted_features(np.full((40, 40), 7, np.uint8))  # flat frame: no division by zero
    assert a.shape == b.shape and np.isfinite(a).all() and np.isfinite(b).all()
