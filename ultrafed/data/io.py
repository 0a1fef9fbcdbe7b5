"""One image reader for every site folder, hardened against files that attack the reader.

Ultrasound exports come as PNG, JPEG, BMP or TIFF, 8- or 16-bit, gray, RGB or RGBA. Everything
downstream wants one uint8 gray channel, so reading, converting and rejecting unusable files
happen here, once. A bad file raises :class:`ImageReadError` naming the file and the reason;
callers that walk a folder collect those and go on (a run never dies on one file).

Site folders are not trusted. Before anything is decoded:

- only regular files are opened, without blocking (a FIFO or ``/dev/zero`` named ``x.png``
  never hangs a scan) and only up to :data:`MAX_FILE_BYTES`;
- the format is sniffed from the content's magic bytes, not the extension, so a DICOM, GIF or
  text file is named for what it is;
- the header's width x height is checked against :data:`MAX_PIXELS` (a 4 MB PNG may declare
  60000 x 60000 px: 3.6 G pixels to allocate), read with Pillow's lazy header parsers;
- :func:`scan_folder` follows no symbolic link that resolves outside the site folder and
  names every folder it cannot read.
"""
from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MIN_SIDE = 8  # smaller than one useful patch: not an ultrasound frame
# Header width x height above this is refused before decoding (a decompression bomb): about
# 7000 x 7000, 3x the largest frame the gate accepts (4096 x 4096); a 16-bit RGBA frame of
# this size decodes in under 1 GB. Callers may pass their own ``max_pixels``.
MAX_PIXELS = 50_000_000
MAX_FILE_BYTES = 256 * 2**20  # larger files are not read at all (a frame is kilo- to megabytes)
SUPPORTED_FORMATS: tuple[str, ...] = ("png", "jpeg", "bmp", "tiff")  # what the reader decodes
_SUPPORTED_TEXT = "PNG, JPEG, BMP or TIFF"
_SNIFF_BYTES = 132  # DICOM's "DICM" sits at offset 128
FORMAT_NAMES: dict[str, str] = {
    "png": "PNG image", "jpeg": "JPEG image", "bmp": "BMP image", "tiff": "TIFF image",
    "gif": "GIF image", "webp": "WebP image", "dicom": "DICOM file", "jpeg2000": "JPEG 2000 image",
    "heif": "HEIF/AVIF/MP4 file", "pdf": "PDF document", "zip": "ZIP archive", "gzip": "gzip archive",
    "text": "text file",
}
_EXT_FORMAT = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".bmp": "bmp", ".tif": "tiff", ".tiff": "tiff"}
_ORIENTATION_TAG = 0x0112  # EXIF orientation (1 = as stored)


class ImageReadError(ValueError):
    """A file that cannot serve as an image; ``str()`` is one line: ``path: reason``."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{printable(self.path)}: {reason}")


@dataclass(frozen=True)
class LoadedImage:
    gray: np.ndarray  # [H, W] uint8, EXIF orientation applied
    bit_depth: int    # of the file as stored (8 or 16)
    channels: int     # of the file as stored (1, 3 or 4)
    notes: tuple[str, ...] = ()  # read, but worth saying (renamed format, EXIF rotation)


@dataclass(frozen=True)
class Listing:
    """What :func:`scan_folder` found: image files to read, and every entry it would not take."""

    files: list[Path]
    refused: list[tuple[Path, str]] = field(default_factory=list)  # (path, one-line reason)


# ----------------------------------------------------------------------------------------------
# Names

def printable(name: str) -> str:
    """``name`` safe for a one-line message or a UTF-8 file: undecodable bytes (lone
    surrogates from the file system) and control characters become ``\\xNN``."""
    raw = os.fsencode(name) if isinstance(name, str) else bytes(name)
    text = raw.decode("utf-8", "backslashreplace")
    return "".join(f"\\x{ord(c):02x}" if _is_control(c) else c for c in text)


def _is_control(c: str) -> bool:
    return ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0


def has_control_chars(name: str) -> bool:
    """True when ``name`` holds a newline, tab or other control character (it would split or
    garble a one-line message)."""
    return any(_is_control(c) for c in name)


def relpath_key(path: str | Path, root: str | Path) -> str:
    """POSIX path of ``path`` relative to ``root``, :func:`printable`: the manifest's
    ``relpath``, the quarantine list's key and the name every site message uses."""
    return printable(Path(os.path.relpath(path, root)).as_posix())


def inside(path: str | Path, root: str | Path) -> bool:
    """Does ``path``, every symbolic link resolved, lie in the folder ``root`` (resolved)?"""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, base]) == base


def file_kind(mode: int) -> str:
    """What a non-regular file is, for messages."""
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return what
    return "not a regular file"


# ----------------------------------------------------------------------------------------------
# Bytes

