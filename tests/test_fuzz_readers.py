"""Fuzzing the readers with Hypothesis: latent files, safetensors headers, 16-bit PNGs and YAML configs.

Every input is either random bytes, a valid file with bytes flipped, cut or inserted, or a file
built from random structure (a JSON header, PNG chunks with correct CRCs, a YAML document). A
reader may refuse it only with one of vaetool's named errors (VaeToolError); any other exception
fails the test. Examples are derandomized and bounded, so a CI run is the same few seconds every time
(VAETOOL_FUZZ_EXAMPLES=N runs N random examples per reader instead).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vaetool.config import load_vae_config
from vaetool.errors import VaeToolError
from vaetool.io import png16
from vaetool.io.images import load_image
from vaetool.io.latents import load_latents
from vaetool.io.safe import read_safetensors, safetensors_header, write_safetensors

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = int(os.environ.get("VAETOOL_FUZZ_EXAMPLES", "0"))  # a longer, random run: VAETOOL_FUZZ_EXAMPLES=5000
FUZZ = settings(max_examples=EXAMPLES or 100, deadline=None, derandomize=not EXAMPLES, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _valid_latent_files() -> dict[str, bytes]:
    """One small valid file per latent suffix (the seeds that mutations start from)."""
    z = torch.arange(2 * 4 * 3 * 3, dtype=torch.float32).reshape(2, 4, 3, 3) / 10  # [B, C, h, w]
    out: dict[str, bytes] = {}
    buf = io.BytesIO()
    np.save(buf, z.numpy())
    out[".npy"] = buf.getvalue()
    buf = io.BytesIO()
    np.savez_compressed(buf, latents=z[0].numpy(), original_size=np.array([24, 24]))
    out[".npz"] = buf.getvalue()
    buf = io.BytesIO()
    torch.save({"samples": z}, buf)
    out[".pt"] = buf.getvalue()
    buf = io.BytesIO()
    torch.save({"latents": z[0]}, buf)
    out[".pt.gz"] = gzip.compress(buf.getvalue())  # a SimpleTuner cache
    buf = io.BytesIO()
    np.savez(buf, latents_3x3=z[0].numpy(), original_size_3x3=np.array([24, 24]), crop_ltrb_3x3=np.zeros(4, int))
    out["_0024x0024_flux.npz"] = buf.getvalue()  # an sd-scripts Flux cache
    out["_0024x0024_wan.safetensors"] = safetensors.torch.save(  # a musubi-tuner cache
        {"latents_1x3x3_float32": z[0, :, None].contiguous()},
        metadata={"architecture": "wan", "width": "24", "height": "24", "format_version": "1.0.1"})
    return out


SEEDS = _valid_latent_files()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    write_safetensors(root / "seed.safetensors", {"latent": torch.ones(4, 3, 3)},
                      {"format": "vaetool.latent", "format_version": "1", "scaled": "false", "vaetool.json_keys": '["scaled"]'})
    SEEDS[".safetensors"] = (root / "seed.safetensors").read_bytes()
    return root


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """`seed` with a few bytes flipped, a cut, or an inserted run (or random bytes altogether)."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        kind = draw(st.sampled_from(["flip", "cut", "insert"]))
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
    return bytes(data)


def _only_named_errors(read: Callable[[Path], object], path: Path) -> None:
    try:
        read(path)
    except VaeToolError as err:
        assert "\n" not in str(err), str(err)


@FUZZ
@given(suffix=st.sampled_from([".safetensors", ".latent", ".npz", ".npy", ".pt", ".pth", ".pt.gz", "_0024x0024_flux.npz",
                               "_0024x0024_wan.safetensors"]), data=st.data())
def test_latent_files(workdir: Path, suffix: str, data: st.DataObject) -> None:
    seed_suffix = {".latent": ".safetensors", ".pth": ".pt"}.get(suffix, suffix)
    blob = data.draw(st.one_of(st.binary(max_size=300), mutated(SEEDS[seed_suffix])))
    path = workdir / f"fuzz{suffix}"
    path.write_bytes(blob)
    _only_named_errors(load_latents, path)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
DTYPES = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "X", 3])


