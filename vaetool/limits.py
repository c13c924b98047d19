"""Bounds on untrusted input, in one place: what a small file may make vaetool allocate or expand.

Each reader checks what a file declares (pixel count, array shape, header size, YAML expansion)
against these bounds and against the file's own size before it allocates, so a hostile file costs
at most a small multiple of its size; the README's "Refused inputs" section lists them.
"""

from __future__ import annotations

MAX_PIXELS = 128 * 1024 * 1024  # declared width x height of one image (~11585 x 11585)
MAX_DEFLATE_RATIO = 1032  # deflate (zlib, PNG, zip) cannot expand data more than this
MAX_LZW_RATIO = 1400  # TIFF LZW (12-bit codes, strings growing by one byte per code) stays below this
MAX_PACKBITS_RATIO = 64  # TIFF PackBits: 2 bytes give at most 128
MAX_GZIP_LATENT = 64 * 2**20  # gunzipped bytes of a compressed latent cache (SimpleTuner .pt.gz: a few MB; 16 MB for 4096^2 Flux)
MAX_SAFETENSORS_HEADER = 100 * 2**20  # the safetensors library's own limit on the JSON header
MAX_CONFIG_NODES = 100_000  # values in a YAML config once its aliases are expanded (shipped configs: < 100)
MAX_CONFIG_BYTES = 16 * 2**20  # size of a YAML config file
MAX_MODEL_PARAMS = 2**32  # weights a config may describe (SD's VAE: 8.4e7)
