"""Builders of files that attack an image reader (small files; huge sizes are only declared)."""
from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
from PIL import Image

from _gate_sites import speckle


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int, rows: int = 4) -> bytes:
    """An 8-bit gray PNG whose header says ``width`` x ``height``; a few rows of (zero) pixel
    data follow (at most ``rows`` x 4097 bytes, whatever the width: the file stays small): a
    decoder that trusts the header allocates the whole image first."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * ((1 + min(width, 4096)) * rows), 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png_bytes(seed: int = 0, size: int = 64) -> bytes:
    return cv2.imencode(".png", speckle(seed, size))[1].tobytes()


def jpeg_bytes(seed: int = 0, size: int = 64) -> bytes:
    return cv2.imencode(".jpg", speckle(seed, size), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small JPEG whose start-of-frame marker is patched to say ``width`` x ``height``."""
    data = bytearray(jpeg_bytes(1, 16))
    i = data.index(b"\xff\xc0")
    data[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_declaring(width: int, height: int) -> bytes:
    data = bytearray(cv2.imencode(".bmp", speckle(2, 16))[1].tobytes())
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def gif_bytes(frames: int = 1, size: int = 32) -> bytes:
    imgs = [Image.fromarray(speckle(10 + k, size)) for k in range(frames)]
    buf = io.BytesIO()
    imgs[0].save(buf, "GIF", save_all=frames > 1, append_images=imgs[1:], duration=40, loop=0)
    return buf.getvalue()


def dicom_bytes() -> bytes:
    """The start of a DICOM Part 10 file: 128-byte preamble, 'DICM', a meta element."""
    return b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x14\x001.2.840.10008.1.2.1\x00" + bytes(200)


def exif_jpeg(img: np.ndarray, orientation: int) -> bytes:
    """``img`` stored as a JPEG (quality 95) with an EXIF orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()
