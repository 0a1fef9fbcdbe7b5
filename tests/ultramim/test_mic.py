"""Mixed image corruption: type/shape/dtype kept, probabilities honoured, hand-checked kernels,
seeded determinism, the caller's image never modified, and bad input refused."""
from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import torch

from ultrafed.config import MICConfig
from ultrafed.ultramim import corrupt, corrupt_ops, motion_blur, salt_pepper
from ultrafed.ultramim.mic import OPS


def _img_u8(h: int = 64, w: int = 80) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w), dtype=np.uint8)


@pytest.mark.parametrize("img", [
    _img_u8(),
    _img_u8().astype(np.float32) / 255,
    _img_u8()[None],                                    # numpy [1, H, W]
    torch.rand(64, 80, generator=torch.Generator().manual_seed(0)),
    torch.rand(1, 64, 80, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
], ids=["np-u8", "np-f32", "np-1HW", "torch-HW", "torch-1HW-f64"])
def test_type_shape_dtype_kept(img):
    out = corrupt(img, np.random.default_rng(1), p=1.0)
    assert type(out) is type(img) and out.shape == img.shape and out.dtype == img.dtype
    assert not np.array_equal(np.asarray(out), np.asarray(img))  # p=1 changes the image


def test_p_zero_is_identity_and_a_copy():
    img = _img_u8()
    out, ops = corrupt_ops(img, np.random.default_rng(0), p=0.0)
    assert ops == () and np.array_equal(out, img) and out is not img


def test_input_untouched():
    img, t = _img_u8(), torch.rand(1, 32, 32)
    img0, t0 = img.copy(), t.clone()
    for seed in range(10):
        corrupt(img, np.random.default_rng(seed), p=1.0, p_each=1.0)
        corrupt(t, torch.Generator().manual_seed(seed), p=1.0, p_each=1.0)
    assert np.array_equal(img, img0) and torch.equal(t, t0)


def test_salt_and_pepper_fractions():
    flat = np.full((200, 200), 128, np.uint8)  # blurring a flat image keeps it flat
    out, ops = corrupt_ops(flat, np.random.default_rng(0), p=1.0, p_each=1.0)
    assert ops == OPS
    assert abs((out == 0).mean() - 0.05) < 0.005 and abs((out == 255).mean() - 0.05) < 0.005
    assert ((out == 0) | (out == 255) | (out == 128)).all()


def test_float_image_stays_in_its_own_range():
    img = 0.2 + 0.5 * np.random.default_rng(0).random((48, 48)).astype(np.float32)
    out = corrupt(img, np.random.default_rng(1), p=1.0, p_each=1.0)
    assert out.min() >= img.min() - 1e-6 and out.max() <= img.max() + 1e-6
    assert np.isclose(out, img.min()).mean() > 0.04  # pepper = the image's own minimum


def test_motion_blur_impulse_by_hand():
    imp = np.zeros((21, 21), np.float32)
    imp[10, 10] = 1.0
    horiz = motion_blur(imp, 5, 0.0)   # 5-px line: five taps of 1/5 along the row
    assert np.allclose(horiz[10, 8:13], 0.2, atol=1e-6) and np.isclose(horiz.sum(), 1.0)
    vert = motion_blur(imp, 5, 90.0)
    assert np.allclose(vert[8:13, 10], 0.2, atol=1e-6) and np.isclose(vert[10, 8], 0.0, atol=1e-6)


def test_salt_pepper_values():
    out = salt_pepper(np.full((100, 100), 0.5, np.float32), 0.1, np.random.default_rng(0), -1.0, 2.0)
    assert abs((out == -1.0).mean() - 0.1) < 0.02 and abs((out == 2.0).mean() - 0.1) < 0.02


def test_probabilities():
    rng, img = np.random.default_rng(0), _img_u8(16, 16)
    runs = [corrupt_ops(img, rng)[1] for _ in range(600)]
    assert 0.43 < np.mean([bool(r) for r in runs]) < 0.57          # p = 0.5
    assert all(len(r) >= 1 for r in runs if r)                       # at least one when corrupting
    single = [corrupt_ops(img, rng, p=1.0, p_each=0.0)[1] for _ in range(600)]
    assert all(len(r) == 1 for r in single)                          # exactly the forced one
    counts = [sum(r == (op,) for r in single) for op in OPS]
    assert min(counts) > 150                                          # uniform over the three


def test_seeded_determinism_numpy_and_torch():
    img = _img_u8()
    a = corrupt(img, np.random.default_rng(5), p=1.0)
    assert np.array_equal(a, corrupt(img, np.random.default_rng(5), p=1.0))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    t = torch.rand(1, 40, 40, generator=torch.Generator().manual_seed(0))
    first = corrupt(t, g1, p=1.0)
    assert torch.equal(first, corrupt(t, g2, p=1.0))
    assert not torch.equal(first, corrupt(t, g1, p=1.0))  # the torch generator advanced


def _motion_only(img: np.ndarray, ref_size: int = 224) -> np.ndarray:
    for seed in range(100):  # p_each=0 forces exactly one corruption; take the first motion blur
        out, ops = corrupt_ops(img, np.random.default_rng(seed), p=1.0, p_each=0.0, ref_size=ref_size)
        if ops == ("motion_blur",):
            return out
    raise AssertionError("motion blur never chosen alone")


def test_motion_blur_length_scales_with_image_size():
    # At ref_size (224) the 24-px kernel (25 taps) spreads an impulse over ~25 px; at 112, ~13.
    big, small = np.zeros((224, 224), np.float32), np.zeros((112, 112), np.float32)
    big[112, 112] = small[56, 56] = 1.0
    spread = [np.count_nonzero(_motion_only(img) > 1e-4) for img in (big, small)]
    assert spread[0] > 1.6 * spread[1]


@pytest.mark.parametrize("img, err", [
    (np.zeros((3, 32, 32), np.float32), ValueError),
    (np.zeros((32, 32, 3), np.uint8), ValueError),
    (np.zeros((0, 32), np.float32), ValueError),
    (np.full((8, 8), np.nan, np.float32), ValueError),
    (np.zeros((8, 8), bool), ValueError),
    ([[0, 1], [1, 0]], TypeError),
])
def test_bad_images_raise(img, err):
    with pytest.raises(err, match="corrupt"):
        corrupt(img, np.random.default_rng(0), p=1.0)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="p must be"):
        corrupt(_img_u8(), np.random.default_rng(0), p=1.5)
    with pytest.raises(TypeError, match="generator"):
        corrupt(_img_u8(), 42)  # type: ignore[arg-type]


