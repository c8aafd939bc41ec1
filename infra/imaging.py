"""Image decoding and normalisation with Pillow: bytes in, uniformly sized PNG bytes out, or a
reason why the input was rejected. Nothing here raises on bad input.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageFile, ImageOps

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is corrupt, not a grey bottom half

ResizeMode = Literal["crop", "pad"]


@dataclass(frozen=True)
class DecodeSpec:
    resolution: int  # output side length (square)
    channels: int  # 3 -> RGB, 1 -> L
    resize: ResizeMode = "crop"  # crop: shorter side to resolution, centre crop; pad: fit, then pad
    pad_value: int = 0  # fill of the padded border (0-255)
    max_pixels: int = 89_478_485  # decompression-bomb limit (Pillow's default)
    min_side: int = 8  # smaller inputs are rejected
    png_compress_level: int = 1  # 0-9; 1 is ~3x faster than Pillow's 6 at a few % more bytes


@dataclass(frozen=True)
class Decoded:
    png: bytes
    width: int  # source size, after EXIF orientation
    height: int


class Rejected(Exception):
    """An input that cannot become an image shard row; ``str(e)`` is the recorded reason."""


def _to_mode(im: Image.Image, channels: int) -> Image.Image:
    """Convert any common mode to RGB or L; transparency is composited on white."""
    target = "RGB" if channels == 3 else "L"
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16"):
            arr = arr / 257.0
        elif im.mode == "I":
            arr = arr / 257.0 if arr.max(initial=0) > 255 else arr
        else:  # float images: assume [0, 1] if they fit, else min-max
            lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
            arr = arr * 255.0 if lo >= 0 and hi <= 1 else (arr - lo) / max(hi - lo, 1e-12) * 255.0
        im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode == "CMYK":
        im = im.convert("RGB")
    if im.mode not in ("RGB", "L"):
        im = im.convert("RGB")
    return im.convert(target) if im.mode != target else im


def _resize(im: Image.Image, spec: DecodeSpec) -> Image.Image:
    r = spec.resolution
    w, h = im.size
    if spec.resize == "crop":
        scale = r / min(w, h)
        nw, nh = max(r, round(w * scale)), max(r, round(h * scale))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
        left, top = (nw - r) // 2, (nh - r) // 2
        return im.crop((left, top, left + r, top + r)) if (nw, nh) != (r, r) else im
    # pad: shrink to fit if needed (never enlarge), then centre on a canvas
    if max(w, h) > r:
        scale = r / max(w, h)
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
        im = im.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if (w, h) == (r, r):
        return im
    fill = spec.pad_value if im.mode == "L" else (spec.pad_value,) * 3
    canvas = Image.new(im.mode, (r, r), fill)
    canvas.paste(im, ((r - w) // 2, (r - h) // 2))
    return canvas


def decode(data: bytes, spec: DecodeSpec) -> Decoded:
    """Decode, orient, convert, resize and PNG-encode one image; :class:`Rejected` if unusable."""
    if not data:
        raise Rejected("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:
        raise Rejected(f"too many pixels (decompression bomb): {e}") from None
    except Image.UnidentifiedImageError:
        raise Rejected("not an image (Pillow cannot identify the format)") from None
    except (Image.DecompressionBombWarning, OSError, ValueError, SyntaxError) as e:
        raise Rejected(f"unreadable image header: {type(e).__name__}: {e}") from None
    w, h = im.size
    if w * h > spec.max_pixels:
        raise Rejected(f"too many pixels: {w}x{h} = {w * h} > max_pixels {spec.max_pixels}")
    if min(w, h) < spec.min_side:
        raise Rejected(f"too small: {w}x{h}, shorter side < min_side {spec.min_side}")
    try:
        im.load()
        im = ImageOps.exif_transpose(im)
        w, h = im.size
        im = _to_mode(im, spec.channels)
        im = _resize(im, spec)
        out = io.BytesIO()
        im.save(out, format="PNG", compress_level=spec.png_compress_level)
    except Exception as e:  # noqa: BLE001 - any decoder failure is a per-image rejection
        raise Rejected(f"corrupt image: {type(e).__name__}: {e}") from None
    return Decoded(png=out.getvalue(), width=w, height=h)


def encode_png(image: np.ndarray, compress_level: int = 1) -> bytes:
    """A uint8 image (H, W) or (H, W, 3) -> PNG bytes (deterministic for the same pixels)."""
    out = io.BytesIO()
    Image.fromarray(image, "L" if image.ndim == 2 else "RGB").save(
        out, format="PNG", compress_level=compress_level
    )
    return out.getvalue()


def encode_pngs(images: list[np.ndarray], threads: int = 1, compress_level: int = 1) -> list[bytes]:
    """Many images -> PNG bytes, in order, on ``threads`` threads (Pillow's encoder releases the
    GIL, so threads scale; a GPU sampler produces images faster than one thread encodes them)."""
    if threads <= 1 or len(images) < 2:
        return [encode_png(im, compress_level) for im in images]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda im: encode_png(im, compress_level), images))


def png_to_array(png: bytes) -> np.ndarray:
    """PNG bytes -> uint8 array (H, W) or (H, W, 3)."""
    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im)


def image_grid(images: list[np.ndarray], ncol: int = 8, pad: int = 2) -> np.ndarray:
    """Tile uint8 images (H, W[, C]) into one grid image, for logging previews."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    imgs = [im if im.ndim == 3 else im[..., None] for im in images]
    c = max(im.shape[2] for im in imgs)
    imgs = [np.repeat(im, c, axis=2) if im.shape[2] != c else im for im in imgs]
    h = max(im.shape[0] for im in imgs)
    w = max(im.shape[1] for im in imgs)
    ncol = min(ncol, len(imgs))
    nrow = -(-len(imgs) // ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, im in enumerate(imgs):
        r, q = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y : y + im.shape[0], x : x + im.shape[1]] = im
    return grid[..., 0] if c == 1 else grid


