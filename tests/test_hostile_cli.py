"""Hostile and broken input through the commands (issue 13, items 9, 10, 12 and 17): each hostile input is
built here, the CLI runs as a user runs it, and each check is the named one-line error, the exit code, the
good files beside the bad one written, and nothing left outside -o (no temp files, no half-written outputs).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from PIL import Image

import vaetool.io.safe
import vaetool.jobs.common
from vaetool.cli import app
from vaetool.io.atomic import is_temp_name
from vaetool.io.latents import load_latents, save_latent
from vaetool.io.manifest import is_header, read_manifest, read_records

MODEL = ["--model", "tiny-f8", "--quiet"]
BAD = os.fsdecode(b"b\xff")  # a name holding the byte 0xff (not UTF-8): "b\udcff" in Python
SHOWN = "b\\xff"  # how vaetool prints it


def _png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(path, format="PNG")
    return path


def _files(root: Path) -> list[str]:
    """Every file under root (hidden ones too), relative, printable."""
    return sorted(os.fsencode(p.relative_to(root)).decode("utf-8", "backslashreplace") for p in root.rglob("*") if p.is_file())


def _failed_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("failed: ")]


# ---- item 9 (and 17b): names that are not UTF-8 ----

def test_image_name_not_utf8_fails_alone_and_every_rerun_is_the_same(runner, tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    _png(src / "a.png", 1), _png(src / f"{BAD}.png", 2), _png(src / "c.png", 3)
    for run in range(3):  # a rerun used to "advance one file"; now each says the same
        result = runner.invoke(app, ["encode", str(src), "-o", str(out), *MODEL])
        assert result.exit_code == 1, result.output
        assert _failed_lines(result.stderr) == [f"failed: {src}/{SHOWN}.png: its name is not valid UTF-8; rename it "
                                                "(vaetool records file names as text)"], result.stderr
        assert "\\udcff" not in result.stderr and "internal error" not in result.stderr
        assert _files(out) == ["a.safetensors", "c.safetensors", "manifest.jsonl"], run
    records = [r for r in read_records(out / "manifest.jsonl") if not is_header(r)]  # every run's records
    assert [r["status"] for r in records if r["source"].endswith(f"{BAD}.png")] == ["failed"] * 3
    assert sorted(Path(r["source"]).name for r in records if r["status"] == "written") == ["a.png", "c.png"]
    assert _files(tmp_path) == sorted([f"in/{SHOWN}.png", "in/a.png", "in/c.png"] + [f"out/{f}" for f in _files(out)])


def test_roundtrip_reports_a_name_that_is_not_utf8(runner, tmp_path: Path) -> None:
    """The HTML page, JSON report and JUnit XML hold the printable name (the page was an internal UnicodeEncodeError)."""
    src = tmp_path / "in"
    _png(src / "a.png", 1), _png(src / f"{BAD}.png", 2)
    reports = {name: tmp_path / "reports" / name for name in ("r.html", "r.json", "j.xml")}
    result = runner.invoke(app, ["roundtrip", str(src), "-o", str(tmp_path / "out"), *MODEL, "--html", str(reports["r.html"]),
                                 "--report", str(reports["r.json"]), "--junit", str(reports["j.xml"])])
    assert result.exit_code == 1, result.output
    assert "internal error" not in result.stderr and f"{SHOWN}.png: its name is not valid UTF-8" in result.stderr
    assert f"{SHOWN}.png" in reports["r.html"].read_text(encoding="utf-8")
    images = {r["image"]: r for r in json.loads(reports["r.json"].read_text(encoding="utf-8"))["images"]}
    assert images[f"{SHOWN}.png"]["status"] == "error" and images["a.png"]["status"] == "ok"
    cases = {c.get("name") for c in ET.parse(reports["j.xml"]).getroot().iter("testcase")}
    assert cases == {"a.png", f"{SHOWN}.png"}
    assert _files(tmp_path / "out") == ["a.png"]


def test_latent_name_not_utf8_fails_alone(runner, tmp_path: Path) -> None:
    """safetensors takes only UTF-8 paths ("Path ... is not valid UTF-8"): named by vaetool instead, the good file decoded."""
    lat, out = tmp_path / "lat", tmp_path / "out"
    save_latent(lat / "a.safetensors", torch.zeros(4, 2, 3), {"scaled": False})
    save_latent(lat / "keep.safetensors", torch.zeros(4, 2, 3), {"scaled": False})
    os.rename(lat / "keep.safetensors", lat / f"{BAD}.safetensors")
    result = runner.invoke(app, ["decode", str(lat), "-o", str(out), *MODEL])
    assert result.exit_code == 1, result.output
    assert _failed_lines(result.stderr) == [f"failed: {lat}/{SHOWN}.safetensors: its name is not valid UTF-8; rename it "
                                            "(vaetool records file names as text)"], result.stderr
    assert _files(out) == ["a.png"]


# ---- item 10: a full disk fails the file being written, and the run goes on ----

def _full_disk_for(monkeypatch: pytest.MonkeyPatch, needle: str) -> None:
    """safetensors' serializer raises SafetensorError (not OSError) for a full disk: do so for headers that mention `needle`."""
    real = safetensors.torch.save

    def save(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
        if needle in json.dumps(metadata):
            raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                              'message: "No space left on device" })')
        return real(tensors, metadata=metadata)

    monkeypatch.setattr(vaetool.io.safe.safetensors.torch, "save", save)


