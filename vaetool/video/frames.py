"""Reading videos as frames [3, H, W] in [-1, 1]: frame folders, animated GIF/WebP/PNG, and video files.

Folders are read in natural order (frame2 before frame10); animated images through Pillow; mp4,
webm, mov, mkv and avi through PyAV, an optional extra (`pip install 'vaetool[video]'`). Frames
are produced one at a time, so a long video is never held in memory whole. Every frame must
have the first frame's size (or is resized to it with `resize`); every problem is one InputError
naming the file (and the frame).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from vaetool.errors import InputError, VaeToolError, first_line
from vaetool.io.images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, load_image

__all__ = [
    "ANIMATED_SUFFIXES", "DEFAULT_FPS", "EXTRA_HINT", "VIDEO_SUFFIXES", "Frame", "VideoInfo", "list_frame_files",
    "natural_key", "open_frames", "require_av",
]

VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v")
ANIMATED_SUFFIXES: tuple[str, ...] = (".gif", ".webp", ".png", ".apng")
ANIMATED_FORMATS = ("GIF", "WEBP", "PNG")
DEFAULT_FPS = 8.0  # frames without timing (a folder, a GIF without delays)
EXTRA_HINT = "pip install 'vaetool[video]'"
_DIGITS = re.compile(r"(\d+)")


class Frame(NamedTuple):
    """One frame: a label for messages (file name or 'frame N') and the image [3, H, W] in [-1, 1]."""

    label: str
    image: torch.Tensor


@dataclass(frozen=True)
class VideoInfo:
    """What is known about a video before its frames are read."""

    path: Path
    kind: str  # folder | animated | video
    fps: float
    frames: int | None  # None when the container does not say


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders digit runs by value: frame2 < frame10, a1b2 < a1b10."""
    return tuple((0, int(part)) if part.isdigit() else (1, part.casefold()) for part in _DIGITS.split(name) if part)


