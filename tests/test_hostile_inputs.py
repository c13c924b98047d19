"""Hostile and broken input (issue 13, the readers' half): every hostile file is built here, in the test.

Each bad file gets a named one-line error; where memory matters, the reader runs in a fresh
interpreter and its peak RSS growth (resource.getrusage) must stay under a stated bound, far below
what the file declares. At the command level a bad file never stops the run: the good file beside
it is written and the run exits 1.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from vaetool.cli import app
from vaetool.config import extract_vae_config, instantiate_from_config, load_vae_config, load_yaml
from vaetool.errors import ConfigError, InputError, printable
from vaetool.families import LatentFormat
from vaetool.io import png16
from vaetool.io.images import load_image, save_png
from vaetool.io.latents import load_latents, save_latent
from vaetool.io.manifest import ManifestWriter, read_manifest
from vaetool.io.shards import ShardWriter

REPO = Path(__file__).resolve().parent.parent
MODEL = ["--model", "tiny-f8", "--quiet"]
RSS_BOUND_MIB = 64  # what a refused file may cost; each hostile file below declares 256 MiB or more


MEASURE = """
import resource, sys
import vaetool.config, vaetool.io.images, vaetool.io.latents, vaetool.io.png16
from vaetool.errors import VaeToolError

READERS = {"image": vaetool.io.images.load_image, "png16": vaetool.io.png16.read_png16,
           "latents": vaetool.io.latents.load_latents, "config": vaetool.config.load_vae_config}