def _open_regular(path: Path, max_bytes: int) -> tuple[int, int]:
    """(fd, size) of the regular file ``path``, opened without blocking; ImageReadError else."""
    try:
        st = os.stat(path)  # before opening: a device is never opened, a FIFO never waited on
        if not stat.S_ISREG(st.st_mode):
            raise ImageReadError(path, _not_regular(st.st_mode))
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except OSError as e:
        raise ImageReadError(path, f"cannot read ({e.strerror or e})") from None
    st = os.fstat(fd)  # what was opened (the path may have been swapped since the stat)
    if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
        os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageReadError(path, _not_regular(st.st_mode))
        raise ImageReadError(path, f"file of {st.st_size} bytes, over the {max_bytes} byte limit; not read")
    return fd, st.st_size


def _not_regular(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "is a directory"
    return f"is {file_kind(mode)}, not a regular file; not read"


def read_file_bytes(path: str | Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """All bytes of the regular file ``path`` (at most ``max_bytes``); ImageReadError otherwise."""
    p = Path(path)
    fd, _ = _open_regular(p, max_bytes)
    chunks, n = [], 0
    try:
        while block := os.read(fd, min(1 << 20, max_bytes + 1 - n)):
            chunks.append(block)
            n += len(block)
            if n > max_bytes:  # grew while being read
                raise ImageReadError(p, f"file grew past the {max_bytes} byte limit while read; not read")
    except OSError as e:
        raise ImageReadError(p, f"cannot read ({e.strerror or e})") from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def read_head(path: str | Path, n: int = _SNIFF_BYTES) -> bytes:
    """The first ``n`` bytes of a regular file (b'' when it cannot be read): enough to sniff."""
    try:
        fd, _ = _open_regular(Path(path), MAX_FILE_BYTES)
    except ImageReadError:
        return b""
    try:
        return os.read(fd, n)
    except OSError:
        return b""
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# Format and header

def sniff(head: bytes) -> str | None:
    """The format of a file from its first bytes (a key of FORMAT_NAMES), None if unknown."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in (12, 40, 52, 56, 64, 108, 124):
        return "bmp"  # "BM" alone is too weak: the DIB header size must be one of the known ones
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x00\x00\x00\x0cjP  ") or head.startswith(b"\xff\x4f\xff\x51"):
        return "jpeg2000"
    if head[4:8] == b"ftyp":
        return "heif"
    for magic, fmt in ((b"%PDF", "pdf"), (b"PK\x03\x04", "zip"), (b"\x1f\x8b", "gzip")):
        if head.startswith(magic):
            return fmt
    return "text" if _looks_like_text(head) else None


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = head[:-3].decode("utf-8", "ignore") if len(head) > 3 else ""  # a cut multi-byte char
        if not text:
            return False
    return bool(text) and all(c.isprintable() or c in "\t\r\n" for c in text)


def describe_content(head: bytes) -> str:
    """'a DICOM file', 'an unknown format (starts 00 01 ...)': what the bytes are, for messages."""
    fmt = sniff(head)
    if fmt is None:
        return f"an unknown format (starts {head[:8].hex(' ') or 'empty'})"
    return "a " + FORMAT_NAMES[fmt]


def unsupported_reason(head: bytes, suffix: str = "") -> str:
    """One line for a file whose content is no format the reader decodes; ``suffix``: the
    extension it is named with, said when it pretends to be a supported one."""
    named = f" named {suffix.lower()}" if suffix.lower() in _EXT_FORMAT else ""
    return f"{describe_content(head)}{named}, not a supported image format ({_SUPPORTED_TEXT})"


def _gif_frames(data: bytes) -> int:
    """Frames of a GIF, counted by Pillow's frame walker (no frame is decoded); 0 if unknown."""
    try:
        from PIL import GifImagePlugin

        return int(GifImagePlugin.GifImageFile(io.BytesIO(data)).n_frames)
    except Exception:  # noqa: BLE001 - a corrupt GIF is reported as a GIF all the same
        return 0


def _pil_header(data: bytes, fmt: str):
    """Pillow's lazy reader of the header (nothing decoded). The plugin class is used directly:
    ``Image.open`` raises a size-less DecompressionBombError before our own limit could name it."""
    from PIL import BmpImagePlugin, JpegImagePlugin, PngImagePlugin, TiffImagePlugin

    cls = {"png": PngImagePlugin.PngImageFile, "jpeg": JpegImagePlugin.JpegImageFile,
           "bmp": BmpImagePlugin.BmpImageFile, "tiff": TiffImagePlugin.TiffImageFile}[fmt]
    return cls(io.BytesIO(data))


def header_info(data: bytes, fmt: str, path: str | Path) -> tuple[int, int, int]:
    """(width, height, EXIF orientation) from the header of a supported format; ImageReadError
    naming the format when the header cannot be parsed."""
    try:
        im = _pil_header(data, fmt)
        w, h = (int(v) for v in im.size)
        orientation = int(im.getexif().get(_ORIENTATION_TAG, 1) or 1) if fmt == "jpeg" else 1
    except Exception as e:  # noqa: BLE001 - Pillow's parsers raise many kinds on hostile bytes
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:120]
        raise ImageReadError(path, f"corrupt {FORMAT_NAMES[fmt]} header ({printable(first)})") from None
    return w, h, orientation if 1 <= orientation <= 8 else 1


def check_pixels(w: int, h: int, fmt: str, path: str | Path, max_pixels: int = MAX_PIXELS) -> None:
    """Refuse a header whose size would take more memory to decode than any frame needs."""
    if w <= 0 or h <= 0:
        raise ImageReadError(path, f"{FORMAT_NAMES[fmt]} header declares {w}x{h} px; not decoded")
    if w * h > max_pixels:
        raise ImageReadError(path, f"{FORMAT_NAMES[fmt]} header declares {w}x{h} px ({w * h / 1e6:.0f} Mpx), over the "
                                   f"{max_pixels / 1e6:.0f} Mpx limit; not decoded (a decompression bomb?)")


def _truncation(data: bytes, fmt: str) -> str | None:
    """Why a file is cut off (decoders fill the missing rows with grey without complaint)."""
    if fmt == "png" and not data.rstrip().endswith(b"IEND\xaeB`\x82"):
        return "truncated PNG (no IEND chunk)"
    if fmt == "jpeg" and data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        return "truncated JPEG (no end-of-image marker after the last scan)"
    return None


# ----------------------------------------------------------------------------------------------
# Pixels

def _to_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        # Scale by the full 16-bit range: keeps relative brightness between files.
        return (img.astype(np.float32) * (255.0 / 65535.0) + 0.5).astype(np.uint8)
    if np.issubdtype(img.dtype, np.floating):
        lo, hi = float(np.nanmin(img)), float(np.nanmax(img))
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return np.clip((np.nan_to_num(img, nan=lo) - lo) * scale, 0, 255).astype(np.uint8)
    info = np.iinfo(img.dtype)
    return ((img.astype(np.float64) - info.min) * (255.0 / (info.max - info.min))).astype(np.uint8)


def _to_gray(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        return img
    if img.ndim == 3 and img.shape[2] == 1:
        return img[:, :, 0]
    if img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)  # alpha dropped: scanners export it opaque
    if img.ndim == 3 and img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    raise ValueError(f"unsupported array shape {img.shape}")


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """The image as it is meant to be seen, for an EXIF orientation 1..8 (what Pillow's
    ``ImageOps.exif_transpose`` does; OpenCV's IMREAD_UNCHANGED ignores the tag)."""
    ops = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1),
           7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
           8: lambda a: np.rot90(a, 1)}
    op = ops.get(orientation)
    return img if op is None else np.ascontiguousarray(op(img))


