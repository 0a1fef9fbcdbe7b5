"""MAE: patch space, masking, the masked-only loss, presets and intermediate features."""
from __future__ import annotations

import pytest
import timm
import torch

from ultrafed.models.mae import ENCODER_PRESETS, build_encoder, build_mae, count_params

torch.set_num_threads(1)


def tiny_mae(img_size: int = 64, **kw):
    kw = {"decoder_dim": 64, "decoder_depth": 1, "decoder_heads": 2, "seed": 0, **kw}
    return build_mae("tiny", img_size, 16, **kw)


@pytest.fixture(scope="module")
def mae():
    return tiny_mae().eval()


def test_patchify_unpatchify_identity_and_order(mae):
    imgs = torch.randn(2, 1, 64, 64)
    patches = mae.patchify(imgs)
    assert patches.shape == (2, 16, 256)
    assert torch.equal(mae.unpatchify(patches), imgs)
    # row-major patches, row-major pixels inside: patch 5 is grid row 1, col 1
    assert torch.equal(patches[1, 5], imgs[1, 0, 16:32, 16:32].reshape(-1))
    assert torch.equal(patches[0, 3], imgs[0, 0, 0:16, 48:64].reshape(-1))


def test_random_mask_exact_count_and_seeded(mae):
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    m = mae.random_mask(5, g1)
    assert m.dtype == torch.bool and m.shape == (5, 16)
    assert m.sum(dim=1).tolist() == [12] * 5  # int(16 * 0.75)
    assert torch.equal(m, mae.random_mask(5, g2))
    assert len({tuple(r.tolist()) for r in m}) > 1  # rows differ


def _mask(rows: list[list[int]], L: int = 16) -> torch.Tensor:
    m = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, masked in enumerate(rows):
        m[i, masked] = True
    return m


def test_loss_only_on_masked_patches(mae):
    torch.manual_seed(0)
    imgs = torch.rand(1, 1, 64, 64)
    target = torch.rand(1, 1, 64, 64)
    mask = _mask([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])  # patches 12..15 visible (bottom row)
    with torch.no_grad():
        base = mae(imgs, mask=mask, target=target).loss
        t_vis = target.clone()
        t_vis[..., 48:64, :] = torch.rand(1, 1, 16, 64)  # the visible bottom row of patches
        same = mae(imgs, mask=mask, target=t_vis).loss
        t_masked = target.clone()
        t_masked[..., 0:16, 0:16] = torch.rand(1, 1, 16, 16)  # patch 0, masked
        changed = mae(imgs, mask=mask, target=t_masked).loss
    assert torch.equal(base, same)
    assert not torch.isclose(base, changed)


def test_target_defaults_to_input(mae):
    imgs = torch.rand(2, 1, 64, 64)
    g = torch.Generator().manual_seed(0)
    mask = mae.random_mask(2, g)
    with torch.no_grad():
        assert torch.equal(mae(imgs, mask=mask).loss, mae(imgs, mask=mask, target=imgs).loss)


def test_norm_pix_loss_hand_computed():
    # 32 px, 16-px patches: L = 4, 256 values per patch.
    m = tiny_mae(img_size=32)
    target = torch.zeros(1, 1, 32, 32)
    target[..., 0:16, 0:16] = torch.tensor([0.0, 2.0]).repeat(128).reshape(16, 16)  # patch 0: mean 1
    target[..., 0:16, 16:32] = 3.0                                                   # patch 1: constant
    pred = torch.full((1, 4, 256), 0.5)
    mask = _mask([[0, 1]], L=4)
    # patch 0: unbiased var = 256/255; normalised values are +-1/sqrt(256/255 + 1e-6)
    z = 1.0 / (256 / 255 + 1e-6) ** 0.5
    mse0 = ((z - 0.5) ** 2 + (-z - 0.5) ** 2) / 2
    mse1 = 0.25  # constant patch normalises to 0
    assert m.loss(target, pred, mask).item() == pytest.approx((mse0 + mse1) / 2, rel=1e-6)
    m.norm_pix_loss = False
    raw0 = ((0 - 0.5) ** 2 + (2 - 0.5) ** 2) / 2
    raw1 = (3 - 0.5) ** 2
    assert m.loss(target, pred, mask).item() == pytest.approx((raw0 + raw1) / 2, rel=1e-6)