unit = 2**20 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
for line in sys.stdin:
    reader, path = line.rstrip("\\n").split(" ", 1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        READERS[reader](path)
        outcome = "LOADED"
    except VaeToolError as err:
        outcome = f"ERROR {err}"
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / unit
    print(f"{growth:.1f} {outcome}", flush=True)
"""


def _measured(cases: list[tuple[str, Path]], tmp_path: Path) -> list[tuple[float, str, str]]:
    """Read each (reader, file) in one fresh interpreter: per file (peak RSS growth in MiB, outcome line); and stderr.

    Peak RSS only grows, so each file's growth is measured from the peak before it; the files are
    small and refused early, so that peak stays close to the memory in use, and a reader that
    allocated what its file declares (256 MiB or more) would show it.
    """
    done = subprocess.run([sys.executable, "-c", MEASURE], input="".join(f"{r} {p}\n" for r, p in cases), capture_output=True,
                          text=True, cwd=tmp_path, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == len(cases), done.stdout
    return [(float(line.split(" ", 1)[0]), line.split(" ", 1)[1], done.stderr) for line in lines]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(w: int, h: int, depth: int, color: int, idat: bytes, extra: bytes = b"", interlace: int = 0) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, interlace)
    return png16.SIGNATURE + _chunk(b"IHDR", ihdr) + extra + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _zeros_deflated(n_mib: int) -> bytes:
    """A zlib stream of n_mib MiB of zeros (level 1: fast to build, ~1000:1)."""
    co, block = zlib.compressobj(1), bytes(2**20)
    return b"".join(co.compress(block) for _ in range(n_mib)) + co.flush()


def _tiff(w: int, h: int, data: bytes) -> bytes:
    """A little-endian RGB TIFF, one uncompressed strip holding `data`, that claims w x h pixels."""
    entries = [(256, 4, w), (257, 4, h), (258, 3, 8), (259, 3, 1), (262, 3, 2), (273, 4, 8), (277, 3, 3),
               (278, 4, h), (279, 4, len(data))]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        ifd += struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
    return b"II*\x00" + struct.pack("<I", 8 + len(data)) + data + ifd + struct.pack("<I", 0)


def _one_line(err: BaseException, *needles: str) -> str:
    text = str(err)
    assert "\n" not in text and len(text) < 600, text
    for needle in needles:
        assert needle in text, text
    return text


def _good_png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(path)
    return path


# ---- bombs: a small file that would cost gigabytes ----

def _alias_bomb(levels: int) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join([*lines, "model:", "  target: vaetool.AutoencodingEngine", "  params:",
                      f"    encoder_config: *a{levels - 1}", ""])


def _npy_header(shape: tuple[int, ...]) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue()


BOMBS: dict[str, tuple[str, str, Callable[[], bytes]]] = {  # name -> (reader, file name, contents)
    "idat-image": ("image", "idat.png", lambda: _png(8, 8, 16, 2, _zeros_deflated(256))),  # item 2: 256 MiB of IDAT
    "idat-png16": ("png16", "idat.png", lambda: b""),  # the same file through png16 directly
    "tall-tiff": ("image", "tall.tif", lambda: _tiff(16, 7_667_724, bytes(64))),  # item 3: 122M pixels in 186 bytes
    "warning-png": ("image", "big.png", lambda: _png(10_000, 9_000, 1, 0, _zeros_deflated(1)[:50])),  # over Pillow's warning
    "alias-yaml": ("config", "bomb.yaml", lambda: _alias_bomb(9).encode()),  # item 4: 9^9 values in 400 bytes
    "npz-member": ("latents", "huge.npz", lambda: b""),  # item 5: 256 MiB declared, 100 bytes held
}


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[float, str, str]]:
    """Every bomb read in one fresh interpreter: name -> (peak RSS growth in MiB, outcome line, the run's stderr)."""
    root = tmp_path_factory.mktemp("bombs")
    for _, name, build in BOMBS.values():
        if data := build():
            (root / name).write_bytes(data)
    with zipfile.ZipFile(root / "huge.npz", "w") as zf:
        zf.writestr("latents.npy", _npy_header((1, 4, 4096, 4096)) + bytes(100))
    results = _measured([(reader, root / name) for reader, name, _ in BOMBS.values()], root)
    return dict(zip(BOMBS, results, strict=True))


@pytest.mark.parametrize(("bomb", "needle"), [
    ("idat-image", "idat.png: corrupt PNG (its image data inflates past the 392 bytes a 8 x 8 image holds)"),
    ("idat-png16", "corrupt PNG (its image data inflates past the 392 bytes a 8 x 8 image holds)"),
    ("tall-tiff", "tall.tif: the image claims 16 x 7667724 pixels, more than its 186 bytes can hold (raw data expands at most 1x)"),
    ("warning-png", "big.png: the image claims 10000 x 9000 pixels, more than its"),
    ("alias-yaml", "bomb.yaml: refusing the YAML: its aliases expand to more than 100000 values (an alias bomb?)"),
    ("npz-member", "huge.npz: truncated or corrupt (member 'latents.npy'): its header declares shape [1, 4, 4096, 4096] float32"),
])
def test_bombs_are_refused_within_a_memory_bound(bombs: dict, bomb: str, needle: str) -> None:
    """Each bomb: a named one-line error, peak RSS growth under RSS_BOUND_MIB, and no Pillow warning on stderr."""
    growth, outcome, stderr = bombs[bomb]
    assert outcome.startswith("ERROR") and needle in outcome, outcome
    assert growth < RSS_BOUND_MIB, f"{bomb}: peak RSS grew {growth:.0f} MiB"
    assert "DecompressionBomb" not in stderr, stderr


def test_more_yaml_bombs(tmp_path: Path) -> None:
    merge = "b0: &b0 {k0: 1, k1: 2, k2: 3, k3: 4, k4: 5, k5: 6, k6: 7, k7: 8}\n" + "\n".join(
        f"b{i}: &b{i} {{<<: [{', '.join([f'*b{i - 1}'] * 8)}], own{i}: 1}}" for i in range(1, 9)) + "\n"
    (tmp_path / "merge.yaml").write_text(merge)  # merge keys (<<) expand while PyYAML builds the mapping
    with pytest.raises(ConfigError, match="alias bomb"):
        load_yaml(tmp_path / "merge.yaml")
    (tmp_path / "self.yaml").write_text("a: &a [1, *a]\n")
    with pytest.raises(ConfigError, match="recursive alias"):
        load_yaml(tmp_path / "self.yaml")
    (tmp_path / "deep.yaml").write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="deep.yaml: invalid YAML"):
        load_yaml(tmp_path / "deep.yaml")


def test_images_claiming_more_than_their_file_holds(tmp_path: Path) -> None:
    (tmp_path / "wide.png").write_bytes(_png(10_000, 10_000, 8, 2, zlib.compress(bytes(1000))))
    with pytest.raises(InputError) as err_info:
        load_image(tmp_path / "wide.png")
    _one_line(err_info.value, "wide.png", "claims 10000 x 10000 pixels", "expands at most 1032x")
    Image.new("RGB", (300, 200), "gray").save(tmp_path / "fine.tif", compression="tiff_lzw")  # ~100:1, accepted
    assert load_image(tmp_path / "fine.tif").shape == (3, 200, 300)


def test_instantiate_never_stringifies_a_whole_config() -> None:
    shared: list = ["x"] * 9
    for _ in range(12):  # 9^12 leaves if printed
        shared = [shared] * 9
    with pytest.raises(ConfigError) as err:
        instantiate_from_config({"params": {"encoder_config": shared}})
    _one_line(err.value, "got a mapping with keys params")
    with pytest.raises(ConfigError) as err:
        instantiate_from_config(shared)  # type: ignore[arg-type]
    _one_line(err.value, "got a list")


def _npy_header(shape: tuple[int, ...]) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue()


def test_npy_and_npz_headers_checked_against_the_bytes_they_hold(tmp_path: Path) -> None:
    """Item 5: [1, 4, 100000, 100000] with 100 bytes of data; an .npz member claiming more than deflate can give."""
    (tmp_path / "huge.npy").write_bytes(_npy_header((1, 4, 100_000, 100_000)) + bytes(100))
    with pytest.raises(InputError) as err:
        load_latents(tmp_path / "huge.npy")
    _one_line(err.value, "huge.npy", "declares shape [1, 4, 100000, 100000] float32 (160000000000 bytes), the file holds 100")
    with zipfile.ZipFile(tmp_path / "zipbomb.npz", "w") as zf:  # a member claiming more than deflate can give
        zf.writestr("latents.npy", _npy_header((1, 4, 8, 8)) + bytes(1024))
    data = bytearray((tmp_path / "zipbomb.npz").read_bytes())
    for offset in (22, data.rfind(b"PK\x01\x02") + 24):  # the local and central headers' uncompressed sizes
        data[offset : offset + 4] = struct.pack("<I", 2**31)
    (tmp_path / "zipbomb.npz").write_bytes(bytes(data))
    with pytest.raises(InputError, match="more than its compression can expand"):
        load_latents(tmp_path / "zipbomb.npz")


# ---- named errors instead of internal ones ----

def test_random_bytes_with_latent_suffixes(tmp_path: Path) -> None:
    """Item 17: random bytes named .npy/.npz are corrupt, not 'pickled objects'."""
    noise = np.random.default_rng(1).bytes(300)
    for suffix, what in ((".npy", "not a .npy file"), (".npz", "not a .npz file")):
        (tmp_path / f"noise{suffix}").write_bytes(noise)
        with pytest.raises(InputError) as err:
            load_latents(tmp_path / f"noise{suffix}")
        _one_line(err.value, f"noise{suffix}", what)
        assert "pickle" not in str(err.value)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="holds pickled objects"):
        load_latents(tmp_path / "objects.npy")