def test_disk_full_during_encode_fails_that_file_alone(runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    for i, name in enumerate("abcd"):
        _png(src / f"{name}.png", i)
    _full_disk_for(monkeypatch, '"key": "b.png"')
    result = runner.invoke(app, ["encode", str(src), "-o", str(out), *MODEL, "--batch-size", "1"])
    assert result.exit_code == 1, result.output
    assert _failed_lines(result.stderr) == [f"failed: {src}/b.png: cannot write output: No space left on device"], result.stderr
    assert "internal error" not in result.stderr
    assert _files(out) == ["a.safetensors", "c.safetensors", "d.safetensors", "manifest.jsonl"]  # no temp file, no b
    status = {Path(r["source"]).name: r["status"] for r in read_manifest(out / "manifest.jsonl")}
    assert status == {"a.png": "written", "b.png": "failed", "c.png": "written", "d.png": "written"}
    monkeypatch.undo()  # space again: a rerun writes only the missing file
    result = runner.invoke(app, ["encode", str(src), "-o", str(out), *MODEL, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["done"] == 1 and (out / "b.safetensors").is_file()


def test_disk_full_during_a_shard_write_fails_its_items_alone(runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    for i, name in enumerate("abcd"):
        _png(src / f"{name}.png", i)
    _full_disk_for(monkeypatch, '\\"b.png\\"')  # the shard holding b (its header lists its items)
    args = ["encode", str(src), "-o", str(out), *MODEL, "--shard-size", "2", "--batch-size", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    failed = _failed_lines(result.stderr)
    assert [line.split(": ")[1] for line in failed] == [f"{src}/a.png", f"{src}/b.png"], result.stderr
    assert all("shard shard-00000.safetensors not written (No space left on device)" in line for line in failed)
    assert _files(out) == ["index.json", "manifest.jsonl", "shard-00000.safetensors"]  # the failed shard's name is reused
    assert sorted(item.name for item in load_latents(out)) == ["c.png", "d.png"]
    monkeypatch.undo()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(item.name for item in load_latents(out)) == ["a.png", "b.png", "c.png", "d.png"]


def test_disk_full_during_decode_fails_that_png_alone(runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The PNG writer is stopped half way by a full disk: nothing half-written is left, the other latents decode."""
    lat, out = tmp_path / "lat", tmp_path / "out"
    for name in "abc":
        save_latent(lat / f"{name}.safetensors", torch.zeros(4, 2, 3), {"scaled": False})
    real = Image.Image.save

    def save(self: Image.Image, fp: Any, *args: Any, **kw: Any) -> None:
        if ".b.png." in str(fp):  # the temp file of b.png
            Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, fp, *args, **kw)

    monkeypatch.setattr(Image.Image, "save", save)
    result = runner.invoke(app, ["decode", str(lat), "-o", str(out), *MODEL])
    assert result.exit_code == 1, result.output
    assert _failed_lines(result.stderr) == [f"failed: {lat}/b.safetensors: cannot write output: {out}/b.png: No space left on device"]
    assert _files(out) == ["a.png", "c.png"]


# ---- item 12: a latent scale of 0 (or NaN, inf, < 0) from any source ----

def test_config_with_scale_zero_is_a_usage_error(runner, tmp_path: Path) -> None:
    config = tmp_path / "zero.yaml"
    config.write_text("latent_format: {scale: 0}\n" + (Path(__file__).parent.parent / "configs" / "tiny-f8.yaml").read_text())
    _png(tmp_path / "in" / "a.png")
    result = runner.invoke(app, ["encode", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--config", str(config),
                                 "--random-weights", "--scaled", "--quiet"])
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: {config}: latent_format: latent scale must be a finite number > 0, not 0.0\n"
    assert not list((tmp_path / "out").glob("*.safetensors"))


@pytest.mark.parametrize(("scale", "needle"), [(0.0, "got 0.0"), (-1.0, "got -1.0")])
def test_diffusers_scaling_factor_that_is_not_positive(runner, tmp_path: Path, scale: float, needle: str) -> None:
    pytest.importorskip("diffusers")
    from diffusers_helpers import edit_config, kl, save

    folder = edit_config(save(kl(block_out_channels=(32, 32)), tmp_path / "vae"), scaling_factor=scale)
    _png(tmp_path / "in" / "a.png")
    result = runner.invoke(app, ["encode", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--checkpoint", str(folder),
                                 "--scaled", "--quiet"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {folder / 'config.json'}: scaling_factor must be a number > 0") and needle in result.stderr


def test_latent_files_recording_unusable_scales_fail_alone(runner, tmp_path: Path) -> None:
    lat, out = tmp_path / "lat", tmp_path / "out"
    save_latent(lat / "good.safetensors", torch.zeros(4, 2, 3), {"scaled": True, "scale": 0.5, "shift": 0.0})
    recorded = {"zero": {"scale": "0"}, "nan": {"scale": "NaN"}, "inf": {"scale": "Infinity"}, "negative": {"scale": "-2"},
                "shift": {"scale": "1", "shift": "-Infinity"},
                "std": {"scale": "1", "mean": "[0, 0, 0, 0]", "std": "[1, 0, 1, 1]"}}
    for name, values in recorded.items():
        meta = {"scaled": "true", "shift": "0"} | values
        safetensors.torch.save_file({"latent": torch.zeros(4, 2, 3)}, lat / f"{name}.safetensors",
                                    metadata=meta | {"vaetool.json_keys": json.dumps(sorted(meta))})
    result = runner.invoke(app, ["decode", str(lat), "-o", str(out), *MODEL])
    assert result.exit_code == 1, result.output
    reasons = {Path(line.split(": ")[1]).stem: line for line in _failed_lines(result.stderr)}
    assert set(reasons) == set(recorded), result.stderr
    for name in ("zero", "nan", "inf", "negative"):
        assert "latent scale must be a finite number > 0" in reasons[name]
    assert "latent shift must be a finite number, not -inf" in reasons["shift"]
    assert "per-channel std must be positive and finite" in reasons["std"]
    assert _files(out) == ["good.png"]


# ---- item 17c: an output folder that cannot be written fails before the model loads ----

@pytest.mark.parametrize("command", ["encode", "decode", "roundtrip", "video"])
def test_unwritable_output_folder_fails_before_the_model_loads(runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              command: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make the access check see what a user would
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: not (Path(p) == out and mode & os.W_OK) and real_access(p, mode, **kw))
    loads: list[Any] = []
    monkeypatch.setattr(vaetool.jobs.common, "load_model", lambda *a, **kw: loads.append(a))
    args = [command, str(tmp_path / "in"), "-o", str(out), *MODEL]
    if command == "decode":
        save_latent(tmp_path / "in" / "a.safetensors", torch.zeros(4, 2, 3), {"scaled": False})
    elif command == "video":  # frames in, a latent file in the folder out
        for i in range(3):
            _png(tmp_path / "in" / f"{i}.png", i)
        args = ["video", "encode", str(tmp_path / "in"), "-o", str(out / "clip.safetensors"), "--model", "tiny-svd", "--quiet"]
    else:
        _png(tmp_path / "in" / "a.png")
    try:
        result = runner.invoke(app, args)
    finally:
        out.chmod(0o755)
    assert result.exit_code == 1, result.output
    assert result.stderr == f"error: {out}: the output folder is not writable\n"
    assert loads == [] and _files(out) == []


# ---- item 17d: outputs of the commands get the mode a plain file gets ----

def test_command_outputs_follow_the_umask(runner, tmp_path: Path) -> None:
    _png(tmp_path / "in" / "a.png")
    old = os.umask(0o027)
    try:
        for args in (["encode", str(tmp_path / "in"), "-o", str(tmp_path / "lat")],
                     ["encode", str(tmp_path / "in"), "-o", str(tmp_path / "shards"), "--shard-size", "2"],
                     ["decode", str(tmp_path / "lat"), "-o", str(tmp_path / "png"), "--16bit"],
                     ["roundtrip", str(tmp_path / "in"), "-o", str(tmp_path / "rt"), "--report", str(tmp_path / "r.json")]):
            result = runner.invoke(app, [*args, *MODEL])
            assert result.exit_code == 0, result.output
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*") if p.is_file()}
    written = {k: oct(v) for k, v in modes.items() if not k.startswith("in/")}
    assert {"lat/a.safetensors", "shards/shard-00000.safetensors", "png/a.png", "rt/a.png", "r.json"} <= set(written)
    assert set(written.values()) == {"0o640"}, written


# ---- item 17e: animations are refused, not silently cut to their first frame ----

@pytest.mark.parametrize("suffix", [".png", ".webp", ".gif"])
def test_animated_images_are_refused_by_encode(runner, tmp_path: Path, suffix: str) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    _png(src / "still.png")
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue", "green")]
    frames[0].save(src / f"anim{suffix}", save_all=True, append_images=frames[1:], duration=100, loop=0)
    result = runner.invoke(app, ["encode", str(src / "still.png"), str(src / f"anim{suffix}"), "-o", str(out), *MODEL])
    assert result.exit_code == 1, result.output
    [line] = _failed_lines(result.stderr)
    assert line.startswith(f"failed: {src / f'anim{suffix}'}: "), line
    needle = "3 frames" if suffix != ".gif" else "not a PNG, JPEG, WebP, BMP or TIFF file"
    assert needle in line and ("vaetool video encode" in line or suffix == ".gif"), line
    assert [p for p in _files(out) if not is_temp_name(Path(p).name)] == ["manifest.jsonl", "still.safetensors"]


# ---- train writes its outputs through the same atomic writers ----

def _train_config(tmp_path: Path) -> Path:
    import yaml

    for i in range(2):
        _png(tmp_path / "data" / f"{i}.png", i)
    model = yaml.safe_load((Path(__file__).parent.parent / "configs" / "tiny-f8.yaml").read_text())["model"]
    doc = {"model": model, "data": {"train": [str(tmp_path / "data")], "crop": 16, "batch_size": 2},
           "steps": 2, "checkpoint_every": 1, "val_every": 0, "log_every": 1}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(doc))
    return tmp_path / "train.yaml"


@pytest.mark.parametrize("target", ["model.safetensors", "state.pt"])
def test_train_on_a_full_disk_names_the_file(runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    import vaetool.train.loop

    if target == "model.safetensors":
        _full_disk_for(monkeypatch, "")
    else:
        def no_space(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")  # torch's words

        monkeypatch.setattr(vaetool.train.loop.torch, "save", no_space)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(_train_config(tmp_path)), "-o", str(out), "--quiet"])
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"error: {out / target}: cannot write: ") and result.stderr.count("\n") == 1, result.stderr
    assert "internal error" not in result.stderr and not [p for p in _files(out) if is_temp_name(Path(p).name)]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device whose every write is ENOSPC)")
def test_a_manifest_on_a_full_disk_stops_the_run_with_its_name(runner, tmp_path: Path) -> None:
    """With no room for the record of what was done, going on would lose it: one line naming the manifest, exit 1."""
    _png(tmp_path / "in" / "a.png")
    result = runner.invoke(app, ["encode", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--manifest", "/dev/full", *MODEL])
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines()[-1] == "error: /dev/full: cannot write the manifest: No space left on device"
    assert "internal error" not in result.stderr
