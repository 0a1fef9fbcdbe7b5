"""Bad inputs at a site: each gives one clear line, nothing crashes, the rest of the site trains.

Every test builds a site of 10 good images, adds one bad thing, and runs the gate the round
runs (``check_site``: scan + manifest + Great Expectations).
"""
from __future__ import annotations

import os
import shutil

import cv2
import numpy as np
import pytest

from _gate_sites import add_row, speckle, write_png, write_site
from ultrafed.data.manifest import list_site, read_manifest, scan_entries, write_manifest
from ultrafed.data.quality import check_manifest, check_site

GOOD = 10


@pytest.fixture
def site(tmp_path):
    return write_site(tmp_path / "site", n=GOOD, masks=False)


def _gate(root, tmp_path, site_id="s"):
    return check_site(root, site_id, manifest_out=tmp_path / "manifests" / f"{site_id}.csv",
                      report=tmp_path / "report.md")


def _one_bad(gate, relpath, reason_part):
    """The bad file is the only one quarantined, with a one-line reason; the rest trains."""
    assert len(gate.quarantined) == 1, gate.quarantined
    rel, why = gate.quarantined[0]
    assert rel == relpath and reason_part in why and "\n" not in why
    assert gate.status == "warn" and gate.n_images == GOOD
    return why