def test_config_fields_map_one_to_one():
    """Every MICConfig field but ``enabled`` reaches corrupt() through mic_kwargs, the mapping
    training uses, with its own value (non-default values, so a dropped key shows)."""
    from ultrafed.data.datasets import mic_kwargs

    cfg = MICConfig(p=0.3, p_each=0.4, motion_kernel=9, gauss_sigma=0.7, sp_amount=0.02, ref_size=96)
    kwargs = mic_kwargs(cfg)
    assert set(kwargs) == set(inspect.signature(corrupt).parameters) - {"img", "generator"}
    assert kwargs == {k: v for k, v in dataclasses.asdict(cfg).items() if k != "enabled"}
    assert mic_kwargs(MICConfig(enabled=False)) is None
    assert corrupt(_img_u8(), np.random.default_rng(0), **kwargs).shape == (64, 80)


def test_ref_size_sets_the_blur_length():
    """The same image blurred with ref_size = its own size gets the full 24-px kernel; at ref 224 a
    112-px image gets about half of it."""
    img = np.zeros((112, 112), np.float32)
    img[56, 56] = 1.0
    own = _motion_only(img, ref_size=112)
    paper = _motion_only(img, ref_size=224)
    assert np.count_nonzero(own > 1e-4) > 1.6 * np.count_nonzero(paper > 1e-4)
