"""ultrafed.data.synth: images that behave like ultrasound, a deterministic cohort, and its CLI."""
from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from flows.cli import main
from ultrafed.data.io import read_gray, read_mask
from ultrafed.data.sites import load_site
from ultrafed.data.synth import (
    LABELS, SiteStyle, assign_splits, make_cohort, sector_mask, site_style, synth_image,
)

STYLES = [site_style(k) for k in range(3)]


def _img(size: int, probe: str, style: SiteStyle, label: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return synth_image(size, probe, style, label, np.random.default_rng(seed))


@pytest.mark.parametrize("probe", ["linear", "convex"])
@pytest.mark.parametrize("label", LABELS)
def test_shapes_dtypes_and_mask_exactly_for_lesions(probe: str, label: str) -> None:
    for k, style in enumerate(STYLES):
        for seed in range(6):
            img, mask = _img(64, probe, style, label, 100 * k + seed)
            assert img.shape == mask.shape == (64, 64)
            assert img.dtype == mask.dtype == np.uint8
            assert set(np.unique(mask)) <= {0, 255}
            area = int((mask > 0).sum())
            if label == "normal":
                assert area == 0
            else:
                assert area >= 20, f"lesion of {area} px is too small to segment"
            assert img.std() > 10  # speckle, not a flat field


@pytest.mark.parametrize("probe", ["linear", "convex"])
@pytest.mark.parametrize("label", ["benign", "malignant"])
def test_lesions_are_darker_than_their_surroundings(probe: str, label: str) -> None:
    ring_kernel = np.ones((7, 7), np.uint8)
    for k, style in enumerate(STYLES):
        for seed in range(8):
            img, mask = _img(96, probe, style, label, 1000 * k + seed)
            inside = mask > 0
            ring = (cv2.dilate(mask, ring_kernel) > 0) & ~inside
            assert img[ring].mean() - img[inside].mean() > 8, (k, seed)


def test_malignant_lesions_cast_posterior_shadows() -> None:
    size = 96
    for k, style in enumerate(STYLES):
        for seed in range(6):
            img, mask = _img(size, "linear", style, "malignant", 7000 + 10 * k + seed)
            inside = mask > 0
            cols = np.nonzero(inside.any(axis=0))[0]
            c0, c1 = int(cols.min()), int(cols.max())
            core = np.arange(c0 + (c1 - c0) // 4, c1 - (c1 - c0) // 4 + 1)
            # bottom of the lesion body (median over core columns ignores spicule tips)
            bottom = int(np.median([np.nonzero(inside[:, c])[0].max() for c in core]))
            rows = slice(bottom + 2, min(size, bottom + 2 + size // 6))
            below = img[rows][:, core][~inside[rows][:, core]].mean()
            side = np.ones(size, bool)
            side[max(0, c0 - 4): c1 + 5] = False
            beside = img[rows][:, side].mean()
            assert beside - below > 8, (k, seed)


@pytest.mark.parametrize("k", [0, 1])
def test_convex_images_are_black_outside_the_fan(k: int) -> None:
    style, size = STYLES[k], 96
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    r = np.hypot(xx - (size - 1) / 2, yy)  # apex at the top centre
    theta = np.degrees(np.arctan2(xx - (size - 1) / 2, yy))
    half = style.sector_deg / 2
    outside = (r > size + 1) | (np.abs(theta) > half + 1.5) | (r < style.r_min_frac * size - 1)
    well_inside = (r < size - 3) & (np.abs(theta) < half - 3) & (r > style.r_min_frac * size + 3)
    assert outside.sum() > 0.2 * size * size  # the test is about a real fan
    assert np.array_equal(sector_mask(size, style.sector_deg, style.r_min_frac) & outside,
                          np.zeros_like(outside))
    for seed in range(4):
        img, mask = _img(size, "convex", style, "malignant", seed)
        assert img[outside].max() == 0 and mask[outside].max() == 0
        assert (img[well_inside] > 0).mean() > 0.9
        # near field at the apex: the first lit rows are at the top centre, not at the sides
        lit_rows = np.nonzero(img.max(axis=1) > 0)[0]
        first = img[lit_rows[0]]
        assert abs(np.nonzero(first)[0].mean() - (size - 1) / 2) < 3


def test_linear_images_fill_the_frame() -> None:
    img, _ = _img(64, "linear", STYLES[0], "normal", 3)
    assert (img > 0).mean() > 0.95


def test_site_styles_make_sites_differ() -> None:
    """Non-IID: brightness and speckle grain differ by site (same probe and label)."""
    means, grain = [], []
    for k, style in enumerate(STYLES):
        imgs = [_img(96, "linear", style, "normal", 50 + 10 * k + i)[0].astype(np.float32) for i in range(8)]
        means.append(np.mean([im.mean() for im in imgs]))
        # lateral gradient per unit contrast: high for fine speckle, low for coarse
        grain.append(np.mean([np.abs(np.diff(im, axis=1)).mean() / im.std() for im in imgs]))
    for a in range(3):
        for b in range(a + 1, 3):
            assert abs(means[a] - means[b]) > 5, (a, b, means)
    assert grain[1] < min(grain[0], grain[2]) - 0.03, grain  # the abdomen site has the coarsest speckle


def test_site_style_beyond_the_base_three_is_stable_and_distinct() -> None:
    assert site_style(5) == site_style(5)
    assert site_style(5) != site_style(2)
    assert abs(sum(site_style(5).class_mix) - 1.0) < 1e-9 and 0 <= site_style(5).p_convex <= 1
    with pytest.raises(ValueError, match="site_index"):
        site_style(-1)


@pytest.mark.parametrize("args,match", [
    ((64, "phased", "normal"), "probe"), ((64, "linear", "cyst"), "label"), ((16, "linear", "normal"), "size"),
])
def test_synth_image_rejects_bad_arguments(args: tuple, match: str) -> None:
    size, probe, label = args
    with pytest.raises(ValueError, match=match):
        synth_image(size, probe, STYLES[0], label, np.random.default_rng(0))


def test_assign_splits_is_70_10_20_and_stable() -> None:
    ids = [f"x{i}" for i in range(10)]
    s = assign_splits(ids, seed=3)
    assert sorted(s.values()).count("train") == 7 and list(s.values()).count("val") == 1
    assert list(s.values()).count("test") == 2
    assert s == assign_splits(list(reversed(ids)), seed=3)  # order of ids does not matter
    big = assign_splits([f"x{i}" for i in range(100)], seed=3)
    assert [list(big.values()).count(v) for v in ("train", "val", "test")] == [70, 10, 20]
    assert big != assign_splits([f"x{i}" for i in range(100)], seed=4)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cohort_is_deterministic_and_reads_back_as_sites(tmp_path: Path) -> None:
    a = make_cohort(tmp_path / "a", sites=3, per_site=10, seed=5, size=64, progress=None)
    b = make_cohort(tmp_path / "b", sites=3, per_site=10, seed=5, size=64, progress=None)
    c = make_cohort(tmp_path / "c", sites=1, per_site=10, seed=6, size=64, progress=None)

    assert a == [tmp_path / "a" / f"site-{k}" for k in range(3)]
    fa = _files(tmp_path / "a")
    assert fa == _files(tmp_path / "b")  # byte-identical
    assert len(fa) == 3 * (2 * 10 + 1)
    assert _files(c[0])["labels.csv"] != fa["site-0/labels.csv"]

    for k, folder in enumerate(a):
        site = load_site(folder)
        assert site.id == f"site-{k}" and site.problems == ()
        assert len(site.records) == 10
        assert site.splits() == {"train": 7, "val": 1, "test": 2}
        with open(folder / "labels.csv", newline="") as f:
            header = next(csv.reader(f))
        assert header == ["id", "label", "probe", "split", "height", "width"]
        for rec in site.records:
            assert rec.probe in ("linear", "convex")
            assert rec.labels["label"] in LABELS
            assert (rec.labels["height"], rec.labels["width"]) == ("64", "64")
            assert read_gray(rec.image).shape == (64, 64)
            assert read_mask(rec.mask).any() == (rec.labels["label"] != "normal")
    probes = [[r.probe for r in load_site(f).records] for f in a]
    assert probes[0].count("linear") == 9 and probes[1].count("convex") == 9  # 90% of 10: mixes differ
    labels = [[r.labels["label"] for r in load_site(f).records] for f in a]
    # class mixes 30/40/30 and 20/30/50 of 10 images, exactly
    assert [labels[0].count(x) for x in LABELS] == [3, 4, 3]
    assert [labels[2].count(x) for x in LABELS] == [2, 3, 5]


def test_rerun_replaces_a_synthetic_site_and_refuses_foreign_folders(tmp_path: Path) -> None:
    make_cohort(tmp_path, sites=1, per_site=12, seed=0, size=48, progress=None)
    make_cohort(tmp_path, sites=1, per_site=4, seed=0, size=48, progress=None)
    site = load_site(tmp_path / "site-0")
    assert len(site.records) == 4 and site.problems == ()  # no stale images left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site-0"]  # no temporary folder left

    foreign = tmp_path / "other"
    (foreign / "site-0").mkdir(parents=True)
    (foreign / "site-0" / "patient.png").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="not a synthetic site folder"):
        make_cohort(foreign, sites=1, per_site=4, seed=0, size=48, progress=None)
    assert (foreign / "site-0" / "patient.png").read_bytes() == b"keep me"
    with pytest.raises(ValueError, match="per_site"):
        make_cohort(tmp_path, sites=1, per_site=0, seed=0)


def test_progress_is_one_line_per_site(tmp_path: Path) -> None:
    lines: list[str] = []
    make_cohort(tmp_path, sites=2, per_site=3, seed=0, size=48, progress=lines.append)
    assert len(lines) == 2 and lines[0].startswith("site-0") and "3 images" in lines[0]


def test_cli_synth_uses_params_defaults_and_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("synth:\n  sites: 2\n  per_site: 5\n  size: 48\n  seed: 1\n")
    out = tmp_path / "cohort"

    assert main(["--params", str(params), "data", "synth", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 sites x 5 images (48 px, seed 1)" in text
    assert "img/s" in text and "normal" in text and "malignant" in text
    assert sorted(p.name for p in out.iterdir()) == ["site-0", "site-1"]
    assert read_gray(out / "site-0" / "images" / "s0_00000.png").shape == (48, 48)

    assert main(["--params", str(params), "data", "synth", "--out", str(out), "--sites", "1",
                 "--per-site", "10", "--size", "32", "--seed", "1"]) == 0
    assert len(load_site(out / "site-0").records) == 10

    with pytest.raises(SystemExit) as info:
        main(["data", "synth", "--out", str(out), "--per-site", "0"])
    assert info.value.code == 2
    assert "--per-site: must be >= 1" in capsys.readouterr().err
