"""Hugging Face repo ids (`ORG/NAME[@REV]`) -> a diffusers folder in the local Hugging Face cache.

The cache is read offline first, through `huggingface_hub` (the optional `hub` extra): a repo whose
snapshot already holds the VAE's config.json and weights is used as it is, without a network call.
Otherwise, unless HF_HUB_OFFLINE=1, only those two files are downloaded into the same cache.
The cache location and offline mode are huggingface_hub's: HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

from vaetool.diffusers_config import folder_files, pick_files
from vaetool.errors import CheckpointError, first_line

__all__ = ["INSTALL_HINT", "RepoRef", "looks_like_repo_id", "parse_repo_id", "resolve_repo"]

INSTALL_HINT = "pip install 'vaetool[hub]'"
REPO_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^\s@]+))?")
# names that are files, not repos, even when no such file exists (the error should say "no such file")
FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".yaml", ".yml", ".json")


class RepoRef(NamedTuple):
    """A repo id and its revision (None: the default branch)."""

    repo: str
    revision: str | None

    @property
    def text(self) -> str:
        """ORG/NAME or ORG/NAME@REV, as the user wrote it."""
        return self.repo + (f"@{self.revision}" if self.revision else "")


def parse_repo_id(text: str) -> RepoRef | None:
    """(repo id, revision) of `ORG/NAME[@REV]`; None for text that is not one (or names a file)."""
    m = REPO_ID.fullmatch(text)
    if m is None or m["repo"].lower().endswith(FILE_SUFFIXES):
        return None
    return RepoRef(m["repo"], m["revision"])


def looks_like_repo_id(text: str | Path) -> bool:
    """Whether a --checkpoint/--model value names a Hugging Face repo: ORG/NAME[@REV] and no such local path."""
    return isinstance(text, str) and parse_repo_id(text) is not None and not Path(text).exists()


def _hub(ref: RepoRef) -> ModuleType:
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(f"no such file or folder; as a Hugging Face repo id it needs huggingface_hub: {INSTALL_HINT}",
                              ref.text) from None
    return huggingface_hub


def _cached(hf: ModuleType, ref: RepoRef, subfolder: str | None) -> tuple[Path | None, CheckpointError | None]:
    """The cached snapshot of `ref` (None when there is none) and why it cannot serve (None when it can)."""
    from huggingface_hub.utils import LocalEntryNotFoundError

    try:
        snapshot = Path(hf.snapshot_download(ref.repo, revision=ref.revision, local_files_only=True))
    except LocalEntryNotFoundError:
        return None, None
    try:
        pick_files(folder_files(snapshot, subfolder), subfolder, f"{ref.text} (cached snapshot {snapshot.name})")
    except CheckpointError as err:
        return snapshot, err
    return snapshot, None


def _download(hf: ModuleType, ref: RepoRef, subfolder: str | None) -> Path:
    """Download only the VAE's config.json and weights of `ref` into the cache; its snapshot folder."""
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        names = hf.HfApi().list_repo_files(ref.repo, revision=ref.revision)
        wanted = pick_files(names, subfolder, ref.text)
        return Path(hf.snapshot_download(ref.repo, revision=ref.revision, allow_patterns=list(wanted)))
    except GatedRepoError:
        raise CheckpointError("a gated repo: accept its terms on huggingface.co and log in (`hf auth login`)", ref.text) from None
    except RepositoryNotFoundError:
        raise CheckpointError("no such repo on the Hugging Face Hub (or it is private: log in with `hf auth login`)", ref.text) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"the repo has no revision {ref.revision!r}", ref.text) from None
    except CheckpointError:
        raise
    except Exception as err:  # network, disk, hub errors: one line
        raise CheckpointError(f"not in the Hugging Face cache, and downloading it failed: {first_line(err)}", ref.text) from None


def resolve_repo(text: str, subfolder: str | None = None) -> tuple[Path, dict[str, str]]:
    """The local snapshot folder of repo id `text` (cache first, then a download when online) and its provenance."""
    ref = parse_repo_id(text)
    if ref is None:
        raise CheckpointError("not a Hugging Face repo id (ORG/NAME or ORG/NAME@REVISION)", text)
    hf = _hub(ref)
    from huggingface_hub.utils import HFValidationError

    try:
        snapshot, problem = _cached(hf, ref, subfolder)
        offline = bool(hf.constants.HF_HUB_OFFLINE)
        if problem is not None and offline:
            raise problem
        if snapshot is None and offline:
            raise CheckpointError(f"no such file or folder, and not in the Hugging Face cache ({hf.constants.HF_HUB_CACHE}); "
                                  "HF_HUB_OFFLINE=1 forbids downloading it", ref.text)
        if snapshot is None or problem is not None:
            snapshot = _download(hf, ref, subfolder)
    except HFValidationError as err:
        raise CheckpointError(f"not a valid Hugging Face repo id: {first_line(err)}", text) from None
    origin = {"repo": ref.repo, "revision": snapshot.name, "requested_revision": ref.revision or "main"}
    return snapshot, origin
