"""vaetool.io.latents and shards: every latent file format users have, metadata, bad files, shards and resume."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch

from vaetool.errors import InputError, OutputExistsError
from vaetool.io.latents import LatentItem, check_channels, load_latents, save_latent
from vaetool.io.shards import ShardWriter, load_shard, merge_shard_indexes, rank_index_name, read_index

GEN = torch.Generator().manual_seed(0)


def _z(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN)


def _bad(path: Path, match: str) -> None:
    with pytest.raises(InputError, match=match) as err:
        load_latents(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


# ---- vaetool files ----

def test_save_load_round_trip_with_typed_metadata(tmp_path: Path) -> None:
    z = _z(4, 6, 5)
    meta: dict[str, Any] = {"family": "sd1", "scaled": True, "original_size": [48, 40], "scale": 0.18215,
                            "seed": None, "nested": {"a": [1, 2]}, "looks_like_json": "123"}
    save_latent(tmp_path / "sub" / "a.safetensors", z, meta)
    [item] = load_latents(tmp_path / "sub" / "a.safetensors")
    assert item.name == "a" and item.source == tmp_path / "sub" / "a.safetensors"
    assert torch.equal(item.latent, z) and item.latent.dtype == torch.float32
    assert item.metadata == meta  # "123" stays a string, the rest decode to their types
    with safetensors.safe_open(str(tmp_path / "sub" / "a.safetensors"), "pt") as f:
        header = f.metadata()
        assert list(f.keys()) == ["latent"]
    assert header["format"] == "vaetool.latent" and header["format_version"] == "1"
    assert header["family"] == "sd1" and json.loads(header["original_size"]) == [48, 40]


def test_save_refuses_existing_unless_overwrite(tmp_path: Path) -> None:
    save_latent(tmp_path / "a.safetensors", _z(4, 2, 2), {"v": 1})
    with pytest.raises(OutputExistsError, match="already exists"):
        save_latent(tmp_path / "a.safetensors", _z(4, 2, 2), {"v": 2})
    assert load_latents(tmp_path / "a.safetensors")[0].metadata == {"v": 1}
    save_latent(tmp_path / "a.safetensors", _z(4, 2, 2), {"v": 2}, overwrite=True)
    assert load_latents(tmp_path / "a.safetensors")[0].metadata == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_batch_becomes_items(tmp_path: Path) -> None:
    z = _z(3, 16, 2, 2)
    save_latent(tmp_path / "b.safetensors", z, {})
    items = load_latents(tmp_path / "b.safetensors")
    assert [i.name for i in items] == ["b_0", "b_1", "b_2"]
    assert all(torch.equal(i.latent, z[k]) for k, i in enumerate(items))


def test_half_precision_is_read_as_float32(tmp_path: Path) -> None:
    save_latent(tmp_path / "h.safetensors", _z(4, 3, 3).half(), {})
    assert load_latents(tmp_path / "h.safetensors")[0].latent.dtype == torch.float32


# ---- other tools' files ----

def test_comfyui_latent(tmp_path: Path) -> None:
    z = _z(1, 4, 3, 3)
    safetensors.torch.save_file({"latent_tensor": z, "latent_format_version_0": torch.tensor([])},
                                str(tmp_path / "c.latent"), metadata={"prompt": "{}"})
    [item] = load_latents(tmp_path / "c.latent")
    assert item.name == "c" and torch.equal(item.latent, z[0])
    assert item.metadata["scaled"] is False and item.metadata["source_format"] == "comfyui"
    assert item.metadata["prompt"] == "{}"
    safetensors.torch.save_file({"latent_tensor": z * 0.18215}, str(tmp_path / "old.latent"))
    [legacy] = load_latents(tmp_path / "old.latent")
    torch.testing.assert_close(legacy.latent, z[0])  # legacy files hold raw * 0.18215
    assert legacy.metadata["scaled"] is False


def test_sd_scripts_npz(tmp_path: Path) -> None:
    z = _z(4, 8, 6).numpy()
    np.savez(tmp_path / "a.npz", latents=z, original_size=np.array([50, 70]), crop_ltrb=np.array([1, 2, 49, 66]),
             latents_flipped=z[..., ::-1])
    [item] = load_latents(tmp_path / "a.npz")
    assert item.name == "a" and np.array_equal(item.latent.numpy(), z)
    assert item.metadata == {"source_format": "sd-scripts", "scaled": False,
                             "sd_scripts_original_size": [50, 70], "sd_scripts_crop_ltrb": [1, 2, 49, 66]}
    np.savez(tmp_path / "multi.npz", latents_8x6=z, original_size_8x6=np.array([50, 70]),
             latents_4x4=_z(4, 4, 4).numpy())
    assert [i.name for i in load_latents(tmp_path / "multi.npz")] == ["multi_4x4", "multi_8x6"]


def test_npy_and_pt(tmp_path: Path) -> None:
    z = _z(2, 4, 3, 3)
    np.save(tmp_path / "a.npy", z.numpy())
    assert [i.name for i in load_latents(tmp_path / "a.npy")] == ["a_0", "a_1"]
    torch.save(z[0], tmp_path / "bare.pt")
    assert torch.equal(load_latents(tmp_path / "bare.pt")[0].latent, z[0])
    torch.save({"samples": z[:1]}, tmp_path / "comfy.pth")
    [comfy] = load_latents(tmp_path / "comfy.pth")
    assert comfy.metadata["scaled"] is False and torch.equal(comfy.latent, z[0])
    torch.save({"latents": z, "step": 3}, tmp_path / "d.pt")
    items = load_latents(tmp_path / "d.pt")
    assert len(items) == 2 and "scaled" not in items[0].metadata  # unknown: the caller decides


# ---- bad files ----

def test_nan_inf_rank_and_missing_tensor(tmp_path: Path) -> None:
    z = _z(4, 3, 3)
    z[1, 1, 1] = float("nan")
    np.save(tmp_path / "nan.npy", z.numpy())
    _bad(tmp_path / "nan.npy", "contains NaN")
    z[1, 1, 1] = float("inf")
    torch.save(z, tmp_path / "inf.pt")
    _bad(tmp_path / "inf.pt", "contains Inf")
    np.save(tmp_path / "flat.npy", np.zeros(16, np.float32))
    _bad(tmp_path / "flat.npy", r"shape \(16,\); expected \[C, h, w\]")
    safetensors.torch.save_file({"w": torch.zeros(3), "b": torch.zeros(2, 2)}, str(tmp_path / "x.safetensors"))
    _bad(tmp_path / "x.safetensors", "no latent tensor inside")
    torch.save({"weights": z}, tmp_path / "w.pt")
    _bad(tmp_path / "w.pt", "no latent tensor inside")
    np.savez(tmp_path / "n.npz", a=np.zeros(3), b=np.zeros(3))
    _bad(tmp_path / "n.npz", "no latent array inside")


def test_empty_truncated_and_corrupt(tmp_path: Path) -> None:
    (tmp_path / "e.safetensors").write_bytes(b"")
    _bad(tmp_path / "e.safetensors", "empty file")
    _bad(tmp_path / "missing.npy", "no such file")
    save_latent(tmp_path / "a.safetensors", _z(4, 8, 8), {})
    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-100])
    _bad(tmp_path / "t.safetensors", "truncated safetensors")
    (tmp_path / "g.latent").write_bytes(b"\xff" * 64)
    _bad(tmp_path / "g.latent", "corrupt safetensors")
    np.savez(tmp_path / "a.npz", latents=_z(4, 8, 8).numpy())
    (tmp_path / "t.npz").write_bytes((tmp_path / "a.npz").read_bytes()[:200])
    _bad(tmp_path / "t.npz", "truncated or corrupt .npz")
    torch.save(_z(4, 8, 8), tmp_path / "a.pt")
    (tmp_path / "t.pt").write_bytes((tmp_path / "a.pt").read_bytes()[:300])
    _bad(tmp_path / "t.pt", "truncated or corrupt torch file")
    (tmp_path / "a.txt").write_text("x")
    _bad(tmp_path / "a.txt", "unsupported latent file type")


class _Payload:
    """Unpickling this would create a marker file: the loader must refuse it before that happens."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.makedirs, (str(self.marker),))