def test_truncated_png(site, tmp_path):
    data = cv2.imencode(".png", speckle(77))[1].tobytes()
    (site / "images" / "cut.png").write_bytes(data[: len(data) // 2])
    add_row(site, "cut")
    _one_bad(_gate(site, tmp_path), "images/cut.png", "unreadable:")
    assert "truncated" in dict(_gate(site, tmp_path).quarantined)["images/cut.png"]


def test_zero_byte_file(site, tmp_path):
    (site / "images" / "empty.png").write_bytes(b"")
    add_row(site, "empty")
    assert _one_bad(_gate(site, tmp_path), "images/empty.png", "") == "unreadable: zero-byte file"


def test_text_file_named_png(site, tmp_path):
    (site / "images" / "notes.png").write_text("patient notes, not an image\n")
    add_row(site, "notes")
    why = _one_bad(_gate(site, tmp_path), "images/notes.png", "unreadable:")
    assert why == "unreadable: a text file named .png, not a supported image format (PNG, JPEG, BMP or TIFF)"


def test_one_pixel_image(site, tmp_path):
    write_png(site / "images" / "dot.png", np.full((1, 1), 128, np.uint8))
    add_row(site, "dot")
    assert "too small (1x1 px" in _one_bad(_gate(site, tmp_path), "images/dot.png", "unreadable:")


def test_all_black_image(site, tmp_path):
    write_png(site / "images" / "black.png", np.zeros((64, 64), np.uint8))
    add_row(site, "black")
    why = _one_bad(_gate(site, tmp_path), "images/black.png", "not_blank: std=0 (expected >= 2)")
    assert "not_mostly_black: frac_black=1" in why  # both reasons, one line


def test_rgba_image_is_converted_and_trains(site, tmp_path):
    rgba = cv2.cvtColor(speckle(55), cv2.COLOR_GRAY2BGRA)
    rgba[..., 3] = 255
    write_png(site / "images" / "rgba.png", rgba)
    add_row(site, "rgba")
    gate = _gate(site, tmp_path)
    assert gate.status == "pass" and gate.n_images == GOOD + 1
    row = read_manifest(gate.manifest_path).set_index("relpath").loc["images/rgba.png"]
    assert row["channels"] == 4 and row["bit_depth"] == 8 and row["readable"]


def test_16_bit_image_is_converted_and_trains(site, tmp_path):
    write_png(site / "images" / "deep.png", speckle(56).astype(np.uint16) * 257)  # same picture, 16 bit
    add_row(site, "deep")
    gate = _gate(site, tmp_path)
    assert gate.status == "pass" and gate.n_images == GOOD + 1
    row = read_manifest(gate.manifest_path).set_index("relpath").loc["images/deep.png"]
    assert row["bit_depth"] == 16
    assert row["mean"] == pytest.approx(float(speckle(56).mean()), abs=0.01)  # x257 / 257: exact


def test_duplicate_files(site, tmp_path):
    shutil.copy(site / "images" / "img_003.png", site / "images" / "img_003_copy.png")
    add_row(site, "img_003_copy")
    why = _one_bad(_gate(site, tmp_path), "images/img_003_copy.png", "")  # the first by path trains
    assert why == "unique_sha256: duplicate of images/img_003.png"


def test_mask_of_wrong_size(tmp_path):
    root = write_site(tmp_path / "site", n=GOOD + 1, masks=True)
    write_png(root / "masks" / "img_004.png", np.zeros((32, 48), np.uint8))
    gate = _gate(root, tmp_path)
    assert [r for r, _ in gate.quarantined] == ["images/img_004.png"]
    why = gate.quarantined[0][1]
    assert "mask_width_matches: mask_width=48, width=64" in why
    assert "mask_height_matches: mask_height=32, height=64" in why
    assert gate.status == "warn" and gate.n_images == GOOD


def test_label_outside_the_set(site, tmp_path):
    write_png(site / "images" / "odd.png", speckle(58))
    add_row(site, "odd", label="cat")
    why = _one_bad(_gate(site, tmp_path), "images/odd.png", "")
    assert why == "label_in_set: label=cat (allowed: normal, benign, malignant)"


def test_non_utf8_file_name(tmp_path):
    root = write_site(tmp_path / "flat", n=GOOD, masks=False, labels_csv=False)
    with open(os.path.join(os.fsencode(root / "images"), b"caf\xe9.png"), "wb") as f:  # Latin-1 name
        f.write(cv2.imencode(".png", speckle(59))[1].tobytes())
    gate = _gate(root, tmp_path)
    shown = "images/caf\\xe9.png"  # escaped: the manifest stays valid UTF-8
    text = open(gate.manifest_path, encoding="utf-8").read()
    assert shown in text
    assert gate.quarantined == () and gate.n_images == GOOD + 1  # readable: it trains
    assert gate.status == "warn"
    assert [r for r in gate.reasons] == [
        "[warn] no_identifier_names: 1 of 11 images (9.1%) unexpected; e.g. " + shown]
    assert f"{shown}: file name may carry an identifier (non-UTF-8 name)" in gate.problems


def test_symlink_loop(site, tmp_path):
    os.symlink("loop.png", site / "images" / "loop.png")   # a file that points at itself
    os.symlink("..", site / "images" / "back")              # a folder cycle
    add_row(site, "loop")
    why = _one_bad(_gate(site, tmp_path), "images/loop.png", "unreadable: cannot read")
    assert "symbolic links" in why


def test_broken_labels_csv(tmp_path):
    root = write_site(tmp_path / "site", n=GOOD)
    (root / "labels.csv").write_text("name;label\nimg_000;benign\n")  # no id column
    gate = _gate(root, tmp_path, site_id="b")
    # the images are still listed (the audit trail is complete) but none may train
    assert gate.n_total == GOOD and gate.n_images == 0 and gate.status == "fail"
    assert gate.problems == ("b/labels.csv: no 'id' column (columns: name;label)",)
    assert {why for _, why in gate.quarantined} == {"split_known: split=unknown (allowed: train, val, test, unlabeled)"}


def test_empty_site_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    gate = _gate(tmp_path / "empty", tmp_path)
    assert gate.status == "fail" and gate.n_images == 0 and gate.n_total == 0
    assert "[fail] min_images: observed 0, expected >= 8" in gate.reasons
    assert read_manifest(gate.manifest_path).empty


def test_missing_site_folder(tmp_path):
    gate = _gate(tmp_path / "nowhere", tmp_path, site_id="lost")
    assert gate.status == "fail" and gate.problems == ("lost: site folder not found",)


def test_site_folder_disappears_mid_scan(site, tmp_path):
    entries, problems = list_site(site, "s")  # listed ...
    shutil.rmtree(site)                        # ... then the folder goes away (unmounted share)
    res = scan_entries(site, "s", entries, problems, workers=1)
    out = tmp_path / "m.csv"
    write_manifest(res, out)
    gate = check_manifest(out)
    assert gate.status == "fail" and gate.n_images == 0
    assert len(gate.quarantined) == GOOD
    assert {why for _, why in gate.quarantined} == {"unreadable: file not found"}
    assert gate.reasons[0].startswith("[fail] readable: 10 of 10 images (100.0%) unexpected, "
                                      "more than the 25% that may be quarantined")