def list_frame_files(folder: Path) -> list[Path]:
    """The image files directly in `folder` (hidden names skipped) in natural order; InputError if none."""
    files = [p for p in folder.iterdir() if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if not files:
        raise InputError(f"no frames in this folder (expected {', '.join(IMAGE_SUFFIXES)} files)", folder)
    return sorted(files, key=lambda p: natural_key(p.name))


def require_av(path: Path, action: str = "read", error: type[VaeToolError] = InputError) -> Any:
    """The PyAV module, or an InputError (or `error`) telling how to install the video extra."""
    try:
        import av
    except ImportError:
        raise error(f"to {action} {path.suffix or 'video'} files vaetool needs PyAV, an optional extra: {EXTRA_HINT}",
                         path) from None
    return av


def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float() / 127.5 - 1.0




# ---------------------------------------------------------------- folders


def _folder(path: Path, max_pixels: int) -> tuple[VideoInfo, Iterator[Frame]]:
    files = list_frame_files(path)

    def frames() -> Iterator[Frame]:
        for file in files:
            yield Frame(file.name, load_image(file, max_pixels=max_pixels))

    return VideoInfo(path, "folder", DEFAULT_FPS, len(files)), frames()


# ---------------------------------------------------------------- animated images (Pillow)


def _open_animated(path: Path, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path, formats=ANIMATED_FORMATS)
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise InputError("not a readable GIF, WebP or PNG image", path) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise InputError(f"corrupt image header: {first_line(err)}", path) from None
    w, h = im.size
    if w * h > max_pixels or w == 0 or h == 0:
        im.close()
        raise InputError(f"refusing to decode: frames of {w} x {h} pixels (limit {max_pixels} pixels)", path)
    return im


def _animated(path: Path, max_pixels: int) -> tuple[VideoInfo, Iterator[Frame]]:
    im = _open_animated(path, max_pixels)
    try:
        n = int(getattr(im, "n_frames", 1))
        durations = []
        for i in range(n):  # headers only: delays for the frame rate
            im.seek(i)
            durations.append(float(im.info.get("duration") or 0.0))
        im.seek(0)
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        im.close()
        raise InputError(f"truncated or corrupt animation: {first_line(err)}", path) from None
    timed = [d for d in durations if d > 0]
    fps = 1000.0 / (sum(timed) / len(timed)) if timed else DEFAULT_FPS

    def frames() -> Iterator[Frame]:
        with im:
            for i in range(n):
                try:
                    im.seek(i)
                    rgb = np.asarray(im.convert("RGB"), np.uint8)  # [H, W, 3]; composited by Pillow
                except (OSError, SyntaxError, ValueError, EOFError) as err:
                    raise InputError(f"frame {i}: truncated or corrupt data: {first_line(err)}", path) from None
                yield Frame(f"frame {i}", _to_tensor(rgb))

    return VideoInfo(path, "animated", fps, n), frames()


# ---------------------------------------------------------------- video files (PyAV)


def _video(path: Path, max_pixels: int) -> tuple[VideoInfo, Iterator[Frame]]:
    av = require_av(path)
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as err:
        raise InputError(f"not a readable video file: {first_line(err)}", path) from None
    if not container.streams.video:
        container.close()
        raise InputError("has no video stream", path)
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else DEFAULT_FPS
    if stream.width * stream.height > max_pixels:
        container.close()
        raise InputError(f"refusing to decode: frames of {stream.width} x {stream.height} pixels (limit {max_pixels})", path)

    def frames() -> Iterator[Frame]:
        with container:
            i = 0
            try:
                for frame in container.decode(stream):
                    yield Frame(f"frame {i}", _to_tensor(frame.to_ndarray(format="rgb24")))  # [3, H, W]
                    i += 1
            except av.error.FFmpegError as err:
                raise InputError(f"frame {i}: corrupt video data: {first_line(err)}", path) from None
        if i == 0:
            raise InputError("the video has no frames", path)

    return VideoInfo(path, "video", fps, int(stream.frames) or None), frames()


# ---------------------------------------------------------------- dispatch, size checks

Reader = Callable[[Path, int], tuple[VideoInfo, Iterator[Frame]]]
READERS: dict[str, Reader] = {s: _animated for s in ANIMATED_SUFFIXES} | {s: _video for s in VIDEO_SUFFIXES}


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[3, H, W] -> [3, h, w] (bicubic, antialiased), kept in [-1, 1]."""
    out = F.interpolate(image[None], size=size, mode="bicubic", antialias=True, align_corners=False)  # [1, 3, h, w]
    return out[0].clamp(-1.0, 1.0)


def _uniform(info: VideoInfo, frames: Iterator[Frame], resize: bool) -> Iterator[Frame]:
    """Check that every frame has the first frame's size, or resize it to that size."""
    first: Frame | None = None
    for frame in frames:
        if first is None:
            first = frame
        elif frame.image.shape != first.image.shape:
            if not resize:
                _, h, w = frame.image.shape
                _, h0, w0 = first.image.shape
                where = info.path / frame.label if info.kind == "folder" else info.path
                what = "" if info.kind == "folder" else f"{frame.label}: "
                raise InputError(f"{what}frame size {w}x{h} differs from the first frame's {w0}x{h0} ({first.label}); "
                                 "use --resize to resize every frame to the first frame's size", where)
            frame = Frame(frame.label, _resize(frame.image, tuple(first.image.shape[1:])))
        yield frame
    if first is None:
        raise InputError("the video has no frames", info.path)


def open_frames(
    path: str | Path, *, fps: float | None = None, resize: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[VideoInfo, Iterator[Frame]]:
    """A video's info and an iterator over its frames (all of the first frame's size); `fps` overrides the file's."""
    path = Path(path)
    if path.is_dir():
        info, frames = _folder(path, max_pixels)
    elif not path.exists():
        raise InputError("no such file or directory", path)
    else:
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            known = ", ".join(ANIMATED_SUFFIXES + VIDEO_SUFFIXES)
            raise InputError(f"unsupported video input {path.suffix!r} (a folder of frames, or one of {known})", path)
        if path.stat().st_size == 0:
            raise InputError("empty file (0 bytes)", path)
        info, frames = reader(path, max_pixels)
    if fps is not None:
        info = VideoInfo(info.path, info.kind, float(fps), info.frames)
    return info, _uniform(info, frames, resize)
