"""Manifests: one row per image, hashes and stats, no pixels, reproducible, incremental."""
from __future__ import annotations

import hashlib
import os
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest

from _gate_sites import speckle, write_png, write_site
from ultrafed.data.manifest import (
    MANIFEST_COLUMNS, ManifestError, caliper_marks, image_stats, list_site, manifest_bytes, manifest_md5,
    name_flags, perceptual_hashes, read_manifest, scan_entries, scan_site, stat_cache_path, write_manifest,
)


def test_rows_match_files_and_labels(tmp_path):
    # Prepare
    root = write_site(tmp_path / "s", n=6)
    # Execute
    res = scan_site(root, "s1", workers=1)
    df = res.rows
    # Assert
    assert tuple(df.columns) == MANIFEST_COLUMNS
    assert list(df["relpath"]) == [f"images/img_{i:03d}.png" for i in range(6)]
    for _, r in df.iterrows():
        data = (root / r["relpath"]).read_bytes()
        assert r["sha256"] == hashlib.sha256(data).hexdigest()
        assert r["size_bytes"] == len(data)
        assert (r["width"], r["height"], r["bit_depth"], r["channels"]) == (64, 64, 8, 1)
        assert r["mask_relpath"] == r["relpath"].replace("images/", "masks/")
        assert (r["mask_width"], r["mask_height"]) == (64, 64)
    assert list(df["label"]) == ["normal", "benign", "malignant"] * 2
    assert list(df["split"]) == ["train"] * 4 + ["val"] * 2
    assert set(df["site"]) == {"s1"} and res.problems == []
    # mask 1 has a 16x16 square in 64x64: 1/16 of the pixels
    assert df.loc[1, "mask_fraction"] == pytest.approx(1 / 16) and df.loc[0, "mask_fraction"] == 0.0


def test_no_pixels_no_absolute_paths(tmp_path):
    root = write_site(tmp_path / "hospital_x", n=4)
    text = manifest_bytes(scan_site(root, "x", workers=1).rows).decode()
    assert str(tmp_path) not in text and "hospital_x" not in text
    # widest field is a sha256: nothing that could hold an image
    assert max(len(cell) for line in text.splitlines() for cell in line.split(",")) <= 64


def test_image_stats_hand_computed():
    img = np.zeros((10, 20), np.uint8)
    img[:, 10:] = 255  # left half black, right half saturated
    s = image_stats(img)
    assert s["mean"] == pytest.approx(127.5) and s["std"] == pytest.approx(127.5)
    assert s["frac_black"] == pytest.approx(0.5) and s["frac_saturated"] == pytest.approx(0.5)
    # |Laplacian| (4-neighbour) is 255 on each side of the edge, 0 elsewhere: 2 columns of 20
    assert s["sharpness"] == pytest.approx(255 * 2 / 20)
    flat = image_stats(np.full((8, 8), 77, np.uint8))
    assert flat["std"] == 0.0 and flat["sharpness"] == 0.0 and flat["frac_black"] == 0.0


def test_caliper_marks_counts_crosses_only():
    rng = np.random.default_rng(0)
    base = cv2.GaussianBlur(rng.normal(90, 20, (128, 128)).clip(0, 255).astype(np.uint8), (0, 0), 1.0)
    marked = base.copy()
    for cy, cx in ((30, 30), (60, 90), (100, 50)):
        marked[cy, cx - 3:cx + 4] = 250
        marked[cy - 3:cy + 4, cx] = 250
    assert caliper_marks(base) == 0
    assert caliper_marks(marked) == 3
    line = base.copy()
    line[64, 10:120] = 250  # a bright tissue interface is not a cross
    blob = base.copy()
    cv2.circle(blob, (64, 64), 4, 250, -1)  # nor is a bright blob
    assert caliper_marks(line) == 0 and caliper_marks(blob) == 0


def _structured(seed: int, size: int = 96) -> np.ndarray:
    """Organ-scale structure (what perceptual hashes see) plus speckle."""
    rng = np.random.default_rng(seed)
    coarse = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), 8)
    img = 110 + 45 * coarse / coarse.std() + rng.normal(0, 8, (size, size))
    return np.clip(img, 0, 255).astype(np.uint8)


def test_near_duplicates_grouped(tmp_path):
    root = tmp_path / "flat"
    a = _structured(1)
    write_png(root / "a.png", a)
    write_png(root / "a_copy.png", np.clip(a.astype(int) + 3, 0, 255).astype(np.uint8))  # re-export
    write_png(root / "a_crop.png", cv2.resize(a[2:94, 2:94], (96, 96)))                # slight crop
    write_png(root / "b.png", _structured(2))
    df = scan_site(root, "flat", workers=1).rows.set_index("relpath")
    assert df.loc["a.png", "dup_group"] == df.loc["a_copy.png", "dup_group"] == df.loc["a_crop.png", "dup_group"]
    assert df.loc["b.png", "dup_group"] != df.loc["a.png", "dup_group"]
    assert list(df["dup_group_size"]) == [3, 3, 3, 1]
    d = [int(h, 16) for h in perceptual_hashes(a)]
    assert all(0 <= v < 2 ** 64 for v in d)


