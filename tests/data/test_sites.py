"""ultrafed.data.sites: site folders on tmp trees (every problem kind) and on the real data."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from ultrafed.data.sites import (
    KNOWN_PROBES, PROBES, Site, SiteError, find_shared_data, load_site, shared_sites,
)


def _png(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((16, 16), value, np.uint8)
    img[::2] = 255 - value
    assert cv2.imwrite(str(path), img)
    return path


def _site(root: Path, csv_text: str | None, images=(), masks=(), unlabeled=()) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in images:
        _png(root / "images" / f"{i}.png")
    for i in masks:
        _png(root / "masks" / f"{i}.png", 0)
    for i in unlabeled:
        _png(root / "unlabeled" / f"{i}.png")
    if csv_text is not None:
        (root / "labels.csv").write_text(csv_text)
    return root


def test_clean_site_reads_every_field(tmp_path: Path) -> None:
    root = _site(tmp_path / "clinic", "id,label,split,probe,hc_mm\n"
                 "a,benign,train,,\n"
                 "b,normal,val,convex,\n"
                 "c,malignant,test,LINEAR,12.5\n",
                 images="abc", masks="abc")

    site = load_site(root)

    assert isinstance(site, Site) and site.id == "clinic" and site.root == root
    assert site.problems == ()
    assert [r.id for r in site.records] == ["a", "b", "c"]
    a, b, c = site.records
    assert a.image == root / "images" / "a.png" and a.mask == root / "masks" / "a.png"
    assert (a.split, b.split, c.split) == ("train", "val", "test")
    # no probe value -> folder default ("clinic" is not a known data set -> unknown); case folded
    assert (a.probe, b.probe, c.probe) == ("unknown", "convex", "linear")
    assert dict(c.labels) == {"label": "malignant", "hc_mm": "12.5"}
    assert a.site == "clinic"
    assert load_site(root, site_id="hospital-7").records[0].site == "hospital-7"


def test_problems_are_recorded_one_line_each_and_the_rest_loads(tmp_path: Path) -> None:
    root = _site(tmp_path / "messy", "id,label,split\n"
                 "a,benign,train\n"
                 "ghost,benign,train\n"     # line 3: image missing
                 "a,normal,test\n"          # line 4: duplicate id
                 "b,normal,val\n"           # has image, mask missing while masks/ exists
                 ",normal,train\n",         # line 6: empty id
                 images=["a", "b", "orphan"], masks=["a"])

    site = load_site(root)

    assert [r.id for r in site.records] == ["a", "b"]
    assert site.records[0].split == "train"  # the first row of a duplicate wins
    assert site.records[1].mask is None
    expected = [  # relative to the site folder: problems may leave the site
        ("labels.csv:3", "image for id 'ghost' not found"),
        ("labels.csv:4", "duplicate id 'a' (first on line 2)"),
        ("labels.csv:5", "no mask for id 'b'"),
        ("labels.csv:6", "empty id"),
        ("images/orphan.png", "image has no row in labels.csv"),
    ]
    assert len(site.problems) == len(expected)
    for msg, (where, reason) in zip(site.problems, expected):
        assert msg.startswith(f"{where}: ") and reason in msg and "\n" not in msg
        assert str(tmp_path) not in msg


def test_image_and_mask_columns_with_a_missing_mask(tmp_path: Path) -> None:
    root = tmp_path / "cols"
    _png(root / "scans" / "x1.png")
    (root / "labels.csv").write_text("id,image,mask,split\n"
                                     "x1,scans/x1.png,seg/x1.png,train\n"
                                     "x2,scans/x2.png,,train\n")
    site = load_site(root)
    assert [r.id for r in site.records] == ["x1"]
    assert site.records[0].image == root / "scans" / "x1.png" and site.records[0].mask is None
    assert any("mask 'seg/x1.png' for id 'x1' not found" in p for p in site.problems)
    assert any("image 'scans/x2.png' for id 'x2' not found; row ignored" in p for p in site.problems)


def test_unknown_probe_value_is_a_problem_and_unknown(tmp_path: Path) -> None:
    root = _site(tmp_path / "busi", "id,split,probe\na,train,phased\n", images="a")
    site = load_site(root)
    assert site.records[0].probe == "unknown"
    assert len(site.problems) == 1 and "unknown probe 'phased'" in site.problems[0]


@pytest.mark.parametrize("name", sorted(KNOWN_PROBES))
def test_known_data_set_folder_gives_default_probe(tmp_path: Path, name: str) -> None:
    root = _site(tmp_path / name, "id,split\na,train\n", images="a")
    assert load_site(root).records[0].probe == KNOWN_PROBES[name] in PROBES


def test_unlabeled_folder_has_its_own_split_and_prefixed_ids(tmp_path: Path) -> None:
    root = _site(tmp_path / "hc18", "id,split\na,train\nb,test\n", images="ab", unlabeled=["a", "z"])
    site = load_site(root)
    assert [(r.id, r.split) for r in site.records] == [
        ("a", "train"), ("b", "test"), ("unlabeled/a", "unlabeled"), ("unlabeled/z", "unlabeled")]
    assert site.problems == ()  # an unlabeled 'a' next to a labelled 'a' is no duplicate
    assert all(r.mask is None and r.probe == "convex" for r in site.select(["unlabeled"]))
    assert [r.id for r in site.select("test")] == ["b"]  # one split name as a plain string
    assert len(site.select(["train", "unlabeled"])) == 3
    assert site.splits() == {"train": 1, "test": 1, "unlabeled": 2}


def test_folder_without_labels_lists_all_images_as_train(tmp_path: Path) -> None:
    with_images = _site(tmp_path / "plain", None, images=["p1", "p2"], masks=["p1"])
    flat = tmp_path / "flat"
    _png(flat / "f1.png")
    _png(flat / "series" / "f2.jpg")
    _png(flat / "masks" / "f1.png", 0)       # masks are not images of the site
    (flat / "notes.txt").write_text("x")

    s1, s2 = load_site(with_images), load_site(flat)

    assert [(r.id, r.split) for r in s1.records] == [("p1", "train"), ("p2", "train")]
    assert s1.records[0].mask == with_images / "masks" / "p1.png" and s1.records[1].mask is None
    assert [r.id for r in s2.records] == ["f1", "series/f2"]
    assert s2.records[0].mask == flat / "masks" / "f1.png"
    assert s1.problems == () and s2.problems == ()


def test_labels_without_id_column_is_a_one_line_error(tmp_path: Path) -> None:
    root = _site(tmp_path / "noid", "name,split\na,train\n", images="a")
    with pytest.raises(SiteError) as info:
        load_site(root)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert msg.startswith(f"{root / 'labels.csv'}: no 'id' column") and "\n" not in msg


def test_missing_folder_and_bad_encoding_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(SiteError, match="site folder not found"):
        load_site(tmp_path / "absent")
    root = _site(tmp_path / "latin1", None, images="a")
    (root / "labels.csv").write_bytes("id,split,note\na,train,caf\xe9\n".encode("latin-1"))
    with pytest.raises(SiteError, match="not UTF-8 text"):
        load_site(root)


def test_bom_and_padded_cells_are_tolerated(tmp_path: Path) -> None:
    root = _site(tmp_path / "excel", None, images="a")
    (root / "labels.csv").write_bytes("\ufeffid , split\n a , val \n".encode("utf-8"))
    site = load_site(root)
    assert [(r.id, r.split) for r in site.records] == [("a", "val")] and site.problems == ()


def test_find_shared_data_order_and_absence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tmp_path / "real"
    _site(real / "ddti", "id,split\n")
    _site(real / "hc18", "id,split\n")
    (real / "busi").mkdir()  # no labels.csv: not a usable data set
    empty = tmp_path / "empty"
    empty.mkdir()

    assert shared_sites(real) == {"ddti": real / "ddti", "hc18": real / "hc18"}
    assert find_shared_data(real) == real
    assert find_shared_data(empty) is None
    assert find_shared_data(tmp_path / "absent") is None
    monkeypatch.setenv("ULTRAFED_SHARED_DATA", str(real))
    assert find_shared_data() == real
    monkeypatch.setenv("ULTRAFED_SHARED_DATA", str(empty))
    assert find_shared_data() is None


@pytest.mark.shared_data
@pytest.mark.parametrize("name,labelled,unlabeled,probe,label_col", [
    ("busi", 780, 0, "linear", "label"),
    ("ddti", 655, 0, "linear", "malignant"),
    ("hc18", 999, 335, "convex", "hc_mm"),
])
def test_real_sites(shared_data: Path, name: str, labelled: int, unlabeled: int, probe: str, label_col: str) -> None:
    assert find_shared_data(shared_data) == shared_data
    site = load_site(shared_sites(shared_data)[name])

    assert site.problems == ()
    counts = site.splits()
    assert sum(counts.get(s, 0) for s in ("train", "val", "test")) == labelled
    assert counts.get("unlabeled", 0) == unlabeled
    assert all(counts[s] > 0 for s in ("train", "val", "test"))
    assert counts["train"] > counts["test"] > counts["val"]  # 70 / 20 / 10
    labelled_recs = site.select(["train", "val", "test"])
    assert all(r.mask is not None and r.image.is_file() for r in labelled_recs)
    assert {r.probe for r in site.records} == {probe}
    assert all(label_col in r.labels for r in labelled_recs)
    assert len({r.id for r in site.records}) == len(site.records)