def test_unsafe_pickle_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"latent": _z(4, 2, 2), "x": _Payload(marker)}, tmp_path / "evil.pt")
    _bad(tmp_path / "evil.pt", "unsafe pickle.*refusing")
    assert not marker.exists()
    np.save(tmp_path / "obj.npy", np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    _bad(tmp_path / "obj.npy", "pickled objects; refusing")
    assert not marker.exists()


def test_check_channels(tmp_path: Path) -> None:
    item = LatentItem("a", _z(16, 2, 2), {}, tmp_path / "a.safetensors")
    check_channels(item, 16)
    with pytest.raises(InputError, match="has 16 channels but the model takes 4") as err:
        check_channels(item, 4)
    assert str(tmp_path / "a.safetensors") in str(err.value)


# ---- shards ----

def _fill(writer: ShardWriter, keys: list[str]) -> dict[str, torch.Tensor]:
    latents = {k: _z(4, 2, 3) for k in keys}
    for k, z in latents.items():
        writer.add(k, z, {"source": f"{k}.png", "size": [16, 24]})
    return latents


def test_shards_write_index_and_load(tmp_path: Path) -> None:
    out = tmp_path / "shards"
    with ShardWriter(out, 2) as writer:
        latents = _fill(writer, ["a", "b", "c", "d", "e"])
    assert sorted(p.name for p in out.iterdir()) == [
        "index.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    index = read_index(out / "index.json")["items"]
    assert index["e"] == {"shard": "shard-00002.safetensors", "shape": [4, 2, 3]}
    items = load_latents(out)
    assert [i.name for i in items] == ["a", "b", "c", "d", "e"]
    assert all(torch.equal(i.latent, latents[i.name]) for i in items)
    assert items[0].metadata == {"source": "a.png", "size": [16, 24]}
    assert [i.name for i in load_latents(out / "shard-00001.safetensors")] == ["c", "d"]
    assert [i.name for i in load_shard(out / "shard-00002.safetensors")] == ["e"]


def test_shards_resume_after_lost_index_and_refuse_duplicates(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, 2) as writer:
        _fill(writer, ["a", "b", "c"])
    (tmp_path / "index.json").unlink()  # killed between a shard and its index update
    with ShardWriter(tmp_path, 2) as writer:
        assert writer.done_keys() == {"a", "b", "c"}
        with pytest.raises(OutputExistsError, match="'b' is already in shard-00000"):
            writer.add("b", _z(4, 2, 3), {})
        _fill(writer, ["d"])
    assert sorted(read_index(tmp_path / "index.json")["items"]) == ["a", "b", "c", "d"]
    assert (tmp_path / "shard-00002.safetensors").exists()
    with ShardWriter(tmp_path, 2, overwrite=True) as writer:
        assert writer.done_keys() == set()
        _fill(writer, ["z"])
    assert [i.name for i in load_latents(tmp_path)] == ["z"]


def test_rank_indexes_merge_into_index_json(tmp_path: Path) -> None:
    for rank, keys in ((1, ["b", "d"]), (0, ["a", "c"])):
        with ShardWriter(tmp_path, 1, prefix=f"rank{rank}", index_name=rank_index_name(rank)) as writer:
            _fill(writer, keys)
    merged = merge_shard_indexes(tmp_path)
    assert read_index(tmp_path / "index.json") == merged
    assert {k: v["shard"] for k, v in merged["items"].items()} == {
        "a": "rank0-00000.safetensors", "b": "rank1-00000.safetensors",
        "c": "rank0-00001.safetensors", "d": "rank1-00001.safetensors"}
    with ShardWriter(tmp_path, 1) as single:  # a later single-process run resumes from the merged index
        assert single.done_keys() == {"a", "b", "c", "d"}
    assert sorted(tmp_path.glob("index.rank*.json")) == [tmp_path / "index.rank0.json", tmp_path / "index.rank1.json"]


def test_shard_writer_keeps_complete_items_when_the_run_fails(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, 10) as writer:
        _fill(writer, ["a", "b"])
        raise RuntimeError("model crashed")
    assert [i.name for i in load_latents(tmp_path)] == ["a", "b"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