def test_json_keys_that_are_not_a_list(tmp_path: Path) -> None:
    """Item 7: metadata `vaetool.json_keys: "5"`, and a listed value that is not JSON."""
    for name, meta in (("five", {"vaetool.json_keys": "5"}), ("notjson", {"vaetool.json_keys": '["a"]', "a": "{oops"})):
        safetensors.torch.save_file({"latent": torch.zeros(4, 2, 2)}, tmp_path / f"{name}.safetensors", metadata=meta)
        with pytest.raises(InputError) as err:
            load_latents(tmp_path / f"{name}.safetensors")
        _one_line(err.value, f"{name}.safetensors", "corrupt metadata")


def test_png16_trns_of_the_wrong_length(tmp_path: Path) -> None:
    """Item 8: a 16-bit PNG with a 3-byte tRNS chunk (gray needs 2, RGB 6); right-sized ones still work."""
    gray = b"".join(b"\x00" + bytes(2 * 2) for _ in range(2))
    (tmp_path / "g3.png").write_bytes(_png(2, 2, 16, 0, zlib.compress(gray), _chunk(b"tRNS", b"\x00\x01\x02")))
    with pytest.raises(InputError) as err:
        load_image(tmp_path / "g3.png")
    _one_line(err.value, "g3.png", "3-byte tRNS chunk", "gray image needs 2")
    rgb = b"".join(b"\x00" + bytes(2 * 6) for _ in range(2))
    (tmp_path / "c3.png").write_bytes(_png(2, 2, 16, 2, zlib.compress(rgb), _chunk(b"tRNS", b"\x00\x01\x02")))
    with pytest.raises(InputError, match="tRNS"):  # Pillow's header check names it first
        load_image(tmp_path / "c3.png")
    with pytest.raises(InputError, match="3-byte tRNS chunk; a 16-bit RGB image needs 6"):
        png16.read_png16(tmp_path / "c3.png")
    (tmp_path / "c6.png").write_bytes(_png(2, 2, 16, 2, zlib.compress(rgb), _chunk(b"tRNS", bytes(6))))
    assert png16.read_png16(tmp_path / "c6.png").transparent == (0, 0, 0)
    assert load_image(tmp_path / "c6.png").shape == (3, 2, 2)


