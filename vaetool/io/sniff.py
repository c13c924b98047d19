"""What a file is, from its first bytes: so a PNG passed as --checkpoint is named "a PNG image" rather than
failing inside the unpickler. Torch-free; reads at most a few hundred bytes (and a zip's member list)."""

from __future__ import annotations

import zipfile
from pathlib import Path

__all__ = ["sniff"]

HEAD_BYTES = 512
# (offset, magic bytes, what the file is); the first match wins
MAGICS: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (0, b"\xff\xd8\xff", "a JPEG image"),
    (0, b"GIF87a", "a GIF image"),
    (0, b"GIF89a", "a GIF image"),
    (8, b"WEBP", "a WebP image"),
    (8, b"AVI ", "an AVI video"),
    (8, b"WAVE", "a WAV audio file"),
    (0, b"II*\x00", "a TIFF image"),
    (0, b"MM\x00*", "a TIFF image"),
    (4, b"ftyp", "an MP4/MOV video or HEIF/AVIF image"),
    (0, b"\x1aE\xdf\xa3", "a Matroska/WebM video"),
    (0, b"%PDF", "a PDF document"),
    (0, b"\x93NUMPY", "a NumPy .npy array"),
    (0, b"GGUF", "a GGUF file"),
    (0, b"\x1f\x8b", "a gzip file"),
    (0, b"BZh", "a bzip2 file"),
    (0, b"\xfd7zXZ\x00", "an xz file"),
    (0, b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (0, b"Rar!", "a RAR archive"),
    (0, b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras/TF weights?)"),
)
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
PICKLE_PROTOCOL = b"\x80"


def _zip_kind(path: Path) -> str | None:
    """None for a torch.save zip (a member NAME/data.pkl); else what the zip holds."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None  # let the torch reader say how it is broken
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return None
    if names and all(n.endswith(".npy") for n in names):
        return "a NumPy .npz archive"
    return f"a zip archive ({len(names)} member{'s' if len(names) != 1 else ''}) without torch's data.pkl"


def _text_kind(head: bytes) -> str | None:
    """'a text file' when the head is printable UTF-8 (a YAML, JSON or list file)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        try:  # cut in the middle of a character
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return None
    if text and all(c.isprintable() or c in "\r\n\t" for c in text):
        return "a text file"
    return None


def sniff(path: str | Path) -> str | None:
    """What a file that is no checkpoint is ("a PNG image", "a text file", ...); None when it may be one
    (safetensors, a torch zip, a pickle) or is unknown."""
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(HEAD_BYTES)
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: an 8-byte header length, then JSON
        return None
    if head.startswith(PICKLE_PROTOCOL):
        return None
    if head.startswith(ZIP_MAGICS):
        return _zip_kind(path)
    for offset, magic, what in MAGICS:
        if offset == 8 and not head.startswith(b"RIFF"):
            continue
        if head[offset : offset + len(magic)] == magic:
            return what
    return _text_kind(head)