def pngs_to_array(pngs: list[bytes], channels: int) -> np.ndarray:
    """PNG bytes -> float32 (N, C, H, W) in [-1, 1]; C = 1 (L) or 3 (RGB, grayscale repeated).

    The result is a view of (N, H, W, C) memory: ``torch.from_numpy`` gives a channels-last tensor.
    """
    arrs = []
    for b in pngs:
        with Image.open(io.BytesIO(b)) as im:
            arrs.append(np.asarray(im.convert("L" if channels == 1 else "RGB")))
    if not arrs:
        return np.zeros((0, channels, 1, 1), np.float32)
    x = np.stack(arrs).astype(np.float32) / 127.5 - 1.0
    return x[:, None] if channels == 1 else x.transpose(0, 3, 1, 2)


def depth_maps(blobs: list[bytes]) -> np.ndarray:
    """``depth`` column values (square little-endian float16 maps) -> float32 (N, 1, n, n)."""
    maps = [np.frombuffer(b, dtype="<f2") for b in blobs]
    if not maps:
        return np.zeros((0, 1, 1, 1), np.float32)
    n = int(round(len(maps[0]) ** 0.5))  # image shards are square (the ingest resolution)
    return np.stack(maps).reshape(-1, 1, n, n).astype(np.float32)


def label_maps(blobs: list[bytes]) -> np.ndarray:
    """``segmentation`` column values (square uint8 label maps) -> uint8 (N, 1, n, n)."""
    maps = [np.frombuffer(b, dtype=np.uint8) for b in blobs]
    if not maps:
        return np.zeros((0, 1, 1, 1), np.uint8)
    n = int(round(len(maps[0]) ** 0.5))
    return np.stack(maps).reshape(-1, 1, n, n)


def decode_column(kind: str, blobs: list[bytes], channels: int = 3) -> np.ndarray:
    """An image-shard column as compact arrays (N, C, H, W): ``image``, ``lowres`` (PNG, ``channels``),
    ``edges`` (PNG, one channel) and ``depth`` float32 in [-1, 1], ``segmentation`` uint8 label ids
    (one channel)."""
    if kind == "depth":
        return depth_maps(blobs)
    if kind == "segmentation":
        return label_maps(blobs)
    return pngs_to_array(blobs, 1 if kind == "edges" else channels)


def maps_from_images(kind: str, pngs: list[bytes], channels: int, upscale: int = 1) -> np.ndarray:
    """Condition maps a user gave as images -> the arrays :func:`decode_column` gives for ``kind``:
    ``segmentation``: the grey level is the label id (uint8); ``depth``: grey levels in [-1, 1]
    (bright = near, as MiDaS's inverse depth); ``edges``: white edges on black; ``lowres``: the
    small image (``channels``), each pixel repeated ``upscale`` x ``upscale`` times as the
    ``lowres`` stage stores it."""
    if kind == "segmentation":
        if not pngs:
            return np.zeros((0, 1, 1, 1), np.uint8)
        maps = []
        for b in pngs:
            with Image.open(io.BytesIO(b)) as im:
                maps.append(np.asarray(im.convert("L")))
        return np.stack(maps)[:, None]
    x = pngs_to_array(pngs, channels if kind == "lowres" else 1)
    if upscale > 1:
        x = np.repeat(np.repeat(x, upscale, axis=2), upscale, axis=3)
    return x


def to_uint8_images(x) -> list[np.ndarray]:
    """A torch batch (N, C, H, W) in [-1, 1] (clamped) -> N uint8 images (H, W) or (H, W, 3)."""
    arr = ((x.detach().float().clamp(-1, 1).cpu().numpy() + 1) * 127.5).round().astype(np.uint8)
    arr = arr.transpose(0, 2, 3, 1)
    return [a[..., 0] if a.shape[-1] == 1 else a for a in arr]


def colorize(values: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """A float map (H, W) -> uint8 RGB with a perceptual dark-blue/red/yellow ramp (for previews)."""
    lo = float(values.min()) if lo is None else lo
    hi = float(values.max()) if hi is None else hi
    t = np.clip((values - lo) / max(hi - lo, 1e-8), 0, 1)
    anchors = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32)
    pos = t * (len(anchors) - 1)
    i = np.minimum(pos.astype(int), len(anchors) - 2)
    f = (pos - i)[..., None]
    return ((1 - f) * anchors[i] + f * anchors[i + 1]).astype(np.uint8)


def label_colors(labels: np.ndarray, n: int = 256) -> np.ndarray:
    """A label map (H, W) -> uint8 RGB with a fixed pseudo-random colour per label (for previews)."""
    rng = np.random.default_rng(12345)
    palette = rng.integers(0, 256, (n, 3), dtype=np.uint8)
    return palette[labels.astype(np.int64) % n]