def test_non_utf8_file_names(tmp_path: Path) -> None:
    """Item 9 and 17: a name holding the byte 0xff is named in a printable error; manifests still record it."""
    bad_name = os.fsdecode(b"b\xff")
    image = _good_png(tmp_path / f"{bad_name}.png")
    with pytest.raises(InputError) as err:
        load_image(image)
    text = _one_line(err.value, "b\\xff.png", "not valid UTF-8")
    text.encode("utf-8")  # printable: no lone surrogates
    save_latent(tmp_path / "ok.safetensors", torch.zeros(4, 2, 2), {})
    os.rename(tmp_path / "ok.safetensors", tmp_path / f"{bad_name}.safetensors")
    with pytest.raises(InputError, match="not valid UTF-8"):
        load_latents(tmp_path / f"{bad_name}.safetensors")
    with ManifestWriter(tmp_path / "manifest.jsonl") as m:
        m.record(image, None, "failed", error=str(err.value))
    [record] = read_manifest(tmp_path / "manifest.jsonl")
    assert record["source"] == str(image)  # exact, through a \udcff escape
    assert printable(record["source"]).endswith("b\\xff.png")


def test_animations_are_refused(tmp_path: Path) -> None:
    """Item 17: animated PNG/WebP would silently encode their first frame."""
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue", "green")]
    for suffix in (".png", ".webp"):
        frames[0].save(tmp_path / f"anim{suffix}", save_all=True, append_images=frames[1:], duration=100, loop=0)
        with pytest.raises(InputError) as err:
            load_image(tmp_path / f"anim{suffix}")
        _one_line(err.value, f"anim{suffix}", "3 frames", "vaetool video encode")


BASE_CONFIG = """\
model:
  target: vaetool.AutoencoderKL
  params:
    embed_dim: 4
    ddconfig: {double_z: true, z_channels: 4, resolution: 64, in_channels: 3, out_ch: 3, ch: 32,
               ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [], dropout: 0.0}
"""


