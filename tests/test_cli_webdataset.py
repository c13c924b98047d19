"""`vaetool encode` of WebDataset tar shards (issue 16): tar in, tar or files out, bad members, resume by shard, torchrun."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from cli_helpers import noise_png, one_thread, subprocess_env
from PIL import Image

from vaetool.cli import app
from vaetool.io.latents import load_latents
from vaetool.io.manifest import read_manifest

MODEL = ["--model", "tiny-f8", "--quiet"]


def png_bytes(w: int, h: int, seed: int) -> bytes:
    """A w x h noise PNG, as bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def make_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    """A tar shard of samples {key: {ext: bytes}}, members in key order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def tar_members(path: Path) -> dict[str, bytes]:
    """{member name: bytes} of a tar."""
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def member_latent(data: bytes, tmp: Path) -> tuple[torch.Tensor, dict]:
    """The latent and metadata of a KEY.latent.safetensors member (through the file reader decode uses)."""
    tmp.write_bytes(data)
    (item,) = load_latents(tmp)
    return item.latent, item.metadata


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """in/data-0000.tar (s0, s1 with .json and .txt) and in/data-0001.tar (s2 of another size, s3 with a non-object JSON)."""
    root = tmp_path / "in"
    make_shard(root / "data-0000.tar", {
        "s0": {"png": png_bytes(32, 32, 0), "json": b'{"caption": "zero", "width": 32}', "txt": b"a cat"},
        "s1": {"png": png_bytes(32, 32, 1), "txt": b"a dog"},
    })  # fmt: skip
    make_shard(root / "data-0001.tar", {
        "s2": {"png": png_bytes(40, 24, 2), "cls": b"7"},
        "s3": {"png": png_bytes(32, 32, 3), "json": b"[1, 2]"},
    })  # fmt: skip
    return root


def test_webdataset_out_one_tar_per_shard_with_the_same_latents_as_files(runner, shards: Path, tmp_path: Path) -> None:
    out, files = tmp_path / "out", tmp_path / "files"
    spec = str(shards / "data-{0000..0001}.tar")
    result = runner.invoke(app, ["encode", spec, "-o", str(out), "--format", "webdataset", *MODEL, "--json", "-b", "1"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["done"], summary["shards"], summary["shards_done"], summary["format"]) == (4, 2, 2, "webdataset")
    first, second = tar_members(out / "data-0000.tar"), tar_members(out / "data-0001.tar")
    assert set(first) == {"s0.latent.safetensors", "s0.json", "s0.txt", "s1.latent.safetensors", "s1.json", "s1.txt"}
    assert set(second) == {"s2.latent.safetensors", "s2.json", "s2.cls", "s3.latent.safetensors", "s3.json", "s3.source.json"}
    assert first["s0.txt"] == b"a cat" and second["s2.cls"] == b"7" and second["s3.source.json"] == b"[1, 2]"
    record = json.loads(first["s0.json"])
    assert record["caption"] == "zero" and record["width"] == 32  # the input's JSON object, kept
    assert record["vaetool"]["key"] == "s0" and record["vaetool"]["provenance"]["latent_format"] == "raw"
    assert record["vaetool"]["original_size"] == [32, 32]

    # the same images as loose files give the same latents, bit for bit
    for key, members in [("s0", first), ("s2", second)]:
        src = tmp_path / "loose" / f"{key}.png"
        src.parent.mkdir(exist_ok=True)
        with tarfile.open(shards / ("data-0000.tar" if key == "s0" else "data-0001.tar")) as tar:
            src.write_bytes(tar.extractfile(f"{key}.png").read())
        assert runner.invoke(app, ["encode", str(src), "-o", str(files), *MODEL, "-b", "1"]).exit_code == 0
        (loose,) = load_latents(files / f"{key}.safetensors")
        latent, meta = member_latent(members[f"{key}.latent.safetensors"], tmp_path / "m.safetensors")
        assert torch.equal(latent, loose.latent), key
        assert meta["family"] == "sd1" and meta["original_size"] == loose.metadata["original_size"]

    index = json.loads((out / "shards.json").read_text())
    assert index["shards"]["data-0000.tar"] == {"input": str(shards / "data-0000.tar"), "complete": True, "samples": 2, "failed": []}
    written = [r for r in read_manifest(out / "manifest.jsonl") if r["status"] == "written"]
    assert sorted(r["key"] for r in written) == ["data-0000.tar/s0", "data-0000.tar/s1", "data-0001.tar/s2", "data-0001.tar/s3"]

    again = runner.invoke(app, ["encode", spec, "-o", str(out), "--format", "webdataset", *MODEL, "--json"])
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)
    assert (summary["done"], summary["shards_skipped"], summary["shards_done"]) == (0, 2, 0)  # finished shards are not read
    index["shards"].pop("data-0001.tar")  # a kill between publishing a tar and recording it
    (out / "shards.json").write_text(json.dumps(index))
    adopted = runner.invoke(app, ["encode", spec, "-o", str(out), "--format", "webdataset", *MODEL, "--json"])
    assert json.loads(adopted.stdout)["shards_skipped"] == 2  # the tar is this run's: kept, not read again ...
    record = json.loads((out / "shards.json").read_text())["shards"]["data-0001.tar"]  # ... and recorded again
    assert record == {"input": str(shards / "data-0001.tar"), "complete": True, "samples": 2, "failed": [], "adopted": True}
    (out / "data-0001.tar").unlink()
    third = runner.invoke(app, ["encode", spec, "-o", str(out), "--format", "webdataset", *MODEL, "--json", "-b", "1"])
    assert (json.loads(third.stdout)["done"], json.loads(third.stdout)["shards_skipped"]) == (2, 1)
    assert tar_members(out / "data-0001.tar") == second  # byte-identical members
    stale = runner.invoke(app, ["encode", spec, "-o", str(out), "--format", "webdataset", *MODEL, "--sample"])
    assert stale.exit_code != 0 and "other settings" in stale.output and "posterior" in stale.output


def test_a_corrupt_member_fails_alone_and_a_truncated_shard_is_redone(runner, shards: Path, tmp_path: Path) -> None:
    make_shard(shards / "data-0002.tar", {"bad": {"png": b"\x89PNG\r\n\x1a\nnot really"}, "ok": {"png": png_bytes(16, 16, 5)}})
    whole = make_shard(tmp_path / "big.tar", {f"t{i}": {"png": png_bytes(16, 16, 10 + i)} for i in range(3)}).read_bytes()
    (shards / "data-0003.tar").write_bytes(whole[: whole.index(b"t1.png") + 700])  # cut inside t1.png's data
    out = tmp_path / "out"
    args = ["encode", str(shards / "data-{0000..0003}.tar"), "-o", str(out), "--format", "webdataset", *MODEL, "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    failed = {f["key"]: f["reason"] for f in summary["failed"]}
    assert "data-0002.tar/bad" in failed and "corrupt image" in failed["data-0002.tar/bad"]
    assert any(k.startswith("data-0003.tar/") and "truncated" in r for k, r in failed.items()), failed
    assert set(tar_members(out / "data-0002.tar")) == {"ok.latent.safetensors", "ok.json"}  # the rest of the shard went on
    assert not (out / "data-0003.tar").exists()  # not finished: no tar, no record
    index = json.loads((out / "shards.json").read_text())["shards"]
    assert "data-0003.tar" not in index and index["data-0002.tar"]["failed"][0]["key"] == "data-0002.tar/bad"
    rerun = json.loads(runner.invoke(app, args).stdout)
    assert rerun["shards_skipped"] == 3 and rerun["done"] == 0 and rerun["failed"]  # only the truncated shard is read again


def test_pipe_shards_and_per_file_output_with_captions(runner, shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    spec = f"pipe:cat {shards / 'data-0000.tar'}"
    result = runner.invoke(app, ["encode", spec, "-o", str(out), *MODEL, "--json"])
    assert result.exit_code == 0, result.output
    assert sorted(p.relative_to(out).as_posix() for p in (out / "data-0000").iterdir()) == [
        "data-0000/s0.json", "data-0000/s0.safetensors", "data-0000/s0.txt", "data-0000/s1.safetensors", "data-0000/s1.txt"]
    assert (out / "data-0000" / "s0.txt").read_bytes() == b"a cat"
    (item,) = load_latents(out / "data-0000" / "s0.safetensors")
    assert item.latent.shape == (4, 4, 4) and item.metadata["key"] == "data-0000.tar/s0"
    again = json.loads(runner.invoke(app, ["encode", spec, "-o", str(out), *MODEL, "--json"]).stdout)
    assert (again["done"], again["shards_skipped"]) == (0, 1)
    json.loads((out / "shards.json").read_text())  # the record that made it skip
    (out / "shards.json").unlink()  # without it the shard is read again: its files are found and skipped one by one
    third = json.loads(runner.invoke(app, ["encode", spec, "-o", str(out), *MODEL, "--json"]).stdout)
    assert (third["done"], third["skipped"], third["shards_done"]) == (0, 2, 1)
    (out / "shards.json").unlink()
    stale = runner.invoke(app, ["encode", spec, "-o", str(out), *MODEL, "--sample"])
    assert stale.exit_code == 2 and "s0.safetensors" in stale.output and "posterior" in stale.output  # before any work
    failing = runner.invoke(app, ["encode", f"pipe:cat {tmp_path / 'gone.tar'}", "-o", str(tmp_path / "o2"), *MODEL, "--json"])
    assert failing.exit_code == 1, failing.output
    assert "No such file" in json.dumps(json.loads(failing.stdout)["failed"])  # named, counted as failed


@pytest.mark.parametrize(("args", "problem"), [
    (["{tars}", "{img}"], "not both"),
    (["{img}", "--format", "webdataset"], "one tar per input tar shard"),
    (["{tars}", "--format", "sd-scripts", "--scaled"], "drop --scaled"),
    (["{tars}", "--format", "webdataset", "--shard-size", "2"], "--shard-size"),
    (["{tars}", "--format", "tarball"], "tarball"),
    (["{tars}", "--shard-size", "2"], "tar shards keep theirs"),
    (["in/data-{3..1}.tar"], "data-{3..1}.tar"),
])  # fmt: skip
def test_usage_errors(runner, shards: Path, tmp_path: Path, args: list[str], problem: str) -> None:
    img = noise_png(tmp_path / "img.png", 16, 16)
    filled = [a.format(tars=str(shards / "data-{0000..0001}.tar"), img=str(img)) if "{t" in a or "{i" in a else a for a in args]
    result = runner.invoke(app, ["encode", *filled, "-o", str(tmp_path / "out"), *MODEL])
    assert result.exit_code == 2, result.output
    assert problem in result.output


def _tar_written(out: Path) -> int:
    return len(list(out.glob("data-*.tar"))) if out.exists() else 0


def test_torchrun_by_shard_with_a_kill_in_the_middle(runner, tmp_path: Path) -> None:
    root, out, single = tmp_path / "in", tmp_path / "out", tmp_path / "single"
    for s in range(4):
        make_shard(root / f"data-{s:04d}.tar", {f"k{s}{i}": {"png": png_bytes(32, 32, 10 * s + i)} for i in range(6)})
    spec = str(root / "data-{0000..0003}.tar")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vaetool", "encode",
           spec, "-o", str(out), "--format", "webdataset", *MODEL, "-b", "1", "--workers", "1"]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while _tar_written(out) == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    ranks = psutil.Process(proc.pid).children(recursive=True)  # torchrun starts each rank in its own session
    os.killpg(proc.pid, signal.SIGKILL)  # every rank dies
    for rank in ranks:
        with contextlib.suppress(psutil.NoSuchProcess):
            rank.kill()
    proc.wait()
    psutil.wait_procs(ranks, timeout=30)
    killed_with = _tar_written(out)
    assert 0 < killed_with < 4, "the run was not killed mid-way"
    result = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    index = json.loads((out / "shards.json").read_text())["shards"]
    assert sorted(index) == [f"data-{s:04d}.tar" for s in range(4)] and not list(out.glob("shards.rank*.json"))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the dead run's temp tars are gone
    with one_thread():  # the ranks' thread count: the same bytes
        assert runner.invoke(app, ["encode", spec, "-o", str(single), "--format", "webdataset", *MODEL, "-b", "1"]).exit_code == 0
    for s in range(4):
        name = f"data-{s:04d}.tar"
        got, want = tar_members(out / name), tar_members(single / name)
        assert set(got) == set(want) and len(got) == 12, name
        for member in got:
            if member.endswith(".safetensors"):
                a = member_latent(got[member], tmp_path / "a.safetensors")[0]
                assert torch.equal(a, member_latent(want[member], tmp_path / "b.safetensors")[0]), member


def test_roundtrip_reads_shards_too(runner, shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "rt"
    make_shard(shards / "data-0002.tar", {"bad": {"png": b"\x89PNG\r\n\x1a\nnot really"}})
    result = runner.invoke(app, ["roundtrip", str(shards / "data-{0000..0002}.tar"), "-o", str(out), *MODEL, "--json"])
    assert result.exit_code == 1, result.output  # the corrupt member is an error in the report
    doc = json.loads(result.stdout)
    images = {r["image"]: r for r in doc["images"]}
    assert set(images) == {"data-0000.tar/s0", "data-0000.tar/s1", "data-0001.tar/s2", "data-0001.tar/s3", "data-0002.tar/bad"}
    assert "data-0002.tar:bad.png: corrupt image" in images["data-0002.tar/bad"]["error"]
    assert Image.open(out / "data-0001" / "s2.png").size == (40, 24)
    assert images["data-0000.tar/s0"]["vs_input"]["psnr"] > 0


def test_decode_reads_webdataset_latent_tars_member_by_member(runner, shards: Path, tmp_path: Path) -> None:
    lat, png, loose = tmp_path / "lat", tmp_path / "png", tmp_path / "loose"
    spec = str(shards / "data-{0000..0001}.tar")
    assert runner.invoke(app, ["encode", spec, "-o", str(lat), "--format", "webdataset", *MODEL]).exit_code == 0
    members = tar_members(lat / "data-0000.tar")
    make_shard(lat / "data-0009.tar", {  # a latent tar with a bad member among good ones
        "good": {"latent.safetensors": members["s0.latent.safetensors"]},
        "bad": {"latent.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "[:12]},
    })  # fmt: skip
    result = runner.invoke(app, ["decode", str(lat), "-o", str(png), *MODEL, "--json"])
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    assert [f["key"] for f in summary["failed"]] == ["data-0009/bad"]
    assert "bad.latent.safetensors" in summary["failed"][0]["reason"]
    written = sorted(p.relative_to(png).as_posix() for p in png.rglob("*.png"))
    assert written == ["data-0000/s0.png", "data-0000/s1.png", "data-0001/s2.png", "data-0001/s3.png", "data-0009/good.png"]
    (loose / "s0.safetensors").parent.mkdir(parents=True)
    (loose / "s0.safetensors").write_bytes(members["s0.latent.safetensors"])
    assert runner.invoke(app, ["decode", str(loose / "s0.safetensors"), "-o", str(loose), *MODEL]).exit_code == 0
    from_tar, alone = (np.asarray(Image.open(p)).astype(int) for p in (png / "data-0000" / "s0.png", loose / "s0.png"))
    assert np.abs(from_tar - alone).max() <= 1  # decoded in a batch of two or alone: float noise may flip a rounding
    assert Image.open(png / "data-0001" / "s2.png").size == (40, 24)  # the padding recorded in the member is cropped
    again = json.loads(runner.invoke(app, ["decode", str(lat), "-o", str(png), *MODEL, "--json"]).stdout)
    assert (again["done"], again["skipped"]) == (0, 5)
