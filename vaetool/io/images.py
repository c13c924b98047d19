"""Image files <-> tensors [3, H, W] in [-1, 1]: every Pillow mode, EXIF orientation, 16-bit kept.

Reading opens with Pillow restricted to the formats we accept and checks what the header claims
before anything is decoded: the pixel count against `max_pixels`, and for formats whose compression
has a known maximum ratio (PNG, uncompressed BMP, TIFF raw/LZW/deflate/PackBits) whether the file is
big enough to hold that many pixels at all. Decompression bombs and truncated giants are refused
without allocating. Pillow's own DecompressionBombWarning is silenced for the whole process (vaetool's
bound is checked first; the warning would otherwise leak from worker threads); its error still applies.
Animated PNG/WebP files are refused (use `vaetool video`). Decoding is forced in full (truncated files
are errors, never grey padding) and every failure becomes one InputError naming the file. 16-bit
PNGs, which Pillow would truncate to 8 bits in colour, go through png16 (interlaced ones too; 48-bit
TIFFs still arrive with 8-bit precision through Pillow). ICC profiles are not applied. An image
held in memory (a tar member: load_image's `data`) gets the same checks as a file. Writing is
PNG, atomic, 8- or 16-bit, with text chunks.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from vaetool.errors import InputError, check_utf8_name, first_line
from vaetool.io import png16
from vaetool.io.atomic import atomic_write
from vaetool.limits import MAX_DEFLATE_RATIO, MAX_LZW_RATIO, MAX_PACKBITS_RATIO, MAX_PIXELS

__all__ = [
    "DEFAULT_MAX_PIXELS", "IMAGE_SUFFIXES", "crop_to", "load_image", "pad_to_multiple", "read_png_text",
    "save_png", "to_uint8",
]

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
PIL_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "DIB", "TIFF")  # JPEG includes MPO (camera JPEGs with a preview)
DEFAULT_MAX_PIXELS = MAX_PIXELS  # ~11585 x 11585; below Pillow's own hard limit
# (format, compression as Pillow reports it) -> the most that compression expands data: a file smaller
# than its claimed pixels at 1 bit each divided by this cannot hold them (PNG counts its exact bits)
MAX_RATIOS: dict[tuple[str, object], int] = {
    ("PNG", None): MAX_DEFLATE_RATIO,
    ("BMP", 0): 1,  # uncompressed
    ("BMP", 3): 1,  # uncompressed with bit fields
    ("TIFF", "raw"): 1,
    ("TIFF", "tiff_lzw"): MAX_LZW_RATIO,
    ("TIFF", "tiff_adobe_deflate"): MAX_DEFLATE_RATIO,
    ("TIFF", "tiff_deflate"): MAX_DEFLATE_RATIO,
    ("TIFF", "packbits"): MAX_PACKBITS_RATIO,
}
PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel
ANIMATED_FORMATS = ("PNG", "WEBP")  # several frames are an animation (MPO's second frame is a preview; TIFF pages are kept)
Background = tuple[int, int, int]
ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transform of an [H, W, C] array that displays the image upright
# (the same transforms as PIL.ImageOps.exif_transpose; np.rot90 turns counter-clockwise)
ORIENTATIONS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}
PAD_MODES = {"replicate": "replicate", "reflect": "reflect"}


def _gray(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, axis=2)  # [H, W] -> [H, W, 3]


# Pillow mode -> samples [H, W, 3 or 4] float32 in [0, 1] (4 = straight alpha last)
MODE_DECODERS: dict[str, Callable[[Image.Image], np.ndarray]] = {
    "RGB": lambda im: np.asarray(im, np.float32) / 255.0,
    "RGBA": lambda im: np.asarray(im, np.float32) / 255.0,
    "LA": lambda im: np.asarray(im.convert("RGBA"), np.float32) / 255.0,
    "PA": lambda im: np.asarray(im.convert("RGBA"), np.float32) / 255.0,
    "RGBa": lambda im: np.asarray(im.convert("RGBA"), np.float32) / 255.0,
    "La": lambda im: np.asarray(im.convert("RGBA"), np.float32) / 255.0,
    "L": lambda im: _gray(np.asarray(im, np.float32) / 255.0),
    "1": lambda im: _gray(np.asarray(im.convert("L"), np.float32) / 255.0),
    "P": lambda im: np.asarray(im.convert("RGB"), np.float32) / 255.0,
    "CMYK": lambda im: np.asarray(im.convert("RGB"), np.float32) / 255.0,
    "YCbCr": lambda im: np.asarray(im.convert("RGB"), np.float32) / 255.0,
    "RGBX": lambda im: np.asarray(im.convert("RGB"), np.float32) / 255.0,
    "I;16": lambda im: _gray(np.asarray(im, np.float32) / 65535.0),
    "I;16L": lambda im: _gray(np.asarray(im, np.float32) / 65535.0),
    "I;16B": lambda im: _gray(np.asarray(im, np.float32) / 65535.0),
    "I;16N": lambda im: _gray(np.asarray(im, np.float32) / 65535.0),
    "I": lambda im: _gray(np.clip(np.asarray(im, np.float32), 0, 65535) / 65535.0),  # 16-bit data in 32-bit ints
    "F": lambda im: _gray(np.clip(np.asarray(im, np.float32), 0.0, 1.0)),
}
# vaetool's own bound (max_pixels) is checked before every decode; Pillow's warning at 89M pixels would
# leak to stderr for images vaetool accepts (a per-call catch_warnings is not thread-safe)
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _claimed_bytes(im: Image.Image, source: Path | bytes) -> int:
    """The fewest bytes the claimed pixels take uncompressed (PNG: exact, from its header; else 1 bit a pixel)."""
    w, h = im.size
    header = png16.read_ihdr(source) if im.format == "PNG" else None
    if header is None:
        return w * h // 8
    depth, color = header[2], header[3]
    return h * (1 + -(-w * depth * PNG_SAMPLES.get(color, 1) // 8))


def _check_claim(im: Image.Image, source: Path | bytes, path: str | Path, max_pixels: int) -> None:
    """InputError before decoding when the header claims too many pixels, or more than the file can hold."""
    w, h = im.size
    if w * h > max_pixels:
        raise InputError(f"refusing to decode: the image claims {w} x {h} pixels, more than the limit of "
                         f"{max_pixels} (a decompression bomb?)", path)
    if w == 0 or h == 0:
        raise InputError(f"image has no pixels ({w} x {h})", path)
    compression = im.info.get("compression")
    ratio = MAX_RATIOS.get((str(im.format), compression))
    size = len(source) if isinstance(source, bytes) else source.stat().st_size
    if ratio is not None and size * ratio < _claimed_bytes(im, source):
        how = f"{compression} data" if compression is not None else "its data"
        raise InputError(f"the image claims {w} x {h} pixels, more than its {size} bytes can hold ({how} expands "
                         f"at most {ratio}x): truncated, or a decompression bomb", path)
    if im.format in ANIMATED_FORMATS and (frames := getattr(im, "n_frames", 1)) > 1:  # from the header (acTL, ANIM)
        raise InputError(f"animated {im.format} ({frames} frames): only its first frame would be encoded; "
                         "use `vaetool video encode` for animations", path)


def _open(source: Path | bytes, path: str | Path, max_pixels: int) -> Image.Image:
    """Open (header only) with Pillow, refusing non-images and oversized or impossible images before decoding."""
    try:
        im = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=PIL_FORMATS)
    except Image.DecompressionBombError as err:
        pixels = re.search(r"\((\d+) pixels\)", str(err))
        claim = f"{int(pixels[1])} pixels" if pixels else "too many pixels"
        raise InputError(f"refusing to decode: the image claims {claim}, more than the limit of {max_pixels} "
                         "(a decompression bomb?)", path) from None
    except PermissionError:
        raise InputError("permission denied", path) from None
    except UnidentifiedImageError:
        raise InputError("not an image, or not a PNG, JPEG, WebP, BMP or TIFF file", path) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise InputError(f"corrupt image header: {first_line(err)}", path) from None
    try:
        _check_claim(im, source, path, max_pixels)
    except InputError:
        im.close()
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # n_frames reads further into the file
        im.close()
        raise InputError(f"corrupt {im.format} image: {first_line(err)}", path) from None
    return im


def _decode_png16(source: Path | bytes, path: str | Path, max_pixels: int) -> tuple[np.ndarray, bytes | None]:
    """16-bit PNG -> samples [H, W, 3 or 4] float32 in [0, 1] (tRNS key colour becomes alpha), eXIf bytes."""
    try:
        png = png16.read_png16(source, max_pixels)
    except png16.PngFormatError as err:
        raise InputError(err.problem, path) from None
    a = png.pixels.astype(np.float32) / 65535.0  # [H, W, C]
    if png.color_type in (0, 4):  # gray (+ alpha) -> RGB (+ alpha)
        a = np.concatenate([_gray(a[..., 0]), a[..., 1:]], axis=2)
    if png.transparent is not None:
        key = np.all(png.pixels == np.asarray(png.transparent, np.uint16), axis=2)  # [H, W]
        a = np.concatenate([a, (~key)[..., None].astype(np.float32)], axis=2)
    return a, png.exif


def _decode_pillow(im: Image.Image, path: str | Path) -> np.ndarray:
    """A Pillow image (header read) -> samples [H, W, 3 or 4] float32 in [0, 1], fully decoded."""
    try:
        im.load()  # the full decode: truncated data raises here
        if "transparency" in im.info and im.mode in ("P", "L", "RGB", "1"):
            im = im.convert("RGBA")  # palette/key transparency -> alpha
        decoder = MODE_DECODERS.get(im.mode)
        if decoder is None:
            raise InputError(f"unsupported image mode {im.mode}", path)
        return decoder(im)
    except InputError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise InputError(f"truncated or corrupt {im.format} image: {first_line(err)}", path) from None


def _orientation(source: Image.Image | bytes | None) -> int:
    """The EXIF orientation (1 = upright) of a Pillow image or a raw eXIf chunk; 1 when its EXIF is unreadable."""
    try:
        if isinstance(source, Image.Image):
            exif = source.getexif()
        else:
            exif = Image.Exif()
            exif.load(source or b"")
        return int(exif.get(ORIENTATION_TAG, 1))
    except Exception:  # Pillow's EXIF parser raises many types on damaged data; viewers ignore it too
        return 1


def load_image(
    path: str | Path,
    *,
    data: bytes | None = None,
    alpha: Literal["composite", "drop"] = "composite",
    background: Background = (255, 255, 255),
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> torch.Tensor:
    """Read an image file as [3, H, W] float32 in [-1, 1], upright; InputError naming the file if unusable.

    With `data` the image is decoded from those bytes (a tar member, say) with the same checks, and
    `path` is only the name errors show (e.g. `shard.tar:key.jpg`); nothing is read from disk.
    """
    source: Path | bytes
    if data is None:
        path = source = Path(path)
        check_utf8_name(path)
        if not path.is_file():
            raise InputError("is a directory, not an image" if path.is_dir() else "no such file", path)
        size = path.stat().st_size
    else:
        source, size = bytes(data), len(data)
    if size == 0:
        raise InputError("empty file (0 bytes)", path)
    exif_source: Image.Image | bytes | None
    with _open(source, path, max_pixels) as im:
        header = png16.read_ihdr(source) if im.format == "PNG" else None
        if header is not None and header[2] == 16:  # Pillow would keep only 8 bits (interlaced or not)
            a, exif_source = _decode_png16(source, path, max_pixels)
        else:
            a = _decode_pillow(im, path)
            exif_source = im
        orientation = _orientation(exif_source)
    a = ORIENTATIONS.get(orientation, lambda x: x)(a)  # [H, W, 3 or 4]
    rgb = a[..., :3]
    if a.shape[2] == 4 and alpha == "composite":
        bg = np.asarray(background, np.float32) / 255.0
        rgb = rgb * a[..., 3:] + bg * (1.0 - a[..., 3:])
    if not np.isfinite(rgb).all():
        raise InputError("image has non-finite pixel values", path)
    out = np.empty((3, *rgb.shape[:2]), np.float32)  # [3, H, W]; numpy, not torch ops: cheap in loader threads
    np.multiply(rgb.transpose(2, 0, 1), 2.0, out=out)
    out -= 1.0
    return torch.from_numpy(out)


def _quantize(image: torch.Tensor, top: int) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> integer samples [H, W, 3] in 0..top (rounded, clipped)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image [3, H, W], got {tuple(image.shape)}")
    x = image.detach().to("cpu")
    x = np.asarray(x if x.dtype in (torch.float32, torch.float64) else x.float(), np.float64)  # [3, H, W]
    x = np.clip(np.nan_to_num(x, nan=0.0), -1.0, 1.0)  # numpy, not torch ops: cheap in writer threads
    return np.rint((x + 1.0) * (top / 2.0)).transpose(1, 2, 0)  # [H, W, 3]


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> uint8 [H, W, 3] (round((x + 1) * 127.5), clipped; NaN -> 128)."""
    return _quantize(image, 255).astype(np.uint8)


