"""Writing decoded frames: a folder of PNGs, an animated GIF or WebP, or (with PyAV) mp4/webm/mov/mkv.

A writer takes uint8 frames [H, W, 3] one at a time and publishes its output only on `commit`:
the PNG folder is filled under a hidden temporary name and renamed at the end, files go through
vaetool.io.atomic. `abort` removes everything written so far, so a failed run leaves no partial
output. An existing output is refused before any work unless `overwrite`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterable
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from vaetool.errors import OutputError, OutputExistsError
from vaetool.io.atomic import atomic_write, temp_path
from vaetool.video.frames import require_av

__all__ = ["FrameWriter", "check_output", "open_writer", "output_kind", "write_frames"]

IMAGE_ONLY_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# suffix -> (container format, codec, codec options) for PyAV
AV_FORMATS: dict[str, tuple[str, str, dict[str, str]]] = {
    ".mp4": ("mp4", "libx264", {"crf": "17", "preset": "medium"}),
    ".m4v": ("mp4", "libx264", {"crf": "17", "preset": "medium"}),
    ".mov": ("mov", "libx264", {"crf": "17", "preset": "medium"}),
    ".mkv": ("matroska", "libx264", {"crf": "17", "preset": "medium"}),
    ".avi": ("avi", "mpeg4", {"qscale": "2"}),
    ".webm": ("webm", "libvpx-vp9", {"crf": "24", "b": "0"}),
}


class FrameWriter(Protocol):
    """Receives frames in order; publishes on commit, removes its partial output on abort."""

    path: Path

    def add(self, frame: np.ndarray) -> None:
        """Append one uint8 frame [H, W, 3]."""

    def commit(self) -> None:
        """Publish the output atomically."""

    def abort(self) -> None:
        """Remove whatever was written."""


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise OutputExistsError("already exists (use --overwrite to replace it)", path)


def _prepare_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create the output directory: {err.strerror or err}", path.parent) from None


class PngFolderWriter:
    """frame_00000.png, frame_00001.png, ... in a hidden sibling folder, renamed to `path` on commit."""

    def __init__(self, path: Path, *, frames: int, overwrite: bool = False) -> None:
        _refuse_existing(path, overwrite)
        if path.exists() and not path.is_dir():
            raise OutputError("exists and is not a folder (PNG frames are written into a folder)", path)
        _prepare_parent(path)
        self.path, self.overwrite = path, overwrite
        self.digits = max(5, len(str(max(frames - 1, 0))))
        self.tmp = path.with_name(f".{path.name}.vaetool-{os.getpid()}-{secrets.token_hex(4)}.partial")
        self.tmp.mkdir()
        self.count = 0

    def add(self, frame: np.ndarray) -> None:
        """Write the next frame as an 8-bit RGB PNG."""
        target = self.tmp / f"frame_{self.count:0{self.digits}d}.png"
        try:
            Image.fromarray(frame, "RGB").save(target, format="PNG")
        except OSError as err:
            raise OutputError(f"cannot write: {err.strerror or err}", target) from None
        self.count += 1

    def commit(self) -> None:
        """Rename the filled folder to `path` (an existing one is replaced only with overwrite)."""
        old = None
        if self.path.exists():
            _refuse_existing(self.path, self.overwrite)
            old = self.path.with_name(f".{self.path.name}.vaetool-{secrets.token_hex(4)}.old")
            os.rename(self.path, old)
        try:
            os.rename(self.tmp, self.path)
        except OSError as err:
            if old is not None:
                os.rename(old, self.path)
            raise OutputError(f"cannot publish the frames folder: {err.strerror or err}", self.path) from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Delete the hidden folder."""
        shutil.rmtree(self.tmp, ignore_errors=True)


class PillowAnimationWriter:
    """An animated GIF or WebP written with Pillow on commit (the frames are kept until then)."""

    def __init__(self, path: Path, *, fps: float, overwrite: bool = False) -> None:
        _refuse_existing(path, overwrite)
        _prepare_parent(path)
        self.path, self.fps, self.overwrite = path, fps, overwrite
        self.images: list[Image.Image] = []

    def add(self, frame: np.ndarray) -> None:
        """Keep the frame for the animation."""
        self.images.append(Image.fromarray(frame, "RGB"))

    def commit(self) -> None:
        """Write all frames at 1000 / fps ms each, looping forever (GIF: identical neighbours merge)."""
        if not self.images:
            raise OutputError("no frames to write", self.path)
        first, rest = self.images[0], self.images[1:]
        options: dict[str, Any] = {"save_all": True, "append_images": rest, "duration": round(1000.0 / self.fps), "loop": 0}
        fmt = "WEBP" if self.path.suffix.lower() == ".webp" else "GIF"
        if fmt == "WEBP":
            options["lossless"] = True
        atomic_write(self.path, lambda tmp: first.save(tmp, format=fmt, **options), overwrite=self.overwrite)

    def abort(self) -> None:
        """Drop the kept frames."""
        self.images.clear()