@st.composite
def safetensors_files(draw: st.DrawFn) -> bytes:
    """A random header (entries with plausible or hostile dtype/shape/offsets, random metadata), then random data."""
    entries: dict[str, object] = {}
    for name in draw(st.lists(st.sampled_from(["latent", "latent_tensor", "a", "samples", "__metadata__"]), max_size=3, unique=True)):
        if name == "__metadata__":
            entries[name] = draw(st.dictionaries(st.text(max_size=8), st.text(max_size=12) | JSON_VALUES, max_size=4))
            continue
        shape = draw(st.lists(st.integers(-1, 2**33), max_size=5) | JSON_VALUES)
        start = draw(st.integers(-1, 400))
        entries[name] = draw(st.sampled_from([
            {"dtype": draw(DTYPES), "shape": shape, "data_offsets": [start, start + draw(st.integers(-4, 400))]},
            draw(JSON_VALUES),
        ]))
    header = json.dumps(entries).encode()
    length = draw(st.sampled_from([len(header), max(0, len(header) + draw(st.integers(-9, 9))), draw(st.integers(0, 2**64 - 1))]))
    return struct.pack("<Q", length) + header + draw(st.binary(max_size=400))


@FUZZ
@given(blob=safetensors_files())
def test_safetensors_headers(workdir: Path, blob: bytes) -> None:
    path = workdir / "fuzz.safetensors"
    path.write_bytes(blob)
    for read in (lambda p: safetensors_header(p, VaeToolError), lambda p: read_safetensors(p, VaeToolError), load_latents):
        _only_named_errors(read, path)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@st.composite
def png16_files(draw: st.DrawFn) -> bytes:
    """A PNG with correct CRCs whose header, filters, stream and tRNS are drawn (mostly 16-bit, sometimes not)."""
    w, h = draw(st.integers(0, 12)), draw(st.integers(0, 12))
    color = draw(st.sampled_from([0, 2, 4, 6, 0, 2, 3, 1]))
    depth = draw(st.sampled_from([16, 16, 16, 8, 1, 7]))
    interlace = draw(st.sampled_from([0, 1, 0, 1, 2]))
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(color, 1)
    n_rows = h if not interlace else 2 * h + 7  # enough filter bytes for the Adam7 passes of a small image
    rows = b"".join(bytes([draw(st.integers(0, 6))]) + draw(st.binary(min_size=w * 2 * channels, max_size=w * 2 * channels))
                    for _ in range(n_rows))
    stream = draw(st.sampled_from([zlib.compress(rows), zlib.compress(rows)[: draw(st.integers(0, 40))], draw(st.binary(max_size=60))]))
    extra = b""
    if draw(st.booleans()):
        extra += _chunk(b"tRNS", draw(st.binary(max_size=8)))
    if draw(st.booleans()):
        extra += _chunk(b"eXIf", draw(st.binary(max_size=24)))
    ihdr = struct.pack(">IIBBBBB", w, h, depth, color, draw(st.sampled_from([0, 0, 1])), 0, interlace)
    chunks = _chunk(b"IHDR", ihdr) + extra + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")
    return png16.SIGNATURE + draw(st.sampled_from([chunks, chunks[: draw(st.integers(0, len(chunks)))]]))


@FUZZ
@given(blob=png16_files())
def test_png16(workdir: Path, blob: bytes) -> None:
    path = workdir / "fuzz.png"
    path.write_bytes(blob)
    _only_named_errors(png16.read_png16, path)
    _only_named_errors(load_image, path)


CONFIG_KEYS = ["model", "target", "params", "ddconfig", "embed_dim", "ch", "ch_mult", "num_res_blocks", "z_channels",
               "resolution", "in_channels", "out_ch", "norm_groups", "dropout", "attn_type", "encoder_config",
               "decoder_config", "regularizer_config", "first_stage_config", "latent_format", "family", "scale", "shift",
               "checkpoint", "scale_factor", "vaetool.AutoencoderKL", "vaetool.Encoder", "torch.nn.Identity"]
CONFIG_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**20, 2**20) | st.floats() | st.sampled_from(CONFIG_KEYS) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(CONFIG_KEYS), inner, max_size=5),
    max_leaves=20,
)
SHIPPED = (REPO / "configs" / "tiny-f8.yaml").read_text()


@FUZZ
@given(text=st.one_of(
    st.builds(lambda doc: yaml.safe_dump(doc, default_flow_style=None), CONFIG_VALUES),
    st.builds(lambda v: SHIPPED.replace("ch: 32", f"ch: {v}"), st.sampled_from(["-1", "0", "x", "[1]", "{a: 1}", "1e9", "*a"])),
    mutated(SHIPPED.encode()).map(lambda b: b.decode("utf-8", "replace")),
    st.text(max_size=200),
))
def test_yaml_configs(workdir: Path, text: str) -> None:
    path = workdir / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    _only_named_errors(load_vae_config, path)
