"""Task views on site folders: fixed splits, skipped rows, paired augmentation, bad files."""
from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from ultrafed.data.sites import SiteError
from ultrafed.data.synth import make_cohort
from ultrafed.data.tasks import TASKS, TaskDataset, crop_box, get_task, load_task, task_records


def write_site(folder: Path, rows: list[dict[str, str]], images: dict[str, np.ndarray],
               masks: dict[str, np.ndarray] | None = None) -> Path:
    (folder / "images").mkdir(parents=True)
    for k, img in images.items():
        cv2.imwrite(str(folder / "images" / f"{k}.png"), img)
    if masks is not None:
        (folder / "masks").mkdir()
        for k, m in masks.items():
            cv2.imwrite(str(folder / "masks" / f"{k}.png"), m)
    with open(folder / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return folder


def square_image(size: int = 64, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Dark speckle with one bright square; the mask is exactly the square."""
    rng = rng or np.random.default_rng(0)
    img = rng.integers(0, 60, (size, size), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[16:40, 20:48] = 255
    img[mask > 0] = 220
    return img, mask


# -- real data ---------------------------------------------------------------------------------------

@pytest.mark.shared_data
def test_busi_cls_uses_the_fixed_splits(shared_data):
    counts = {s: len(task_records("busi-cls", shared_data, s)) for s in ("train", "val", "test")}
    assert counts == {"train": 535, "val": 91, "test": 154}  # all 780 images, none dropped
    train = Counter(r.labels["label"] for r in task_records("busi-cls", shared_data, "train"))
    assert train == {"benign": 307, "malignant": 136, "normal": 92}


@pytest.mark.shared_data
def test_ddti_cls_skips_unknown_malignancy(shared_data):
    counts = {}
    for split in ("train", "val", "test"):
        records, problems = load_task("ddti-cls", shared_data, split)
        assert {r.labels["malignant"] for r in records} == {"0", "1"}
        assert all("malignant unknown" in p for p in problems)
        counts[split] = (len(records), len(problems))
    # labels.csv: train 50 + 271 known, 129 empty; val 4 + 51, 24; test 16 + 64, 46
    assert counts == {"train": (321, 129), "val": (55, 24), "test": (80, 46)}
    # segmentation needs no label: every DDTI image with a mask counts
    assert len(task_records("ddti-seg", shared_data, "train")) == 450


@pytest.mark.shared_data
def test_busi_seg_items_have_empty_masks_for_normals(shared_data):
    records = [r for r in task_records("busi-seg", shared_data, "val") if r.labels["label"] == "normal"][:2]
    ds = TaskDataset(records, TASKS["busi-seg"], 64)
    assert len(ds) == 2 and all(ds[i]["mask"].sum() == 0 for i in range(2))


# -- synthetic cohort -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    make_cohort(root, sites=2, per_site=10, seed=0, size=64, progress=None)
    return root


def test_synth_tasks_pool_every_site_folder(cohort):
    records = task_records("synth-cls", cohort, "train") + task_records("synth-cls", cohort, "val") \
        + task_records("synth-cls", cohort, "test")
    assert len(records) == 20 and {r.site for r in records} == {"site-0", "site-1"}
    ds = TaskDataset(records, TASKS["synth-cls"], 32)
    item = ds[0]
    assert item["image"].shape == (1, 32, 32) and 0.0 <= item["image"].min() <= item["image"].max() <= 1.0
    assert ds.labels.tolist() == [TASKS["synth-cls"].classes.index(r.labels["label"]) for r in records]


def test_seg_items_are_binary_masks(cohort):
    ds = TaskDataset(task_records("synth-seg", cohort, "train"), TASKS["synth-seg"], 48, train=True)
    m = ds[0]["mask"]
    assert m.shape == (1, 48, 48) and set(m.unique().tolist()) <= {0.0, 1.0}


def test_augmentation_moves_image_and_mask_together(tmp_path):
    img, mask = square_image()
    write_site(tmp_path / "site", [{"id": "a", "label": "benign", "split": "train"}], {"a": img}, {"a": mask})
    ds = TaskDataset(task_records("synth-seg", tmp_path, "train"), TASKS["synth-seg"], 48, train=True, seed=3)
    crops, flips = set(), 0
    for epoch in range(12):
        ds.set_epoch(epoch)
        item = ds[0]
        bright = item["image"][0].numpy() > 0.5
        m = item["mask"][0].numpy() > 0.5
        iou = (bright & m).sum() / (bright | m).sum()
        assert iou > 0.9, f"epoch {epoch}: mask drifted from the image (IoU {iou:.2f})"
        crops.add(bright.tobytes())
        cols = np.nonzero(m.any(axis=0))[0]
        flips += int(cols.mean() < 24)  # the square sits right of centre unless flipped
    assert len(crops) > 6 and 0 < flips < 12  # the draws do vary
    ds.set_epoch(5)
    assert np.array_equal(ds[0]["image"].numpy(), ds[0]["image"].numpy())  # same (seed, epoch, index): same item


def test_eval_items_are_plain_resizes(tmp_path):
    img, mask = square_image()
    write_site(tmp_path / "site", [{"id": "a", "label": "benign", "split": "val"}], {"a": img}, {"a": mask})
    ds = TaskDataset(task_records("synth-seg", tmp_path, "val"), TASKS["synth-seg"], 32)
    m = ds[0]["mask"][0].numpy()
    assert m.sum() == 12 * 14 and m[8:20, 10:24].all()  # the 24x28 square at half size


def test_crop_box_stays_inside_the_frame():
    rng = np.random.default_rng(0)
    for _ in range(200):
        y0, x0, ch, cw = crop_box(50, 80, rng)
        assert 0 <= y0 and y0 + ch <= 50 and 0 <= x0 and x0 + cw <= 80
        assert 0.8 * 50 * 80 - 80 <= ch * cw <= 50 * 80


# -- bad input ---------------------------------------------------------------------------------------------

def test_unreadable_image_and_misfit_mask_are_left_out_with_a_reason(tmp_path):
    img, mask = square_image()
    folder = write_site(tmp_path / "site", [{"id": k, "label": "benign", "split": "train"} for k in "abc"],
                        {"a": img, "b": img, "c": img}, {"a": mask, "b": mask, "c": mask[:, :50]})
    (folder / "images" / "b.png").write_bytes(b"not a png")
    ds = TaskDataset(task_records("synth-seg", tmp_path, "train"), TASKS["synth-seg"], 32)
    assert len(ds) == 1 and ds.records[0].id == "a"
    assert len(ds.problems) == 2
    assert any("b.png" in p and "a text file named .png, not a supported image format" in p for p in ds.problems)
    assert any("c.png" in p and "does not match" in p for p in ds.problems)
    assert all("\n" not in p for p in ds.problems)


def test_unknown_and_foreign_labels_are_skipped_with_a_reason(tmp_path):
    img, _ = square_image()
    write_site(tmp_path / "site", [{"id": "a", "label": "benign", "split": "train"},
                                   {"id": "b", "label": "", "split": "train"},
                                   {"id": "c", "label": "cyst", "split": "train"}],
               {"a": img, "b": img, "c": img})
    records, problems = load_task("synth-cls", tmp_path, "train")
    assert [r.id for r in records] == ["a"]
    assert any("b.png" in p and "unknown" in p for p in problems)
    assert any("c.png" in p and "'cyst' is not one of normal, benign, malignant" in p for p in problems)


def test_missing_task_or_dataset_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'busi-det'"):
        get_task("busi-det")
    with pytest.raises(SiteError, match="no 'busi' site folder"):
        task_records("busi-cls", tmp_path, "train")
    with pytest.raises(SiteError, match="no site folders"):
        task_records("synth-cls", tmp_path, "train")
