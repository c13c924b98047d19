"""vaetool.io.webdataset and shard_specs: brace expansion, samples from tars and pipes, bad members named, TarWriter."""

from __future__ import annotations

import io
import os
import struct
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaetool.errors import InputError, OutputError, OutputExistsError, UsageError
from vaetool.io import png16
from vaetool.io.images import load_image
from vaetool.io.webdataset import BadSample, Sample, TarWriter, expand_shards, is_shard_spec, iter_samples

RNG = np.random.default_rng(0)


def _image(fmt: str = "PNG", size: tuple[int, int] = (5, 4)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]], mode: str = "w", fmt: int = tarfile.PAX_FORMAT) -> Path:
    with tarfile.open(path, mode, format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _samples(shard: str | Path, **kwargs: object) -> list[Sample | BadSample]:
    return list(iter_samples(str(shard), **kwargs))  # type: ignore[arg-type]


PNG, JPG = _image("PNG"), _image("JPEG")
THREE = [("a.png", PNG), ("a.json", b'{"c": 1}'), ("b.jpg", JPG), ("b.txt", b"cap"), ("c.png", PNG)]


# ---- shard specs ----


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("data-{0000..0002}.tar", ["data-0000.tar", "data-0001.tar", "data-0002.tar"]),
        ("d-{8..10}.tar", ["d-8.tar", "d-9.tar", "d-10.tar"]),
        ("d-{08..10}.tar", ["d-08.tar", "d-09.tar", "d-10.tar"]),
        ("{a,b}/x-{0..1}.tar", ["a/x-0.tar", "a/x-1.tar", "b/x-0.tar", "b/x-1.tar"]),
        ("{a,{b,c}d}", ["a", "bd", "cd"]),
        ("plain.tar", ["plain.tar"]),
        (r"odd\{1\}.tar", ["odd{1}.tar"]),
        ("pipe:curl -s http://x/data-{000..002}.tar", [f"pipe:curl -s http://x/data-00{i}.tar" for i in range(3)]),
    ],
)
def test_expand_shards(spec: str, expected: list[str]) -> None:
    assert expand_shards(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("d-{0..3.tar", "without its '}'"),
        ("d-0..3}.tar", "without its '{'"),
        ("d-{5..1}.tar", "reversed range"),
        ("d-{x}.tar", "neither a range"),
        ("d-{0..999}-{0..9999}.tar", "more than 1000000"),
    ],
)
def test_expand_shards_errors(spec: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as err:
        expand_shards(spec)
    assert spec in str(err.value)


def test_is_shard_spec() -> None:
    shards = ["a.tar", "A.TAR", "a.tar.gz", "d-{0..3}.tar", "x.{tar,tgz}", "pipe:cat a.tar"]
    assert all(is_shard_spec(s) for s in shards)
    assert not any(is_shard_spec(s) for s in ["a.png", "folder", "x.{tar,png}", "d-{0..3.tar.x"])


# ---- reading ----


def test_grouping_extras_and_skipped_members(tmp_path: Path) -> None:
    shard = _tar(tmp_path / "s.tar", [*THREE, ("dir/d.seg.webp", PNG), ("dir/d.seg.json", b"{}"), ("./e.png", PNG)])
    with tarfile.open(shard, "a") as tf:  # a folder, a link, a README and a macOS resource file: all skipped
        for name, kind in [("f", tarfile.DIRTYPE), ("g.png", tarfile.SYMTYPE)]:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "a.png"
            tf.addfile(info)
        for name in ["README", "._h.png"]:
            info = tarfile.TarInfo(name)
            info.size = 3
            tf.addfile(info, io.BytesIO(b"xyz"))
    out = _samples(shard)
    assert all(isinstance(s, Sample) for s in out)
    assert [(s.key, s.image_member, sorted(s.extras)) for s in out] == [  # type: ignore[union-attr]
        ("a", "a.png", ["json"]),
        ("b", "b.jpg", ["txt"]),
        ("c", "c.png", []),
        ("dir/d", "dir/d.seg.webp", ["seg.json"]),
        ("e", "e.png", []),
    ]
    assert out[0].image == PNG and out[0].extras == {"json": b'{"c": 1}'}  # type: ignore[union-attr]


def test_image_member_by_extension(tmp_path: Path) -> None:
    shard = _tar(tmp_path / "s.tar", [("a.JPG", JPG), ("a.json", b"{}"), ("b.png", PNG), ("b.jpg", JPG), ("c.txt", b"x")])
    a, b, c = _samples(shard)
    assert isinstance(a, Sample) and a.image_member == "a.JPG" and a.extras == {"json": b"{}"}
    assert b == BadSample("b", "b.jpg", "two image members (b.png, b.jpg)")  # fatal=False: the shard goes on
    assert c == BadSample("c", "c.txt", "no image member")
    only_png = _samples(shard, image_suffixes=(".png",))
    assert only_png[0] == BadSample("a", "a.JPG", "no image member")
    assert isinstance(only_png[1], Sample) and only_png[1].extras == {"jpg": JPG}


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz"])
def test_compressed_tars(tmp_path: Path, mode: str) -> None:
    shard = _tar(tmp_path / "s.tar.x", THREE, mode=mode)
    assert [s.key for s in _samples(shard)] == ["a", "b", "c"]


def test_corrupt_image_member_is_a_sample_and_load_image_names_it(tmp_path: Path) -> None:
    shard = _tar(tmp_path / "s.tar", [("a.png", PNG[: len(PNG) // 2]), ("b.jpg", b"not a jpeg"), ("c.png", b"")])
    out = _samples(shard)
    assert all(isinstance(s, Sample) for s in out)
    messages = []
    for sample in out:
        with pytest.raises(InputError) as err:
            load_image(f"{shard}:{sample.image_member}", data=sample.image)  # type: ignore[union-attr]
        messages.append(str(err.value))
    assert messages[0].startswith(f"{shard}:a.png: ") and "truncated" in messages[0]
    assert messages[1] == f"{shard}:b.jpg: not an image, or not a PNG, JPEG, WebP, BMP or TIFF file"
    assert messages[2] == f"{shard}:c.png: empty file (0 bytes)"


def test_truncated_tar_yields_the_good_samples_then_one_bad(tmp_path: Path) -> None:
    whole = _tar(tmp_path / "s.tar", [*THREE[:4], ("c.png", _image(size=(64, 64)))]).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: whole.index(b"c.png") + 512 + 100])  # into c.png's data
    *good, bad = _samples(cut)
    assert [s.key for s in good] == ["a", "b"] and all(isinstance(s, Sample) for s in good)
    assert isinstance(bad, BadSample) and (bad.key, bad.member) == ("c", "c.png")
    assert bad.reason.startswith("truncated or corrupt tar: ")
    cut.write_bytes(whole[: whole.index(b"c.png")])  # ends at a member boundary: no end-of-archive blocks
    out = _samples(cut)
    assert [s.key for s in out] == ["a", "b"] and isinstance(out[1], BadSample) and "end-of-archive" in out[1].reason
    gz = _tar(tmp_path / "s.tar.gz", THREE, mode="w:gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(gz[: len(gz) // 2])
    out = _samples(tmp_path / "cut.tar.gz")
    assert isinstance(out[-1], BadSample) and out[-1].reason.startswith("truncated or corrupt tar: ") and out[-1].fatal
    assert all(isinstance(s, Sample) for s in out[:-1])
    (tmp_path / "junk.tar").write_bytes(b"\x01" * 2000)
    assert [type(s) for s in _samples(tmp_path / "junk.tar")] == [BadSample]


def test_hostile_member_names(tmp_path: Path) -> None:
    names = ["../evil.png", "/abs.png", "a/../../b.png", "x//y.png", "bad\x01.png", "nul\0é.png", "\udcff.png", "ok.png"]
    members = [(n, PNG) for n in names]
    shard = _tar(tmp_path / "s.tar", members[:-2], fmt=tarfile.PAX_FORMAT)
    with tarfile.open(shard, "a", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tf:
        for name, data in members[-2:]:  # a raw 0xff byte in the name
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    out = _samples(shard)
    assert isinstance(out[-1], Sample) and out[-1].key == "ok"
    bad = out[:-1]
    assert all(isinstance(s, BadSample) for s in bad) and len(bad) == 7
    reasons = [s.reason for s in bad]  # type: ignore[union-attr]
    assert reasons[:3] == ["'..' in the member path", "absolute member path", "'..' in the member path"]
    assert reasons[3:] == [
        "empty or '.' part in the member path",
        "control character in the member name",
        "NUL in the member name",
        "member name is not valid UTF-8",
    ]
    assert bad[-1].key == "\\xff" and bad[-1].key.encode("utf-8")  # printable, never a raw surrogate


def test_oversized_members_and_samples_are_skipped(tmp_path: Path) -> None:
    big = b"x" * 3000
    shard = _tar(
        tmp_path / "s.tar", [("a.png", PNG), ("a.bin", big), ("b.png", PNG), ("b.x", b"1" * 1000), ("b.y", b"1" * 1000), ("c.png", PNG)]
    )
    a, b, c = _samples(shard, max_member_bytes=2000)
    assert a == BadSample("a", "a.bin", "member larger than the limit of 2000 bytes (3000 bytes in this member)")
    assert isinstance(b, BadSample) and b.member == "b.y" and b.reason.startswith("sample larger than the limit")
    assert isinstance(c, Sample)


def test_repeated_and_duplicate_members(tmp_path: Path) -> None:
    shard = _tar(tmp_path / "s.tar", [("a.png", PNG), ("b.png", PNG), ("a.json", b"{}"), ("c.png", PNG), ("c.PNG", PNG)])
    out = _samples(shard)
    assert [type(s) for s in out] == [Sample, Sample, BadSample, BadSample]
    assert out[2] == BadSample("a", "a.json", "its key repeats an earlier sample's (members of a sample must be consecutive)")
    assert out[3] == BadSample("c", "c.PNG", "two members with the extension png")


def test_huge_extended_header_ends_the_shard(tmp_path: Path) -> None:
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tf:  # tarfile would read a pax header whole into memory
        for name, pax in [("x.png", {}), ("a.png", {}), ("b.png", {"comment": "c" * (2**20 + 10)}), ("c.png", {})]:
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = len(PNG), pax
            tf.addfile(info, io.BytesIO(PNG))
    x, bad = _samples(shard)
    assert isinstance(x, Sample) and x.key == "x"
    assert isinstance(bad, BadSample) and (bad.key, bad.member) == ("a", "a.png")  # the sample before may be incomplete
    assert bad.reason.startswith("truncated or corrupt tar: corrupt member header: an extended header of 1048")
    assert bad.reason.endswith("bytes (the limit is 1048576)")


def test_missing_shard(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        _samples(tmp_path / "nope.tar")
    with pytest.raises(InputError, match="is a directory"):
        _samples(tmp_path)


def test_pipe_shards(tmp_path: Path) -> None:
    shard = _tar(tmp_path / "s.tar", THREE)
    assert _samples(f"pipe:cat '{shard}'") == _samples(shard)
    with pytest.raises(InputError, match=r"^pipe:false: `false` exited with status 1: \(nothing on stderr\)$"):
        _samples("pipe:false")
    with pytest.raises(UsageError, match="without a command"):
        _samples("pipe:  ")
    with pytest.raises(InputError, match="exited with status 3: oops"):
        _samples("pipe:echo hmm >&2; echo oops >&2; exit 3")
    *good, last = _samples(f"pipe:cat '{shard}'; echo boom >&2; exit 2")
    assert [s.key for s in good] == ["a", "b", "c"]
    assert last == BadSample(
        "", f"pipe:cat '{shard}'; echo boom >&2; exit 2", f"`cat '{shard}'; echo boom >&2; exit 2` exited with status 2: boom",
        fatal=True,  # the shard's reader failed: the caller redoes the shard
    )
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[: shard.read_bytes().index(b"c.png") + 100])  # inside c.png's header
    out = _samples(f"pipe:cat '{cut}'; exit 4")
    assert isinstance(out[0], Sample) and len(out) == 2 and isinstance(out[-1], BadSample) and out[-1].key == "b"
    assert isinstance(out[-1], BadSample) and out[-1].reason.startswith("truncated or corrupt tar: ") and out[-1].fatal
    assert out[-1].reason.endswith("exited with status 4: (nothing on stderr)")


def test_pipe_reader_that_stops_early_kills_the_command(tmp_path: Path) -> None:
    big = RNG.integers(0, 256, 300_000, dtype=np.uint8).tobytes()  # more than a pipe holds: cat is still writing
    shard = _tar(tmp_path / "s.tar", [("a.png", big), ("b.png", big), ("c.png", big)])
    marker = tmp_path / "went-on"
    samples = iter_samples(f"pipe:cat '{shard}'; touch '{marker}'")
    start = time.monotonic()
    assert next(samples).key == "a"  # type: ignore[union-attr]
    samples.close()  # killed, not merely cut off (cat would die of SIGPIPE and the shell go on)
    assert time.monotonic() - start < 10
    time.sleep(0.5)
    assert not marker.exists()


# ---- writing ----


LONG = "d/" + "é" * 120 + ".json"  # a pax header for the name


def _write(path: Path, overwrite: bool = False) -> None:
    with TarWriter(path, overwrite=overwrite) as w:
        w.add("a.latent.safetensors", b"\x00" * 700)
        w.add("dir/b.json", b"{}")
        w.add(LONG, b"[]")


def test_tar_writer_is_deterministic_and_readable(tmp_path: Path) -> None:
    _write(tmp_path / "one.tar")
    _write(tmp_path / "two.tar")
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()
    with tarfile.open(tmp_path / "one.tar") as tf:
        infos = tf.getmembers()
        assert [i.name for i in infos] == ["a.latent.safetensors", "dir/b.json", LONG]
        assert all((i.mtime, i.uid, i.gid, i.mode, i.uname, i.gname) == (0, 0, 0, 0o644, "", "") for i in infos)
        assert tf.extractfile("dir/b.json").read() == b"{}"  # type: ignore[union-attr]
    assert sorted(os.listdir(tmp_path)) == ["one.tar", "two.tar"]


def test_tar_writer_atomicity_and_overwrite(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), TarWriter(tmp_path / "x.tar") as w:
        w.add("a.json", b"{}")
        raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []
    _write(tmp_path / "x.tar")
    with pytest.raises(OutputExistsError):
        TarWriter(tmp_path / "x.tar")
    w = TarWriter(tmp_path / "y.tar")
    w.add("a.json", b"{}")
    (tmp_path / "y.tar").write_bytes(b"another process")
    with pytest.raises(OutputExistsError):
        w.commit()
    with TarWriter(tmp_path / "z.tar") as w:  # committed in the block: the exit does not commit again
        w.add("a.json", b"{}")
        w.commit()
    assert (tmp_path / "y.tar").read_bytes() == b"another process"
    with TarWriter(tmp_path / "y.tar", overwrite=True) as w:
        w.add("b.json", b"[]")
    with tarfile.open(tmp_path / "y.tar") as tf:
        assert tf.getnames() == ["b.json"]
    assert sorted(os.listdir(tmp_path)) == ["x.tar", "y.tar", "z.tar"]


@pytest.mark.parametrize("name", ["../a.json", "/a.json", "a//b.json", "a/./b.json", "nul\0.json", ""])
def test_tar_writer_refuses_unsafe_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(OutputError, match="refusing the member name"), TarWriter(tmp_path / "x.tar") as w:
        w.add(name, b"{}")
    assert os.listdir(tmp_path) == []


def test_tar_writer_round_trip_through_iter_samples(tmp_path: Path) -> None:
    with TarWriter(tmp_path / "x.tar") as w:
        for name, data in THREE:
            w.add(name, data)
        with pytest.raises(OutputError, match="already written"):
            w.add("a.png", PNG)
    assert [(s.key, s.image) for s in _samples(tmp_path / "x.tar")] == [("a", PNG), ("b", JPG), ("c", PNG)]  # type: ignore[union-attr]


# ---- load_image from bytes ----


def test_load_image_from_bytes_matches_the_file(tmp_path: Path) -> None:
    deep = RNG.integers(0, 65536, (6, 7, 3), dtype=np.uint16)
    png16.write_png16(tmp_path / "deep.png", deep)
    data = (tmp_path / "deep.png").read_bytes()
    from_bytes = load_image("s.tar:deep.png", data=data)
    assert torch.equal(from_bytes, load_image(tmp_path / "deep.png"))
    assert png16.read_ihdr(data) == png16.read_ihdr(tmp_path / "deep.png")
    assert np.array_equal(png16.read_png16(data).pixels, deep)
    (tmp_path / "a.jpg").write_bytes(JPG)
    assert torch.equal(load_image("x:a.jpg", data=JPG), load_image(tmp_path / "a.jpg"))
    with pytest.raises(InputError, match=r"^s.tar:cut.png: truncated PNG \(IDAT chunk cut off\)$"):
        load_image("s.tar:cut.png", data=data[:100])
    ihdr = png16._chunk(b"IHDR", struct.pack(">IIBBBBB", 5000, 5000, 16, 2, 0, 0, 0))
    claim = png16.SIGNATURE + ihdr + png16._chunk(b"IDAT", zlib.compress(b"")) + png16._chunk(b"IEND", b"")
    with pytest.raises(InputError, match=f"more than its {len(claim)} bytes can hold"):  # the size checked is the data's
        load_image("s.tar:bomb.png", data=claim)