def test_given_mask_respected(mae):
    mask = _mask([[1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])
    seen = {}
    def capture(mod, args):
        seen["keep"] = args[1]  # returns None: the inputs are left as they are

    h = mae.encoder.register_forward_pre_hook(capture)
    imgs = torch.rand(2, 1, 64, 64)
    try:
        with torch.no_grad():
            out = mae(imgs, mask=mask)
    finally:
        h.remove()
    assert seen["keep"].tolist() == [[0, 4, 8, 12], [12, 13, 14, 15]]
    assert torch.equal(out.mask, mask)
    # the encoder sees visible patches only: masked input pixels cannot change the prediction
    edited = imgs.clone()
    edited[0, :, 0:16, 16:32] = 1.0   # patch 1 of image 0: masked
    edited[1, :, 0:16, 0:16] = 0.0    # patch 0 of image 1: masked
    with torch.no_grad():
        assert torch.equal(mae(edited, mask=mask).pred, out.pred)
        edited[0, :, 0:16, 0:16] = 1.0  # patch 0 of image 0: visible
        assert not torch.equal(mae(edited, mask=mask).pred[0], out.pred[0])


def test_unequal_mask_rows_rejected(mae):
    mask = _mask([[0, 1, 2], [0, 1]])
    with pytest.raises(ValueError, match="same number"):
        mae(torch.rand(2, 1, 64, 64), mask=mask)
    with pytest.raises(ValueError, match=r"\[N, L\]"):
        mae(torch.rand(2, 1, 64, 64), mask=torch.zeros(2, 9, dtype=torch.bool))


def test_same_seed_same_weights_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = tiny_mae(seed=7)
    after = torch.rand(3)
    b, c = tiny_mae(seed=7), tiny_mae(seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["encoder.blocks.0.attn.qkv.weight"], sc["encoder.blocks.0.attn.qkv.weight"])
    assert torch.equal(before, after)  # building a seeded model does not consume the global stream


def _block_params(d: int) -> int:
    # qkv 3d^2+3d, proj d^2+d, fc1 4d^2+4d, fc2 4d^2+d, two LayerNorms 4d
    return 12 * d * d + 13 * d


@pytest.mark.parametrize("preset,timm_name", [("tiny", "vit_tiny_patch16_224"), ("small", "vit_small_patch16_224"),
                                              ("base", "vit_base_patch16_224")])
def test_encoder_param_counts(preset, timm_name):
    d, depth = ENCODER_PRESETS[preset]["embed_dim"], ENCODER_PRESETS[preset]["depth"]
    with torch.device("meta"):  # shapes only: no memory, no init time
        enc = build_encoder(preset, 224, 16, 1)
        ref = timm.create_model(timm_name, in_chans=1, num_classes=0, pretrained=False)
    by_hand = depth * _block_params(d) + (256 * d + d) + d + 2 * d  # blocks, patch embed, cls, final norm
    assert count_params(enc) == by_hand
    # timm's ViT learns its position embedding; ours is a fixed sin-cos buffer
    assert count_params(enc) == count_params(ref) - ref.pos_embed.numel()
    if preset == "base":
        assert by_hand == 85_254_144  # ViT-B/16, 1 channel (85.8M is timm's 3-channel count with learned positions)


def test_decoder_param_count():
    with torch.device("meta"):
        m = build_mae("tiny", 224, 16, decoder_dim=512, decoder_depth=8, decoder_heads=16)
    d, e = 512, 192
    dec = (e * d + d) + d + 8 * _block_params(d) + 2 * d + (d * 256 + 256)
    assert count_params(m) - count_params(m.encoder) == dec


def test_forward_intermediates_shapes(mae):
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        feats = mae.encoder.forward_intermediates(x, [3, 7, -1])
        full = mae.encoder(x)
    assert [tuple(f.shape) for f in feats] == [(2, 192, 4, 4)] * 3
    assert full.shape == (2, 17, 192)
    # the last map is the normalised encoder output laid out on the grid
    assert torch.allclose(feats[-1], full[:, 1:].transpose(1, 2).reshape(2, 192, 4, 4))


def test_bad_sizes_rejected():
    with pytest.raises(ValueError, match="multiple"):
        build_encoder("tiny", 70, 16)
    with pytest.raises(ValueError, match="unknown encoder preset"):
        build_encoder("huge")


def test_mae_and_heads_run_under_bf16_autocast():
    """The CUDA path trains under bf16 autocast; CPU autocast reaches the same dtype mixing
    (a float32 mask token scattered with bf16 decoder tokens failed on the first GPU run)."""
    import torch

    from ultrafed.models.heads import ClassificationModel, SegmentationModel
    from ultrafed.models.mae import build_encoder, build_mae

    mae = build_mae("tiny", 32, 16, 1, 32, 1, 2, seed=0)
    x = torch.rand(2, 1, 32, 32)
    mask = mae.random_mask(2, torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mae(x, mask=mask, target=x)
    out.loss.backward()
    assert torch.isfinite(out.loss) and mae.mask_token.grad is not None
    for model in (ClassificationModel(build_encoder("tiny", 32), 3), SegmentationModel(build_encoder("tiny", 32), num_classes=1)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y.float().sum().backward()
        assert y.shape[0] == 2 and torch.isfinite(y.float()).all()
