"""Pictures: masking is exact per patch, reconstructions keep visible pixels, artifacts land."""
from __future__ import annotations

import numpy as np
import torch
from mlflow import MlflowClient

from ultrafed.models.mae import build_mae
from ultrafed.tracking.pictures import (
    bars_figure, curves_figure, figure_to_array, log_loss_curves, log_quality_report, log_reconstructions,
    log_site_bars, masked_images, patch_mask_to_pixels, reconstruction_panels)
from ultrafed.tracking.runs import ensure_experiment, log_metrics


def test_patch_mask_to_pixels_and_masked_images_hand_computed():
    img = torch.arange(16.0).reshape(1, 1, 4, 4)  # 2x2 patches of 2x2 pixels
    mask = torch.tensor([[True, False, False, True]])  # top-left and bottom-right patches masked
    pix = patch_mask_to_pixels(mask, patch=2, grid=2)
    assert pix[0, 0].int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    out = masked_images(img, mask, patch=2, fill=-1.0)
    assert out[0, 0].tolist() == [[-1, -1, 2, 3], [-1, -1, 6, 7], [8, 9, -1, -1], [12, 13, -1, -1]]
    assert masked_images(img, mask, patch=2)[0, 0, 0, 0] == 7.5  # default fill: the image mean


def test_reconstruction_panels_keep_visible_patches_exactly():
    mae = build_mae("tiny", img_size=32, decoder_depth=1, decoder_dim=32, decoder_heads=2, seed=0)
    imgs = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    panels = reconstruction_panels(mae, imgs, generator=torch.Generator().manual_seed(1))
    assert list(panels) == ["original", "masked", "reconstruction", "recon + visible"]
    assert all(p.shape == imgs.shape for p in panels.values())
    changed = (panels["masked"] != imgs).float().mean().item()
    assert abs(changed - 0.75) < 0.01  # mask ratio 0.75 of 4 patches: 3 patches filled
    same = panels["recon + visible"] == imgs
    assert abs(same.float().mean().item() - 0.25) < 0.01  # visible quarter pasted back unchanged
    assert mae.training  # the helper restores the caller's mode


def test_figures_render_to_pixels():
    a = figure_to_array(curves_figure({"site/a/loss": [(0, 1.0), (1, 0.8)], "global": [(0, 0.9), (1, 0.7)]}))
    b = figure_to_array(bars_figure({"a": 0.5, "b": 0.7}, "val loss", "loss"))
    assert a.shape == (400, 600, 4) and a.std() > 0
    assert b.ndim == 3 and (b[..., :3] < 250).any()  # something drawn on white


def test_pictures_are_logged_as_run_artifacts(store, tmp_path):
    client = MlflowClient()
    rid = client.create_run(ensure_experiment("pics")).info.run_id
    mae = build_mae("tiny", img_size=32, decoder_depth=1, decoder_dim=32, decoder_heads=2, seed=0)
    p1 = log_reconstructions(rid, mae, torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0)),
                             site="a", round_idx=2, generator=torch.Generator().manual_seed(0))
    for step, v in enumerate([1.0, 0.8, 0.7]):
        log_metrics(rid, {"train_loss": v, "val_loss.a": v + 0.1}, step=step)
    p2 = log_loss_curves(rid)
    p3 = log_site_bars(rid, {"a": 0.8, "b": 0.9}, metric="val_loss", round_idx=2)
    p4 = log_quality_report(rid, "a", {"status": "pass", "n_images": 12})
    report = tmp_path / "gx.html"
    report.write_text("<html>ok</html>")
    p5 = log_quality_report(rid, "b", report)
    root = client.get_run(rid).info.artifact_uri[len("file://"):]
    import cv2

    img = cv2.imread(f"{root}/{p1}")
    assert img is not None and img.shape[0] > 300  # 3 rows of images
    for p in (p2, p3, p4, p5):
        assert (tmp_path / "artifacts").exists() and __import__("os").path.getsize(f"{root}/{p}") > 0
    assert np.frombuffer(open(f"{root}/{p2}", "rb").read()[:8], np.uint8).tolist()[:4] == [137, 80, 78, 71]  # PNG
