"""Tiled encode and decode as pure functions over a model: exact (equal to untiled) and fast."""

from vaetool.tiling.exact import decode_exact, encode_exact

__all__ = ["decode_exact", "encode_exact"]