@pytest.mark.parametrize(("change", "needles"), [
    ("ch: 32,|ch: -32,", ["model.params.ddconfig.ch must be a positive integer, not -32"]),
    ("num_res_blocks: 1|num_res_blocks: -1", ["model.params.ddconfig.num_res_blocks must be an integer >= 0, not -1"]),
    ("ch_mult: [1, 2]|ch_mult: []", ["model.params.ddconfig.ch_mult must be a list of 1 to 16 positive integers"]),
    ("ch_mult: [1, 2]|ch_mult: 5", ["model.params.ddconfig.ch_mult must be"]),
    ("ch: 32,|ch: 24,", ["model.params.ddconfig.norm_groups (32) must divide"]),
    ("dropout: 0.0|dropout: 7", ["model.params.ddconfig.dropout must be a number in [0, 1), not 7"]),
    ("z_channels: 4|z_channels: 0", ["model.params.ddconfig.z_channels must be a positive integer, not 0"]),
    ("embed_dim: 4|embed_dim: four", ["model.params.embed_dim must be a positive integer, not 'four'"]),
    ("ch: 32,|ch: 65536,", ["model describes a model of about", "weights, more than the limit"]),
    ("target: vaetool.AutoencoderKL|target: [1, 2]", ["model.target must be a class name, not [1, 2]"]),
    ("target: vaetool.AutoencoderKL|target: torch.nn.Identity", ["model.target 'torch.nn.Identity' builds Identity, not an autoencoder"]),
    ("target: vaetool.AutoencoderKL|target: os.system", ["model.target 'os.system' is not allowed; allowed here:"]),
    ("    embed_dim: 4\n|", ["model.params.embed_dim is missing"]),
    ("  params:\n    embed_dim: 4|  params: [1]\n  other:\n    embed_dim: 4", ["model.params must be a mapping, not [1]"]),
    ("|latent_format: {scale: 0}\n", ["latent_format: latent scale must be a finite number > 0, not 0.0"]),
    ("|latent_format: {scale: .nan}\n", ["latent_format: latent scale must be a finite number > 0, not nan"]),
    ("|latent_format: {scale: 1, shift: .inf}\n", ["latent_format: latent shift must be a finite number, not inf"]),
    ("|latent_format: 5\n", ["latent_format must be a mapping"]),
])
def test_config_errors_name_the_file_and_the_key(tmp_path: Path, change: str, needles: list[str]) -> None:
    """Item 11 (and 12 for latent_format): one line naming the config file and the key, before anything is built."""
    old, new = change.split("|")
    text = BASE_CONFIG.replace(old, new, 1) if old else new + BASE_CONFIG
    assert text != BASE_CONFIG
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_vae_config(tmp_path / "bad.yaml")
    _one_line(err.value, str(tmp_path / "bad.yaml"), *needles)


def test_engine_sub_configs_are_checked(tmp_path: Path) -> None:
    doc = load_yaml(REPO / "configs" / "tiny-f8-16ch.yaml")
    doc["model"]["params"]["encoder_config"]["target"] = "vaetool.Decoder"
    with pytest.raises(ConfigError, match=r"model.params.encoder_config.target 'vaetool.Decoder' builds Decoder, not Encoder"):
        extract_vae_config(doc, "x.yaml")
    doc = load_yaml(REPO / "configs" / "tiny-f8-16ch.yaml")
    decoder = doc["model"]["params"]["decoder_config"]
    decoder["params"] = {**decoder["params"], "ch": 0}  # the shipped YAML shares one params mapping (an alias)
    with pytest.raises(ConfigError, match=r"^x.yaml: model.params.decoder_config.params.ch must be a positive integer, not 0$"):
        extract_vae_config(doc, "x.yaml")


@pytest.mark.parametrize(("scale", "shift"), [(0.0, 0.0), (-1.0, 0.0), (float("nan"), 0.0), (float("inf"), 0.0), (1.0, float("nan"))])
def test_latent_format_refuses_unusable_scales(scale: float, shift: float) -> None:
    """Item 12: whatever the source (config, metadata, flag), a format with scale 0 cannot exist."""
    with pytest.raises(ValueError, match="latent (scale|shift) must be a finite number"):
        LatentFormat("x", 4, scale, shift)
    assert LatentFormat("x", 4, 0.5, -0.25).to_raw(torch.ones(1)).item() == pytest.approx(1.75)


# ---- writing: reproducible bytes, consistent modes ----

def test_latent_files_are_byte_reproducible(tmp_path: Path) -> None:
    """Item 14: the same tensors and metadata give the same bytes (the library writes its header in hash order,
    which differs between maps even within one process, so four writes here would differ without the fix)."""
    latent = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(0))
    meta = {f"key{i}": f"value {i}" for i in range(12)} | {"original_size": [48, 40], "scaled": False}
    for i in range(4):
        save_latent(tmp_path / f"a{i}.safetensors", latent, meta)
        with ShardWriter(tmp_path / f"shards{i}", shard_size=3) as writer:
            for k in "cab":
                writer.add(k, latent, meta)  # one tensor three times: storage shared, as views of a batch are
    assert len({(tmp_path / f"a{i}.safetensors").read_bytes() for i in range(4)}) == 1
    assert len({(tmp_path / f"shards{i}" / "shard-00000.safetensors").read_bytes() for i in range(4)}) == 1
    [item] = load_latents(tmp_path / "a0.safetensors")
    assert torch.equal(item.latent, latent) and item.metadata == meta


