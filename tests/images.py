"""Generators of test images: every mode the ingest stage must handle, and every kind of bad input."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    ch = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2, "CMYK": 4}[mode]
    arr = rng.integers(0, 256, size=(h, w, ch), dtype=np.uint8)
    return Image.frombytes(mode, (w, h), arr.tobytes())


def good_images() -> dict[str, bytes]:
    """name -> bytes of valid images in varied modes and formats."""
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise on display
    p = noise(30, 20, "RGB", 5).convert("P")
    p.info["transparency"] = 0
    i16 = Image.fromarray(np.arange(24 * 24, dtype=np.uint16).reshape(24, 24) * 100)
    transparent = Image.new("RGBA", (24, 24), (10, 20, 30, 0))
    return {
        "rgb.jpg": encode(noise(40, 32, "RGB", 1), "JPEG"),
        "rotated.jpg": encode(noise(48, 24, "RGB", 2), "JPEG", exif=exif.tobytes()),
        "gray.png": encode(noise(32, 32, "L", 3), "PNG"),
        "gray_alpha.png": encode(noise(32, 32, "LA", 4), "PNG"),
        "palette.png": encode(p, "PNG", transparency=0),
        "transparent.png": encode(transparent, "PNG"),
        "cmyk.jpg": encode(noise(32, 32, "CMYK", 6), "JPEG"),
        "deep16.png": encode(i16, "PNG"),
        "wide.webp": encode(noise(96, 24, "RGB", 7), "WEBP"),
    }


def bad_images(max_pixels: int) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, expected start of the recorded reason)."""
    side = int(max_pixels**0.5) + 8
    jpg = encode(noise(64, 64, "RGB", 9), "JPEG")
    return {
        "truncated.jpg": (jpg[: len(jpg) // 2], "corrupt image"),
        "empty.png": (b"", "empty file"),
        "notes.txt": (b"these are not the pixels you are looking for", "not an image"),
        "bomb.png": (encode(Image.new("L", (side, side)), "PNG"), "too many pixels"),
        "tiny.png": (encode(noise(4, 4, "RGB", 10), "PNG"), "too small"),
    }


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def ingested_noise(root: Path, n: int, side: int, mode: str, experiment: str, classes: str = "ab", **fields):
    """``n`` noise PNGs of ``side`` px under ``root/src/<class>/NNN.png`` (classes in turn), ingested
    into ``root/images`` with the given ``IngestConfig`` fields; returns the ingest result."""
    from stages import ingest

    write_tree(
        root / "src",
        {
            f"{classes[i % len(classes)]}/{i:03d}.png": encode(noise(side, side, mode, i), "PNG")
            for i in range(n)
        },
    )
    cfg = ingest.IngestConfig(source_uri=str(root / "src"), output_uri=str(root / "images"), **fields)
    return ingest.run(cfg, experiment)