def to_uint16(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> uint16 [H, W, 3] (round((x + 1) * 32767.5), clipped)."""
    return _quantize(image, 65535).astype(np.uint16)


def save_png(
    path: str | Path,
    image: torch.Tensor,
    *,
    bits: Literal[8, 16] = 8,
    text: dict[str, str] | None = None,
    overwrite: bool = False,
) -> None:
    """Write [3, H, W] in [-1, 1] as an 8- or 16-bit RGB PNG with text chunks, atomically."""
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, not {bits}")
    if bits == 16:
        pixels16 = to_uint16(image)
        atomic_write(path, lambda tmp: png16.write_png16(tmp, pixels16, text), overwrite=overwrite)
        return
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        png16.check_text_key(key)
        info.add_text(key, value)  # iTXt automatically when not Latin-1
    pil = Image.fromarray(to_uint8(image), "RGB")
    atomic_write(path, lambda tmp: pil.save(tmp, format="PNG", pnginfo=info), overwrite=overwrite)


def read_png_text(path: str | Path) -> dict[str, str]:
    """The tEXt/zTXt/iTXt chunks of a PNG file as a dict ({} when it has none)."""
    path = Path(path)
    try:
        with Image.open(path, formats=("PNG",)) as im:
            im.load()  # text chunks after the image data are read here
            return {str(k): str(v) for k, v in getattr(im, "text", {}).items()}
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise InputError(f"cannot read PNG text: {first_line(err)}", path) from None


def pad_to_multiple(
    image: torch.Tensor, k: int, mode: Literal["replicate", "reflect"] = "replicate"
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad [..., H, W] on the bottom/right up to multiples of k; returns (padded, (H, W)) for crop_to."""
    h, w = image.shape[-2:]
    ph, pw = -h % k, -w % k
    if ph == 0 and pw == 0:
        return image, (h, w)
    if mode == "reflect" and (ph >= h or pw >= w):
        mode = "replicate"  # reflection needs more pixels than the pad
    flat = image.reshape(-1, *image.shape[-3:]) if image.ndim >= 3 else image[None, None]  # [N, C, H, W]
    padded = F.pad(flat, (0, pw, 0, ph), mode=PAD_MODES[mode])  # [N, C, H + ph, W + pw]
    return padded.reshape(*image.shape[:-2], h + ph, w + pw), (h, w)


def crop_to(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop [..., H, W] back to the top-left (h, w) recorded by pad_to_multiple."""
    h, w = size
    return image[..., :h, :w]