def test_outputs_get_the_modes_of_plain_files(tmp_path: Path) -> None:
    """Item 17: latents were 0600 while PNGs and manifests were 0644; all follow the umask now."""
    old = os.umask(0o027)
    try:
        (tmp_path / "plain").write_bytes(b"")
        save_latent(tmp_path / "a.safetensors", torch.zeros(4, 2, 2), {})
        save_png(tmp_path / "a.png", torch.zeros(3, 2, 2))
        save_png(tmp_path / "b.png", torch.zeros(3, 2, 2), bits=16)
        with ShardWriter(tmp_path / "shards", shard_size=1) as writer:
            writer.add("k", torch.zeros(4, 2, 2), {})
        with ManifestWriter(tmp_path / "manifest.jsonl") as m:
            m.write({"a": 1})
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o640}, {k: oct(v) for k, v in modes.items()}


# ---- the command: one bad file never stops the run, nothing escapes -o ----

def test_encode_names_each_hostile_image_and_writes_the_good_one(runner, tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    _good_png(src / "good.png")
    (src / "tall.tif").write_bytes(_tiff(16, 7_667_724, bytes(64)))
    (src / "idat.png").write_bytes(_png(8, 8, 16, 2, _zeros_deflated(8)))
    rows = b"".join(b"\x00" + bytes(12) for _ in range(2))
    (src / "trns.png").write_bytes(_png(2, 2, 16, 2, zlib.compress(rows), _chunk(b"tRNS", b"abc")))
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    frames[0].save(src / "anim.webp", save_all=True, append_images=frames[1:])
    _good_png(src / f"{os.fsdecode(b'b' + bytes([0xFF]))}.png")
    result = runner.invoke(app, ["encode", str(src), "-o", str(out), *MODEL])
    assert result.exit_code == 1, result.output
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["good.safetensors"]
    records = {Path(r["source"]).name: r for r in read_manifest(out / "manifest.jsonl")}
    assert records.pop("good.png")["status"] == "written"
    expected = {"tall.tif": "more than its", "idat.png": "inflates past", "trns.png": "tRNS",
                "anim.webp": "animated", os.fsdecode(b"b\xff.png"): "not valid UTF-8"}
    assert {name: r["status"] for name, r in records.items()} == dict.fromkeys(expected, "failed")
    for name, needle in expected.items():
        assert needle in records[name]["error"], records[name]


def test_encode_glob_with_dotdot_writes_inside_out(runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 1: `vaetool encode 'in/*/../../up.png' -o out` wrote ./up.safetensors."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in" / "sub").mkdir(parents=True)
    _good_png(tmp_path / "up.png")
    result = runner.invoke(app, ["encode", "in/*/../../up.png", "-o", "out", *MODEL])
    assert result.exit_code == 0, result.output
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.safetensors"))
    assert written == ["out/up.safetensors"]
    [record] = read_manifest(tmp_path / "out" / "manifest.jsonl")
    assert record["output"] == "out/up.safetensors"


def test_decode_names_each_hostile_latent_and_writes_the_good_one(runner, tmp_path: Path) -> None:
    lat, out = tmp_path / "lat", tmp_path / "out"
    save_latent(lat / "good.safetensors", torch.zeros(4, 3, 3), {"scaled": False})
    (lat / "huge.npy").write_bytes(_npy_header((1, 4, 100_000, 100_000)) + bytes(100))
    (lat / "noise.npz").write_bytes(np.random.default_rng(2).bytes(200))
    safetensors.torch.save_file({"latent": torch.zeros(4, 3, 3)}, lat / "keys.safetensors", metadata={"vaetool.json_keys": "5"})
    result = runner.invoke(app, ["decode", str(lat), "-o", str(out), "--json", *MODEL])
    assert result.exit_code == 1, result.output
    assert sorted(p.name for p in out.glob("*.png")) == ["good.png"]
    errors = {Path(r["source"]).name: r["reason"] for r in json.loads(result.stdout)["failed"]}
    assert set(errors) == {"huge.npy", "noise.npz", "keys.safetensors"}, errors
    assert "declares shape" in errors["huge.npy"] and "not a .npz file" in errors["noise.npz"]
    assert "vaetool.json_keys" in errors["keys.safetensors"]
