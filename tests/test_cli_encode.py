"""`vaetool encode` and the streaming engine: inputs, image modes, metadata, shards, manifest, resume, bad files, torchrun."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import noise_png, one_thread, subprocess_env
from PIL import Image

from vaetool.api import load_vae
from vaetool.cli import app
from vaetool.errors import MemoryBudgetError
from vaetool.io.images import load_image, pad_to_multiple
from vaetool.io.latents import load_latents
from vaetool.io.manifest import read_manifest, run_headers
from vaetool.io.shards import load_shard_dir, read_index
from vaetool.pipeline import EngineOptions, Job, Loaded, Stages, run_pipeline
from vaetool.precision import Fp32Fallback, fp32_copy

MODEL = ["--model", "tiny-f8", "--quiet"]
REPO = Path(__file__).resolve().parent.parent



def _latent(path: Path) -> tuple[torch.Tensor, dict]:
    (item,) = load_latents(path)
    return item.latent, item.metadata


def _encode(runner, *args: str, input: str | None = None):
    result = runner.invoke(app, ["encode", *args], input=input)
    return result


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*.safetensors")}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """in/a.png 40x24, in/b.png 32x32, in/sub/c.png 24x40, in/sub/deep/d.jpg 32x32."""
    root = tmp_path / "in"
    noise_png(root / "a.png", 40, 24, 1)
    noise_png(root / "b.png", 32, 32, 2)
    noise_png(root / "sub" / "c.png", 24, 40, 3)
    noise_png(root / "sub" / "deep" / "d.jpg", 32, 32, 4)
    return root


# ---------------------------------------------------------------- inputs


def test_input_kinds(runner, tree: Path, tmp_path: Path) -> None:
    cases = {
        "file": ([str(tree / "a.png")], None, {"a.safetensors"}),
        "folder": ([str(tree)], None, {"a.safetensors", "b.safetensors"}),
        "recursive": ([str(tree), "--recursive"], None, {"a.safetensors", "b.safetensors", "sub/c.safetensors", "sub/deep/d.safetensors"}),
        "glob": ([f"{tree}/**/*.png"], None, {"a.safetensors", "b.safetensors", "sub/c.safetensors"}),
    }
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two files\n{tree / 'b.png'}\n\n{tree / 'sub' / 'c.png'}\n")
    cases["files-from"] = (["--files-from", str(listing)], None, {"b.safetensors", "c.safetensors"})
    cases["stdin"] = (["--files-from", "-"], f"{tree / 'a.png'}\n", {"a.safetensors"})
    for name, (args, stdin, expected) in cases.items():
        out = tmp_path / f"out-{name}"
        result = _encode(runner, *args, "-o", str(out), *MODEL, input=stdin)
        assert result.exit_code == 0, (name, result.stderr)
        assert _files(out) == expected, name


def test_no_inputs_is_a_usage_error(runner, tmp_path: Path) -> None:
    result = _encode(runner, "-o", str(tmp_path / "out"), *MODEL)
    assert result.exit_code == 2
    assert "--files-from" in result.stderr


def test_missing_input_is_named(runner, tmp_path: Path) -> None:
    result = _encode(runner, str(tmp_path / "nope.png"), "-o", str(tmp_path / "out"), *MODEL)
    assert result.exit_code == 1
    assert "nope.png" in result.stderr and "no such file" in result.stderr


# ---------------------------------------------------------------- image modes and metadata


def test_every_image_mode(runner, tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    gray = np.random.default_rng(5).integers(0, 256, (24, 32), dtype=np.uint8)
    Image.fromarray(gray, "L").save(root / "gray.png")
    Image.fromarray(np.repeat(gray[..., None], 3, axis=2)).save(root / "gray_rgb.png")
    rgba = np.dstack([np.repeat(gray[..., None], 3, axis=2), np.full((24, 32), 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "opaque_rgba.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(root / "gray16.png")  # mode I;16
    palette = Image.fromarray(gray, "L").convert("P")
    palette.save(root / "palette.png", transparency=0)
    Image.new("CMYK", (32, 24), (10, 200, 30, 5)).save(root / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 x 24, shown rotated 90 degrees: 24 wide, 40 high
    Image.fromarray(np.random.default_rng(6).integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(root / "rotated.jpg", exif=exif)
    out = tmp_path / "out"
    result = _encode(runner, str(root), "-o", str(out), *MODEL, "-b", "1")
    assert result.exit_code == 0, result.stderr
    assert _files(out) == {f"{n}.safetensors" for n in ("gray", "gray_rgb", "opaque_rgba", "gray16", "palette", "cmyk", "rotated")}
    gray_latent, _ = _latent(out / "gray.safetensors")
    assert torch.equal(gray_latent, _latent(out / "gray_rgb.safetensors")[0])  # L is gray RGB
    assert torch.equal(gray_latent, _latent(out / "opaque_rgba.safetensors")[0])  # opaque alpha changes nothing
    assert torch.allclose(gray_latent, _latent(out / "gray16.safetensors")[0], atol=1e-4)  # same levels in 16 bits
    latent, meta = _latent(out / "rotated.safetensors")
    assert meta["original_size"] == [40, 24] and tuple(latent.shape) == (4, 5, 3)


def test_metadata_and_values_match_the_api(runner, tmp_path: Path) -> None:
    src = noise_png(tmp_path / "in" / "odd.png", 30, 20, 7)  # not a multiple of 8: padded to 32 x 24
    out = tmp_path / "out"
    assert _encode(runner, str(src), "-o", str(out), *MODEL, "-b", "1").exit_code == 0
    latent, meta = _latent(out / "odd.safetensors")
    vae = load_vae("tiny-f8")
    padded, _ = pad_to_multiple(load_image(src), 8, "replicate")  # [3, 24, 32]
    assert torch.equal(latent, vae.encode(padded[None])[0])
    assert meta["family"] == "sd1" and meta["latent_format"] == "raw" and meta["scaled"] is False
    assert meta["scale"] == pytest.approx(0.18215) and meta["shift"] == 0.0
    assert meta["config"] == "tiny-f8" and meta["checkpoint_sha256"] == "random-weights"
    assert meta["original_size"] == [20, 30] and meta["padded_size"] == [24, 32]
    assert meta["padding"] == {"mode": "replicate", "bottom": 4, "right": 2}
    assert meta["posterior"] == "mode" and meta["dtype"] == "float32" and meta["vaetool_version"]
    assert meta["source"] == str(src) and meta["key"] == "odd.png"

    scaled_out = tmp_path / "scaled"
    assert _encode(runner, str(src), "-o", str(scaled_out), *MODEL, "--scaled").exit_code == 0
    scaled, smeta = _latent(scaled_out / "odd.safetensors")
    assert smeta["latent_format"] == "scaled"
    assert torch.allclose(scaled, latent * 0.18215, atol=1e-6)


def test_sample_is_seeded_per_image(runner, tree: Path, tmp_path: Path) -> None:
    runs = {}
    for name, args in {"s1": ["--seed", "1"], "s1-again": ["--seed", "1", "-b", "1"], "s2": ["--seed", "2"]}.items():
        out = tmp_path / name
        assert _encode(runner, str(tree), "-o", str(out), *MODEL, "--sample", *args).exit_code == 0
        runs[name] = _latent(out / "b.safetensors")
    mode_out = tmp_path / "mode"
    assert _encode(runner, str(tree / "b.png"), "-o", str(mode_out), *MODEL).exit_code == 0
    assert runs["s1"][1]["posterior"] == "sample" and runs["s1"][1]["seed"] == 1
    assert torch.allclose(runs["s1"][0], runs["s1-again"][0], atol=1e-5)  # batching does not change the noise
    assert not torch.allclose(runs["s1"][0], runs["s2"][0])
    assert not torch.allclose(runs["s1"][0], _latent(mode_out / "b.safetensors")[0])


def test_deterministic(runner, tree: Path, tmp_path: Path) -> None:
    for name in ("one", "two"):
        assert _encode(runner, str(tree), "-r", "-o", str(tmp_path / name), *MODEL).exit_code == 0
    for rel in _files(tmp_path / "one"):
        assert torch.equal(_latent(tmp_path / "one" / rel)[0], _latent(tmp_path / "two" / rel)[0])


# ---------------------------------------------------------------- shards, manifest, skip/overwrite, --json


def test_shards_and_index(runner, tree: Path, tmp_path: Path) -> None:
    out, single = tmp_path / "shards", tmp_path / "single"
    result = _encode(runner, str(tree), "-r", "-o", str(out), *MODEL, "--shard-size", "3", "--json")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.glob("shard-*.safetensors")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    index = read_index(out / "index.json")["items"]
    assert set(index) == {"a.png", "b.png", "sub/c.png", "sub/deep/d.jpg"}
    assert _encode(runner, str(tree), "-r", "-o", str(single), *MODEL).exit_code == 0
    items = {item.name: item for item in load_shard_dir(out)}
    for key, item in items.items():
        stem = Path(key).with_suffix(".safetensors").as_posix()
        assert torch.equal(item.latent, _latent(single / stem)[0])
        assert item.metadata["original_size"] and item.metadata["source"].endswith(Path(key).name)
    written = [r for r in read_manifest(out / "manifest.jsonl") if r["status"] == "written"]
    assert sorted(Path(r["output"]).name for r in written) == ["shard-00000.safetensors"] * 3 + ["shard-00001.safetensors"]
    again = _encode(runner, str(tree), "-r", "-o", str(out), *MODEL, "--shard-size", "3", "--json")
    assert json.loads(again.stdout)["skipped"] == 4 and json.loads(again.stdout)["done"] == 0


def test_a_failed_shard_reports_its_items_failed_and_resume_redoes_them(
    runner, tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vaetool.io.shards as shards_module

    out, real = tmp_path / "shards", shards_module.atomic_write
    calls: list[str] = []

    def full_disk(path: Path, write, **kw):
        calls.append(path.name)
        if calls.count("shard-00000.safetensors") == 1 and path.name == "shard-00000.safetensors":
            raise OSError(28, "No space left on device")
        return real(path, write, **kw)

    monkeypatch.setattr(shards_module, "atomic_write", full_disk)
    first = _encode(runner, str(tree), "-r", "-o", str(out), *MODEL, "--shard-size", "3", "--json")
    assert first.exit_code == 1
    summary = json.loads(first.stdout)
    assert summary["done"] == 1 and len(summary["failed"]) == 3
    assert all("shard-00000.safetensors not written (no space left on device)" in f["reason"] for f in summary["failed"])
    records = read_manifest(out / "manifest.jsonl")
    assert sorted(r["status"] for r in records) == ["failed"] * 3 + ["written"]
    assert len(read_index(out / "index.json")["items"]) == 1
    again = json.loads(_encode(runner, str(tree), "-r", "-o", str(out), *MODEL, "--shard-size", "3", "--json").stdout)
    assert (again["done"], again["skipped"], again["failed"]) == (3, 1, [])
    assert set(read_index(out / "index.json")["items"]) == {"a.png", "b.png", "sub/c.png", "sub/deep/d.jpg"}


def test_manifest_skip_overwrite_and_json(runner, tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = _encode(runner, str(tree), "-r", "-o", str(out), *MODEL, "--json")
    assert first.exit_code == 0
    summary = json.loads(first.stdout)
    assert (summary["total"], summary["done"], summary["skipped"], summary["failed"]) == (4, 4, 0, [])
    assert summary["family"] == "sd1" and summary["manifest"] == str(out / "manifest.jsonl")
    records = read_manifest(out / "manifest.jsonl")
    sources = [tree / "a.png", tree / "b.png", tree / "sub/c.png", tree / "sub/deep/d.jpg"]
    assert {(r["source"], r["status"]) for r in records} == {(str(p), "written") for p in sources}
    a = next(r for r in records if r["key"] == "a.png")
    assert a["output"] == str(out / "a.safetensors") and a["size"] == (out / "a.safetensors").stat().st_size and a["image_size"] == [24, 40]

    mtime = (out / "a.safetensors").stat().st_mtime_ns
    second = json.loads(_encode(runner, str(tree), "-r", "-o", str(out), *MODEL, "--json").stdout)
    assert (second["done"], second["skipped"]) == (0, 4)
    assert (out / "a.safetensors").stat().st_mtime_ns == mtime
    assert [r["status"] for r in read_manifest(out / "manifest.jsonl")].count("skipped") == 4

    third = json.loads(_encode(runner, str(tree), "-r", "-o", str(out), *MODEL, "--json", "--overwrite").stdout)
    assert (third["done"], third["skipped"]) == (4, 0)


# ---------------------------------------------------------------- bad inputs and outputs


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bad_inputs(root: Path) -> dict[str, str]:
    """Bad files -> a word their failure reason contains."""
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("this is not an image\n")
    good_png = noise_png(root / "full.png", 64, 64, 8).read_bytes()
    (root / "full.png").unlink()
    (root / "truncated.png").write_bytes(good_png[: len(good_png) // 2])
    Image.fromarray(np.random.default_rng(9).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "full.jpg", quality=90)
    good_jpg = (root / "full.jpg").read_bytes()
    (root / "full.jpg").unlink()
    (root / "cut.jpg").write_bytes(good_jpg[: len(good_jpg) // 2])
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    chunks = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b"")
    (root / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)
    return {"empty.png": "empty", "text.png": "not an image", "truncated.png": "truncated", "cut.jpg": "truncated", "bomb.png": "bomb"}


def test_bad_inputs_are_named_and_skipped(runner, tree: Path, tmp_path: Path) -> None:
    expected = _bad_inputs(tree)
    out = tmp_path / "out"
    result = _encode(runner, str(tree), "-o", str(out), "--model", "tiny-f8", "--json")
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary["done"] == 2 and _files(out) == {"a.safetensors", "b.safetensors"}
    reasons = {Path(f["source"]).name: f["reason"] for f in summary["failed"]}
    assert set(reasons) == set(expected)
    for name, word in expected.items():
        assert word in reasons[name], (name, reasons[name])
        assert f"{tree / name}: " in result.stderr  # named on stderr
    assert "5 input(s) failed" in result.stderr
    failed = [r for r in read_manifest(out / "manifest.jsonl") if r["status"] == "failed"]
    assert {Path(r["source"]).name for r in failed} == set(expected) and all(r["error"] for r in failed)


def test_fail_fast_stops_at_the_first_bad_input(runner, tree: Path, tmp_path: Path) -> None:
    (tree / "0-broken.png").write_text("not a png")  # sorted first
    out = tmp_path / "out"
    result = _encode(runner, str(tree), "-o", str(out), *MODEL, "-b", "1", "--workers", "1", "--fail-fast", "--json")
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary["stopped"] is True and len(summary["failed"]) == 1 and summary["done"] == 0
    assert "--fail-fast" in result.stderr


def test_unwritable_output_dir(runner, tree: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file where the output folder should be")
    result = _encode(runner, str(tree), "-o", str(blocker / "out"), *MODEL)
    assert result.exit_code == 1
    assert str(blocker / "out") in result.stderr and "cannot create the output folder" in result.stderr
    assert len([line for line in result.stderr.strip().splitlines() if not line.startswith("warning: tiny-f8: random")]) == 1


# ---------------------------------------------------------------- the engine


def test_engine_buckets_sizes_and_fails_rows_that_are_not_finite() -> None:
    shapes = [(3, 8, 8), (3, 8, 16), (3, 8, 8), (3, 8, 16), (3, 8, 8)]
    jobs = [Job(str(i), Path(f"{i}.png")) for i in range(len(shapes))]
    batches: list[list[str]] = []
    written: dict[str, torch.Tensor] = {}

    def compute(x: torch.Tensor, js: list[Job]) -> torch.Tensor:
        batches.append([j.key for j in js])
        out = x.mean(dim=(1, 2, 3))[:, None]  # [B, 1]
        return torch.where(x[:, :1, 0, 0] == 3, float("nan"), out)  # job 3's row is NaN

    def write(job: Job, t: torch.Tensor, info: dict) -> None:
        if job.key == "4":
            raise OSError(28, "No space left on device")
        written[job.key] = t

    stages = Stages(lambda j: Loaded(torch.full(shapes[int(j.key)], float(j.key))), compute, write)
    summary = run_pipeline(jobs, stages, EngineOptions(batch_size=2))
    assert batches == [["0", "2"], ["1", "3"], ["4"]]  # equal sizes only, in input order
    assert sorted(written) == ["0", "1", "2"] and written["1"].item() == 1.0
    assert summary.done == 3 and [f.key for f in summary.failed] == ["3", "4"]
    assert "NaN/inf" in summary.failed[0].reason and "no space left" in summary.failed[1].reason


def test_engine_fails_the_batch_a_model_call_refuses_and_goes_on() -> None:
    jobs = [Job(str(i), Path(f"{i}.png")) for i in range(3)]

    def compute(x: torch.Tensor, js: list[Job]) -> torch.Tensor:
        if any(j.key == "1" for j in js):
            raise MemoryBudgetError("max_memory 1 MiB is too small to decode 8x8 images")
        return x.mean(dim=(1, 2, 3))[:, None]

    stages = Stages(lambda j: Loaded(torch.full((3, 8, 8 * (1 + (j.key == "1"))), 1.0)), compute, lambda j, t, i: None)
    summary = run_pipeline(jobs, stages, EngineOptions(batch_size=2))
    assert summary.done == 2 and [f.key for f in summary.failed] == ["1"]
    assert "too small" in summary.failed[0].reason


def test_fp32_fallback_redoes_non_finite_half_outputs_once_built() -> None:
    vae = load_vae("tiny-f8", dtype=torch.bfloat16)
    notices: list[str] = []
    fallback = Fp32Fallback(vae, notices.append)
    dtypes: list[torch.dtype] = []

    def call(v) -> torch.Tensor:
        dtypes.append(v.dtype)
        return torch.full((1,), float("nan")) if v.dtype == torch.bfloat16 else torch.ones(1)

    assert fallback(call).item() == 1.0 and fallback(call).item() == 1.0
    assert dtypes == [torch.bfloat16, torch.float32] * 2 and fallback.retries == 2
    assert len(notices) == 1 and "redoing it in fp32" in notices[0]
    assert fallback.fp32 is not None and vae.dtype == torch.bfloat16  # one copy; the half model is untouched
    fp32 = Fp32Fallback(load_vae("tiny-f8"))
    assert torch.isnan(fp32(lambda v: torch.full((1,), float("nan")))).all() and fp32.retries == 0  # nothing to redo in fp32


def test_nan_in_half_precision_is_redone_in_fp32(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vaetool.api import Vae
    from vaetool.io.inputs import collect_inputs
    from vaetool.jobs import EncodeSettings, encode_files

    vae = load_vae("tiny-f8", dtype=torch.bfloat16)
    real = Vae.moments

    def moments(self, images, **kw):
        mean, logvar = real(self, images, **kw)
        return (mean * float("nan"), logvar) if self.dtype == torch.bfloat16 else (mean, logvar)

    monkeypatch.setattr(Vae, "moments", moments)
    inputs = collect_inputs([str(tree / "a.png")])
    summary = encode_files(vae, inputs, EncodeSettings(tmp_path / "out"))
    assert summary.fp32_retries == 1 and summary.done == 1
    expected = fp32_copy(vae).encode(load_image(tree / "a.png")[None])[0]  # bf16 weights, fp32 activations
    assert torch.equal(_latent(tmp_path / "out" / "a.safetensors")[0], expected)
    assert vae.dtype == torch.bfloat16  # the half-precision model was not converted in place


# ---------------------------------------------------------------- processes: SIGKILL resume, torchrun



def test_killed_run_leaves_no_partial_file_and_resumes(tmp_path: Path) -> None:
    root, out = tmp_path / "in", tmp_path / "out"
    for i in range(30):
        noise_png(root / f"img{i:02d}.png", 64, 64, i)
    cmd = [sys.executable, "-m", "vaetool", "encode", str(root), "-o", str(out), *MODEL, "-b", "1", "--workers", "1"]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not _files(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _files(out)
    assert 0 < len(done) < 30, "the run was not killed mid-way"
    for rel in done:  # every output there is complete
        assert _latent(out / rel)[0].shape == (4, 8, 8)
    leftovers = {p.name for p in out.iterdir()} - done - {"manifest.jsonl"}
    assert all(name.startswith(".") and name.endswith(".tmp") for name in leftovers), leftovers

    rerun_cmd = [*cmd, "--json", "--manifest", str(tmp_path / "rerun.jsonl")]
    rerun = subprocess.run(rerun_cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert (summary["done"], summary["skipped"]) == (30 - len(done), len(done))
    statuses = [r["status"] for r in read_manifest(tmp_path / "rerun.jsonl")]
    assert statuses.count("written") == 30 - len(done) and statuses.count("skipped") == len(done)
    assert _files(out) == {f"img{i:02d}.safetensors" for i in range(30)}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # stale temp files removed


def test_torchrun_two_ranks_make_the_same_files(runner, tree: Path, tmp_path: Path) -> None:
    single, ranks = tmp_path / "single", tmp_path / "ranks"
    with one_thread():  # the ranks' thread count and batch: the same bytes (other thread counts: float rounding)
        assert _encode(runner, str(tree), "-r", "-o", str(single), *MODEL, "-b", "1").exit_code == 0

    def torchrun(out: Path, *extra: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "vaetool", "encode", str(tree), "-r", "-o", str(out), *MODEL, "-b", "1", *extra]
        result = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]

    torchrun(ranks)
    assert _files(ranks) == _files(single)
    for rel in _files(single):
        assert torch.equal(_latent(ranks / rel)[0], _latent(single / rel)[0]), rel
    merged = read_manifest(ranks / "manifest.jsonl")
    assert sorted(r["key"] for r in merged) == ["a.png", "b.png", "sub/c.png", "sub/deep/d.jpg"]
    assert not list(ranks.glob("manifest.rank*.jsonl"))  # parts merged away
    [header] = run_headers(ranks / "manifest.jsonl")  # the ranks' parts are one run
    assert header["settings"]["world_size"] == 2 and {r["run_id"] for r in merged} == {header["run_id"]}

    sharded = tmp_path / "sharded"  # shards: each rank writes its own, rank 0 merges the indexes
    torchrun(sharded, "--shard-size", "2")
    index = read_index(sharded / "index.json")["items"]
    assert sorted(index) == ["a.png", "b.png", "sub/c.png", "sub/deep/d.jpg"]
    assert {entry["shard"].split("-")[0] for entry in index.values()} == {"rank0", "rank1"}
    for item in load_shard_dir(sharded):
        assert torch.equal(item.latent, _latent(single / Path(item.name).with_suffix(".safetensors"))[0]), item.name


def test_engine_runs_partial_batches_when_too_much_waits() -> None:
    shapes = [(1, 4, 4), (1, 4, 8), (1, 4, 4), (1, 4, 8), (1, 4, 4)]
    jobs = [Job(str(i), Path(f"{i}.png")) for i in range(len(shapes))]
    batches: list[list[str]] = []

    def compute(x: torch.Tensor, js: list[Job]) -> torch.Tensor:
        batches.append([j.key for j in js])
        return x.flatten(1)

    stages = Stages(lambda j: Loaded(torch.zeros(shapes[int(j.key)])), compute, lambda j, t, i: None)
    summary = run_pipeline(jobs, stages, EngineOptions(batch_size=8, max_pending_bytes=200))
    assert summary.done == 5 and sorted(k for b in batches for k in b) == ["0", "1", "2", "3", "4"]
    assert all(len({shapes[int(k)] for k in b}) == 1 for b in batches)  # never mixed sizes
    assert len(batches) > 2  # the 200-byte cap ran partial batches before the end


def test_random_weights_are_said_in_the_summary_the_manifest_and_the_png(runner, tmp_path: Path) -> None:
    """Issue 12.1: a test model's random weights are marked in every place a script reads."""
    src = noise_png(tmp_path / "in" / "a.png", 16, 16, 3)
    out, png = tmp_path / "out", tmp_path / "png"
    result = _encode(runner, str(src), "-o", str(out), *MODEL, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["random_weights"] is True
    assert "random weights" in result.stderr
    assert run_headers(out / "manifest.jsonl")[-1]["settings"]["random_weights"] is True
    assert _latent(out / "a.safetensors")[1]["random_weights"] is True
    decoded = runner.invoke(app, ["decode", str(out / "a.safetensors"), "-o", str(png), *MODEL, "--json"])
    assert decoded.exit_code == 0, decoded.output
    assert json.loads(decoded.stdout)["random_weights"] is True
    assert json.loads(Image.open(png / "a.png").text["vaetool.model"])["random_weights"] is True
