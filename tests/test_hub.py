"""Hugging Face repo ids: `--checkpoint ORG/NAME[@REV]` and `-m ORG/NAME` from a local cache, offline.

The cache is built by hand in the layout huggingface_hub reads (models--ORG--NAME/refs, snapshots,
blobs) under a temporary HF_HOME/HF_HUB_CACHE, with HF_HUB_OFFLINE=1: no test touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers_helpers import kl, rgb, save

from vaetool.api import load_vae
from vaetool.cli import app
from vaetool.errors import CheckpointError, UsageError
from vaetool.hub import INSTALL_HINT, looks_like_repo_id, parse_repo_id, resolve_repo
from vaetool.io.images import read_png_text
from vaetool.io.latents import save_latent
from vaetool.jobs import ModelSpec, load_model

REPO = Path(__file__).resolve().parent.parent
CPU = ["--device", "cpu", "--quiet"]
COMMIT, OLD_COMMIT = "a" * 40, "b" * 40


def _snapshot(cache: Path, repo: str, commit: str, files: dict[str, Path], refs: tuple[str, ...] = ()) -> Path:
    """models--ORG--NAME/snapshots/COMMIT/<files> as symlinks into blobs/, and refs/<ref> = COMMIT."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    for rel, source in files.items():
        data = source.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (root / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def vaes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """Two tiny diffusers VAE folders ("new" and "old") and their models."""
    pytest.importorskip("huggingface_hub", reason="the hub path needs huggingface_hub (pip install 'vaetool[hub]')")
    pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("vaes")
    new, old = kl(), kl(scaling_factor=0.5)
    with torch.no_grad():
        old.decoder.conv_out.bias.add_(0.5)  # a different revision: different weights
    return {"new": (new, save(new, root / "new")), "old": (old, save(old, root / "old"))}


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vaes) -> Path:
    """A Hugging Face cache with org/vae (main -> COMMIT, tag v1 -> OLD_COMMIT) and the pipeline org/pipe; offline."""
    import huggingface_hub as hub

    cache = tmp_path / "hf" / "hub"
    new, old = vaes["new"][1], vaes["old"][1]
    files = {name: new / name for name in ("config.json", "diffusion_pytorch_model.safetensors")}
    _snapshot(cache, "org/vae", COMMIT, files, ("main",))
    _snapshot(cache, "org/vae", OLD_COMMIT, {name: old / name for name in files}, ("v1",))
    index = tmp_path / "model_index.json"
    index.write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    _snapshot(cache, "org/pipe", COMMIT, {"model_index.json": index} | {f"vae/{n}": p for n, p in files.items()}, ("main",))
    _snapshot(cache, "org/unet-only", COMMIT, {"model_index.json": index}, ("main",))
    for key, value in {"HF_HOME": tmp_path / "hf", "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, str(value))
    # huggingface_hub reads the variables once, at import: set what it read too (a subprocess test checks the variables alone)
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def _z(seed: int = 0) -> torch.Tensor:
    return torch.randn((1, 4, 3, 5), generator=torch.Generator().manual_seed(seed))  # [B, C, h, w]


# ---------------------------------------------------------------- repo ids


def test_repo_id_syntax(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_repo_id("stabilityai/sdxl-vae") == ("stabilityai/sdxl-vae", None)
    assert parse_repo_id("madebyollin/sdxl-vae-fp16-fix@refs/pr/3") == ("madebyollin/sdxl-vae-fp16-fix", "refs/pr/3")
    for text in ("sdxl", "a/b/c", "models/vae.safetensors", "configs/x.yaml", "./a/b", "/abs/path", "a/b@", "org/name@x@y"):
        assert parse_repo_id(text) is None, text
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # an existing path is a path, even when it reads like a repo id
    assert not looks_like_repo_id("org/name") and looks_like_repo_id("org/other")


# ---------------------------------------------------------------- from the cache, offline


def test_cli_decode_from_a_cached_repo(runner, tmp_path: Path, hf_cache: Path, vaes) -> None:
    ref = vaes["new"][0]
    save_latent(tmp_path / "lat" / "z.safetensors", _z()[0], {"latent_format": "raw"})
    for how in (["--checkpoint", "org/vae"], ["-m", "org/vae"], ["-m", "org/pipe"], ["--checkpoint", f"org/vae@{COMMIT}"]):
        out = tmp_path / "out" / how[1].replace("/", "_").replace("@", "_")
        result = runner.invoke(app, ["decode", str(tmp_path / "lat"), "-o", str(out), *how, "--16bit", *CPU])
        assert result.exit_code == 0, (how, result.output)
        model = json.loads(read_png_text(out / "z.png")["vaetool.model"])
        assert model["repo"] == f"org/{'pipe' if 'pipe' in how[1] else 'vae'}@{COMMIT}", model
    from vaetool.io.images import load_image

    with torch.no_grad():
        expected = ref.decode(_z()).sample[0].clamp(-1, 1)
    torch.testing.assert_close(load_image(out / "z.png"), expected, atol=1e-4, rtol=0)


def test_revisions_by_tag_and_commit(hf_cache: Path, vaes) -> None:
    (new, _), (old, _) = vaes["new"], vaes["old"]
    with torch.no_grad():
        for text, ref in (("org/vae", new), ("org/vae@main", new), ("org/vae@v1", old), (f"org/vae@{OLD_COMMIT}", old)):
            vae = load_vae(checkpoint=text)
            torch.testing.assert_close(vae.decode(_z(), clamp=False), ref.decode(_z()).sample, atol=1e-4, rtol=0)
            assert vae.source["revision"] == (COMMIT if ref is new else OLD_COMMIT)
    assert load_vae(checkpoint="org/vae@v1").latent_format.scale == 0.5  # that revision's config.json


def test_api_and_jobs_take_repo_ids(hf_cache: Path) -> None:
    vae = load_vae(checkpoint="org/pipe")
    assert (vae.source["repo"], vae.source["subfolder"], vae.source["requested_revision"]) == ("org/pipe", "vae", "main")
    assert Path(vae.source["checkpoint"]).parent.name == "vae"
    assert load_model(ModelSpec(model="org/pipe", device="cpu")).source["repo"] == "org/pipe"
    with pytest.raises(UsageError, match="--model org/vae names a Hugging Face repo and --checkpoint another model"):
        load_model(ModelSpec(model="org/vae", checkpoint="org/pipe", device="cpu"))
    with pytest.raises(CheckpointError, match=r"no unet/config\.json \(the --subfolder given\)"):
        load_vae(checkpoint="org/pipe", subfolder="unet")


def test_missing_from_the_cache_offline(runner, tmp_path: Path, hf_cache: Path) -> None:
    image = rgb(tmp_path / "a.png", 16, 16)
    cases = {
        "org/absent": "error: org/absent: no such file or folder, and not in the Hugging Face cache",
        "org/vae@v9": "error: org/vae@v9: no such file or folder, and not in the Hugging Face cache",
        "org/unet-only": "error: org/unet-only (cached snapshot " + COMMIT + "): a pipeline folder without vae/config.json",
    }
    for repo, message in cases.items():
        result = runner.invoke(app, ["encode", str(image), "-o", str(tmp_path / "out"), "--checkpoint", repo, *CPU])
        assert result.exit_code == 2, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(message), result.stderr
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in runner.invoke(app, ["info", "org/absent"]).stderr


def test_env_variables_alone_point_at_the_cache(tmp_path: Path, hf_cache: Path) -> None:
    """A fresh process reads HF_HUB_CACHE and HF_HUB_OFFLINE as huggingface_hub does (nothing patched)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "vaetool", "info", "org/vae@v1", "--json"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert (info["repo"], info["revision"], info["latent_format"]["scale"]) == ("org/vae", OLD_COMMIT, 0.5)


# ---------------------------------------------------------------- downloading (huggingface_hub stood in for: no network)


def test_online_downloads_only_the_vae_files(tmp_path: Path, hf_cache: Path, monkeypatch: pytest.MonkeyPatch, vaes) -> None:
    """Not in the cache and online: the repo is listed, and only the VAE's config.json and weights are fetched."""
    import huggingface_hub

    remote = {"model_index.json": "{}", "unet/config.json": "{}", "unet/diffusion_pytorch_model.safetensors": "",
              "vae/config.json": "", "vae/diffusion_pytorch_model.safetensors": "", "vae/diffusion_pytorch_model.fp16.safetensors": ""}
    requested: list[list[str]] = []
    cached_lookup = huggingface_hub.snapshot_download

    def snapshot_download(repo_id: str, *, revision: str | None = None, local_files_only: bool = False,
                          allow_patterns: list[str] | None = None) -> str:
        if local_files_only:  # the real cache lookup
            return cached_lookup(repo_id, revision=revision, local_files_only=True)
        requested.append(sorted(allow_patterns or []))
        files = {p: vaes["new"][1] / Path(p).name for p in allow_patterns or []}
        return str(_snapshot(hf_cache, repo_id, "c" * 40, files, ("main",)))

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, revision=None: list(remote))
    snapshot, origin = resolve_repo("org/remote-pipe")
    assert requested == [["vae/config.json", "vae/diffusion_pytorch_model.safetensors"]]
    assert origin == {"repo": "org/remote-pipe", "revision": "c" * 40, "requested_revision": "main"}
    assert load_vae(checkpoint="org/remote-pipe").source["revision"] == "c" * 40  # now cached: no second download
    assert len(requested) == 1 and (snapshot / "vae" / "config.json").exists()


# ---------------------------------------------------------------- without the extra


def test_without_huggingface_hub_the_error_says_how_to_install_it(runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import huggingface_hub now raises ImportError
    with pytest.raises(CheckpointError, match="org/vae: no such file or folder; as a Hugging Face repo id it needs huggingface_hub"):
        load_vae(checkpoint="org/vae")
    image = rgb(tmp_path / "a.png", 16, 16)
    result = runner.invoke(app, ["encode", str(image), "-o", str(tmp_path / "out"), "-m", "org/vae", *CPU])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: org/vae: no such file or folder; as a Hugging Face repo id it needs "
                                                  f"huggingface_hub: {INSTALL_HINT}"]