class AvWriter:
    """A video file encoded with PyAV frame by frame into a hidden temp file, published on commit."""

    def __init__(self, path: Path, *, fps: float, overwrite: bool = False) -> None:
        self.av = require_av(path, "write", OutputError)
        _refuse_existing(path, overwrite)
        _prepare_parent(path)
        self.path, self.fps, self.overwrite = path, fps, overwrite
        self.format, self.codec, self.options = AV_FORMATS[path.suffix.lower()]
        self.tmp = temp_path(path)
        self.container: Any = None
        self.stream: Any = None

    def _open(self, height: int, width: int) -> None:
        self.container = self.av.open(str(self.tmp), mode="w", format=self.format)
        self.stream = self.container.add_stream(self.codec, rate=Fraction(self.fps).limit_denominator(1001))
        self.stream.width, self.stream.height = width, height
        even = width % 2 == 0 and height % 2 == 0  # 4:2:0 chroma needs even sizes
        self.stream.pix_fmt = "yuv420p" if even or self.codec == "mpeg4" else "yuv444p"
        self.stream.options = dict(self.options)

    def add(self, frame: np.ndarray) -> None:
        """Encode the next frame."""
        try:
            if self.container is None:
                self._open(*frame.shape[:2])
            for packet in self.stream.encode(self.av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                self.container.mux(packet)
        except self.av.error.FFmpegError as err:
            raise OutputError(f"cannot encode video ({self.codec}): {err}", self.path) from None

    def commit(self) -> None:
        """Flush the encoder, close the file and publish it atomically."""
        if self.container is None:
            raise OutputError("no frames to write", self.path)
        try:
            for packet in self.stream.encode():
                self.container.mux(packet)
            self.container.close()
        except self.av.error.FFmpegError as err:
            raise OutputError(f"cannot encode video ({self.codec}): {err}", self.path) from None
        self.container = None
        atomic_write(self.path, lambda tmp: os.replace(self.tmp, tmp), overwrite=self.overwrite)

    def abort(self) -> None:
        """Close and delete the temp file."""
        if self.container is not None:
            with contextlib.suppress(Exception):
                self.container.close()
            self.container = None
        self.tmp.unlink(missing_ok=True)


def output_kind(path: Path) -> str:
    """'video', 'animation' or 'frames' (a PNG folder) for an output path; OutputError for image suffixes."""
    suffix = path.suffix.lower()
    if suffix in AV_FORMATS:
        return "video"
    if suffix in (".gif", ".webp"):
        return "animation"
    if suffix in IMAGE_ONLY_SUFFIXES:
        raise OutputError("a video output is a folder (PNG frames), a .gif/.webp, or a video file "
                          f"({', '.join(AV_FORMATS)})", path)
    return "frames"


WRITERS: dict[str, Callable[..., FrameWriter]] = {
    "frames": lambda path, fps, frames, overwrite: PngFolderWriter(path, frames=frames, overwrite=overwrite),
    "animation": lambda path, fps, frames, overwrite: PillowAnimationWriter(path, fps=fps, overwrite=overwrite),
    "video": lambda path, fps, frames, overwrite: AvWriter(path, fps=fps, overwrite=overwrite),
}


def open_writer(path: str | Path, *, fps: float, frames: int, overwrite: bool = False) -> FrameWriter:
    """A writer for `path` by its suffix (none: a PNG folder); refuses an existing output unless overwrite."""
    path = Path(path)
    if fps <= 0:
        raise OutputError(f"frame rate must be positive, got {fps}", path)
    return WRITERS[output_kind(path)](path, fps, frames, overwrite)


def check_output(path: str | Path, *, overwrite: bool = False) -> str:
    """Before any work: the output's kind; OutputError if it exists (without overwrite) or needs a missing extra."""
    path = Path(path)
    kind = output_kind(path)
    _refuse_existing(path, overwrite)
    if kind == "video":
        require_av(path, "write", OutputError)
    return kind


def write_frames(outputs: list[Path], frames: Iterable[np.ndarray], *, fps: float, count: int, overwrite: bool) -> None:
    """Feed uint8 frames [H, W, 3] (a lazy iterator: decoding starts after the writers open) to a writer per output;
    all outputs are published at the end or none is."""
    writers: list[FrameWriter] = []
    try:
        for out in outputs:
            writers.append(open_writer(out, fps=fps, frames=count, overwrite=overwrite))
        for frame in frames:  # [H, W, 3] uint8
            for writer in writers:
                writer.add(frame)
        for writer in writers:
            writer.commit()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