def test_flat_folder_defaults(tmp_path):
    root = write_site(tmp_path / "f", n=3, labels_csv=False, masks=False)
    df = scan_site(root, "f", workers=1).rows
    assert list(df["split"]) == ["train"] * 3
    assert df["label"].isna().all() and df["mask_relpath"].isna().all()


def test_unknown_probe_is_detected(tmp_path):
    from ultrafed.data.synth import site_style, synth_image

    rng = np.random.default_rng(0)
    style = site_style(1)
    root = tmp_path / "unknown_site"  # flat folder, no labels.csv: probe unknown -> detected
    write_png(root / "fan.png", synth_image(128, "convex", style, "normal", rng)[0])
    write_png(root / "rect.png", synth_image(128, "linear", style, "normal", rng)[0])
    df = scan_site(root, "u", workers=1).rows.set_index("relpath")
    assert df.loc["fan.png", "probe"] == "convex" and df.loc["rect.png", "probe"] == "linear"
    assert set(df["probe_source"]) == {"detected"}


def test_probe_from_labels_csv(tmp_path):
    from ultrafed.data.synth import make_site

    make_site(tmp_path / "site-1", 1, 6, seed=0, size=64)
    df = scan_site(tmp_path / "site-1", "site-1", workers=1).rows
    labels = pd.read_csv(tmp_path / "site-1" / "labels.csv")
    assert list(df["probe"]) == list(labels["probe"]) and set(df["probe_source"]) == {"site"}


def test_write_is_reproducible_and_md5_is_dvc_md5(tmp_path):
    root = write_site(tmp_path / "a" / "site", n=5)
    md5 = write_manifest(scan_site(root, "s", workers=1), tmp_path / "m1.csv")
    assert md5 == manifest_md5(tmp_path / "m1.csv") == hashlib.md5((tmp_path / "m1.csv").read_bytes()).hexdigest()
    # same images elsewhere, other mtimes: same bytes, same data version
    other = tmp_path / "b" / "elsewhere"
    shutil.copytree(root, other)
    os.utime(other / "images" / "img_000.png", (1, 1))
    assert write_manifest(scan_site(other, "s", workers=1), tmp_path / "m2.csv") == md5
    # round trip: read_manifest gives back what was written
    back = read_manifest(tmp_path / "m1.csv")
    assert manifest_bytes(back) == (tmp_path / "m1.csv").read_bytes()
    assert not list(tmp_path.glob(".m1.csv.*.tmp"))  # atomic write left nothing behind


def test_incremental_scan_reuses_unchanged_files(tmp_path):
    root = write_site(tmp_path / "s", n=6)
    out = tmp_path / "m" / "s.csv"
    first = scan_site(root, "s", workers=1)
    md5 = write_manifest(first, out)
    assert first.n_reused == 0 and first.n_read == 12 and stat_cache_path(out).is_file()
    again = scan_site(root, "s", previous=out, workers=1)
    assert again.n_reused == 6 and again.n_read == 0
    assert write_manifest(again, out) == md5
    # change one image: only it is read again, and the data version changes
    write_png(root / "images" / "img_002.png", speckle(999))
    third = scan_site(root, "s", previous=out, workers=1)
    assert third.n_reused == 5 and third.n_read == 1
    row = third.rows.set_index("relpath").loc["images/img_002.png"]
    assert row["sha256"] == hashlib.sha256((root / "images" / "img_002.png").read_bytes()).hexdigest()
    assert write_manifest(third, out) != md5


def test_parallel_equals_serial(tmp_path):
    root = write_site(tmp_path / "s", n=30)  # 60 files: above the in-process threshold
    serial = scan_site(root, "s", workers=1)
    parallel = scan_site(root, "s", workers=2)
    assert parallel.n_read == 60
    assert manifest_bytes(serial.rows) == manifest_bytes(parallel.rows)


def test_name_flags(tmp_path):
    def flags(name):
        return name_flags(tmp_path / name, tmp_path)

    assert flags("benign_001.png") == "" and flags("000_HC.png") == "" and flags("100_1_1.png") == ""
    assert "long digit run" in flags("scan_12345678.png")
    assert "date" in flags("us_2021-03-04.png")
    assert "identifier word" in flags("patient_7.png")
    assert "person-name pattern" in flags("Doe_John.png") and "person-name pattern" in flags("DOE^JOHN.png")


def test_read_manifest_errors(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "nope.csv")
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ManifestError, match="missing columns") as e:
        read_manifest(tmp_path / "x.csv")
    assert "\n" not in str(e.value)
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(ManifestError, match="empty file"):
        read_manifest(tmp_path / "empty.csv")


def test_listing_then_vanished_files_are_rows(tmp_path):
    root = write_site(tmp_path / "s", n=4)
    entries, problems = list_site(root, "s")
    (root / "images" / "img_001.png").unlink()
    res = scan_entries(root, "s", entries, problems, workers=1)
    row = res.rows.set_index("relpath").loc["images/img_001.png"]
    assert not row["readable"] and row["error"] == "file not found"
    assert "images/img_001.png: file not found" in res.problems
    assert res.rows["readable"].sum() == 3
