"""UltraMIMDataset: offline SMAT copies, clean targets, MIC inputs, texture scores, seeded items."""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import torch

from ultrafed.data.datasets import UltraMIMDataset, dataset_from_config, make_loader, random_resized_crop
from ultrafed.data.io import read_gray
from ultrafed.data.sites import load_site
from ultrafed.data.synth import make_cohort
from ultrafed.ultramim.smat import ScanGeometry, convex_to_linear, estimate_geometry, linear_to_convex, sector_mask
from ultrafed.ultramim.tgm import texture_scores

torch.set_num_threads(1)
MIC = {"p": 1.0, "p_each": 0.5, "motion_kernel": 24, "gauss_sigma": 1.1, "sp_amount": 0.05}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Six synthetic images of the mixed-probe site (both geometries present)."""
    out = tmp_path_factory.mktemp("cohort")
    folders = make_cohort(out, sites=2, per_site=6, seed=0, size=96, progress=None)
    recs = list(load_site(folders[1]).records)
    assert {r.probe for r in recs} == {"linear", "convex"}
    return recs


def make(records, **kw):
    kw = {"img_size": 64, "patch_size": 16, "smat": True, "mic": None, "seed": 0, **kw}
    return UltraMIMDataset(records, **kw)


def test_smat_doubles_the_site_and_copies_are_converted(records):
    geom = ScanGeometry(angle_deg=50.0, r_min_frac=0.2)
    ds = make(records, smat_geometry=geom)
    n = len(records)
    assert ds.n_images == n and len(ds) == 2 * n
    assert len(make(records, smat=False)) == n
    for i, rec in enumerate(records):
        orig = read_gray(rec.image)
        assert np.array_equal(ds.gray(i), orig)
        copy = ds.gray(n + i)
        if rec.probe == "linear":  # drawn into the configured fan: black outside it
            assert np.array_equal(copy, linear_to_convex(orig, geom))
            near_fan = cv2.dilate(sector_mask(orig.shape, geom).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
            assert copy[~near_fan].max() == 0 and copy[sector_mask(orig.shape, geom)].mean() > 20
        else:  # the image's own fan unrolled into a rectangle
            assert np.array_equal(copy, convex_to_linear(orig, estimate_geometry(orig)))


def test_unknown_probe_is_detected(records):
    unknown = [dataclasses.replace(r, probe="unknown") for r in records]
    ds = make(unknown)
    assert ds.probes == [r.probe for r in records]
    assert all(np.array_equal(make(records).gray(k), ds.gray(k)) for k in range(len(ds)))


def test_item_contents(records):
    ds = make(records, mic=MIC)
    for k in (0, len(records) + 1):
        item = ds[k]
        assert set(item) == {"input", "target", "texture"}
        assert item["target"].shape == item["input"].shape == (1, 64, 64)
        assert item["texture"].shape == (16,)
        assert all(v.dtype == torch.float32 for v in item.values())
        assert 0.0 <= item["target"].min() and item["target"].max() <= 1.0
        assert 0.0 <= item["input"].min() and item["input"].max() <= 1.0
        # texture scores are those of the clean target, not of the corrupted input
        assert torch.equal(item["texture"], texture_scores(item["target"][None], 16)[0])
        assert not torch.equal(item["input"], item["target"])  # p=1: always corrupted
        # target values are uint8 levels: an unblurred, uncorrupted 8-bit crop
        assert torch.allclose(item["target"] * 255, (item["target"] * 255).round(), atol=1e-3)


def test_no_mic_means_input_is_target(records):
    item = make(records, mic=None)[2]
    assert torch.equal(item["input"], item["target"])


def test_items_seeded_by_seed_epoch_index(records):
    ds, other_seed = make(records, mic=MIC), make(records, mic=MIC, seed=1)
    a, b = ds[3], ds[3]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["target"], other_seed[3]["target"])
    ds.set_epoch(1)
    assert ds.epoch == 1 and not torch.equal(a["target"], ds[3]["target"])
    ds.set_epoch(0)
    assert torch.equal(a["input"], ds[3]["input"])


def test_cache_off_gives_the_same_items(records):
    cached, lazy = make(records, mic=MIC), make(records, mic=MIC, cache=False)
    for k in (1, len(records) + 2):
        x, y = cached[k], lazy[k]
        assert all(torch.equal(x[key], y[key]) for key in x)


def _batches(loader, epoch):
    loader.dataset.set_epoch(epoch)
    return [b for b in loader]


def test_workers_do_not_change_the_data(records):
    """0 or 2 workers, epoch 0 then 1: identical batches (the epoch reaches persistent workers)."""
    ds0, ds2 = make(records, mic=MIC), make(records, mic=MIC)
    l0, l2 = make_loader(ds0, 4, 0, seed=5), make_loader(ds2, 4, 2, seed=5)
    assert l2.persistent_workers and not l0.persistent_workers
    for epoch in (0, 1):
        b0, b2 = _batches(l0, epoch), _batches(l2, epoch)
        assert len(b0) == len(b2) == 3  # 12 items, drop_last with a full batch available
        for x, y in zip(b0, b2):
            assert all(torch.equal(x[k], y[k]) for k in x)
        if epoch == 0:
            first = b0
    assert not torch.equal(first[0]["target"], b0[0]["target"])


def test_loader_order_is_seeded(records):
    ds = make(records, smat=False)
    order = lambda seed: torch.cat([b["target"] for b in make_loader(ds, 2, 0, seed)]).flatten(1).sum(1)
    assert torch.equal(order(3), order(3))
    assert not torch.equal(order(3), order(4))


def test_loader_drop_last_default(records):
    ds = make(records, smat=False)  # 6 items
    assert len(make_loader(ds, 4, 0, 0)) == 1          # one full batch, ragged rest dropped
    assert len(make_loader(ds, 8, 0, 0)) == 1          # smaller than a batch: still one step
    assert len(make_loader(ds, 4, 0, 0, drop_last=False)) == 2
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(ds, 0, 0, 0)


def test_unreadable_files_are_skipped_with_one_line_each(records, tmp_path):
    garbage, empty, trunc = tmp_path / "garbage.png", tmp_path / "empty.png", tmp_path / "trunc.png"
    garbage.write_bytes(b"not an image at all" * 20)
    empty.write_bytes(b"")
    trunc.write_bytes(records[0].image.read_bytes()[:200])
    paths = (garbage, empty, trunc, tmp_path / "gone.png")
    # tmp_path plays the site folder of these records: problems name files relative to it
    bad = [dataclasses.replace(records[0], id=p.stem, image=p, root=tmp_path) for p in paths]
    ds = make(bad[:2] + records[:3] + bad[2:])
    assert ds.n_images == 3 and len(ds) == 6
    assert [r.id for r in ds.records] == [r.id for r in records[:3]]
    assert len(ds.problems) == 4
    for line, p in zip(ds.problems, paths):
        assert line.startswith(f"{p.name}: ") and "\n" not in line and str(tmp_path) not in line
    assert "zero-byte" in ds.problems[1] and "not found" in ds.problems[3]
    nothing = make(bad)
    assert len(nothing) == 0 and len(nothing.problems) == 4


def test_problems_never_carry_an_absolute_path(records, tmp_path):
    """A record of another folder (relpath would climb out with ../) or one with no site root
    at all (a bare record) is named by its file name only."""
    p = tmp_path / "odd.png"
    p.write_bytes(b"")
    bare = type("Bare", (), {"image": p, "probe": "linear"})()
    ds = make([dataclasses.replace(records[0], image=p), bare])
    assert ds.problems == ["odd.png: zero-byte file", "odd.png: zero-byte file"]


def test_file_broken_after_construction_names_the_file(records, tmp_path):
    p = tmp_path / "images" / "later.png"
    p.parent.mkdir()
    p.write_bytes(records[0].image.read_bytes())
    ds = make([dataclasses.replace(records[0], image=p, root=tmp_path)], cache=False)
    p.write_bytes(b"")
    with pytest.raises(ValueError, match="^images/later.png: zero-byte file") as info:
        ds[0]
    assert str(tmp_path) not in str(info.value)


def test_index_out_of_range(records):
    ds = make(records)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_random_resized_crop():
    img = np.arange(100 * 100, dtype=np.float32).reshape(100, 100)
    rng = np.random.default_rng(0)
    out = random_resized_crop(img, 50, rng, scale=(1.0, 1.0), ratio=(1.0, 1.0))  # whole image, resized
    assert np.allclose(out, img.reshape(50, 2, 50, 2).mean(axis=(1, 3)))
    for _ in range(20):
        crop = random_resized_crop(img, 32, rng)
        assert crop.shape == (32, 32)
    # a frame too elongated for any draw: the largest centred crop within the ratio range
    wide = np.tile(np.arange(400, dtype=np.float32), (20, 1))
    c = random_resized_crop(wide, 8, np.random.default_rng(0), scale=(0.99, 1.0))
    assert c.shape == (8, 8) and abs(float(c.mean()) - 199.5) < 2


def test_dataset_from_config(records, tiny_cfg):
    ds = dataset_from_config(records, tiny_cfg)
    assert ds.img_size == 64 and ds.smat == tiny_cfg.ultramim.smat.enabled
    assert ds.mic == {k: getattr(tiny_cfg.ultramim.mic, k)
                      for k in ("p", "p_each", "motion_kernel", "gauss_sigma", "sp_amount", "ref_size")}
    assert ds.smat_geometry.angle_deg == tiny_cfg.ultramim.smat.angle_deg
    off = dataset_from_config(records, tiny_cfg.replace(**{"ultramim.mic.enabled": False, "ultramim.smat.enabled": False}))
    assert off.mic is None and len(off) == len(records)