def _decode(data: bytes, path: Path) -> np.ndarray:
    try:
        raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        raise ImageReadError(path, f"decoder error ({printable(lines[-1].strip() if lines else 'OpenCV')[:160]})") from None
    except MemoryError:
        raise ImageReadError(path, "out of memory while decoding") from None
    if raw is None:
        raise ImageReadError(path, "not a decodable image (corrupt, truncated or another format)")
    return raw


def decode_image(data: bytes, path: str | Path, *, allow_constant: bool = False,
                 max_pixels: int = MAX_PIXELS) -> LoadedImage:
    """``data`` (the bytes of ``path``) as one uint8 gray channel, or ImageReadError. The format
    comes from the content; nothing is decoded before the header's size is checked."""
    p = Path(path)
    if not data:
        raise ImageReadError(p, "zero-byte file")
    fmt = sniff(data[:_SNIFF_BYTES])
    if fmt not in SUPPORTED_FORMATS:
        raise ImageReadError(p, _unsupported_with_name(data, fmt, p))
    w, h, orientation = header_info(data, fmt, p)
    check_pixels(w, h, fmt, p, max_pixels)
    cut = _truncation(data, fmt)  # before decoding: libpng fills a cut-off PNG with grey silently
    if cut:
        raise ImageReadError(p, cut)
    raw = _decode(data, p)
    notes = []
    named = _EXT_FORMAT.get(p.suffix.lower())
    if named and named != fmt:
        notes.append(f"the content is a {FORMAT_NAMES[fmt]}, not {p.suffix.lower()} as named; read as {fmt.upper()}")
    channels = 1 if raw.ndim == 2 else raw.shape[2]
    bit_depth = raw.dtype.itemsize * 8
    try:
        gray = _to_uint8(_to_gray(raw))
    except ValueError as e:
        raise ImageReadError(p, str(e)) from None
    if orientation != 1:
        gray = apply_orientation(gray, orientation)
        notes.append(f"EXIF orientation {orientation} applied (stored {w}x{h}, read {gray.shape[1]}x{gray.shape[0]})")
    h2, w2 = gray.shape
    if min(h2, w2) < MIN_SIDE:
        raise ImageReadError(p, f"too small ({w2}x{h2} px; need at least {MIN_SIDE} px a side)")
    if not allow_constant and int(gray.max()) == int(gray.min()):
        raise ImageReadError(p, f"blank: every pixel is {int(gray.min())}")
    return LoadedImage(gray=np.ascontiguousarray(gray), bit_depth=bit_depth, channels=channels, notes=tuple(notes))


