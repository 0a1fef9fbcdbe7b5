"""ultrafed.data.io on files written here: every format/depth/channel layout, every bad input."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from ultrafed.data.io import ImageReadError, list_images, load_image, read_gray, read_mask

H, W = 24, 32
# BGR primaries and their gray value by the ITU-R 601 weights cv2 uses:
# red 0.299*255 = 76.2 -> 76, green 0.587*255 = 149.7 -> 150, blue 0.114*255 = 29.1 -> 29.
PRIMARIES = {"red": ((0, 0, 1), 76), "green": ((0, 1, 0), 150), "blue": ((1, 0, 0), 29)}


def _color_image(dtype: type, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Three vertical bands (red, green, blue) at full scale; returns (file array, expected gray)."""
    full = np.iinfo(dtype).max
    img = np.zeros((H, W, channels), dtype)
    expected = np.zeros((H, W), np.uint8)
    for band, ((b, g, r), gray) in enumerate(PRIMARIES.values()):
        cols = slice(band * W // 3, (band + 1) * W // 3 if band < 2 else W)
        img[:, cols, :3] = np.array([b, g, r], np.float64) * full
        expected[:, cols] = gray
    if channels == 4:
        img[:, :, 3] = np.linspace(0, full, W, dtype=np.float64).astype(dtype)  # alpha is ignored
    return img, expected


def _gray_image(dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """Left half 10, right half 200 (16 bit: 257 * v, which scales back to exactly v)."""
    expected = np.full((H, W), 10, np.uint8)
    expected[:, W // 2:] = 200
    scale = 257 if dtype == np.uint16 else 1
    return expected.astype(dtype) * scale, expected


LOSSLESS = [
    ("png", np.uint8, 1), ("png", np.uint8, 3), ("png", np.uint8, 4),
    ("png", np.uint16, 1), ("png", np.uint16, 3), ("png", np.uint16, 4),
    ("tif", np.uint8, 1), ("tif", np.uint8, 3), ("tiff", np.uint16, 1), ("tiff", np.uint16, 3),
    ("tif", np.uint16, 4), ("bmp", np.uint8, 1), ("bmp", np.uint8, 3),
]


@pytest.mark.parametrize("ext,dtype,channels", LOSSLESS)
def test_lossless_formats_give_exact_uint8_gray(tmp_path: Path, ext: str, dtype: type, channels: int) -> None:
    arr, expected = _gray_image(dtype) if channels == 1 else _color_image(dtype, channels)
    path = tmp_path / f"img.{ext}"
    assert cv2.imwrite(str(path), arr)

    loaded = load_image(path)

    assert loaded.gray.dtype == np.uint8 and loaded.gray.shape == (H, W)
    np.testing.assert_array_equal(loaded.gray, expected)
    if ext != "bmp":  # cv2 writes 8-bit gray BMP with a palette; depth/channels only checked elsewhere
        assert loaded.bit_depth == (16 if dtype == np.uint16 else 8)
        assert loaded.channels == channels


def test_sixteen_bit_scales_by_full_range(tmp_path: Path) -> None:
    arr = np.array([[0, 32768, 65535, 257 * 100]], np.uint16).repeat(8, axis=0).repeat(2, axis=1)
    path = tmp_path / "x.png"
    cv2.imwrite(str(path), arr)
    # 32768 * 255 / 65535 = 127.5019 -> rounds to 128; 257 * 100 -> exactly 100.
    assert read_gray(path)[0, ::2].tolist() == [0, 128, 255, 100]
    assert read_gray(path).shape == (8, 8)


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_reads_close_to_written_values(tmp_path: Path, channels: int) -> None:
    arr, expected = _gray_image(np.uint8) if channels == 1 else _color_image(np.uint8, 3)
    path = tmp_path / "img.jpg"
    cv2.imwrite(str(path), arr, [cv2.IMWRITE_JPEG_QUALITY, 95])
    gray = read_gray(path)
    assert gray.dtype == np.uint8 and gray.shape == (H, W)
    interior = (slice(4, H - 4), slice(2, 6))  # away from band edges where JPEG rings
    assert abs(int(np.median(gray[interior])) - int(expected[interior][0, 0])) <= 3


def _valid_png_bytes() -> bytes:
    rng = np.random.default_rng(0)
    ok, buf = cv2.imencode(".png", rng.integers(0, 256, (64, 64), dtype=np.uint8))
    assert ok
    return buf.tobytes()


def _bad_truncated(p: Path) -> Path:
    data = _valid_png_bytes()
    (f := p / "truncated.png").write_bytes(data[: len(data) // 2])
    return f


def _bad_zero(p: Path) -> Path:
    (f := p / "empty.png").write_bytes(b"")
    return f


def _bad_text(p: Path) -> Path:
    (f := p / "notes.png").write_text("patient list, not an image\n")
    return f


def _bad_tiny(p: Path) -> Path:
    cv2.imwrite(str(f := p / "dot.png"), np.full((1, 1), 90, np.uint8))
    return f


def _bad_blank(p: Path) -> Path:
    cv2.imwrite(str(f := p / "blank.png"), np.full((32, 32), 7, np.uint8))
    return f


def _bad_ext(p: Path) -> Path:
    (f := p / "clip.gif").write_bytes(b"GIF89a")
    return f


def _bad_missing(p: Path) -> Path:
    return p / "gone.png"


def _bad_dir(p: Path) -> Path:
    (f := p / "folder.png").mkdir()
    return f


def _bad_link_loop(p: Path) -> Path:
    os.symlink("self.png", f := p / "self.png")
    return f


BAD = {
    "truncated PNG": (_bad_truncated, "truncated"),
    "zero-byte": (_bad_zero, "zero-byte file"),
    "text named .png": (_bad_text, "a text file named .png, not a supported image format"),
    "1x1": (_bad_tiny, "too small (1x1 px"),
    "blank": (_bad_blank, "blank: every pixel is 7"),
    "GIF": (_bad_ext, "a GIF image, not a supported image format (PNG, JPEG, BMP or TIFF)"),
    "missing": (_bad_missing, "file not found"),
    "directory": (_bad_dir, "is a directory"),
    "symlink to itself": (_bad_link_loop, "cannot read"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_file_raises_one_line_error_naming_path_and_reason(tmp_path: Path, case: str) -> None:
    make, reason = BAD[case]
    path = make(tmp_path)
    with pytest.raises(ImageReadError) as info:
        read_gray(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ")
    assert reason in msg
    assert "\n" not in msg
    assert info.value.path == str(path)
    assert isinstance(info.value, ValueError)  # callers may catch ValueError


def test_read_mask_all_zero_is_valid_and_binary_mask_is_exact(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "empty.png"), np.zeros((16, 20), np.uint8))
    m = np.zeros((16, 20), np.uint8)
    m[2:5, 3:7] = 255  # 3 x 4 = 12 lesion pixels
    cv2.imwrite(str(tmp_path / "lesion.png"), m)

    empty, lesion = read_mask(tmp_path / "empty.png"), read_mask(tmp_path / "lesion.png")

    assert empty.dtype == bool and empty.shape == (16, 20) and not empty.any()
    assert lesion.dtype == bool and int(lesion.sum()) == 12 and lesion[2:5, 3:7].all()
    with pytest.raises(ImageReadError, match="blank"):  # the same file is no usable *image*
        read_gray(tmp_path / "empty.png")


@pytest.mark.timeout(20)
def test_list_images_survives_loops_broken_links_and_non_utf8_names(tmp_path: Path) -> None:
    png = _valid_png_bytes()
    (tmp_path / "a.png").write_bytes(png)
    (tmp_path / "B.PNG").write_bytes(png)
    (tmp_path / "readme.txt").write_text("not an image")
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "deeper" / "c.tif").write_bytes(png)
    os.symlink("..", tmp_path / "sub" / "up")                     # directory loop
    os.symlink("nowhere.png", tmp_path / "broken.png")            # dangling link
    os.symlink("spin", tmp_path / "spin")                         # link to itself
    odd = os.path.join(os.fsencode(tmp_path), b"scan\xff\xfe.png")  # not valid UTF-8
    with open(odd, "wb") as f:
        f.write(png)

    found = list_images(tmp_path)

    names = sorted(p.relative_to(tmp_path).as_posix() for p in found)
    odd_name = os.fsdecode(b"scan\xff\xfe.png")
    assert names == sorted(["a.png", "B.PNG", "sub/deeper/c.tif", "broken.png", odd_name])
    assert found == sorted(found)
    gray = read_gray(tmp_path / odd_name)  # the odd name reads like any other
    assert gray.shape == (64, 64)
    (tmp_path / odd_name).write_text("garbage")
    with pytest.raises(ImageReadError) as info:
        read_gray(tmp_path / odd_name)
    str(info.value).encode("utf-8")  # the message is printable (no lone surrogates)
    with pytest.raises(ImageReadError, match="file not found"):
        read_gray(tmp_path / "broken.png")


def test_list_images_of_missing_folder_is_empty(tmp_path: Path) -> None:
    assert list_images(tmp_path / "absent") == []


@pytest.mark.shared_data
def test_real_busi_image_and_masks(shared_data: Path) -> None:
    busi = shared_data / "busi"
    img = read_gray(busi / "images" / "benign_001.png")
    lesion = read_mask(busi / "masks" / "benign_001.png")
    normal = read_mask(busi / "masks" / "normal_001.png")

    assert img.dtype == np.uint8 and img.ndim == 2 and max(img.shape) <= 256
    assert img.std() > 10  # real speckle, not a blank frame
    assert lesion.shape == img.shape and 0 < lesion.mean() < 0.5
    assert normal.dtype == bool and not normal.any()  # normal cases: valid, all-zero mask
