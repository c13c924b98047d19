"""Resume that cannot go stale (issue 12.2), a manifest a script can trust (12.3), concurrent encodes (13.15), hash cache."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from cli_helpers import noise_png, subprocess_env

from vaetool.cli import app
from vaetool.hashing import cache_path, file_sha256
from vaetool.io.latents import load_latents, save_latent
from vaetool.io.manifest import read_manifest, read_records, run_headers
from vaetool.io.shards import ShardWriter, read_index

MODEL = ["--model", "tiny-f8", "--quiet"]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("VAETOOL_CACHE_DIR", raising=False)  # conftest's; these tests check the XDG location



@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """in/a.png, in/b.png, in/sub/c.png."""
    root = tmp_path / "in"
    noise_png(root / "a.png", 40, 24, 1)
    noise_png(root / "b.png", 32, 32, 2)
    noise_png(root / "sub" / "c.png", 24, 40, 3)
    return root


def _run(runner, *args: str):
    return runner.invoke(app, list(args))


def _mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- encode: per-file outputs


def test_encode_rerun_skips_its_own_outputs_and_stops_on_other_settings(runner, tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _run(runner, "encode", str(tree), "-r", "-o", str(out), *MODEL).exit_code == 0
    meta = load_latents(out / "a.safetensors")[0].metadata
    assert meta["provenance"] == {"checkpoint_sha256": "random-weights", "random_weights": True, "config": "tiny-f8", "dtype": "float32",
                                  "tiling": "auto", "latent_format": "raw", "posterior": "mode", "seed": None}
    again = _run(runner, "encode", str(tree), "-r", "-o", str(out), *MODEL, "--json")
    assert again.exit_code == 0 and (json.loads(again.stdout)["done"], json.loads(again.stdout)["skipped"]) == (0, 3)

    before = _mtimes(out)
    cases = {
        "latent_format: raw there, scaled in this run": ["--scaled", *MODEL],
        "config: tiny-f8 there, tiny-f8-16ch in this run": ["--model", "tiny-f8-16ch", "--quiet"],
        "posterior: mode there, sample in this run": ["--sample", "--seed", "1", *MODEL],
        "dtype: float32 there, bfloat16 in this run": ["--dtype", "bf16", *MODEL],
        "tiling: auto there, fast tile 64 in this run": ["--tile", "fast", "--tile-size", "64", *MODEL],
    }
    for field, args in cases.items():
        result = _run(runner, "encode", str(tree), "-r", "-o", str(out), *args)
        assert result.exit_code == 2, (field, result.stderr)
        assert f"{out / 'a.safetensors'}: {field}" in result.stderr, result.stderr
        assert "3 existing outputs" in result.stderr and "--overwrite" in result.stderr
        assert _mtimes(out) == before, field  # nothing rewritten, not even the manifest

    scaled = _run(runner, "encode", str(tree), "-r", "-o", str(out), "--scaled", "--overwrite", *MODEL, "--json")
    assert scaled.exit_code == 0 and json.loads(scaled.stdout)["done"] == 3
    assert load_latents(out / "a.safetensors")[0].metadata["provenance"]["latent_format"] == "scaled"


def test_the_seed_of_a_sample_is_part_of_the_provenance(runner, tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _run(runner, "encode", str(tree / "a.png"), "-o", str(out), "--sample", "--seed", "1", *MODEL).exit_code == 0
    assert _run(runner, "encode", str(tree / "a.png"), "-o", str(out), "--sample", "--seed", "1", *MODEL).exit_code == 0
    result = _run(runner, "encode", str(tree / "a.png"), "-o", str(out), "--sample", "--seed", "2", *MODEL)
    assert result.exit_code == 2 and f"{out / 'a.safetensors'}: seed: 1 there, 2 in this run" in result.stderr


def test_outputs_without_provenance_are_never_skipped(runner, tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    save_latent(out / "a.safetensors", torch.zeros(4, 3, 5), {"family": "sd1", "scaled": False})  # an older vaetool's file
    (out / "b.safetensors").write_bytes(b"not a latent")
    result = _run(runner, "encode", str(tree), "-o", str(out), *MODEL)
    assert result.exit_code == 2
    assert f"{out / 'a.safetensors'}: no provenance recorded" in result.stderr
    assert f"{out / 'b.safetensors'}: cannot read its provenance" in result.stderr
    assert (out / "b.safetensors").read_bytes() == b"not a latent"


def test_the_weights_sha256_is_recorded_and_cached(runner, tree: Path, tmp_path: Path) -> None:
    from vaetool.api import load_vae

    weights = tmp_path / "tiny.safetensors"
    with pytest.warns(UserWarning):
        model = load_vae("tiny-f8").model
    safetensors.torch.save_file({k: t.contiguous() for k, t in model.state_dict().items()}, weights)
    expected = hashlib.sha256(weights.read_bytes()).hexdigest()
    out = tmp_path / "out"
    assert _run(runner, "encode", str(tree / "a.png"), "-o", str(out), *MODEL, "--checkpoint", str(weights)).exit_code == 0
    assert load_latents(out / "a.safetensors")[0].metadata["provenance"]["checkpoint_sha256"] == expected
    cache = json.loads(cache_path().read_text())
    assert cache[str(weights.resolve())]["sha256"] == expected
    assert cache_path().is_relative_to(tmp_path / "cache")
    # other weights under the same name: a new mtime, so a new hash, and the rerun stops
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    result = _run(runner, "encode", str(tree / "a.png"), "-o", str(out), *MODEL, "--checkpoint", str(weights))
    assert result.exit_code == 2 and "checkpoint_sha256: sha256 " + expected[:12] in result.stderr


def test_hash_cache_is_keyed_by_path_size_and_mtime(tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 3000)
    real = hashlib.sha256(b"x" * 3000).hexdigest()
    assert file_sha256(f) == real
    entries = json.loads(cache_path().read_text())
    entries[str(f.resolve())]["sha256"] = "0" * 64  # a cache hit returns what the cache says
    cache_path().write_text(json.dumps(entries))
    assert file_sha256(f) == "0" * 64 and file_sha256(f, cache=False) == real
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1))  # touched: hashed again
    assert file_sha256(f) == real
    cache_path().write_text("{torn")  # a corrupt cache is ignored
    assert file_sha256(f) == real


# ---------------------------------------------------------------- encode: shards


def test_shard_index_records_provenance_and_a_mismatch_stops(runner, tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    assert _run(runner, "encode", str(tree), "-r", "-o", str(out), "--shard-size", "2", *MODEL).exit_code == 0
    index = read_index(out / "index.json")
    assert index["provenance"]["latent_format"] == "raw" and index["provenance"]["config"] == "tiny-f8"
    assert load_latents(out / "shard-00000.safetensors")  # shards still read
    again = _run(runner, "encode", str(tree), "-r", "-o", str(out), "--shard-size", "2", *MODEL, "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["skipped"] == 3
    before = _mtimes(out)
    result = _run(runner, "encode", str(tree), "-r", "-o", str(out), "--shard-size", "2", "--scaled", *MODEL)
    assert result.exit_code == 2 and f"{out / 'index.json'}: latent_format: raw there, scaled in this run" in result.stderr
    assert _mtimes(out) == before
    assert not list(out.glob(".*.lock"))  # the writer let go of its lock


def test_a_second_shard_writer_into_one_folder_is_refused_naming_the_lock(runner, tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    with ShardWriter(out, 2):  # another process writing shards here
        result = _run(runner, "encode", str(tree), "-r", "-o", str(out), "--shard-size", "2", *MODEL)
        assert result.exit_code == 1
        assert f"{out / '.index.json.lock'}: another vaetool run (pid {os.getpid()} on this machine)" in result.stderr
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    from vaetool.io.atomic import HOST_TAG

    (out / ".index.json.lock").write_text(f"{HOST_TAG} {dead}\n")  # left by a killed run: taken over
    assert _run(runner, "encode", str(tree), "-r", "-o", str(out), "--shard-size", "2", *MODEL).exit_code == 0
    assert len(read_index(out / "index.json")["items"]) == 3 and not (out / ".index.json.lock").exists()


# ---------------------------------------------------------------- encode: another run writes the same output meanwhile


def test_an_output_written_meanwhile_by_another_run_is_skipped_or_fails_named(
    runner, tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vaetool.io.latents as latents_module

    real = latents_module.save_latent
    twin: dict[str, str] = {}

    def racing(path: Path, latent: torch.Tensor, metadata: dict, **kw) -> None:
        if Path(path).name == "a.safetensors":  # the other run publishes a.safetensors between our check and our write
            other = dict(metadata, provenance=dict(metadata["provenance"], **twin))
            real(path, latent, other)
        real(path, latent, metadata, **kw)

    monkeypatch.setattr(latents_module, "save_latent", racing)
    out = tmp_path / "out"
    result = _run(runner, "encode", str(tree), "-r", "-o", str(out), *MODEL, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["done"], summary["skipped"], summary["failed"]) == (2, 1, [])
    [a] = [r for r in read_manifest(out / "manifest.jsonl") if r["key"] == "a.png"]
    assert (a["status"], a["reason"]) == ("skipped", "written by another run")

    twin["dtype"] = "float16"  # the other run had other settings: this item fails, naming the file
    out2 = tmp_path / "out2"
    result = _run(runner, "encode", str(tree), "-r", "-o", str(out2), *MODEL, "--json")
    assert result.exit_code == 1
    [failure] = json.loads(result.stdout)["failed"]
    assert failure["source"] == str(tree / "a.png")
    assert f"{out2 / 'a.safetensors'} was written meanwhile by another run with other settings (dtype: float16 there" \
        in failure["reason"]



def test_two_concurrent_encodes_into_one_folder_both_succeed(tmp_path: Path) -> None:
    root, out = tmp_path / "in", tmp_path / "out"
    for i in range(24):
        noise_png(root / f"img{i:02d}.png", 16, 16, i)
    cmd = [sys.executable, "-m", "vaetool", "encode", str(root), "-o", str(out), *MODEL, "-b", "1", "--workers", "1", "--json"]
    procs = [subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (_, stderr) in zip(procs, results, strict=True):
        assert proc.returncode == 0, stderr
    summaries = [json.loads(stdout) for stdout, _ in results]
    assert all(s["done"] + s["skipped"] == 24 and s["failed"] == [] for s in summaries)
    assert sum(s["done"] for s in summaries) >= 24
    assert len(list(out.glob("*.safetensors"))) == 24
    assert len(run_headers(out / "manifest.jsonl")) == 2 and len(read_manifest(out / "manifest.jsonl")) == 24


# ---------------------------------------------------------------- decode


def test_decode_rerun_after_the_source_latent_changed_stops(runner, tree: Path, tmp_path: Path) -> None:
    lat, png = tmp_path / "lat", tmp_path / "png"
    assert _run(runner, "encode", str(tree / "a.png"), "-o", str(lat), *MODEL).exit_code == 0
    assert _run(runner, "decode", str(lat / "a.safetensors"), "-o", str(png), *MODEL).exit_code == 0
    again = _run(runner, "decode", str(lat / "a.safetensors"), "-o", str(png), *MODEL, "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["skipped"] == 1
    before = _mtimes(png)
    for args, field in ((["--16bit"], "bits: 8 there, 16 in this run"), (["--dtype", "bf16"], "dtype: float32 there")):
        result = _run(runner, "decode", str(lat / "a.safetensors"), "-o", str(png), *MODEL, *args)
        assert result.exit_code == 2 and f"{png / 'a.png'}: {field}" in result.stderr, result.stderr
    assert _run(runner, "encode", str(tree / "a.png"), "-o", str(lat), "--sample", "--overwrite", *MODEL).exit_code == 0
    result = _run(runner, "decode", str(lat / "a.safetensors"), "-o", str(png), *MODEL)
    assert result.exit_code == 2 and f"{png / 'a.png'}: source_sha256: sha256 " in result.stderr, result.stderr
    assert _mtimes(png) == before
    assert _run(runner, "decode", str(lat / "a.safetensors"), "-o", str(png), "--overwrite", *MODEL).exit_code == 0
    assert _mtimes(png) != before


# ---------------------------------------------------------------- manifest


def test_manifest_has_run_headers_and_latest_record_per_input(runner, tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = json.loads(_run(runner, "encode", str(tree), "-o", str(out), *MODEL, "--json").stdout)  # a, b
    second = json.loads(_run(runner, "encode", str(tree), "-r", "-o", str(out), *MODEL, "--json").stdout)  # a, b skipped; c
    headers = run_headers(out / "manifest.jsonl")
    assert [h["run_id"] for h in headers] == [first["run_id"], second["run_id"]] and first["run_id"] != second["run_id"]
    assert headers[1]["settings"]["latent_format"] == "raw" and headers[1]["vaetool_version"] and headers[1]["started"]
    records = read_records(out / "manifest.jsonl")
    assert all(r["run_id"] in (first["run_id"], second["run_id"]) for r in records)
    latest = read_manifest(out / "manifest.jsonl")
    assert sorted(r["key"] for r in latest) == ["a.png", "b.png", "sub/c.png"]  # one record per input
    assert {r["key"]: r["status"] for r in latest} == {"a.png": "skipped", "b.png": "skipped", "sub/c.png": "written"}
    for summary in (first, second):
        mine = [r for r in records if r.get("type") == "item" and r["run_id"] == summary["run_id"]]
        counts = [sum(r["status"] == s for r in mine) for s in ("written", "skipped", "failed")]
        assert counts == [summary["done"], summary["skipped"], len(summary["failed"])]
    assert (second["done"], second["skipped"]) == (1, 2)