def _unsupported_with_name(data: bytes, fmt: str | None, path: Path) -> str:
    reason = unsupported_reason(data[:_SNIFF_BYTES], path.suffix)
    frames = _gif_frames(data) if fmt == "gif" else 0
    if frames > 1:
        reason = reason.replace("a GIF image", f"an animated GIF ({frames} frames)", 1)
    return reason


def load_image(path: str | Path, *, allow_constant: bool = False, max_pixels: int = MAX_PIXELS) -> LoadedImage:
    """Read ``path`` as one uint8 gray channel, or raise :class:`ImageReadError`."""
    return decode_image(read_file_bytes(path), path, allow_constant=allow_constant, max_pixels=max_pixels)


def read_gray(path: str | Path) -> np.ndarray:
    """``[H, W]`` uint8 gray image of ``path``; raises :class:`ImageReadError`."""
    return load_image(path).gray


def read_mask(path: str | Path) -> np.ndarray:
    """``[H, W]`` bool lesion mask (any non-zero pixel); an empty (all-zero) mask is valid."""
    return load_image(path, allow_constant=True).gray > 0


# ----------------------------------------------------------------------------------------------
# Folders

def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _classify(entry: os.DirEntry, base: str) -> tuple[str, str]:
    """('dir' | 'file' | 'skip' | 'refuse', reason) for one folder entry."""
    name = entry.name
    if has_control_chars(name):
        return "refuse", "file name holds a control character (newline, tab, ...); not read"
    try:
        link = entry.is_symlink()
    except OSError:
        link = False
    if link and not inside(entry.path, base):
        return "refuse", "symbolic link that resolves outside the site folder; not followed"
    try:
        st = os.stat(entry.path)  # follows links (inside the site, checked above)
    except OSError:  # dangling link, link loop, vanished: an image name becomes an unreadable row
        return ("file", "") if is_image_name(name) else ("skip", "")
    if stat.S_ISDIR(st.st_mode):
        return "dir", ""
    if not stat.S_ISREG(st.st_mode):
        return "refuse", f"{file_kind(st.st_mode)}, not a regular file; not read"
    if is_image_name(name):
        return "file", ""
    head = read_head(entry.path)
    fmt = sniff(head)
    if fmt in SUPPORTED_FORMATS:
        return "refuse", f"{describe_content(head)} without an image extension; not read (rename it)"
    if fmt is not None and fmt != "text":
        return "refuse", unsupported_reason(head)
    return "skip", ""  # labels.csv, notes, anything that is no image


def scan_folder(root: str | Path, boundary: str | Path | None = None) -> Listing:
    """Image files under ``root`` (recursive, sorted) and one reason per entry not taken.

    Symbolic links are followed only where they resolve inside ``boundary`` (default ``root``);
    each folder is read once (no cycles); folders that cannot be read, special files, names with
    control characters and images in formats the reader does not decode are ``refused``.
    Other files (labels.csv, notes) are skipped silently.
    """
    root = Path(root)
    base = os.path.realpath(boundary if boundary is not None else root)
    files: list[Path] = []
    refused: list[tuple[Path, str]] = []
    if root.exists() and not inside(root, base):  # e.g. images/ itself a link out of the site
        return Listing(files=[], refused=[(root, "symbolic link that resolves outside the site folder; not followed")])
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            st = d.stat()
        except OSError:
            continue  # the root is absent (callers say so), or it vanished mid-walk
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except PermissionError:
            refused.append((d, "permission denied: folder not read"))
            continue
        except OSError as e:
            refused.append((d, f"folder not read ({e.strerror or e})"))
            continue
        for e in entries:
            kind, why = _classify(e, base)
            if kind == "dir":
                stack.append(Path(e.path))
            elif kind == "file":
                files.append(Path(e.path))
            elif kind == "refuse":
                refused.append((Path(e.path), why))
    return Listing(files=sorted(files), refused=sorted(refused))


def list_images(root: str | Path) -> list[Path]:
    """Image files under ``root`` (recursive, sorted, symlink loops not followed)."""
    return scan_folder(root).files
