"""The run's file plumbing: input collection (vaetool.io.inputs), atomic writes (atomic) and manifests (manifest)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path, PurePath

import pytest

from vaetool.errors import InputError, OutputError, OutputExistsError
from vaetool.io.atomic import atomic_write, is_temp_name, remove_stale_temps, temp_path
from vaetool.io.inputs import InputFile, collect_inputs, output_path
from vaetool.io.manifest import ManifestWriter, merge_manifests, rank_manifest_path, read_manifest


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """data/{a.png, b.JPG, notes.txt, .hidden.png, sub/c.webp, sub/deep/d.png, .git/e.png}; cwd = tmp_path."""
    for rel in ["a.png", "b.JPG", "notes.txt", ".hidden.png", "sub/c.webp", "sub/deep/d.png", ".git/e.png"]:
        (tmp_path / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / rel).write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _rels(items: list) -> list[str]:
    return [i.rel.as_posix() for i in items]


# ---- inputs ----

def test_folder_top_level_and_recursive(tree: Path) -> None:
    assert _rels(collect_inputs(["data"])) == ["a.png", "b.JPG"]
    found = collect_inputs(["data"], recursive=True)
    assert _rels(found) == ["a.png", "b.JPG", "sub/c.webp", "sub/deep/d.png"]  # hidden names skipped
    assert found[3].path == Path("data/sub/deep/d.png")


def test_files_and_globs(tree: Path) -> None:
    assert _rels(collect_inputs(["data/sub/deep/d.png", "data/notes.txt"])) == ["d.png", "notes.txt"]
    assert _rels(collect_inputs(["data/**/*.png"])) == ["a.png", "sub/deep/d.png"]
    assert _rels(collect_inputs(["data/s*/*"])) == ["sub/c.webp"]
    assert _rels(collect_inputs([str(tree / "data" / "*.png")])) == ["a.png"]


def test_deduplicated_and_sorted(tree: Path) -> None:
    found = collect_inputs(["data/sub", "data/sub/c.webp", "data/sub/*.webp", "./data/sub"], recursive=True)
    assert _rels(found) == ["c.webp", "deep/d.png"]
    forward = collect_inputs(["data/a.png", "data/b.JPG", "data/sub"], recursive=True)
    assert forward == collect_inputs(["data/sub", "data/b.JPG", "data/a.png"], recursive=True)


def test_files_from_file_and_stdin(tree: Path) -> None:
    (tree / "list.txt").write_text("# images to encode\n\ndata/a.png\n  data/sub/deep/d.png  \ndata/sub\n")
    expected = ["c.webp", "data/a.png", "data/sub/deep/d.png"]
    assert _rels(collect_inputs([], files_from="list.txt")) == expected
    stdin = io.StringIO((tree / "list.txt").read_text())
    assert _rels(collect_inputs([], files_from="-", stdin=stdin)) == expected


def test_missing_inputs_are_named(tree: Path) -> None:
    with pytest.raises(InputError, match="^nope.png: no such file or directory$"):
        collect_inputs(["data/a.png", "nope.png"])
    with pytest.raises(InputError, match="data/\\*.gif: no png/.* files match"):
        collect_inputs(["data/*.gif"])
    with pytest.raises(InputError, match="missing.txt: no such file"):
        collect_inputs([], files_from="missing.txt")
    (tree / "list.txt").write_text("data/a.png\ndata/gone.png\n")
    with pytest.raises(InputError, match="^data/gone.png: no such file"):
        collect_inputs([], files_from="list.txt")


def test_output_collisions_refused(tree: Path) -> None:
    (tree / "data" / "a.jpg").write_bytes(b"x")
    shared = {i.rel.as_posix(): output_path(i, "out", ".safetensors").as_posix() for i in collect_inputs(["data"])}
    assert shared["a.png"] == "out/a.png.safetensors" and shared["a.jpg"] == "out/a.jpg.safetensors"  # the stems collide
    assert all(not v.endswith((".png.safetensors", ".jpg.safetensors")) for k, v in shared.items() if not k.startswith("a."))
    (tree / "other").mkdir()
    (tree / "other" / "d.png").write_bytes(b"x")
    assert len(collect_inputs(["data/sub/deep/d.png", "data/sub/../sub/deep/d.png"])) == 1  # same file twice
    with pytest.raises(InputError, match="same output"):
        collect_inputs(["data/sub/deep/d.png", "other/d.png"])


def test_output_path_mirrors_tree(tree: Path) -> None:
    [item] = [i for i in collect_inputs(["data"], recursive=True) if i.rel == PurePath("sub/deep/d.png")]
    assert output_path(item, "out", ".safetensors") == Path("out/sub/deep/d.safetensors")


def test_glob_dotdot_parts_never_leave_the_output_folder(tree: Path) -> None:
    (tree / "up.png").write_bytes(b"x")
    [item] = collect_inputs(["data/*/../../up.png"])  # issue 13 item 1: the glob keeps its `..` parts
    assert item.path == Path("data/sub/../../up.png") and item.rel == PurePath("up.png")
    assert output_path(item, "out", ".safetensors") == Path("out/up.safetensors")
    assert _rels(collect_inputs(["data/sub/../*.png"])) == ["a.png"]  # `..` that stays under the base keeps the tree
    assert _rels(collect_inputs(["data/sub/deep/../../**/d.png"])) == ["sub/deep/d.png"]
    with pytest.raises(InputError, match="cannot mirror"):
        InputFile(Path("x.png"), PurePath("../x.png"))
    with pytest.raises(InputError, match="cannot mirror"):
        InputFile(Path("/x.png"), PurePath("/x.png"))


def test_double_star_follows_each_folder_once(tree: Path) -> None:
    """A symlink loop under a quoted ** glob (issue 13 item 16): every file once, in a bounded walk."""
    (tree / "data" / "sub" / "deep" / "loop").symlink_to("../..")  # data/sub/deep/loop -> data
    (tree / "data" / "sub" / "back").symlink_to("..")
    (tree / "linked").symlink_to("data/sub")  # a second way into one folder
    code = ("from vaetool.io.inputs import collect_inputs\n"
            "print(sorted(i.path.resolve().relative_to(__import__('pathlib').Path.cwd()).as_posix()"
            " for i in collect_inputs(['data/**/*.png', 'data/**', 'linked/**/*.webp'])))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,  # a hang guard, not a timing
                          cwd=tree, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(["data/a.png", "data/b.JPG", "data/sub/c.webp", "data/sub/deep/d.png"])


# ---- atomic writes ----

def test_atomic_write_creates_dirs_and_refuses_existing(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "x.bin"
    atomic_write(target, lambda p: p.write_bytes(b"one"))
    assert target.read_bytes() == b"one"
    with pytest.raises(OutputExistsError) as err:
        atomic_write(target, lambda p: p.write_bytes(b"two"))
    assert isinstance(err.value, FileExistsError) and str(target) in str(err.value)
    atomic_write(target, lambda p: p.write_bytes(b"two"), overwrite=True)
    assert target.read_bytes() == b"two"
    assert os.listdir(target.parent) == ["x.bin"]


def test_atomic_write_leaves_nothing_on_error(tmp_path: Path) -> None:
    def failing(p: Path) -> None:
        p.write_bytes(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(tmp_path / "x.bin", failing)
    assert os.listdir(tmp_path) == []


def test_atomic_write_never_clobbers_a_concurrent_writer(tmp_path: Path) -> None:
    target = tmp_path / "x.bin"

    def racing(p: Path) -> None:  # another process publishes the target while we write
        target.write_bytes(b"theirs")
        p.write_bytes(b"ours")

    with pytest.raises(OutputExistsError):
        atomic_write(target, racing)
    assert target.read_bytes() == b"theirs" and os.listdir(tmp_path) == ["x.bin"]


def test_unwritable_output_dir(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(OutputError, match="cannot create the output directory") as err:
        atomic_write(tmp_path / "file" / "x.bin", lambda p: p.write_bytes(b""))
    assert str(tmp_path / "file") in str(err.value)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user whom chmod does not stop (root)")
        with pytest.raises(OutputError, match="not writable") as err:
            atomic_write(locked / "x.bin", lambda p: p.write_bytes(b""))
        assert str(locked) in str(err.value) and "\n" not in str(err.value)
    finally:
        locked.chmod(0o700)


def test_remove_stale_temps(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    ours = temp_path(tmp_path / "live.png")
    stale = Path(str(temp_path(tmp_path / "sub" / "x.png")).replace(f"-{os.getpid()}-", f"-{int(dead.stdout)}-"))
    stale.parent.mkdir()
    for p in (ours, stale, tmp_path / ".keep.tmp", tmp_path / "x.png"):
        p.write_bytes(b"")
    assert is_temp_name(ours.name) and is_temp_name(stale.name) and not is_temp_name(".keep.tmp")
    assert remove_stale_temps(tmp_path) == 1
    assert not stale.exists() and ours.exists() and (tmp_path / ".keep.tmp").exists()


# ---- manifests ----

def test_manifest_lines_and_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    with ManifestWriter(path) as m:
        m.record("a.png", tmp_path / "a.safetensors", "written", size=10)
        m.record("b.png", None, "failed", error="b.png: truncated")
    first_run = m.run_id
    with path.open("a") as f:
        f.write('{"source": "c.png", "stat')  # killed mid-line
    assert [r["source"] for r in read_manifest(path)] == ["a.png", "b.png"]
    with ManifestWriter(path) as m:  # resume appends whole lines after the torn one
        m.record("c.png", "c.safetensors", "written", size=3, seconds=0.5)
    records = read_manifest(path)
    assert [r["source"] for r in records] == ["a.png", "b.png", "c.png"]
    assert records[1] == {"type": "item", "run_id": first_run, "source": "b.png", "output": None, "size": None, "status": "failed",
                          "error": "b.png: truncated"}
    assert records[2]["run_id"] != first_run  # each writer is a run of its own
    assert records[2]["seconds"] == 0.5
    with ManifestWriter(path, append=False) as m:
        m.write({"source": "only"})
    assert read_manifest(path) == [{"source": "only"}]


def test_merge_rank_parts_is_independent_of_ranks(tmp_path: Path) -> None:
    records = [{"source": f"{c}.png", "output": f"{c}.safetensors", "status": "written"} for c in "edcba"]
    single = tmp_path / "one" / "manifest.jsonl"
    with ManifestWriter(rank_manifest_path(single, 0)) as m:
        for r in records:
            m.write(r)
    two = tmp_path / "two" / "manifest.jsonl"
    for rank in (0, 1):
        with ManifestWriter(rank_manifest_path(two, rank)) as m:
            for r in records[rank::2]:
                m.write(r)
    assert rank_manifest_path(two, 1).name == "manifest.rank1.jsonl"
    merged = merge_manifests(two)
    assert [r["source"] for r in merged] == ["a.png", "b.png", "c.png", "d.png", "e.png"]
    merge_manifests(single)
    assert single.read_bytes() == two.read_bytes()
    assert sorted(os.listdir(two.parent)) == ["manifest.jsonl"]
    assert json.loads(two.read_text().splitlines()[0])["source"] == "a.png"
