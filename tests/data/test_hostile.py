"""Files that attack the reader (issue 15, section 1): each case gets its one-line answer.

No case may hang, raise or lose the manifest; every message names the file relative to the
site folder, on one line. The sites are those of test_bad_inputs (10 good images + the attack).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

import ultrafed.data.io as uio
from _gate_sites import add_row, speckle, write_png, write_site
from _hostile import dicom_bytes, exif_jpeg, gif_bytes, jpeg_bytes, jpeg_declaring, png_bytes, png_declaring
from ultrafed.data.io import ImageReadError, load_image, read_gray, scan_folder
from ultrafed.data.manifest import read_manifest
from ultrafed.data.quality import check_site, render_report
from ultrafed.data.sites import load_site

GOOD = 10
REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)  # a FIFO or /dev/zero that is read hangs: fail instead


@pytest.fixture
def site(tmp_path):
    return write_site(tmp_path / "site", n=GOOD, masks=False)


@pytest.fixture
def no_decode(monkeypatch):
    """``no_decode(data)``: OpenCV's decoder fails the test if it is handed ``data`` (refusals
    must come from the header); other files decode as usual."""
    forbidden: list[bytes] = []
    real = uio.cv2.imdecode

    def imdecode(buf, flags):
        if bytes(buf) in forbidden:
            raise AssertionError("cv2.imdecode called on a file that should have been refused")
        return real(buf, flags)

    monkeypatch.setattr(uio.cv2, "imdecode", imdecode)
    return forbidden.append


def _gate(root, tmp_path, site_id="s"):
    return check_site(root, site_id, manifest_out=tmp_path / "manifests" / f"{site_id}.csv",
                      report=tmp_path / "report.md", workers=1)


def _lines(gate) -> list[str]:
    """Every message of the gate that may leave the site."""
    return (list(gate.reasons) + list(gate.problems) + [f"{r}: {w}" for r, w in gate.quarantined]
            + render_report(gate).splitlines())


def _no_leak(gate, tmp_path) -> None:
    for line in _lines(gate):
        assert str(tmp_path) not in line, line
    for line in list(gate.reasons) + list(gate.problems) + [w for _, w in gate.quarantined]:
        assert "\n" not in line and "\r" not in line


def _problem(gate, start: str) -> str:
    hits = [p for p in gate.problems if p.startswith(start)]
    assert len(hits) == 1, (start, gate.problems)
    return hits[0]


def _trains(gate, n_extra: int = 0) -> None:
    assert gate.status in ("pass", "warn") and gate.n_images == GOOD + n_extra, (gate.status, gate.reasons)
    assert Path(gate.manifest_path).is_file()  # nothing lost: the manifest is written


# ----------------------------------------------------------------------------------------------
# Bombs: the header's size is checked before anything is decoded

def test_png_bomb_60000_is_refused_by_its_header_and_the_site_trains(site, tmp_path, no_decode):
    bomb = png_declaring(60000, 60000)
    no_decode(bomb)
    (site / "images" / "bomb.png").write_bytes(bomb)
    add_row(site, "bomb")
    gate = _gate(site, tmp_path)
    _trains(gate)
    (rel, why), = gate.quarantined
    assert rel == "images/bomb.png"
    assert why == ("unreadable: PNG image header declares 60000x60000 px (3600 Mpx), over the 50 Mpx limit; "
                   "not decoded (a decompression bomb?)")
    _no_leak(gate, tmp_path)


def test_png_of_20000_px_is_refused_without_allocating(tmp_path, no_decode):
    p = tmp_path / "big.png"
    p.write_bytes(data := png_declaring(20000, 20000))
    no_decode(data)
    with pytest.raises(ImageReadError, match=r"20000x20000 px \(400 Mpx\), over the 50 Mpx limit"):
        load_image(p)
    with pytest.raises(ImageReadError, match=r"declares 20000x20000 px"):
        read_gray(p)


def test_pixel_limit_is_a_parameter(tmp_path):
    p = tmp_path / "frame.png"
    p.write_bytes(png_bytes(size=64))
    assert load_image(p).gray.shape == (64, 64)
    with pytest.raises(ImageReadError, match=r"64x64 px \(0 Mpx\), over the 0 Mpx limit"):
        load_image(p, max_pixels=64 * 64 - 1)


@pytest.mark.parametrize("width,height,reason", [
    (65000, 65000, "JPEG image header declares 65000x65000 px (4225 Mpx), over the 50 Mpx limit"),
    (0, 64, "corrupt JPEG image header"),
])
def test_jpeg_header_size_is_checked_too(tmp_path, no_decode, width, height, reason):
    p = tmp_path / "x.jpg"
    p.write_bytes(data := jpeg_declaring(width, height))
    no_decode(data)
    with pytest.raises(ImageReadError) as info:
        load_image(p)
    assert info.value.reason.startswith(reason) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------
# Only regular files are read; reads are bounded

def test_fifo_named_png_is_named_and_never_opened_for_a_blocking_read(site, tmp_path):
    os.mkfifo(site / "images" / "x.png")
    add_row(site, "x")
    gate = _gate(site, tmp_path)
    _trains(gate)
    assert gate.quarantined == ()
    assert _problem(gate, "labels.csv:12: ") == (
        "labels.csv:12: image for id 'x' not usable (images/x.png: a FIFO (named pipe), not a regular file; "
        "not read); row ignored")
    with pytest.raises(ImageReadError, match="is a FIFO \\(named pipe\\), not a regular file; not read"):
        read_gray(site / "images" / "x.png")  # the reader itself refuses it too
    _no_leak(gate, tmp_path)


def test_fifo_in_a_site_without_labels_is_named(tmp_path):
    root = write_site(tmp_path / "flat", n=GOOD, masks=False, labels_csv=False)
    os.mkfifo(root / "images" / "y.png")
    gate = _gate(root, tmp_path)
    _trains(gate)
    assert _problem(gate, "images/y.png: ") == "images/y.png: a FIFO (named pipe), not a regular file; not read"


def test_symlink_to_dev_zero_is_refused(site, tmp_path):
    os.symlink("/dev/zero", site / "images" / "zero.png")
    add_row(site, "zero")
    gate = _gate(site, tmp_path)
    _trains(gate)
    assert "images/zero.png: symbolic link that resolves outside the site folder; not followed" in \
        _problem(gate, "labels.csv:12: ")
    with pytest.raises(ImageReadError, match="is a character device, not a regular file; not read"):
        read_gray("/dev/zero")


def test_reads_are_bounded(tmp_path):
    p = tmp_path / "huge.png"
    p.write_bytes(data := png_bytes())
    assert uio.read_file_bytes(p, max_bytes=len(data)) == data
    with pytest.raises(ImageReadError, match=rf"file of {len(data)} bytes, over the 100 byte limit; not read"):
        uio.read_file_bytes(p, max_bytes=100)


# ----------------------------------------------------------------------------------------------
# Nothing outside the site folder is read

def test_symlinks_out_of_the_site_are_refused_one_line_each(site, tmp_path):
    outside = tmp_path / "outside"
    write_png(outside / "leak.png", speckle(90))
    write_png(outside / "dir" / "leak2.png", speckle(91))
    os.symlink(outside / "leak.png", site / "images" / "leak.png")  # a file out of the site
    os.symlink(outside / "dir", site / "images" / "linked")          # a folder out of the site
    os.symlink("../images/img_001.png", site / "images" / "inside.png")  # inside: allowed
    add_row(site, "leak")
    add_row(site, "inside")
    gate = _gate(site, tmp_path)
    _trains(gate, n_extra=0)  # inside.png is a copy of img_001: quarantined as its duplicate
    assert dict(gate.quarantined) == {"images/inside.png": "unique_sha256: duplicate of images/img_001.png"}
    assert _problem(gate, "labels.csv:12: ") == (
        "labels.csv:12: image for id 'leak' not usable (images/leak.png: symbolic link that resolves outside "
        "the site folder; not followed); row ignored")
    assert _problem(gate, "images/linked: ") == \
        "images/linked: symbolic link that resolves outside the site folder; not followed"
    rels = set(read_manifest(gate.manifest_path)["relpath"])
    assert not any("leak" in r for r in rels) and "images/inside.png" in rels
    _no_leak(gate, tmp_path)


def test_images_folder_itself_linked_out_of_the_site(tmp_path):
    outside = write_site(tmp_path / "elsewhere", n=3, masks=False, labels_csv=False)
    root = tmp_path / "site"
    root.mkdir()
    os.symlink(outside / "images", root / "images")
    site = load_site(root)
    assert site.records == ()
    assert site.problems == ("images: symbolic link that resolves outside the site folder; not followed",)


@pytest.mark.parametrize("column", ["image", "mask"])
def test_labels_csv_paths_out_of_the_site_are_refused(tmp_path, column):
    root, outside = tmp_path / "site", tmp_path / "outside"
    write_png(outside / "abs.png", speckle(92))
    for k in range(4):
        write_png(root / "images" / f"i{k}.png", speckle(k))
    cells = [str(outside / "abs.png"), "../../outside/abs.png", "../outside/abs.png"]
    why = ["is an absolute path; only paths inside the site folder are read",
           "resolves outside the site folder; refused", "resolves outside the site folder; refused"]
    rows = ["i3,images/i3.png,,train"] + [
        f"i{k},{cell if column == 'image' else f'images/i{k}.png'},{cell if column == 'mask' else ''},train"
        for k, cell in enumerate(cells)]
    (root / "labels.csv").write_text("id,image,mask,split\n" + "\n".join(rows) + "\n")
    site = load_site(root)
    assert all(uio.inside(r.image, root) for r in site.records) and {r.mask for r in site.records} == {None}
    assert [r.id for r in site.records] == (["i3"] if column == "image" else ["i3", "i0", "i1", "i2"])
    tail = "; row ignored" if column == "image" else ""
    assert list(site.problems) == [f"labels.csv:{k + 3}: {column} {cell!r} for id 'i{k}' {w}{tail}"
                                   for k, (cell, w) in enumerate(zip(cells, why))]


def test_labels_csv_that_is_no_regular_file_fails_the_site(tmp_path):
    root = write_site(tmp_path / "site", n=GOOD, masks=False, labels_csv=False)
    os.mkfifo(root / "labels.csv")  # read as "no labels.csv", every val/test image would pretrain
    gate = _gate(root, tmp_path)
    assert gate.status == "fail" and gate.n_images == 0
    assert gate.problems == ("s/labels.csv: is a FIFO (named pipe), not a regular file",)


# ----------------------------------------------------------------------------------------------
# Say what the file is

def test_jpeg_named_png_is_read_and_said(site, tmp_path):
    (site / "images" / "photo.png").write_bytes(jpeg_bytes(93))
    add_row(site, "photo")
    gate = _gate(site, tmp_path)
    _trains(gate, n_extra=1)
    assert _problem(gate, "images/photo.png: ") == \
        "images/photo.png: the content is a JPEG image, not .png as named; read as JPEG"


def test_animated_gif_named_png(site, tmp_path):
    (site / "images" / "clip.png").write_bytes(gif_bytes(frames=3))
    add_row(site, "clip")
    gate = _gate(site, tmp_path)
    _trains(gate)
    assert dict(gate.quarantined) == {"images/clip.png": (
        "unreadable: an animated GIF (3 frames) named .png, not a supported image format (PNG, JPEG, BMP or TIFF)")}


@pytest.mark.parametrize("name,make,what", [
    ("scan.dcm", dicom_bytes, "a DICOM file, not a supported image format (PNG, JPEG, BMP or TIFF)"),
    ("still.gif", gif_bytes, "a GIF image, not a supported image format (PNG, JPEG, BMP or TIFF)"),
    ("x.png", None, "is a directory"),
])
def test_unsupported_file_of_an_id_says_what_it_is(site, tmp_path, name, make, what):
    target = site / "images" / name
    if make is None:
        target.mkdir()
    else:
        target.write_bytes(make())
    rid = name.split(".")[0]
    add_row(site, rid)
    gate = _gate(site, tmp_path)
    _trains(gate)
    assert _problem(gate, "labels.csv:12: ") == \
        f"labels.csv:12: image for id {rid!r} not usable (images/{name}: {what}); row ignored"
    assert not any(name in p for p in gate.problems if not p.startswith("labels.csv:12"))  # said once


def test_unsupported_files_in_a_site_without_labels_are_named(tmp_path):
    root = write_site(tmp_path / "flat", n=GOOD, masks=False, labels_csv=False)
    (root / "images" / "scan.dcm").write_bytes(dicom_bytes())
    (root / "images" / "IM0001").write_bytes(dicom_bytes())  # DICOM often has no extension
    (root / "images" / "frame.dat").write_bytes(png_bytes(94))
    (root / "images" / "notes.txt").write_text("not an image\n")  # skipped silently: no image
    gate = _gate(root, tmp_path)
    _trains(gate)
    dicom = "a DICOM file, not a supported image format (PNG, JPEG, BMP or TIFF)"
    assert set(gate.problems) == {f"images/IM0001: {dicom}", f"images/scan.dcm: {dicom}",
                                  "images/frame.dat: a PNG image without an image extension; not read (rename it)"}


# ----------------------------------------------------------------------------------------------
# EXIF orientation

@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, orientation):
    img = speckle(95, shape=(48, 80))
    img[:12, :20] = 250  # a bright corner shows which way the frame turned
    p = tmp_path / "rot.jpg"
    p.write_bytes(exif_jpeg(img, orientation))
    ref = np.asarray(ImageOps.exif_transpose(Image.open(p)).convert("L"), dtype=np.int16)
    got = load_image(p)
    assert got.gray.shape == ref.shape
    assert np.abs(got.gray.astype(np.int16) - ref).mean() < 2.0  # Pillow and OpenCV JPEG decoders
    assert got.notes == (() if orientation == 1 else
                         (f"EXIF orientation {orientation} applied (stored 80x48, read "
                          f"{ref.shape[1]}x{ref.shape[0]})",))


def test_exif_rotated_jpeg_in_the_manifest(site, tmp_path):
    (site / "images" / "turned.jpg").write_bytes(exif_jpeg(speckle(96, shape=(48, 80)), 6))
    add_row(site, "turned")
    gate = _gate(site, tmp_path)
    _trains(gate, n_extra=1)
    row = read_manifest(gate.manifest_path).set_index("relpath").loc["images/turned.jpg"]
    assert (row["width"], row["height"]) == (48, 80)  # as seen, not as stored
    assert _problem(gate, "images/turned.jpg: ") == \
        "images/turned.jpg: EXIF orientation 6 applied (stored 80x48, read 48x80)"


# ----------------------------------------------------------------------------------------------
# Names: quarantine holds for every name, no absolute path, one line each

def _latin1_site(tmp_path: Path) -> tuple[Path, str]:
    """A site without labels.csv whose one non-UTF-8 name is a corrupt file (so the gate
    quarantines it); returns (root, its relpath as the manifest writes it)."""
    root = write_site(tmp_path / "flat", n=GOOD, masks=False, labels_csv=False)
    with open(os.path.join(os.fsencode(root / "images"), b"caf\xe9.png"), "wb") as f:
        f.write(png_bytes(97)[:300])  # truncated
    return root, "images/caf\\xe9.png"


def test_non_utf8_name_quarantined_and_keyed_like_its_record(tmp_path):
    root, shown = _latin1_site(tmp_path)
    gate = _gate(root, tmp_path)
    _trains(gate)
    assert dict(gate.quarantined) == {shown: "unreadable: truncated PNG (no IEND chunk)"}
    bad = {rel for rel, _ in gate.quarantined}
    records = load_site(root, "s").records
    assert [r.relpath for r in records if r.relpath in bad] == [shown]  # the key training must use
    assert len([r for r in records if r.relpath not in bad]) == GOOD
    json.dumps([list(q) for q in gate.quarantined]).encode("ascii")  # quarantine.json: plain text
    _no_leak(gate, tmp_path)


def test_client_training_skips_a_quarantined_non_utf8_name(tmp_path):
    from ultrafed.federated.client import _training_records, site_check

    root, shown = _latin1_site(tmp_path)
    site_check("s", root, tmp_path / "work")
    trained = {r.relpath for r in _training_records("s", root, tmp_path / "work")}
    assert shown not in trained and len(trained) == GOOD


def test_newline_in_a_name_is_one_line(tmp_path):
    root = write_site(tmp_path / "flat", n=GOOD, masks=False, labels_csv=False)
    write_png(root / "images" / "two\nlines.png", speckle(98))
    write_png(root / "images" / "tab\there.png", speckle(99))
    gate = _gate(root, tmp_path)
    _trains(gate)
    reason = "file name holds a control character (newline, tab, ...); not read"
    assert set(gate.problems) == {f"images/two\\x0alines.png: {reason}", f"images/tab\\x09here.png: {reason}"}
    _no_leak(gate, tmp_path)


def test_site_check_result_carries_no_absolute_path(tmp_path):
    """Issue 11: what site_check returns (report_md, quarantined, reasons) leaves the site."""
    from ultrafed.federated.client import site_check

    root = write_site(tmp_path / "hospital" / "data", n=GOOD, masks=False)
    (root / "images" / "cut.png").write_bytes(png_bytes(3)[:200])
    add_row(root, "cut")
    os.symlink("/etc/hostname", root / "images" / "host.png")
    add_row(root, "host")
    res = site_check("s", root, tmp_path / "work")
    text = json.dumps(res)
    assert res["n_quarantined"] == 1 and res["quarantined"] == ["images/cut.png: unreadable: truncated PNG (no IEND chunk)"]
    assert "manifest: `s.csv`" in res["report_md"] and "host.png" in res["report_md"]
    for needle in (str(tmp_path), str(root), "/etc/hostname", str(tmp_path / "work")):
        assert needle not in text
    for line in res["report_md"].splitlines():
        assert not line.startswith("/") and "`/" not in line


# ----------------------------------------------------------------------------------------------
# Folders that cannot be read

def test_unreadable_subfolder_is_reported(tmp_path, monkeypatch):
    """The reporting path, for any user (root reads a chmod 000 folder anyway): os.scandir
    raising PermissionError for one folder gives one line, the rest of the site is read."""
    root = write_site(tmp_path / "flat", n=GOOD, masks=False, labels_csv=False)
    locked = root / "images" / "locked"
    write_png(locked / "hidden.png", speckle(100))
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == os.fspath(locked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(uio.os, "scandir", scandir)
    gate = _gate(root, tmp_path)
    _trains(gate)
    assert gate.problems == ("images/locked: permission denied: folder not read",)


_CHMOD_SCRIPT = """
import json, sys
from ultrafed.data.sites import load_site
site = load_site(sys.argv[1], "s")
print(json.dumps({"problems": list(site.problems), "n": len(site.records)}))
"""


def _as_nobody() -> list[str] | None:
    """A command prefix that drops root to 'nobody' (setpriv, else runuser), None if neither."""
    if shutil.which("setpriv"):
        return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    if shutil.which("runuser"):
        return ["runuser", "-u", "nobody", "--"]
    return None


def test_chmod_000_subfolder_is_reported(tmp_path):
    """The real case: as a non-root user a chmod 000 folder cannot be listed. Tests run as root
    here, so the scan runs in a subprocess as 'nobody' (in a world-readable temp folder)."""
    prefix = [] if os.geteuid() != 0 else _as_nobody()
    if prefix is None:
        pytest.skip("running as root without setpriv/runuser: a chmod 000 folder is readable to root")
    top = Path(tempfile.mkdtemp(prefix="ultrafed-chmod-"))
    try:
        top.chmod(0o755)
        root = write_site(top / "flat", n=GOOD, masks=False, labels_csv=False)
        for d in (root, root / "images"):
            d.chmod(0o755)
        for f in (root / "images").iterdir():
            f.chmod(0o644)
        write_png(root / "images" / "locked" / "hidden.png", speckle(101))
        (root / "images" / "locked").chmod(0o000)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        out = subprocess.run(prefix + [sys.executable, "-c", _CHMOD_SCRIPT, str(root)], cwd=str(top), env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        res = json.loads(out.stdout.strip().splitlines()[-1])
        assert res == {"problems": ["images/locked: permission denied: folder not read"], "n": GOOD}
    finally:
        (top / "flat" / "images" / "locked").chmod(0o755)
        shutil.rmtree(top, ignore_errors=True)


def test_scan_folder_lists_and_refuses(tmp_path):
    """The walker on its own: what it takes, what it names, what it skips."""
    (tmp_path / "a.png").write_bytes(png_bytes())
    os.mkfifo(tmp_path / "f.png")
    os.symlink("/dev/null", tmp_path / "null.png")
    (tmp_path / "readme.txt").write_text("notes")
    listing = scan_folder(tmp_path)
    assert listing.files == [tmp_path / "a.png"]
    assert listing.refused == [
        (tmp_path / "f.png", "a FIFO (named pipe), not a regular file; not read"),
        (tmp_path / "null.png", "symbolic link that resolves outside the site folder; not followed"),
    ]
